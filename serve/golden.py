"""Replay a version's stored golden pair through its runtime (the load-time parity check)."""

from __future__ import annotations

from pathlib import Path

from safetensors.numpy import load_file

from model_registry import Manifest
from serve.runtimes import Runtime
from training.parity import describe_error, max_abs_error


class GoldenMismatch(RuntimeError):
    """The artifact's output on the stored golden inputs differs from the stored outputs."""


def check_golden(manifest: Manifest, runtime: Runtime, version_dir: Path) -> float:
    """Max abs error over every output, or GoldenMismatch beyond the parity tolerance."""
    if not manifest.golden:
        raise GoldenMismatch("the manifest names no golden file")
    tensors = load_file(str(version_dir / manifest.golden))
    inputs = {s.name: tensors[f"input.{s.name}"] for s in manifest.signature.inputs}
    got = runtime.run(inputs)
    tolerance = max((p.tolerance for p in manifest.parity), default=1e-4)
    worst = 0.0
    for spec in manifest.signature.outputs:
        expected = tensors[f"output.{spec.name}"]
        if got[spec.name].shape != expected.shape:
            raise GoldenMismatch(f"output {spec.name!r} has shape {got[spec.name].shape}, golden {expected.shape}")
        worst = max(worst, max_abs_error(expected, got[spec.name]))
    if not worst <= tolerance:
        raise GoldenMismatch(f"golden outputs differ by {describe_error(worst)} (tolerance {tolerance})")
    return worst
