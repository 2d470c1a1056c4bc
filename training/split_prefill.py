"""A recurrent token model's prefill split around its scan: ONNX segments, with the native causal
conv and fused scan (training/kernels) between them. The decode step (T = 1) stays the whole
exported step.

Why: in the whole-step ONNX graph, Mamba's selective scan can only be written with standard ops
(a Scan over chunks in closed form), which made ~60 % of a 512-token prefill. The family's
`prefill_segments(model)` cuts each layer twice: an "open" segment finishes layer i-1 and
computes layer i's in_proj, the native conv follows, a "mid" segment computes the scan's inputs,
the native scan follows; an exit segment returns the logits. Per prompt that is 2L + 1 ONNX
Runtime calls and 2L native calls, with the same contract as the step:

    run({ids (B, T), n_new (B,), conv_state_i, ssm_state_i, ...}) -> {logits (B, 1, V), new_<state>, ...}

Exported beside model.onnx as prefill_<i>.onnx and checked like the step (right-padded prefill
of rows with different lengths, then decode through the whole step) against eager; the error is
stored in the manifest's `prefill` entry. A server without the kernel runs the whole step.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from training.kernels import selective_scan

SEGMENT_FILE = "prefill_{}.onnx"
KERNEL = "selective_scan"


def supported(fam) -> bool:
    return hasattr(fam, "prefill_segments")


def _io(fam, segment) -> tuple[tuple[str, ...], list[str]]:
    """A segment's input names (its forward's parameters) and output names."""
    names = tuple(inspect.signature(segment.forward).parameters)
    if "n_new" in names:
        return names, ["logits"]
    return names, list(fam.SEGMENT_MID_OUTPUTS if names == ("x",) else fam.SEGMENT_OPEN_OUTPUTS)


def _example(config, names: tuple[str, ...], batch: int = 2, new: int = 7) -> tuple[torch.Tensor, ...]:
    """Random segment inputs at B = 2, T = 7 (distinct, >= 2: both stay dynamic)."""
    g = torch.Generator().manual_seed(0)
    E, D = config.d_inner, config.d_model
    shapes = {"prev_h": (batch, new, D), "prev_y": (batch, new, E), "x": (batch, new, E)}
    made = {"ids": torch.randint(0, config.vocab_size, (batch, new), generator=g),
            "n_new": torch.tensor([new, 3])[:batch]}
    return tuple(made[n] if n in made else torch.randn(shapes[n], generator=g) for n in names)


def _dynamic_shapes(names: tuple[str, ...]) -> dict:
    Dim = torch.export.Dim
    batch, new = Dim("batch", min=1, max=4096), Dim("new", min=1, max=65536)
    return {n: {0: batch} if n == "n_new" else {0: batch, 1: new} for n in names}


def export(fam, model: torch.nn.Module, config, out: Path) -> list[str]:
    """Export the 2L + 1 segments to out/prefill_<i>.onnx; returns the file names in order."""
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    files = []
    try:
        for i, segment in enumerate(fam.prefill_segments(model)):
            names, outputs = _io(fam, segment)
            files.append(SEGMENT_FILE.format(i))
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")   # exporter noise, as in export_recurrent
                torch.onnx.export(segment.eval(), _example(config, names), str(out / files[-1]),
                                  input_names=list(names), output_names=outputs,
                                  dynamic_shapes=_dynamic_shapes(names), external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    return files


class SplitPrefill:
    """The segments in ONNX Runtime and the native conv and scan between them; `run` has the
    step's contract for T > 1."""

    def __init__(self, directory: Path, files: list[str], threads: int = 1,
                 kernel: selective_scan.SelectiveScanKernel | None = None):
        import onnxruntime as ort

        self.kernel = kernel or selective_scan.load()      # KernelUnavailable: the caller keeps the whole step
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = [ort.InferenceSession(str(Path(directory) / f), options, providers=["CPUExecutionProvider"])
                         for f in files]
        if len(files) % 2 != 1:
            raise ValueError(f"a split prefill has 2L + 1 segments, not {len(files)}")
        self.n_layer = len(files) // 2

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_new = inputs["n_new"]
        out: dict[str, np.ndarray] = {}
        feed: dict[str, np.ndarray] = {"ids": inputs["ids"]}
        y = None
        for i in range(self.n_layer):
            opened, mid = self.sessions[2 * i], self.sessions[2 * i + 1]
            h, x_in, z, conv_w, conv_b = opened.run(None, feed)
            x, out[f"new_conv_state_{i}"] = self.kernel.conv(x_in, inputs[f"conv_state_{i}"], conv_w, conv_b, n_new)
            dt, B, C, a_t, d = mid.run(None, {"x": x})
            # one y buffer for every layer: layer i+1's open has read layer i's before its scan writes
            y, out[f"new_ssm_state_{i}"] = self.kernel.scan(x, z, dt, a_t, B, C, d, n_new,
                                                            inputs[f"ssm_state_{i}"], out=y)
            feed = {"prev_h": h, "prev_y": y}
        out["logits"] = self.sessions[-1].run(None, {**feed, "n_new": n_new})[0]
        return out


def step_runner(split: SplitPrefill, whole_step):
    """The served step: prompts (T > 1) through the split prefill, decode steps through the whole step."""
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return split.run(inputs) if inputs["ids"].shape[1] > 1 else whole_step(inputs)
    return run


def export_and_check(fam, model: torch.nn.Module, config, out: Path, step_path: Path) -> dict | None:
    """Segments + their parity (through the served path) as the manifest's `prefill` entry; None
    (and a log line) where the kernel is unavailable: the version then serves the whole step."""
    from training import export_recurrent as rec

    reason = selective_scan.available()
    if reason is not None:
        logging.getLogger("zooserve.export").warning("no split prefill for %s: %s", fam.__name__, reason)
        return None
    files = export(fam, model, config, out)
    run = step_runner(SplitPrefill(out, files), rec.onnx_step_runner(step_path))
    report = rec.check_recurrent_parity(fam, model, config, run, "onnx")
    return {"segments": files, "kernel": KERNEL, "parity": report}
