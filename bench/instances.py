"""Every core busy: a ResNet-style CNN served with one execution instance against one per usable
core, JSON and binary tensors, against the all-cores in-process ceiling.

One run:
  1. builds a ResNet-style CNN nobody here trained (torch, seeded random weights, 3x32x32 -> 10,
     ~50 M multiply-adds an image), exports it to ONNX and imports it into a temp registry;
  2. measures the ceiling at batch 32 in process: ONNX Runtime with one thread, with one thread
     per core run side by side on one session, and with one session of as many intra-op threads as
     cores; the ceiling is the best of the last two (what the hardware does);
  3. for each server setting (`--instances 1`, then `--instances CORES`), starts `zooserve serve` and drives
     it closed-loop (bench/classify.py's load generator) with v2 JSON bodies (~20 KB) and with the
     binary tensor extension, at each concurrency level;
  4. prints req/s, p50/p99, server CPU per request, mean batch and the share of the ceiling, and
     the targets of issue 16: >= 0.70x the ceiling with JSON and >= 0.85x with binary tensors at
     32-128 concurrent, p99 no worse than one instance, no loss at concurrency 1.

    .venv/bin/python bench/instances.py [--duration 5] [--concurrency 1 32 128] [--workers N] [--out FILE.json]

`--workers N` adds a third server setting, `zooserve serve --workers N` (N processes on one port,
each with its default instances), judged against the same targets.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify import (REPO_ROOT, HelpFormatter, LevelResult, Server, environment,  # noqa: E402
                      event_loop_factory, run_level, zooserve_cmd)

MODEL = "cnn"
BATCH = 32
JSON_TARGET, BINARY_TARGET = 0.70, 0.85


def build_cnn(work: Path, registry: Path) -> Path:
    """A small ResNet (stem, three basic blocks, 32 -> 64 channels), exported with a dynamic batch
    and imported into `registry` as `cnn`; returns the ONNX file."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
            self.skip = nn.Conv2d(cin, cout, 1, stride) if (cin, stride) != (cout, 1) else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.skip(x))

    torch.manual_seed(0)
    model = nn.Sequential(                                              # (B, 3, 32, 32)
        nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(),                           # (B, 32, 32, 32)  0.9 M MACs
        Block(32, 32, 1),                                               # (B, 32, 32, 32)  18.9 M
        Block(32, 64, 2),                                               # (B, 64, 16, 16)  14.6 M
        Block(64, 64, 1),                                               # (B, 64, 16, 16)  18.9 M
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),      # (B, 10)
    ).eval()
    onnx_path = work / "cnn.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(onnx_path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    subprocess.run([*zooserve_cmd(), "registry", "import", "--registry", str(registry), MODEL, str(onnx_path)],
                   cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return onnx_path


def images(count: int = 256) -> np.ndarray:
    """Real pictures at the CNN's size: scikit-learn digits upscaled to 32x32, three channels, in
    [0, 1] with 3 decimals (what a client sends as JSON: ~20 KB a request). (count, 3, 32, 32)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count] / 16.0                     # (count, 8, 8)
    big = digits.repeat(4, axis=1).repeat(4, axis=2)                 # (count, 32, 32)
    rgb = np.stack([big, big * 0.5, 1 - big], axis=1)                # (count, 3, 32, 32)
    return np.round(rgb, 3).astype(np.float32)


def json_request(host: str, port: int, image: np.ndarray) -> bytes:
    import orjson

    body = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                     "data": [round(float(v), 3) for v in image.reshape(-1)]}]})
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def binary_request(host: str, port: int, image: np.ndarray) -> bytes:
    """The v2 binary tensor extension: a JSON header, then the raw FP32 bytes; the output asked binary too."""
    import orjson

    raw = np.ascontiguousarray(image, dtype="<f4").tobytes()
    header = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(header) + len(raw)}\r\n\r\n")
    return head.encode() + header + raw


def ceiling(onnx_path: Path, batch: np.ndarray, cores: int, seconds: float) -> dict[str, float]:
    """Images/s at batch 32 in process, best of three windows each: one thread; `cores` callers of
    one one-thread session; one session with `cores` intra-op threads."""
    import onnxruntime as ort

    def session(threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def rate(sess, callers: int) -> float:
        sess.run(None, {"image": batch})
        best = 0.0
        for _ in range(3):
            counts, stop = [0] * callers, time.perf_counter() + seconds / 3

            def work(i: int) -> None:
                while time.perf_counter() < stop:
                    sess.run(None, {"image": batch})
                    counts[i] += 1
            started = time.perf_counter()
            threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            best = max(best, sum(counts) * len(batch) / (time.perf_counter() - started))
        return best

    one = session(1)
    result = {"one_thread": rate(one, 1), "instances": rate(one, cores), "intra_op": rate(session(cores), 1)}
    result["ceiling"] = max(result["instances"], result["intra_op"])
    return result


async def drive(server: Server, bodies: dict[str, list[bytes]], levels: list[int], warmup_s: float,
                duration_s: float) -> dict[str, list[LevelResult]]:
    results: dict[str, list[LevelResult]] = {}
    for encoding, requests in bodies.items():
        for i, concurrency in enumerate(levels):
            r = await run_level(server, MODEL, requests, concurrency, warmup_s, duration_s, i)
            print(f"[bench]   {encoding:6} c={concurrency:<4} {r.throughput_rps:7,.0f} req/s  p99 {r.p99_ms:7.2f} ms  "
                  f"server CPU {r.server_cpu_ms_per_req:.3f} ms/req (loop {r.loop_cpu_ms_per_req:.3f})  mean batch {(r.mean_batch or 0):5.2f}  "
                  f"non-200 {r.non_200}", flush=True)
            results.setdefault(encoding, []).append(r)
    return results


def report(ceil: dict[str, float], cores: int, runs: dict[str, dict[str, list[LevelResult]]]) -> list[str]:
    """The table and the targets; returns the targets missed."""
    print()
    print(f"Ceiling at batch {BATCH}, in process: one thread {ceil['one_thread']:,.0f} img/s; {cores} one-thread "
          f"callers of one session {ceil['instances']:,.0f}; one session with {cores} intra-op threads "
          f"{ceil['intra_op']:,.0f}; ceiling {ceil['ceiling']:,.0f}")
    # CPU-ms of model work per image: one thread's rate (a busy machine lowers the all-cores
    # ceiling, not what one core does)
    model_ms = 1000 / ceil["one_thread"]
    # "event loop": the server's main thread alone; "other threads": the rest of the server, the
    # instances' model runs above all, against one thread's model work alone (contention shows there)
    print("| server | body | concurrency | req/s | share of ceiling | p50 ms | p99 ms | server CPU ms/req | "
          "of which not the model | event loop ms/req | other threads ms/req | client CPU ms/req | mean batch | non-200 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting, by_encoding in runs.items():
        for encoding, levels in by_encoding.items():
            for r in levels:
                print(f"| {setting} | {encoding} | {r.concurrency} | {r.throughput_rps:,.0f} | "
                      f"{r.throughput_rps / ceil['ceiling']:.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                      f"{r.server_cpu_ms_per_req:.3f} | {r.server_cpu_ms_per_req - model_ms:.3f} | "
                      f"{r.loop_cpu_ms_per_req:.3f} | {r.server_cpu_ms_per_req - r.loop_cpu_ms_per_req:.3f} | "
                      f"{r.client_cpu_ms_per_req:.3f} | {(r.mean_batch or 0):.2f} | {r.non_200} |")
    print()
    # The load generator shares the cores: with a server that cost nothing beyond the model, the
    # machine still could not pass cores / (model + client CPU per request); and a target share T
    # leaves the server cores / (T x ceiling) - model - client of CPU per request for all the rest
    # (HTTP, decoding, batching, answering).
    print(f"Model work {model_ms:.3f} CPU-ms an image (one thread). With the load generator on the same {cores} cores:")
    for encoding, target in (("json", JSON_TARGET), ("binary", BINARY_TARGET)):
        busiest = [r for by in runs.values() for r in by.get(encoding, []) if r.concurrency >= 32]
        if not busiest:
            continue
        client_ms = min(r.client_cpu_ms_per_req for r in busiest)
        overhead = min(r.server_cpu_ms_per_req for r in busiest) - model_ms
        bound = min(1.0, cores * 1000 / (model_ms + client_ms) / ceil["ceiling"])
        budget = cores * 1000 / (target * ceil["ceiling"]) - model_ms - client_ms
        print(f"  {encoding}: a server costing nothing beyond the model reaches at most {bound:.2f}x the ceiling "
              f"(client {client_ms:.3f} ms/req); {target:.2f}x leaves the server {budget:.3f} ms/req beyond the model, "
              f"measured {overhead:.3f}")
    print()
    base = runs["instances 1"]
    missed = []
    for setting, by_encoding in runs.items():
        if setting == "instances 1":
            continue
        for encoding, target in (("json", JSON_TARGET), ("binary", BINARY_TARGET)):
            for r, old in zip(by_encoding[encoding], base[encoding]):
                share = r.throughput_rps / ceil["ceiling"]
                where = f"{setting}, {encoding} c={r.concurrency}"
                if r.concurrency >= 32:
                    ok = share >= target
                    print(f"target {where} >= {target:.2f}x ceiling: {'met' if ok else 'MISSED'} "
                          f"({share:.2f}x; one instance {old.throughput_rps / ceil['ceiling']:.2f}x)")
                    missed += [] if ok else [f"{where} share"]
                    ok = r.p99_ms <= old.p99_ms * 1.1
                    print(f"target {where} p99 no worse than one instance (10% noise allowed): "
                          f"{'met' if ok else 'MISSED'} ({r.p99_ms:.1f} ms against {old.p99_ms:.1f} ms)")
                    missed += [] if ok else [f"{where} p99"]
                elif r.concurrency == 1:
                    ok = r.throughput_rps >= old.throughput_rps * 0.9
                    print(f"target {where} no loss (10% noise allowed): {'met' if ok else 'MISSED'} "
                          f"({r.throughput_rps:,.0f} against {old.throughput_rps:,.0f} req/s)")
                    missed += [] if ok else [f"{where} c=1"]
    return missed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.5, help="warm-up seconds before each level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128], help="closed-loop connections per level")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per ceiling variant")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp registry and server logs")
    p.add_argument("--workers", type=int, default=1, help="also measure `zooserve serve --workers N` (each worker "
                   "with its default instances; judged against the targets too)")
    args = p.parse_args(argv)
    from serve.instances import usable_cores

    cores = usable_cores()
    work = Path(tempfile.mkdtemp(prefix="zooserve-instances-"))
    try:
        registry = work / "registry"
        print("[bench] building the CNN and importing it ...", flush=True)
        onnx_path = build_cnn(work, registry)
        pictures = images()
        ceil = ceiling(onnx_path, pictures[:BATCH], cores, args.ceiling_seconds)
        print(f"[bench] ceiling {ceil['ceiling']:,.0f} img/s ({cores} usable cores)", flush=True)
        loop_factory, loop_name = event_loop_factory("auto")
        runs: dict[str, dict[str, list[LevelResult]]] = {}
        settings = [("instances 1", ["--instances", "1"]), ("one per core", ["--instances", str(cores)])]
        if args.workers > 1:
            settings.append((f"{args.workers} workers", ["--workers", str(args.workers)]))
        for setting, extra in settings:
            server = Server(registry, 1, work / f"server-{len(runs)}.log", extra)
            try:
                server.wait_ready()
                print(f"[bench] {setting}: server pid {server.proc.pid}", flush=True)
                bodies = {"json": [json_request(server.host, server.port, x) for x in pictures],
                          "binary": [binary_request(server.host, server.port, x) for x in pictures]}
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    runs[setting] = runner.run(drive(server, bodies, args.concurrency, args.warmup, args.duration))
            finally:
                server.stop()
        json_kb = np.mean([len(b) for b in bodies["json"]]) / 1024
        print(f"[bench] mean JSON request {json_kb:.1f} KB; load generator on {loop_name}")
        missed = report(ceil, cores, runs)
        if args.out is not None:
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(),
                "usable_cores": cores, "ceiling": ceil, "json_request_kb": json_kb, "missed": missed,
                "runs": {s: {e: [vars(r) for r in levels] for e, levels in by.items()} for s, by in runs.items()},
            }, indent=2))
            print(f"[bench] wrote {args.out}")
        return 0
    finally:
        if args.keep:
            print(f"[bench] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
