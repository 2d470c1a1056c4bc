"""KServe v2 over gRPC beside HTTP on the CNN: one server, one model, the same closed loop, both protocols.

One run:
  1. builds a registry with `zooserve demo` in a temp dir (or reuses `--registry`);
  2. starts `zooserve serve --threads 1 --grpc-port P` on free loopback ports (one process serves both);
  3. at each concurrency level, taking turns `--rounds` times: HTTP through bench/classify.py's raw
     keep-alive HTTP/1.1 client (a JSON body per digit, one connection per client), then gRPC over one
     channel (HTTP/2, as gRPC clients run) with the stock `tritonclient.grpc.aio` client (raw tensor
     contents), or with `--grpc-client stub` the generated stub sending requests serialized
     beforehand, so that the client's own cost is as small as the HTTP side's;
  4. prints req/s, p50/p99, server CPU and client CPU per request for each, and the gRPC / HTTP ratios.

    .venv/bin/python bench/classify_grpc.py [--model resnet-digits] [--registry DIR] [--duration 10]
                                            [--concurrency 1 16 64] [--grpc-client tritonclient|stub]
                                            [--out FILE.json]

Both clients run on the plain asyncio loop (grpc.aio brings its own integration with it; uvloop is
left out so that neither side gets it). On a small machine the client shares the cores with the
server: read the client CPU column before reading the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classify  # noqa: E402  (bench/classify.py: registry, server process, the HTTP closed loop)

SERVICE = "/inference.GRPCInferenceService/ModelInfer"


def grpc_payloads(model: str, images: np.ndarray) -> list:
    """One ModelInferRequest per digit (1, 1, 8, 8) FP32 in raw_input_contents, as the stock client sends."""
    from tritonclient.grpc import service_pb2 as pb

    requests = []
    for image in images:
        request = pb.ModelInferRequest(model_name=model, raw_input_contents=[image.reshape(1, 1, 8, 8).tobytes()])
        request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
        requests.append(request)
    return requests


async def grpc_level(server: classify.Server, address: str, model: str, images: np.ndarray, concurrency: int,
                     warmup_s: float, duration_s: float, seed: int, client_kind: str) -> dict:
    """Closed loop over one gRPC channel: `concurrency` callers each send the next request as soon as the
    last is answered. Same measures as bench/classify.py's HTTP levels."""
    import grpc
    import tritonclient.grpc as tgrpc
    import tritonclient.grpc.aio as tgrpc_aio
    from tritonclient.utils import InferenceServerException

    phase = {"recording": False, "stop": False}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    if client_kind == "tritonclient":
        client = tgrpc_aio.InferenceServerClient(address)

        async def send(k: int) -> None:
            tensor = tgrpc.InferInput("image", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(images[k].reshape(1, 1, 8, 8))
            await client.infer(model, [tensor])

        async def close() -> None:
            await client.close()
        failure = InferenceServerException
    else:
        channel = grpc.aio.insecure_channel(address)
        # bytes in, bytes out: the requests were serialized before the clock started
        call = channel.unary_unary(SERVICE)
        payloads = [p.SerializeToString() for p in grpc_payloads(model, images)]

        async def send(k: int) -> None:
            await call(payloads[k])

        async def close() -> None:
            await channel.close()
        failure = grpc.aio.AioRpcError

    def status_of(exc: Exception) -> str:
        return str(exc.status()) if isinstance(exc, InferenceServerException) else exc.code().name

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while not phase["stop"]:
            k = rng.randrange(len(images))
            sent = time.perf_counter()
            try:
                await send(k)
                status = "OK"
            except failure as exc:
                status = status_of(exc)
            if phase["recording"] and not phase["stop"]:
                statuses[status] = statuses.get(status, 0) + 1
                if status == "OK":
                    latencies.append(time.perf_counter() - sent)

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        cpu0, client0, t0 = server.cpu_times(), time.process_time(), time.perf_counter()
        phase["recording"] = True
        await asyncio.sleep(duration_s)
        phase["stop"] = True
        cpu1, client1, t1 = server.cpu_times(), time.process_time(), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        for task in tasks:
            task.cancel()
        await close()
    seconds = t1 - t0
    completed = sum(statuses.values())
    ok = statuses.get("OK", 0)
    lat = np.sort(np.asarray(latencies)) * 1000 if latencies else np.asarray([float("nan")])
    return {"concurrency": concurrency, "seconds": seconds, "completed": completed, "ok": ok,
            "errors": {k: v for k, v in statuses.items() if k != "OK"}, "throughput_rps": ok / seconds,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "server_cpu_ms_per_req": (sum(cpu1) - sum(cpu0)) * 1000 / max(completed, 1),
            "client_cpu_ms_per_req": (client1 - client0) * 1000 / max(completed, 1)}


def http_level(result: classify.LevelResult) -> dict:
    return {"concurrency": result.concurrency, "seconds": result.seconds, "completed": result.completed,
            "ok": result.ok, "errors": result.non_200_statuses, "throughput_rps": result.throughput_rps,
            "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "server_cpu_ms_per_req": result.server_cpu_ms_per_req,
            "client_cpu_ms_per_req": result.client_cpu_ms_per_req}


def best(runs: list[dict]) -> dict:
    """The round with the most req/s (other work on shared cores only ever slows a round)."""
    return max(runs, key=lambda r: r["throughput_rps"])


def print_report(model: str, client_kind: str, levels: list[dict]) -> None:
    print(f"\n{model}: HTTP (raw JSON client) and gRPC ({client_kind}) on one server, best of each level's rounds")
    print(f"{'conc':>5} {'proto':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU ms/req':>15} "
          f"{'client CPU ms/req':>18} {'errors':>8}")
    for level in levels:
        for name in ("http", "grpc"):
            r = level[name]
            print(f"{r['concurrency']:>5} {name:>5} {r['throughput_rps']:>9,.0f} {r['p50_ms']:>8.2f} "
                  f"{r['p99_ms']:>8.2f} {r['server_cpu_ms_per_req']:>15.3f} {r['client_cpu_ms_per_req']:>18.3f} "
                  f"{sum(r['errors'].values()):>8}")
        ratio = level["grpc"]["throughput_rps"] / level["http"]["throughput_rps"] if level["http"]["throughput_rps"] \
            else float("nan")
        cpu = level["grpc"]["server_cpu_ms_per_req"] / level["http"]["server_cpu_ms_per_req"] \
            if level["http"]["server_cpu_ms_per_req"] else float("nan")
        print(f"{'':>5} {'ratio':>5} gRPC/HTTP req/s {ratio:.2f}, server CPU per request {cpu:.2f}")


async def measure(server: classify.Server, address: str, args, images: np.ndarray) -> list[dict]:
    path = f"/v2/models/{args.model}/infer"
    http_requests = [classify.http_request(path, server.host, server.port, classify.infer_body(img))
                     for img in images]
    levels = []
    for concurrency in args.concurrency:
        runs: dict[str, list[dict]] = {"http": [], "grpc": []}
        for _ in range(args.rounds):        # in turns: a slow spell of the machine hits both
            runs["http"].append(http_level(await classify.run_level(
                server, args.model, http_requests, concurrency, args.warmup, args.duration, args.seed)))
            runs["grpc"].append(await grpc_level(server, address, args.model, images, concurrency, args.warmup,
                                                 args.duration, args.seed, args.grpc_client))
            print(f"[bench] concurrency {concurrency}: HTTP {runs['http'][-1]['throughput_rps']:,.0f} req/s, "
                  f"gRPC {runs['grpc'][-1]['throughput_rps']:,.0f} req/s", flush=True)
        levels.append({"concurrency": concurrency, "http": best(runs["http"]), "grpc": best(runs["grpc"]),
                       "rounds": runs})
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=classify.HelpFormatter)
    p.add_argument("--model", default="resnet-digits", help="classifier to benchmark (its default version)")
    p.add_argument("--registry", type=Path, default=None,
                   help="existing registry holding --model (default: a temp one built with `zooserve demo --only "
                        "mlp-digits resnet-digits`, ~30 s)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level, protocol and round")
    p.add_argument("--warmup", type=float, default=1.5, help="warm-up seconds before each measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="closed-loop callers per level")
    p.add_argument("--rounds", type=int, default=2, help="HTTP/gRPC turns per level (the best of each is shown)")
    p.add_argument("--grpc-client", choices=["tritonclient", "stub"], default="tritonclient",
                   help="tritonclient: the stock tritonclient.grpc.aio client; stub: the generated stub with "
                        "requests serialized beforehand (the least client CPU)")
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads (--threads of zooserve serve)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order in which each caller picks its digits")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp registry and server log")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="zooserve-bench-grpc-"))
    registry = args.registry
    server: classify.Server | None = None
    try:
        if registry is None:
            registry = workdir / "registry"
            classify.build_registry(registry)
        elif not registry.is_dir():
            raise SystemExit(f"--registry {registry} is not a directory")
        version, _ = classify.served_version(registry, args.model)
        images = classify.load_digits_images()
        grpc_port = classify.free_port()
        server = classify.Server(registry, args.threads, workdir / "server.log", ["--grpc-port", str(grpc_port)])
        ready_s = server.wait_ready()
        address = f"{server.host}:{grpc_port}"
        print(f"[bench] server pid {server.proc.pid} ready after {ready_s:.1f} s: HTTP {server.url}, gRPC {address}; "
              f"{args.model} version {version}", flush=True)
        check_same_answer(server, address, args.model, images[0])
        levels = asyncio.run(measure(server, address, args, images))
        print_report(args.model, args.grpc_client, levels)
        code = server.stop()
        server = None
        if code not in (0, None, -signal.SIGTERM):
            print(f"[bench] warning: server exited with code {code}", file=sys.stderr)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "environment": {**classify.environment(), "client_loop": "asyncio"}, "model": args.model,
                "version": version, "grpc_client": args.grpc_client, "duration_s": args.duration,
                "warmup_s": args.warmup, "levels": levels, "server_exit_code": code,
            }, indent=2))
            print(f"[bench] wrote {args.out}")
        return 0
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"[bench] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def check_same_answer(server: classify.Server, address: str, model: str, image: np.ndarray) -> None:
    """Both protocols answer the same logits for a digit before anything is timed."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    answers = []
    for module, url in ((thttp, f"{server.host}:{server.port}"), (tgrpc, address)):
        tensor = module.InferInput("image", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(image.reshape(1, 1, 8, 8))
        with module.InferenceServerClient(url) as client:
            answers.append(client.infer(model, [tensor]).as_numpy("logits"))
    if answers[0].shape != (1, 10) or not np.array_equal(*answers):
        raise RuntimeError(f"HTTP and gRPC answer differently: {answers}")


if __name__ == "__main__":
    sys.exit(main())
