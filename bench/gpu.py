"""CUDA serving against CPU serving: one registry, two servers, the same requests, in one run.

What a GPU gives each execution pattern as the server runs it today: TorchScript artifacts on torch
CUDA (the machines lent here have no onnxruntime-gpu), token state (KV slots) kept in host memory
and copied to the device and back on every step.

    python3 bench/gpu.py [--out FILE.json]        # needs a CUDA device; refuses to run without one
    python3 bench/gpu.py --devices cpu            # the same steps on the CPU alone (checks the script)

1. trains briefly and publishes, TorchScript only (the weights' quality does not matter here):
   resnet-digits (`small`), decoder-tiny and diffusion-digits (`tiny`);
2. starts `zooserve serve --device cuda` and `zooserve serve --device cpu`, both `--threads 1`
   (the CPU side is one intra-op thread, as on the 2-core machines the other benchmarks use);
3. on each server in turn, closed-loop clients over HTTP:
   - classify: 128 requests of 32 images (v2 infer; 32 is the default max_batch_size), 4 at a time -> images/s;
   - tokens: 32 greedy completions of 64 tokens (`ignore_eos`), 16 at a time -> tokens/s;
   - denoise: 16 DDIM-50 requests of 4 images each, 8 at a time -> images/s;
4. prints one table with the cuda / cpu ratio of each, and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from classify import Server  # noqa: E402  (the house server subprocess of the classifier benchmark)

PROMPT = "ROMEO. What light through yonder window breaks? It is the east, and"


def build_registry(root: Path) -> dict[str, float]:
    """Train each model for a moment and publish it as TorchScript; seconds per step."""
    import torch

    from model_registry import Registry
    from training import export, generative, loop
    from training.lm import train_token_family
    from training.train import train_classifier

    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    registry, work, seconds = Registry(root), root.parent / "work", {}

    def publish(name: str) -> None:
        started = time.perf_counter()
        export.package(work / name / "checkpoint", work / name / "package", formats=("torchscript",),
                       serve_format="torchscript")
        registry.set_alias(name, "stable", registry.publish(name, work / name / "package"))
        seconds[f"export {name}"] = time.perf_counter() - started

    for name, train in (
            ("resnet-digits", lambda out: train_classifier("resnet", "small", out, loop.TrainConfig(epochs=1),
                                                          progress=False)),
            ("decoder-tiny", lambda out: train_token_family("decoder", "tiny", out, steps=40, progress=False,
                                                            block_size=128, vocab_size=2048, eval_batches=1,
                                                            final_eval_batches=2)),
            ("diffusion-digits", lambda out: generative.train_generative(
                "diffusion", "tiny", out, progress=False, eval_cfg=None,
                train_cfg=loop.TrainConfig(epochs=1, batch_size=256)))):
        started = time.perf_counter()
        train(work / name / "checkpoint")
        seconds[f"train {name}"] = time.perf_counter() - started
        publish(name)
    return seconds


def closed_loop(send, requests: int, concurrency: int) -> float:
    """Wall seconds for `requests` calls of send(i), `concurrency` at a time (after one warm-up)."""
    send(-1)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, range(requests)))
    return time.perf_counter() - started


def ok(response):
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:500]}")
    return response


def workloads(url: str) -> dict[str, float]:
    """Units per second of each workload against one server."""
    import httpx

    client = httpx.Client(base_url=url, timeout=600)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 16, (32, 1, 8, 8)).astype(np.float32)

    def classify(_: int) -> None:
        body = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                            "data": images.ravel().tolist()}]}
        ok(client.post("/v2/models/resnet-digits/infer", json=body))

    def complete(_: int) -> None:
        r = client.post("/v1/completions", json={"model": "decoder-tiny", "prompt": PROMPT, "max_tokens": 64,
                                                 "temperature": 0, "ignore_eos": True})
        assert ok(r).json()["usage"]["completion_tokens"] == 64

    def denoise(i: int) -> None:
        body = {"inputs": [{"name": "label", "shape": [4], "datatype": "INT64", "data": [0, 3, 5, 9]},
                           {"name": "seed", "shape": [1], "datatype": "INT64", "data": [max(i, 0)]}],
                "parameters": {"sampler": "ddim", "steps": 50}}
        ok(client.post("/v2/models/diffusion-digits/infer", json=body))

    return {"classify images/s": 128 * 32 / closed_loop(classify, 128, 4),
            "tokens/s": 32 * 64 / closed_loop(complete, 32, 16),
            "denoise images/s": 16 * 4 / closed_loop(denoise, 16, 8)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", metavar="FILE", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--devices", nargs="+", choices=["cuda", "cpu"], default=["cuda", "cpu"],
                   help="the servers to run and compare (default: cuda cpu; cpu alone checks the script on a "
                        "machine without a GPU)")
    args = p.parse_args()
    import torch

    if "cuda" in args.devices and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device (torch sees none); --devices cpu runs the CPU side alone")
    work = Path(tempfile.mkdtemp(prefix="zooserve-bench-gpu-"))
    build = build_registry(work / "registry")
    print("[bench] registry: " + ", ".join(f"{k} {v:.1f} s" for k, v in build.items()), flush=True)
    results = {}
    for device in args.devices:
        server = Server(work / "registry", threads=1, log_path=work / f"server-{device}.log",
                        extra_args=["--device", device])
        try:
            print(f"[bench] {device} server ready in {server.wait_ready():.1f} s", flush=True)
            results[device] = workloads(server.url)
            print(f"[bench] {device}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[device].items()), flush=True)
        finally:
            server.stop()
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"\n{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {name}; {os.cpu_count()} CPU cores; "
          f"torch {torch.__version__}; Python {platform.python_version()}; servers --threads 1\n")
    print("| workload | " + " | ".join(results) + (" | cuda / cpu |" if len(results) == 2 else " |"))
    print("|---|" + "---:|" * (len(results) + (len(results) == 2)))
    for key in next(iter(results.values())):
        ratio = f" {results['cuda'][key] / results['cpu'][key]:.2f}x |" if len(results) == 2 else ""
        print(f"| {key} | " + " | ".join(f"{r[key]:.1f}" for r in results.values()) + " |" + ratio)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "results": results, "build_seconds": build}, indent=2))


if __name__ == "__main__":
    main()
