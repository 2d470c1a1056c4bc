"""Batch job benchmark: `zooserve batch` in process against the same requests sent straight to the engine.

One run:
  1. builds a registry with `zooserve demo` in a temp dir (or reuses `--registry`; a registry that
     lacks the model gets it with `zooserve demo --only MODEL`);
  2. writes N KServe v2 requests as an OpenAI Batch input file: for a classifier (mlp-digits,
     resnet-digits) a real digit each; for a sampler (gan-digits, diffusion-digits, vae-digits) a
     generation request: `label` INT64 [--samples] (digits i, i+1, ... mod 10; the VAE takes -1 only),
     `seed` INT64 [1] = i, and for diffusion `parameters` {"sampler": --sampler, "steps": --steps}
     (guidance: the manifest's default);
  3. measures, taking turns, `--repeats` times each:
     (a) `serve.batch.run` — the function `zooserve batch` calls — over the file into a fresh output
         (end to end: scan, start-up and model load included; and its answering phase alone);
     (b) the engine alone, in process, with the same concurrency (`--window` workers, as the batch job
         runs): for each request decode the v2 JSON body (`serve.v2_codec`; a sampler's the way the
         server decodes it, `serve.sample_request.decode_sample_request`), `await engine.infer(...)`
         (a sampler's with the request's parameters), encode the v2 response
         (`serve.v2_codec.encode_infer_response`) — the work any caller of the engine must do for a
         JSON request;
     (c) the same with the inputs decoded beforehand: `engine.infer` alone (the ceiling, for reference);
     (d) the same requests through the server's ASGI app in process (`serve.batch.call_app`, the call the
         batch job makes per line), without the file, the records or the writer: the route's own cost;
  4. prints requests/s (best of the repeats; for a sampler also images/s) and the ratios a/b
     (target >= 0.8), a/c and a/d; for a sampler it also checks that (a) and (b) answered request 0
     with the same images.

    .venv/bin/python bench/batch.py [--model mlp-digits] [--registry DIR] [--requests N]
                                    [--window N] [--repeats 3] [--out FILE.json]
                                    [--samples 4] [--sampler ddim] [--steps 20]   # samplers only

Default N: 20,000 for a classifier, 24,000 for the GAN and the VAE, 400 for diffusion (20 DDIM steps,
4 labels): about 10 s or more per side on 2 cores.

Torch and ONNX Runtime run one intra-op thread (settings default); the event loop is uvloop when
installed (as `zooserve batch` and uvicorn pick), else asyncio, the same for every side.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from classify import HelpFormatter  # noqa: E402  (each default said once)
from model_registry import Registry  # noqa: E402
from serve.batch import call_app, default_window, model_configs, parse_line, run  # noqa: E402
from serve.settings import ServeSettings  # noqa: E402


CLASSIFIERS = ("mlp-digits", "resnet-digits")
SAMPLERS = ("gan-digits", "diffusion-digits", "vae-digits")
DEFAULT_REQUESTS = {"gan-digits": 24000, "vae-digits": 24000, "diffusion-digits": 400}


def build_registry(root: Path, models: tuple[str, ...] = CLASSIFIERS) -> None:
    took = "two small models, ~30 s" if models == CLASSIFIERS else f"{', '.join(models)}, ~1-3 min each"
    print(f"[bench] building the demo registry in {root} (trains {took}) ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "serve.cli", "demo", "--registry", str(root), "--only",
                           *models], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"zooserve demo failed with exit code {proc.returncode}")


def write_requests(path: Path, model: str, n: int) -> list[bytes]:
    """N v2 requests (real digits) as batch lines; returns their bodies."""
    from sklearn.datasets import load_digits

    images = load_digits().images.reshape(-1, 1, 8, 8).astype(np.float32)
    bodies = []
    with open(path, "wb") as f:
        for i in range(n):
            body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                "data": images[i % len(images)].reshape(-1).tolist()}]}
            bodies.append(orjson.dumps(body))
            f.write(orjson.dumps({"custom_id": f"req-{i}", "method": "POST", "url": f"/v2/models/{model}/infer",
                                  "body": body}) + b"\n")
    return bodies


def sampler_body(model: str, i: int, samples: int, sampler: str, steps: int) -> dict:
    """Request i to a sampler: `samples` labels (digits from i on; the unconditional VAE: -1), seed i."""
    labels = [-1] * samples if model == "vae-digits" else [(i + k) % 10 for k in range(samples)]
    body = {"inputs": [{"name": "label", "shape": [samples], "datatype": "INT64", "data": labels},
                       {"name": "seed", "shape": [1], "datatype": "INT64", "data": [i]}]}
    if model == "diffusion-digits":
        body["parameters"] = {"sampler": sampler, "steps": steps}
    return body


def write_sampler_requests(path: Path, model: str, n: int, samples: int, sampler: str, steps: int) -> list[bytes]:
    """N v2 generation requests as batch lines; returns their bodies."""
    bodies = []
    with open(path, "wb") as f:
        for i in range(n):
            body = sampler_body(model, i, samples, sampler, steps)
            bodies.append(orjson.dumps(body))
            f.write(orjson.dumps({"custom_id": f"req-{i}", "method": "POST", "url": f"/v2/models/{model}/infer",
                                  "body": body}) + b"\n")
    return bodies


def loop_factory():
    try:
        import uvloop
        return uvloop.new_event_loop, "uvloop"
    except ImportError:
        return None, "asyncio"


def measure_batch(settings: ServeSettings, inp: Path, out: Path, window: int | None) -> dict:
    """(a): the batch job over the whole file into a fresh output."""
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = run(settings, inp, out, window=window, progress=False)
    wall = time.perf_counter() - started
    if summary.statuses != {200: summary.records}:
        raise RuntimeError(f"batch job answered {dict(summary.statuses)}")
    return {"wall_s": wall, "run_s": summary.run_s, "startup_s": summary.startup_s, "window": summary.window,
            "requests": summary.records}


async def _engine_side(settings: ServeSettings, model: str, inp: Path, bodies: list[bytes], window: int | None) -> dict:
    """(b), (c) and (d): the loaded engine or app, `window` workers pulling from one list of requests."""
    from serve.app import create_app
    from serve.sample_request import GENERATIVE_KINDS
    from serve.v2_codec import decode_infer_request, encode_infer_response

    app = create_app(settings)
    async with app.app.router.lifespan_context(app.app):
        repo = app.state.repository
        while not repo.loaded:
            await asyncio.sleep(0.01)
        window = window or default_window(model_configs(Registry(settings.registry), {model}), settings)
        lv = repo.resolve(model, None)
        engine, sig, max_batch = lv.engine, lv.engine.manifest.signature, repo.configs[model].batching.max_batch_size
        datatypes = {s.name: s.datatype for s in sig.outputs}
        version = str(lv.version)
        if engine.manifest.kind in GENERATIVE_KINDS:
            return await _sampler_side(app, settings, model, engine, version, datatypes, inp, bodies, window)

        async def with_codec(body: bytes) -> None:
            req = decode_infer_request(body, None, sig.inputs, sig.outputs, max_batch, False)
            outputs = await engine.infer(req.inputs, req.batch_size, time.perf_counter() + 30)
            encode_infer_response(model, version, req.id, outputs, req.outputs, datatypes)

        decoded = [decode_infer_request(b, None, sig.inputs, sig.outputs, max_batch, False) for b in bodies]

        async def engine_only(req) -> None:
            await engine.infer(req.inputs, req.batch_size, time.perf_counter() + 30)

        async def drive(items, call) -> float:
            it = iter(items)

            async def worker() -> None:
                for item in it:
                    await call(item)
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(window)))
            return time.perf_counter() - started

        routed = [parse_line(raw, i, {}) for i, raw in enumerate(inp.read_bytes().splitlines())]

        async def through_app(req) -> None:
            status, _, _ = await call_app(app, req)
            assert status == 200, status

        await drive(bodies[:2000], with_codec)               # warm-up
        return {"codec_s": await drive(bodies, with_codec), "engine_s": await drive(decoded, engine_only),
                "app_s": await drive(routed, through_app), "window": window}


async def drive_all(items, call, window: int) -> float:
    """Seconds for `window` workers to take every item in order from one iterator and `await call(item)`."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await call(item)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window)))
    return time.perf_counter() - started


async def _sampler_side(app, settings: ServeSettings, model: str, engine, version: str, datatypes: dict,
                        inp: Path, bodies: list[bytes], window: int) -> dict:
    """(b), (c) and (d) for a sampler: decoded as the server decodes a sampler's v2 body
    (serve/sample_request.py), `engine.infer` with the request's parameters, encoded as v2."""
    from serve.sample_request import decode_sample_request
    from serve.v2_codec import encode_infer_response

    sig, timeout_s = engine.manifest.signature, settings.request_timeout_s

    def decode(body: bytes):
        return decode_sample_request(body, None, sig, settings.max_samples_per_request, settings.allow_non_finite)

    async def with_codec(body: bytes) -> bytes:
        req = decode(body)
        outputs = await engine.infer(req.inputs, req.batch_size, time.perf_counter() + timeout_s, req.parameters)
        wanted = [o for o in req.outputs if o.name in outputs]      # the outputs the request's task makes
        return encode_infer_response(model, version, req.id, outputs, wanted, datatypes)[0]

    decoded = [decode(b) for b in bodies]

    async def engine_only(req) -> None:
        await engine.infer(req.inputs, req.batch_size, time.perf_counter() + timeout_s, req.parameters)

    kinds = {model: engine.manifest.kind}
    routed = [parse_line(raw, i, {}, kinds) for i, raw in enumerate(inp.read_bytes().splitlines())]

    async def through_app(req) -> None:
        status, _, body = await call_app(app, req)
        assert status == 200, (status, body[:200])

    first = await with_codec(bodies[0])                              # request 0's answer, to compare with (a)
    await drive_all(bodies[:min(2000, max(window, len(bodies) // 10))], with_codec, window)   # warm-up
    return {"codec_s": await drive_all(bodies, with_codec, window),
            "engine_s": await drive_all(decoded, engine_only, window),
            "app_s": await drive_all(routed, through_app, window), "window": window,
            "first_answer": first}


def same_answer(batch_out: Path, first: bytes) -> float:
    """Largest |difference| between the outputs of (a)'s record 0 and (b)'s answer to request 0."""
    with open(batch_out, "rb") as f:
        record = orjson.loads(f.readline())
    got = {o["name"]: np.asarray(o["data"], np.float64) for o in record["response"]["body"]["outputs"]}
    want = {o["name"]: np.asarray(o["data"], np.float64) for o in orjson.loads(first)["outputs"]}
    if got.keys() != want.keys() or any(got[k].shape != want[k].shape for k in got):
        raise RuntimeError(f"(a) and (b) answered request 0 with different outputs: {sorted(got)} vs {sorted(want)}")
    return max(float(np.max(np.abs(got[k] - want[k]), initial=0.0)) for k in got)


def measure_engine(settings: ServeSettings, model: str, inp: Path, bodies: list[bytes], window: int | None) -> dict:
    factory, _ = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_engine_side(settings.model_copy(update={"models": [model]}), model, inp, bodies, window))


def environment() -> dict[str, str]:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count()),
            "cpu": cpu, "onnxruntime": version("onnxruntime"), "fastapi": version("fastapi"),
            "loop": loop_factory()[1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="mlp-digits", choices=[*CLASSIFIERS, *SAMPLERS],
                   help="model to benchmark: a classifier or a sampler (generation jobs)")
    p.add_argument("--registry", type=Path, default=None,
                   help="existing registry; one without --model gets it with `zooserve demo --only MODEL` "
                        "(default: a temp one built with `zooserve demo`: the two classifiers, or the sampler "
                        "asked for)")
    p.add_argument("--requests", type=int, default=None,
                   help="lines in the batch file (default: 20000 classifiers, 24000 GAN/VAE, 400 diffusion)")
    p.add_argument("--samples", type=int, default=4, help="sampler: images per request (labels per line)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="diffusion: parameters.sampler")
    p.add_argument("--steps", type=int, default=20, help="diffusion: parameters.steps")
    p.add_argument("--window", type=int, default=None, help="requests in flight (default: the batch job's default)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, taking turns; the best counts")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (settings.intra_op_threads)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    generative = args.model in SAMPLERS
    if args.requests is None:
        args.requests = DEFAULT_REQUESTS.get(args.model, 20000)

    workdir = Path(tempfile.mkdtemp(prefix="zooserve-bench-batch-"))
    try:
        registry = args.registry
        if registry is None:
            registry = workdir / "registry"
            build_registry(registry, (args.model,) if generative else CLASSIFIERS)
        elif args.model not in Registry(registry).models():
            build_registry(registry, (args.model,))
        settings = ServeSettings(registry=registry, intra_op_threads=args.threads, log_level="warning")
        inp, out = workdir / "requests.jsonl", workdir / "results.jsonl"
        if generative:
            bodies = write_sampler_requests(inp, args.model, args.requests, args.samples, args.sampler, args.steps)
            what = f"{args.samples} images each" + (f", {args.sampler} {args.steps} steps"
                                                     if args.model == "diffusion-digits" else "")
            print(f"[bench] {args.requests} v2 requests to {args.model} ({what}), {environment()['loop']} loop",
                  flush=True)
        else:
            bodies = write_requests(inp, args.model, args.requests)
            print(f"[bench] {args.requests} v2 requests to {args.model}, {environment()['loop']} loop", flush=True)
        batch_runs, engine_runs = [], []
        for r in range(args.repeats):
            batch_runs.append(measure_batch(settings, inp, out, args.window))
            engine_runs.append(measure_engine(settings, args.model, inp, bodies, args.window))
            b, e = batch_runs[-1], engine_runs[-1]
            if generative:
                e["answer_0_max_abs_diff"] = same_answer(out, e.pop("first_answer"))
            print(f"[bench] run {r + 1}: batch wall {b['wall_s']:.2f} s (answering {b['run_s']:.2f} s, window "
                  f"{b['window']}); engine+codec {e['codec_s']:.2f} s; engine alone {e['engine_s']:.2f} s; "
                  f"app in process {e['app_s']:.2f} s", flush=True)
        n = args.requests
        a_wall = n / min(b["wall_s"] for b in batch_runs)
        a_run = n / min(b["run_s"] for b in batch_runs)
        b_rps = n / min(e["codec_s"] for e in engine_runs)
        c_rps = n / min(e["engine_s"] for e in engine_runs)
        d_rps = n / min(e["app_s"] for e in engine_runs)
        print()
        k = args.samples if generative else 1
        digits = 1 if generative and max(a_wall, b_rps) < 100 else 0

        def rate(rps: float) -> str:       # requests/s, and images/s for a sampler
            return f"{rps:,.{digits}f}" + (f" | {rps * k:,.0f}" if generative else "")

        print(f"| side | requests/s |{' images/s |' if generative else ''} ratio batch(end to end) / side "
              "| ratio batch(answering) / side |")
        print("|---|---:|" + ("---:|" if generative else "") + "---:|---:|")
        print(f"| (a) zooserve batch, end to end | {rate(a_wall)} | - | - |")
        print(f"| (a) zooserve batch, answering phase | {rate(a_run)} | - | - |")
        for label, rps in (("(b) engine.infer + v2 decode/encode", b_rps),
                           ("(c) engine.infer, inputs decoded beforehand", c_rps),
                           ("(d) the server's ASGI app in process, no file", d_rps)):
            print(f"| {label} | {rate(rps)} | {a_wall / rps:.2f} | {a_run / rps:.2f} |")
        if generative:
            print()
            diff = max(e["answer_0_max_abs_diff"] for e in engine_runs)
            print(f"(a) and (b) answers to request 0: max |difference| {diff:.3g}")
        print()
        met = "MET" if a_wall / b_rps >= 0.8 else "MISSED"
        print(f"ratio (a) end to end / (b): {a_wall / b_rps:.2f} — target >= 0.8: {met}")
        if args.out is not None:
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(),
                "model": args.model, "requests": n, "batch_runs": batch_runs, "engine_runs": engine_runs,
                **({"samples_per_request": args.samples, "request_example": orjson.loads(bodies[0])}
                   if generative else {}),
                "requests_per_s": {"batch_end_to_end": a_wall, "batch_answering": a_run, "engine_codec": b_rps,
                                   "engine_only": c_rps, "app_in_process": d_rps}}, indent=2))
            print(f"[bench] wrote {args.out}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
