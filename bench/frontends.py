"""The two HTTP front ends side by side: `zooserve serve` (native) against `zooserve serve
--frontend litserve`, on the CNN and the MLP, in one run.

One run:
  1. builds a temp registry: the ResNet-style CNN nobody here trained (bench/instances.py: 3x32x32
     -> 10, ~50 M multiply-adds an image, ~20 KB of JSON a request) and mlp-digits (trained with
     `zooserve demo --only mlp-digits`, or published from `--mlp-from DIR`);
  2. starts both servers on it (same flags, `--threads 1`) and checks they answer the same logits;
  3. drives them closed-loop (bench/classify.py's raw keep-alive client, v2 JSON bodies), taking
     turns: each round runs every model, front end and concurrency level once;
  4. prints, per model, front end and level, the best round's req/s with its p50/p99, server CPU per
     request (every process of the server: LitServe's API server, queue manager and worker too) and
     mean batch, and the ratios litserve / native.

    .venv/bin/python bench/frontends.py [--models cnn mlp-digits] [--concurrency 1 32 128]
                                        [--duration 5] [--rounds 2] [--mlp-from DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify import (CLK_TCK, REPO_ROOT, HelpFormatter, LevelResult, Server, environment,  # noqa: E402
                      event_loop_factory, http_request, infer_body, load_digits_images, run_level, served_version,
                      zooserve_cmd)
from instances import build_cnn, images, json_request  # noqa: E402

FRONTENDS = ("native", "litserve")
MLP = "mlp-digits"
CNN = "cnn"                     # bench/instances.py imports its CNN under this name


class FrontendServer(Server):
    """`zooserve serve --frontend F`, its CPU counted over the whole process tree: LitServe serves
    from child processes (API server, queue manager, inference worker)."""

    def __init__(self, registry: Path, frontend: str, log_path: Path):
        super().__init__(registry, 1, log_path, ["--frontend", frontend])
        self.frontend = frontend

    def cpu_times(self) -> tuple[float, float]:
        user = system = 0.0
        for pid in _tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:             # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            user += int(fields[11]) / CLK_TCK
            system += int(fields[12]) / CLK_TCK
        return user, system


def _tree(root: int) -> list[int]:
    """`root` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def build_registry(work: Path, registry: Path, models: list[str], mlp_from: Path | None) -> None:
    if CNN in models:
        print("[bench] building the CNN and importing it ...", flush=True)
        build_cnn(work, registry)
    if MLP not in models:
        return
    if mlp_from is None:
        print("[bench] training mlp-digits (`zooserve demo --only mlp-digits`) ...", flush=True)
        subprocess.run([*zooserve_cmd(), "demo", "--registry", str(registry), "--only", MLP], cwd=REPO_ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        return
    from model_registry import Registry

    version, _ = served_version(mlp_from, MLP)
    Registry(registry).publish(MLP, Registry(mlp_from).version_dir(MLP, version))


def request_bodies(model: str, server: Server) -> list[bytes]:
    """Raw HTTP requests for `model` on `server`: real digits (the CNN's upscaled to 3x32x32)."""
    if model == CNN:
        return [json_request(server.host, server.port, x) for x in images()]
    path = f"/v2/models/{model}/infer"
    return [http_request(path, server.host, server.port, infer_body(x)) for x in load_digits_images()[:256]]


def same_answers(servers: list[FrontendServer], models: list[str]) -> None:
    """Both front ends answer the same request with the same JSON (the CNN's first picture, a digit)."""
    for model in models:
        raw = request_bodies(model, servers[0])[0]
        body = raw[raw.index(b"\r\n\r\n") + 4:]
        answers = []
        for server in servers:
            request = urllib.request.Request(f"{server.url}/v2/models/{model}/infer", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request) as r:
                answers.append(json.loads(r.read()))
        if answers[0] != answers[1]:
            raise RuntimeError(f"{model}: the front ends answer differently: {answers}")


async def drive(servers: list[FrontendServer], models: list[str], levels: list[int], rounds: int,
                warmup_s: float, duration_s: float) -> dict[str, dict[str, list[list[LevelResult]]]]:
    """results[model][frontend][level index] = that level's result in each round."""
    bodies = {(m, s.frontend): request_bodies(m, s) for m in models for s in servers}
    results = {m: {s.frontend: [[] for _ in levels] for s in servers} for m in models}
    for round_ in range(rounds):
        for model in models:
            for server in servers:
                for i, c in enumerate(levels):
                    r = await run_level(server, model, bodies[model, server.frontend], c, warmup_s, duration_s,
                                        round_ * 100 + i)
                    print(f"[bench] round {round_ + 1} {model:10} {server.frontend:8} c={c:<4} "
                          f"{r.throughput_rps:7,.0f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  "
                          f"server CPU {r.server_cpu_ms_per_req:.3f} ms/req  mean batch {(r.mean_batch or 0):5.2f}  "
                          f"non-200 {r.non_200}", flush=True)
                    results[model][server.frontend][i].append(r)
    return results


def best(rounds: list[LevelResult]) -> LevelResult:
    return max(rounds, key=lambda r: r.throughput_rps)


def report(results: dict[str, dict[str, list[list[LevelResult]]]], rounds: int) -> None:
    print()
    print(f"Best of {rounds} round(s) by req/s, the p50/p99 and CPU of that round; v2 JSON, closed loop")
    print("| model | front end | concurrency | req/s | p50 ms | p99 ms | server CPU ms/req | mean batch | non-200 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model, by_frontend in results.items():
        for frontend, levels in by_frontend.items():
            for level in levels:
                r = best(level)
                print(f"| {model} | {frontend} | {r.concurrency} | {r.throughput_rps:,.0f} | {r.p50_ms:.2f} | "
                      f"{r.p99_ms:.2f} | {r.server_cpu_ms_per_req:.3f} | {(r.mean_batch or 0):.2f} | {r.non_200} |")
    print()
    print("| model | concurrency | req/s litserve / native | p50 litserve / native | p99 litserve / native | "
          "CPU/req litserve / native |")
    print("|---|---:|---:|---:|---:|---:|")
    for model, by_frontend in results.items():
        for native, lit in zip(by_frontend["native"], by_frontend["litserve"]):
            n, x = best(native), best(lit)
            print(f"| {model} | {n.concurrency} | {_ratio(x.throughput_rps, n.throughput_rps)} | "
                  f"{_ratio(x.p50_ms, n.p50_ms)} | {_ratio(x.p99_ms, n.p99_ms)} | "
                  f"{_ratio(x.server_cpu_ms_per_req, n.server_cpu_ms_per_req)} |")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", choices=[CNN, MLP], default=[CNN, MLP], help="models to measure")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128], help="closed-loop connections per level")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.5, help="warm-up seconds before each level")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running every model, front end and level once")
    p.add_argument("--mlp-from", type=Path, default=None,
                   help="registry holding mlp-digits to publish from (default: train it, ~30 s)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp registry and server logs")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="zooserve-frontends-"))
    servers: list[FrontendServer] = []
    try:
        registry = work / "registry"
        build_registry(work, registry, args.models, args.mlp_from)
        servers = [FrontendServer(registry, f, work / f"server-{f}.log") for f in FRONTENDS]
        for server in servers:
            ready_s = server.wait_ready()
            print(f"[bench] {server.frontend}: pid {server.proc.pid} ready on {server.url} after {ready_s:.1f} s",
                  flush=True)
        same_answers(servers, args.models)
        loop_factory, loop_name = event_loop_factory("auto")
        print(f"[bench] both front ends answer alike; load generator on {loop_name}", flush=True)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(drive(servers, args.models, args.concurrency, args.rounds, args.warmup,
                                       args.duration))
        report(results, args.rounds)
        if args.out is not None:
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(),
                "results": {m: {f: [[vars(r) for r in level] for level in levels] for f, levels in by.items()}
                            for m, by in results.items()},
            }, indent=2))
            print(f"[bench] wrote {args.out}")
        return 0
    finally:
        for server in servers:
            code = server.stop()
            if code not in (0, None):
                print(f"[bench] warning: the {server.frontend} server exited with code {code}:\n"
                      f"{server.log_tail(1500)}", file=sys.stderr)
        if args.keep:
            print(f"[bench] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
