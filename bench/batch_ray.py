"""Batch jobs on Ray: `zooserve batch --ray` on two nodes against one node and against plain `zooserve batch`,
for a GAN job and a decoder job.

One run:
  1. a registry with gan-digits and decoder-tiny: `--registry`, where one it lacks gets it with
     `zooserve demo --only`, else a temp one built so (minutes on 2 cores);
  2. two input files: GAN lines (bench/batch.py's: `--samples` labels each, seed i) and decoder-tiny
     completions (a line of a play as the prompt, `--max-tokens` tokens, temperature 0.8, seeded
     by the job: serve/batch.py's derived seed);
  3. two Ray clusters on this machine, on loopback (tests/serve/test_batch_ray.py's way: `ray start
     --block` with Ray's 127.0.0.1 rewrite turned off): one node, and two nodes, `--node-cpus` each;
  4. for each job, taking turns, `--repeats` times: (a) `serve.batch.run`, what `zooserve batch` runs,
     in this process; (b) one node and (c) two nodes: `serve.batch_ray.run_on_ray`, what `zooserve
     batch --ray ADDRESS --shards N` runs, with `--shards` shards; each end to end from a fresh output
     (Ray's connect, the node probe, worker processes, model loads and the merge included);
  5. checks that the three outputs are byte-identical, and prints requests/s (best of the repeats;
     images/s or tokens/s beside) and the ratios (c)/(b), (c)/(a) and (b)/(a).

    .venv/bin/python bench/batch_ray.py [--registry DIR] [--gan-requests 24000] [--decoder-requests 2000]
                                        [--shards 4] [--node-cpus 1] [--repeats 3] [--out FILE.json]

Defaults: plain `zooserve batch` takes ~20-25 s on each job on 2 idle cores, so that the Ray sides' fixed
cost (~2 s: connect, probe, a worker process per node that imports torch and loads the models, merge)
is a small part. On one machine the nodes share its cores: on 2 cores one process already keeps both
busy (event loop and model), so two 1-CPU nodes there measure Ray's overhead more than its scaling;
give a machine with more cores larger nodes (--node-cpus) and more shards. Smoke run:
--gan-requests 200 --decoder-requests 8 --repeats 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch import build_registry, environment, sampler_body  # noqa: E402  (bench/batch.py)
from classify import HelpFormatter  # noqa: E402
from model_registry import Registry  # noqa: E402
from serve.batch import run  # noqa: E402
from serve.settings import ServeSettings  # noqa: E402

MODELS = ("gan-digits", "decoder-tiny")
KEEP_LOOPBACK = "import ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
START_NODE = KEEP_LOOPBACK + "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
PROMPTS = ("ROMEO. But soft, what light through yonder window breaks?", "HAMLET. To be, or not to be",
           "KING LEAR. Blow, winds, and crack your cheeks!", "MACBETH. Is this a dagger which I see before me")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """`ray start --block` nodes on 127.0.0.1, each its own process group; stop() ends only them."""

    def __init__(self, nodes: int, cpus: int, work: Path):
        self.tmp = Path(tempfile.mkdtemp(prefix="zr-", dir="/tmp"))     # Ray's socket paths must stay short
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(self.tmp)}
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        head = ["--head", "--port", self.address.split(":")[1], "--include-dashboard", "false", "--dashboard-port",
                str(free_port()), "--ray-client-server-port", str(free_port())]
        for i in range(nodes):
            self._start(head if i == 0 else ["--address", self.address], cpus, work / f"node-{self.tmp.name}-{i}.log")

    def _start(self, args: list[str], cpus: int, log: Path) -> None:
        cmd = [sys.executable, "-c", START_NODE, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus",
               str(cpus), "--object-store-memory", str(100 << 20), "--dashboard-agent-listen-port", "0", "--block"]
        with open(log, "wb") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()                     # `ray start --block` stops what it started
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_gan(path: Path, n: int, samples: int) -> int:
    with open(path, "wb") as f:
        for i in range(n):
            f.write(orjson.dumps({"custom_id": f"gan-{i}", "method": "POST", "url": "/v2/models/gan-digits/infer",
                                  "body": sampler_body("gan-digits", i, samples, "ddim", 0)}) + b"\n")
    return n * samples                           # images


def write_decoder(path: Path, n: int, max_tokens: int) -> int:
    with open(path, "wb") as f:
        for i in range(n):
            body = {"model": "decoder-tiny", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0.8, "ignore_eos": True}
            f.write(orjson.dumps({"custom_id": f"dec-{i}", "method": "POST", "url": "/v1/completions",
                                  "body": body}) + b"\n")
    return n * max_tokens                        # tokens (ignore_eos: every completion is max_tokens long)


def timed(side: str, settings: ServeSettings, inp: Path, out: Path, address: str | None, shards: int) -> float:
    """Seconds for one end-to-end job into a fresh output; every record must be a 200."""
    from serve.batch_ray import parts_dir, run_on_ray

    out.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    started = time.perf_counter()
    if address is None:
        summary = run(settings, inp, out, progress=False)
    else:
        summary = run_on_ray(settings, inp, out, address, shards, progress=False)
    wall = time.perf_counter() - started
    if summary.statuses != {200: summary.records}:
        raise RuntimeError(f"{side}: answered {dict(summary.statuses)}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--registry", type=Path, default=None,
                   help="existing registry; one without gan-digits or decoder-tiny gets it with `zooserve demo "
                        "--only` (default: a temp one built so, minutes)")
    p.add_argument("--gan-requests", type=int, default=24000, help="GAN lines")
    p.add_argument("--samples", type=int, default=4, help="images per GAN line")
    p.add_argument("--decoder-requests", type=int, default=2000, help="decoder-tiny completions")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    p.add_argument("--shards", type=int, default=4, help="shards of each Ray job (the same for one and two nodes)")
    p.add_argument("--node-cpus", type=int, default=1, help="CPUs each Ray node offers (one shard runs per CPU)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, taking turns; the best counts")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    import ray._private.services as services
    services.resolve_ip_for_localhost = lambda host: host     # this process is the driver: stay on loopback

    workdir = Path(tempfile.mkdtemp(prefix="zooserve-bench-batch-ray-"))
    clusters: dict[str, LoopbackCluster] = {}
    try:
        registry = args.registry or workdir / "registry"
        missing = tuple(m for m in MODELS if m not in Registry(registry).models())
        if missing:
            build_registry(registry, missing)
        settings = ServeSettings(registry=registry, log_level="warning")
        jobs = {"gan-digits": (workdir / "gan.jsonl", "images", write_gan(workdir / "gan.jsonl", args.gan_requests,
                                                                          args.samples), args.gan_requests),
                "decoder-tiny": (workdir / "decoder.jsonl", "tokens",
                                 write_decoder(workdir / "decoder.jsonl", args.decoder_requests, args.max_tokens),
                                 args.decoder_requests)}
        print(f"[bench] starting two Ray clusters on loopback: 1 node and 2 nodes, {args.node_cpus} CPU(s) each",
              flush=True)
        for side, nodes in (("one node", 1), ("two nodes", 2)):
            clusters[side] = LoopbackCluster(nodes, args.node_cpus, workdir)
        sides = {"plain zooserve batch": None, **{k: c.address for k, c in clusters.items()}}
        results = {}
        for job, (inp, unit, units, n) in jobs.items():
            walls: dict[str, list[float]] = {side: [] for side in sides}
            outputs = {}
            for r in range(args.repeats):
                for side, address in sides.items():
                    out = workdir / f"{job}-{side.replace(' ', '-')}.jsonl"
                    walls[side].append(timed(side, settings, inp, out, address, args.shards))
                    outputs[side] = out
                print(f"[bench] {job} run {r + 1}: " + "; ".join(f"{s} {w[-1]:.2f} s" for s, w in walls.items()),
                      flush=True)
            reference = outputs["plain zooserve batch"].read_bytes()
            same = all(o.read_bytes() == reference for o in outputs.values())
            if not same:
                raise RuntimeError(f"{job}: the outputs differ between the sides")
            results[job] = {"requests": n, unit: units, "walls_s": walls,
                            "requests_per_s": {s: n / min(w) for s, w in walls.items()}}
        print()
        print(f"{args.shards} shards; Ray nodes of {args.node_cpus} CPU(s) on this machine ({os.cpu_count()} cores); "
              f"end to end, best of {args.repeats}; outputs byte-identical across the sides")
        print()
        print("| job | side | requests/s | images or tokens/s | vs one node | vs plain |")
        print("|---|---|---:|---:|---:|---:|")
        for job, res in results.items():
            rps, per = res["requests_per_s"], res[next(k for k in ("images", "tokens") if k in res)] / res["requests"]
            for side, rate in rps.items():
                vs_one = f"{rate / rps['one node']:.2f}" if side != "plain zooserve batch" else "-"
                print(f"| {job} | {side} | {rate:,.1f} | {rate * per:,.0f} | {vs_one} | "
                      f"{rate / rps['plain zooserve batch']:.2f} |")
        if args.out is not None:
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(),
                "shards": args.shards, "node_cpus": args.node_cpus, "jobs": results}, indent=2))
            print(f"[bench] wrote {args.out}")
        return 0
    finally:
        for c in clusters.values():
            c.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
