"""Overload: goodput, accepted latency and readiness at 32x saturation (issue 13, section 2).

One run (`--family cnn`, the default; `--family tokens` does the same for a token model, below):
  1. builds a CNN that nobody here trained (torch, seeded random weights, 3x32x32 -> 10, the shape of
     the peers' `cnn.onnx` in research/reliability-anchors.md), exports it to ONNX and publishes it
     with `zooserve registry import`, as a user would; model.json's batching: batches of up to 32,
     a 5 ms batch window (the peers' setting) and `--max-queue-wait-ms`;
  2. starts `zooserve serve --threads 1` (and `--workers N` with `--workers`) on a free loopback port;
  3. runs closed-loop levels, each client on its own keep-alive connection with a random image:
     - "plain" at each `--peak` concurrency (default 32 and 64): the peak goodput, and the p99 at 32
       that the accepted p99 under overload is compared with;
     - "retry at once" at `--overload` (default 1024): a refused client sends again at once;
     - "retry after" at `--overload`: a refused client sleeps its `Retry-After` (whole seconds)
       plus up to 20 % jitter, as a client library that honours the header does;
     all through, a probe GETs /v2/health/ready every 50 ms on its own connection;
  4. prints one row per level (goodput = 200 answers/s, accepted p50/p99, refusals, how many of the
     clients got at least one answer, readiness p99) and the four targets of the issue as ratios
     measured in this one run; with `--rounds N` the levels run N times, taking turns, and the
     targets are judged on each level's medians (a shared machine moves one level by a fifth).

    .venv/bin/python bench/overload.py [--family cnn|tokens] [--workers N] [--duration 15]
                                       [--max-queue-wait-ms MS] [--max-retry-after-s S] [--rounds N]
                                       [--out FILE.json]
                                       [--server-cpus 0-1 --client-cpus 2-3]

`--family tokens`: bench/tokens.py's random-weight `small` decoder (its own tokenizer, ONNX export
with parity, published), `max_num_seqs` 16 rows, and non-streamed `/v1/completions` of a fixed
64-token prompt and 16 new tokens (`ignore_eos`), so every accepted answer must carry exactly 16
tokens (checked); goodput is completions a second; plain levels 16 and 32 by default.

The load generator is bench/classify.py's raw keep-alive client (tens of microseconds a request);
on a 2-core machine it still shares the cores with the server, which the "other load" column shows.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify import (REPO_ROOT, Connection, HelpFormatter, Server, environment, event_loop_factory,  # noqa: E402
                      http_request, machine_busy_seconds, zooserve_cmd)

MODEL = "cnn"
PROBE_EVERY_S = 0.05
JITTER = 0.2
TOKEN_ROWS = 16             # max_num_seqs of the token model's server
NEW_TOKENS = 16


# ---- the foreign model -------------------------------------------------------------------------

def build_cnn(work: Path, registry: Path, max_queue_wait_ms: float) -> None:
    """A small VGG-style CNN (3x32x32 -> 10 logits), exported to ONNX with a dynamic batch and
    imported into `registry` as `cnn`; then its model.json's batching is set."""
    import torch
    from torch import nn

    from model_registry import Registry

    torch.manual_seed(0)
    model = nn.Sequential(                                          # (B, 3, 32, 32)
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # (B, 32, 16, 16)
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 64, 8, 8)
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),                    # (B, 64, 8, 8)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),     # (B, 10)
    ).eval()
    onnx_path = work / "cnn.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(onnx_path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    subprocess.run([*zooserve_cmd(), "registry", "import", "--registry", str(registry), MODEL, str(onnx_path)],
                   cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    reg = Registry(registry)
    cfg = reg.model_config(MODEL)
    batching = cfg.batching.model_copy(update={"max_batch_size": 32, "max_queue_delay_ms": 5.0,
                                               "max_queue_wait_ms": max_queue_wait_ms})
    reg.write_model_config(cfg.model_copy(update={"batching": batching}))


def build_decoder(work: Path, max_queue_wait_ms: float) -> tuple[Path, str, list[bytes]]:
    """bench/tokens.py's decoder in its own registry: (registry, model name, prompts of 64 tokens
    as JSON-ready id lists)."""
    import orjson

    from model_registry import Registry
    from tokens import MODEL_NAME, build_model

    _, tokenizer, text, registry, _, _ = build_model(work, log=lambda line: print(line.replace("[bench]", "[overload]")))
    reg = Registry(registry)
    cfg = reg.model_config(MODEL_NAME)
    reg.write_model_config(cfg.model_copy(update={"batching": cfg.batching.model_copy(
        update={"max_queue_wait_ms": max_queue_wait_ms})}))
    ids = tokenizer.encode(text[:50_000])
    rng = random.Random(0)
    starts = [rng.randrange(len(ids) - 64) for _ in range(64)]
    return registry, MODEL_NAME, [orjson.dumps(ids[s:s + 64]) for s in starts]


def completion_requests(host: str, port: int, model: str, prompts: list[bytes]) -> list[bytes]:
    return [http_request("/v1/completions", host, port,
                         b'{"model":"' + model.encode() + b'","prompt":' + p + b',"max_tokens":' +
                         str(NEW_TOKENS).encode() + b',"temperature":0,"ignore_eos":true}') for p in prompts]


def request_bodies(host: str, port: int, count: int, seed: int) -> list[bytes]:
    import orjson

    rng = np.random.default_rng(seed)
    path = f"/v2/models/{MODEL}/infer"
    return [http_request(path, host, port, orjson.dumps({"inputs": [{
        "name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
        "data": rng.random(3 * 32 * 32, dtype=np.float32).round(4).tolist()}]})) for _ in range(count)]


# ---- one level -----------------------------------------------------------------------------------

@dataclass
class Level:
    clients: str                     # "plain", "retry at once", "retry after"
    concurrency: int
    seconds: float
    ok: int
    goodput_rps: float
    p50_ms: float                    # accepted (200) answers only
    p99_ms: float
    refused: int                     # 429 answers
    clients_served: int              # clients with at least one 200 answer in the measured window
    other: dict[str, int]            # any other status, or -1 for a connection error
    ready_p50_ms: float
    ready_p99_ms: float
    ready_max_ms: float
    ready_not_200: int
    short_answers: int               # 200 answers that lacked what every answer must hold
    server_cpu_cores: float
    loop_cpu_cores: float            # the server's main thread: its event loop (the rest: the model's threads)
    client_cpu_cores: float
    other_load_cores: float
    errors: list[str] = field(default_factory=list)


def median_levels(levels: list[Level]) -> list[Level]:
    """One level per (clients, concurrency), in first-run order, each number the median over the
    rounds that ran it (on a shared machine one round's peak or overload level can be off by a
    fifth; the targets are judged on the medians)."""
    groups: dict[tuple[str, int], list[Level]] = {}
    for lv in levels:
        groups.setdefault((lv.clients, lv.concurrency), []).append(lv)
    out = []
    for runs in groups.values():
        fields = {}
        for name, value in asdict(runs[0]).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                mid = statistics.median(getattr(lv, name) for lv in runs)
                fields[name] = round(mid) if isinstance(value, int) else mid
            elif name == "errors":
                fields[name] = [e for lv in runs for e in lv.errors][:5]
            else:
                fields[name] = value
        out.append(Level(**fields))
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def run_level(server: Server, bodies: list[bytes], clients: str, concurrency: int,
                    warmup_s: float, duration_s: float, seed: int, expect: bytes | None = None) -> Level:
    """One closed-loop level; `expect`: bytes every 200 answer must hold (else counted as short)."""
    host, port = server.host, server.port
    phase = {"recording": False, "stop": False, "t0": float("inf")}
    connected, go = [0], asyncio.Event()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    short = [0]                      # 200 answers without every token asked for (token models)
    served: set[int] = set()         # clients answered 200 at least once while recording
    ready_ms: list[float] = []
    ready_bad = [0]

    async def client(index: int) -> None:
        rng = random.Random(seed * 100_000 + index)
        conn = Connection(host, port)
        await asyncio.sleep(rng.random() * 0.5)        # connect over 500 ms, not in one burst of SYNs
        await conn.open()
        connected[0] += 1
        await go.wait()
        try:
            while not phase["stop"]:
                sent = time.perf_counter()
                try:
                    status, answer = await conn.request(bodies[rng.randrange(len(bodies))])
                except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                    status = -1
                    if phase["recording"]:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    await asyncio.sleep(0.05)
                # counted when sent and answered within the measured window
                if phase["recording"] and not phase["stop"] and sent >= phase["t0"]:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(time.perf_counter() - sent)
                        served.add(index)
                        short[0] += expect is not None and expect not in answer
                if status == 429 and clients == "retry after":
                    await asyncio.sleep((conn.retry_after or 1.0) * (1 + JITTER * rng.random()))
        finally:
            conn.close()

    async def probe() -> None:
        conn = Connection(host, port)
        raw = http_request("/v2/health/ready", host, port)
        try:
            while not phase["stop"]:
                sent = time.perf_counter()
                status, _ = await conn.request(raw)
                if phase["recording"]:
                    ready_ms.append(time.perf_counter() - sent)
                    ready_bad[0] += status != 200
                await asyncio.sleep(PROBE_EVERY_S)
        finally:
            conn.close()

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)] + [asyncio.create_task(probe())]
    try:
        connect_by = time.perf_counter() + 60
        while connected[0] < concurrency and time.perf_counter() < connect_by:    # every connection open first
            await asyncio.sleep(0.05)
        go.set()
        await asyncio.sleep(warmup_s)
        busy0, cpu0, client0, t0 = (machine_busy_seconds(), server.cpu_seconds(), time.process_time(),
                                    time.perf_counter())
        loop0 = server.main_thread_cpu_seconds()
        phase["recording"], phase["t0"] = True, t0
        await asyncio.sleep(duration_s)
        phase["stop"] = True
        busy1, cpu1, client1, t1 = (machine_busy_seconds(), server.cpu_seconds(), time.process_time(),
                                    time.perf_counter())
        loop1 = server.main_thread_cpu_seconds()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        for t in tasks:
            t.cancel()
    seconds = t1 - t0
    ok = statuses.get(200, 0)
    return Level(
        clients=clients, concurrency=concurrency, seconds=seconds, ok=ok, goodput_rps=ok / seconds,
        p50_ms=pct(latencies, 50), p99_ms=pct(latencies, 99), refused=statuses.get(429, 0), clients_served=len(served),
        other={str(k): v for k, v in sorted(statuses.items()) if k not in (200, 429)},
        ready_p50_ms=pct(ready_ms, 50), ready_p99_ms=pct(ready_ms, 99),
        ready_max_ms=max(ready_ms) * 1000 if ready_ms else float("nan"), ready_not_200=ready_bad[0],
        short_answers=short[0],
        server_cpu_cores=(cpu1 - cpu0) / seconds, loop_cpu_cores=(loop1 - loop0) / seconds,
        client_cpu_cores=(client1 - client0) / seconds,
        other_load_cores=max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (client1 - client0)) / seconds,
        errors=errors[:5])


# ---- report --------------------------------------------------------------------------------------

def targets(levels: list[Level]) -> list[tuple[str, float, float, bool]]:
    """(what, measured, bound, met) for the issue's four targets."""
    plain = [lv for lv in levels if lv.clients == "plain"]
    peak = max(lv.goodput_rps for lv in plain)
    base_p99 = min(plain, key=lambda lv: lv.concurrency).p99_ms
    out = []
    for lv in levels:
        if lv.clients == "retry at once":
            out.append((f"goodput, retry at once, {lv.concurrency} / peak", lv.goodput_rps / peak, 0.80,
                        lv.goodput_rps / peak >= 0.80))
        if lv.clients == "retry after":
            out.append((f"goodput, retry after, {lv.concurrency} / peak", lv.goodput_rps / peak, 0.95,
                        lv.goodput_rps / peak >= 0.95))
        if lv.clients != "plain":
            ratio = lv.p99_ms / base_p99
            out.append((f"accepted p99, {lv.clients}, {lv.concurrency} / p99 at "
                        f"{min(p.concurrency for p in plain)}", ratio, 4.0, ratio <= 4.0))
    worst_ready = max(lv.ready_p99_ms for lv in levels)
    out.append(("readiness p99 ms, worst level", worst_ready, 50.0, worst_ready < 50.0))
    return out


def print_report(levels: list[Level], judged: list[Level]) -> None:
    """Every level run, then (with several rounds) their medians, then the targets on `judged`."""
    print_table(levels)
    if judged is not levels:
        print(f"\nmedians of {len(levels) // len(judged)} rounds:")
        print_table(judged)
    print()
    for what, measured, bound, met in targets(judged):
        print(f"  {what}: {measured:.3g} (target {'>=' if 'goodput' in what else '<='} {bound:g}): "
              f"{'met' if met else 'MISSED'}")
    for lv in levels:
        if lv.errors:
            print(f"  {lv.clients} {lv.concurrency}: {lv.errors}")


def print_table(levels: list[Level]) -> None:
    print()
    print("| clients | concurrency | goodput req/s | p50 ms | p99 ms | 429 | clients served | other "
          "| ready p50 / p99 / max ms | server cores | of which the event loop | client cores | other load cores |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|")
    for lv in levels:
        other = ", ".join([*(f"{k}: {v}" for k, v in lv.other.items()),
                           *([f"short 200: {lv.short_answers}"] if lv.short_answers else [])]) or "-"
        print(f"| {lv.clients} | {lv.concurrency} | {lv.goodput_rps:,.0f} | {lv.p50_ms:.1f} | {lv.p99_ms:.1f} | "
              f"{lv.refused:,} | {lv.clients_served:,} | {other} | {lv.ready_p50_ms:.1f} / {lv.ready_p99_ms:.1f} / {lv.ready_max_ms:.1f} | "
              f"{lv.server_cpu_cores:.2f} | {lv.loop_cpu_cores:.2f} | {lv.client_cpu_cores:.2f} | "
              f"{lv.other_load_cores:.2f} |")


async def drive(server: Server, bodies: list[bytes], plan: list[tuple[str, int]], warmup_s: float,
                duration_s: float, seed: int, expect: bytes | None) -> list[Level]:
    levels = []
    for i, (clients, n) in enumerate(plan):
        print(f"[overload] {clients}, {n} clients: {warmup_s:.0f} s warm-up + {duration_s:.0f} s ...", flush=True)
        lv = await run_level(server, bodies, clients, n, warmup_s, duration_s, seed + i, expect)
        print(f"[overload]   goodput {lv.goodput_rps:,.0f} req/s, p99 {lv.p99_ms:.1f} ms, 429 {lv.refused:,}, "
              f"ready p99 {lv.ready_p99_ms:.1f} ms", flush=True)
        levels.append(lv)
        await asyncio.sleep(1.0)       # let refused clients' sockets close before the next level
    return levels


def cpu_list(text: str) -> set[int]:
    """'0-1,4' -> {0, 1, 4} (taskset's list form)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each level is measured")
    p.add_argument("--family", choices=["cnn", "tokens"], default="cnn", help="the model under load")
    p.add_argument("--peak", type=int, nargs="+", default=None,
                   help="plain closed-loop levels (default: 32 64 for the CNN, 16 32 for tokens)")
    p.add_argument("--overload", type=int, default=1024, help="clients of the two overload levels")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the levels this many times, taking turns; the targets are judged on each level's median")
    p.add_argument("--max-queue-wait-ms", type=float, default=None,
                   help="model.json batching.max_queue_wait_ms of the served model (default: 50 for the "
                        "CNN, 300 for tokens: about two sequences' time)")
    p.add_argument("--max-retry-after-s", type=int, default=None,
                   help="ZOOSERVE_MAX_RETRY_AFTER_S of the server (default: the server's, 4): the longest "
                        "Retry-After a connection refused again and again is told; 1 turns doubling off")
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads")
    p.add_argument("--workers", type=int, default=1, help="server processes on the one port (zooserve serve --workers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs the clients send")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here (default: printed only)")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="load generator loop")
    p.add_argument("--server-cpus", type=cpu_list, default=None,
                   help="cores for the server, e.g. 0-1 (default: all); with --client-cpus on a machine of more "
                        "cores, the load generator's CPU stays off the server's (here they share 2)")
    p.add_argument("--client-cpus", type=cpu_list, default=None, help="cores for the load generator, e.g. 2-3")
    args = p.parse_args(argv)
    if args.client_cpus is not None:
        os.sched_setaffinity(0, args.client_cpus)
    if args.max_retry_after_s is not None:
        os.environ["ZOOSERVE_MAX_RETRY_AFTER_S"] = str(args.max_retry_after_s)       # the server inherits it

    workdir = Path(tempfile.mkdtemp(prefix="zooserve-overload-"))
    server = None
    try:
        tokens = args.family == "tokens"
        peak = args.peak or ([16, 32] if tokens else [32, 64])
        wait_ms = args.max_queue_wait_ms or (300.0 if tokens else 50.0)
        if tokens:
            print("[overload] building the decoder ...", flush=True)
            registry, model, prompts = build_decoder(workdir, wait_ms)
            os.environ["ZOOSERVE_MAX_NUM_SEQS"] = str(TOKEN_ROWS)      # the server inherits it
            expect = f'"completion_tokens":{NEW_TOKENS}'.encode()
        else:
            registry = workdir / "registry"
            print("[overload] building the CNN and importing it ...", flush=True)
            build_cnn(workdir, registry, wait_ms)
            expect = None
        server = Server(registry, args.threads, workdir / "server.log",
                        ["--workers", str(args.workers)] if args.workers > 1 else None, cpus=args.server_cpus)
        print(f"[overload] server ready in {server.wait_ready():.1f} s on {server.url}", flush=True)
        bodies = (completion_requests(server.host, server.port, model, prompts) if tokens
                  else request_bodies(server.host, server.port, 256, args.seed))
        plan = ([("plain", n) for n in peak]
                + [("retry at once", args.overload), ("retry after", args.overload)]) * args.rounds
        loop_factory, loop_name = event_loop_factory(args.loop)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            levels = runner.run(drive(server, bodies, plan, args.warmup, args.duration, args.seed, expect))
        judged = median_levels(levels) if args.rounds > 1 else levels
        print_report(levels, judged)
        code = server.stop()
        server = None
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "environment": {**environment(), "client_loop": loop_name},
                "family": args.family, "workers": args.workers, "max_queue_wait_ms": wait_ms,
                "max_retry_after_s": args.max_retry_after_s,
                "server_cpus": sorted(args.server_cpus or []), "client_cpus": sorted(args.client_cpus or []),
                "rounds": args.rounds, "levels": [asdict(lv) for lv in levels],
                "median_levels": [asdict(lv) for lv in judged] if args.rounds > 1 else None,
                "targets": [{"what": w, "measured": m, "bound": b, "met": ok} for w, m, b, ok in targets(judged)],
                "server_exit_code": code}, indent=2))
            print(f"[overload] wrote {args.out}")
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
