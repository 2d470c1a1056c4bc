"""Test-only faulty canaries of mlp-digits, built as TorchScript files for `zooserve registry import`
(publish them with IMPORT_ARGS): tests of canary analysis and automatic rollback need versions that
misbehave in a known way.

- build_failing_canary: raises (the server answers 500) on about `fail_share` of inputs, chosen by a
  hash of the pixel values, so the same input fails every time; answers as mlp-digits elsewhere.
- build_slow_canary: answers as mlp-digits, about `extra_ms` later per batch (a loop of throwaway
  matrix products, calibrated when built: TorchScript has no sleep).

Both wrap mlp-digits' own TorchScript artifact, so the signature is the stable version's:
input `image` FP32 [-1, 1, 8, 8] (integer pixels 0..16) -> output `logits` FP32 [-1, 10].
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from model_registry import TensorSpec
from training.import_model import GOLDEN_ROWS, golden_inputs

# the flags that give an imported canary mlp-digits' signature (TorchScript records no names or shapes)
IMPORT_ARGS = ("--input-shape", "1,1,8,8", "--input-name", "image", "--output-name", "logits")
IMAGE = TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])
PIXELS = 64
# a prime: pixel hashes mod it spread evenly, so a threshold of share * MODULUS fails that share
MODULUS = 10007
# (SPIN, SPIN) matrix products make the slow canary's delay; a probe of PROBE_ITERATIONS times them
SPIN = 128
PROBE_ITERATIONS = 200


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit is deprecated in torch 2.13
        return torch.jit.load(str(path), map_location="cpu").eval()


def pixel_hash(image: torch.Tensor, weights: torch.Tensor, modulus: int) -> torch.Tensor:
    """(B, 1, 8, 8) integer-valued pixels -> (B,) int64 in [0, modulus): a weighted sum of the pixels
    with (64,) int64 weights below 2**20 (no overflow: 64 * 16 * 2**20 < 2**31). The modulus is an
    argument because TorchScript cannot read a module-level constant."""
    pixels = image.round().to(torch.int64).reshape(image.shape[0], -1)
    return (pixels * weights).sum(1) % modulus


class FailOnHashedInputs(torch.nn.Module):
    """mlp-digits, raising whenever a row of the batch hashes below `threshold`."""

    def __init__(self, stable: torch.jit.ScriptModule, weights: torch.Tensor, threshold: int):
        super().__init__()
        self.stable = stable
        self.register_buffer("weights", weights)     # (64,) int64
        self.threshold = threshold
        self.modulus = MODULUS

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if bool((pixel_hash(image, self.weights, self.modulus) < self.threshold).any()):
            raise RuntimeError("faulty canary: this input is one it fails on by design (tests/faulty_models.py)")
        return self.stable(image)


class SlowAnswer(torch.nn.Module):
    """mlp-digits after `iterations` throwaway (128, 128) matrix products per batch, whatever its size."""

    def __init__(self, stable: torch.jit.ScriptModule, iterations: int):
        super().__init__()
        self.stable = stable
        self.iterations = iterations
        self.register_buffer("spin", torch.full((SPIN, SPIN), 1.0 / SPIN))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        acc = self.spin
        for _ in range(self.iterations):
            acc = torch.tanh(torch.mm(self.spin, acc))       # tanh keeps it finite
        # the products feed the answer as 0 * (a finite sum): exactly mlp-digits' logits, and a graph
        # optimizer cannot drop them as unused
        return self.stable(image) + 0.0 * acc.sum()


def build_failing_canary(mlp_torchscript_path: str | Path, out_path: str | Path, fail_share: float = 0.05,
                         golden_seed: int = 0) -> Path:
    """A TorchScript mlp-digits that fails on about `fail_share` of inputs. Import it with
    `--seed golden_seed` (both default 0): the hash weights are drawn from the first salt under
    which the import's golden inputs at that seed pass, else the server's load-time golden check
    (which replays them) would refuse the version."""
    torch.set_num_threads(1)
    stable = load_torchscript(mlp_torchscript_path)
    golden = torch.from_numpy(golden_inputs([IMAGE], {"image": [GOLDEN_ROWS, 1, 8, 8]}, golden_seed)["image"])
    threshold = round(fail_share * MODULUS)
    for salt in range(1000):
        weights = torch.randint(1, 1 << 20, (PIXELS,), generator=torch.Generator().manual_seed(salt))
        if not bool((pixel_hash(golden, weights, MODULUS) < threshold).any()):
            break
    else:
        raise RuntimeError(f"no salt in 0..999 lets the golden inputs pass at fail_share {fail_share}")
    return _save(FailOnHashedInputs(stable, weights, threshold), out_path)


def build_slow_canary(mlp_torchscript_path: str | Path, out_path: str | Path, extra_ms: float = 50.0) -> Path:
    """A TorchScript mlp-digits that takes about `extra_ms` longer per batch on this machine, one thread."""
    torch.set_num_threads(1)
    stable = load_torchscript(mlp_torchscript_path)
    return _save(SlowAnswer(stable, _iterations_for(stable, extra_ms)), out_path)


def add_slow_digits(registry_root: Path, work: Path, max_queue_wait_ms: float) -> None:
    """Import a slow canary of the registry's mlp-digits v1 as `slow-digits`: ~50 ms a request,
    batches of one, one instance (one batch at a time, whatever the machine's cores)."""
    from model_registry import Registry
    from training.import_model import import_model

    reg = Registry(registry_root)
    ts = next(p for p in (Path(registry_root) / "mlp-digits" / "1").iterdir() if p.suffix in (".pt", ".ts"))
    import_model(reg, "slow-digits", build_slow_canary(ts, Path(work) / "slow.pt"), input_shape="1,1,8,8",
                 input_name="image", output_name="logits")
    cfg = reg.model_config("slow-digits")
    cfg.batching.max_batch_size, cfg.batching.max_queue_delay_ms, cfg.batching.max_queue_wait_ms = \
        1, 0, max_queue_wait_ms
    cfg.instance_group.count = 1
    reg.write_model_config(cfg)


def _iterations_for(stable: torch.jit.ScriptModule, extra_ms: float) -> int:
    """Spin iterations that take `extra_ms`, from a probe's fastest run: another process busy on the
    shared cores only slows a run, so the fastest is the calm machine's cost, and the canary is at
    least `extra_ms` slower whenever the machine is calm."""
    probe = torch.jit.script(SlowAnswer(stable, PROBE_ITERATIONS))
    image = torch.zeros(1, 1, 8, 8)
    per_iteration_s = (_fastest_run_s(probe, image) - _fastest_run_s(stable, image)) / PROBE_ITERATIONS
    return max(1, math.ceil(extra_ms / 1000 / max(per_iteration_s, 1e-7)))


def _fastest_run_s(module, image: torch.Tensor, runs: int = 7) -> float:
    with torch.inference_mode():
        module(image)              # the profiling executor optimizes the graph over the first runs
        module(image)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            module(image)
            times.append(time.perf_counter() - started)
    return min(times)


def _save(module: torch.nn.Module, out_path: str | Path) -> Path:
    out = Path(out_path)
    torch.jit.save(torch.jit.script(module), str(out))
    return out
