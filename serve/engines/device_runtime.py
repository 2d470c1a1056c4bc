"""A token model's step over torch tensors on one device, for the device-resident token state
(serve/engines/device_slots.py): `run_tensors` takes and returns tensors on the device, so the
KV cache or recurrent state never leaves it; `run` is the numpy `Runtime` interface (the
load-time golden replay).

Two ways to get the step, same contract (training/export_tokens.py, training/export_recurrent.py):
- "torchscript": the package's traced `model.ts`, the exported and parity-checked artifact (on
  CUDA, the trace's baked-in CPU device constants and TF32 flags are fixed and the shape-
  specialising fusers are off, as in `serve.runtimes.TorchScriptRuntime`);
- "eager": the family's `StepModule` over the package's weights, which dispatches a one-token
  step to the family's decode path where it has one (Mamba: `Mamba.decode`, O(1) ops per token,
  as the exported ONNX step's If does) and is what CUDA graphs / torch.compile would capture.
`open_step(..., kind="auto")` takes TorchScript where the package has it, else eager.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model_registry import Manifest
from serve.runtimes import prepare_trace_for_cuda

log = logging.getLogger("zooserve.runtime")

StepKind = Literal["auto", "torchscript", "eager"]


def resolve_device(setting: str) -> torch.device:
    """The torch device for the server's `device` setting: auto = CUDA when torch sees a GPU."""
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        raise RuntimeError("CUDA was required but torch sees no GPU")
    return torch.device("cpu")


class _EagerStep:
    """StepModule's forward, with T = 1 through the family's decode branch where it has one (the
    branches the exported step chooses between with an If; eager Mamba's forward always scans)."""

    def __init__(self, step: torch.nn.Module):
        self.step = step
        self.branches = (step._decode, step._prefill) if hasattr(step, "_decode") and hasattr(step, "_prefill") \
            else None

    def __call__(self, ids: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.branches is None:
            return self.step(ids, *rest)
        decode, prefill = self.branches
        return (decode if ids.shape[1] == 1 else prefill)(ids, *rest)


class TorchStepRuntime:
    """The step on `device`: inputs and outputs keyed by the signature's names."""

    def __init__(self, module, input_names: list[str], output_names: list[str], device: torch.device, fmt: str):
        self.module, self.input_names, self.output_names = module, input_names, output_names
        self.torch_device = device
        self.device = device.type          # "cuda" or "cpu", as the other runtimes say it
        self.format = fmt                  # "torchscript" or "eager"

    def run_tensors(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step over tensors already on the device; outputs stay there."""
        with torch.no_grad():      # not inference_mode: the outputs are written into the slots' plain tensors
            outs = self.module(*(inputs[n] for n in self.input_names))
        outs = outs if isinstance(outs, tuple) else (outs,)
        return dict(zip(self.output_names, outs, strict=True))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The numpy Runtime interface (golden replay, tests): to the device, one step, back."""
        feeds = {n: torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.torch_device) for n in self.input_names}
        return {n: t.cpu().numpy() for n, t in self.run_tensors(feeds).items()}


def open_step(version_dir: Path, manifest: Manifest, input_names: list[str], output_names: list[str],
              device: torch.device, threads: int = 1, kind: StepKind = "auto") -> TorchStepRuntime:
    """The version's step as a TorchStepRuntime on `device` (see the module docstring for `kind`)."""
    torch.set_num_threads(threads)         # one pool per process, as TorchScriptRuntime sets it
    script = manifest.artifacts.get("torchscript")
    if kind == "auto":
        kind = "torchscript" if script and (version_dir / script).exists() else "eager"
    if kind == "torchscript":
        if not script:
            raise RuntimeError(f"{version_dir}: the package has no TorchScript artifact")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(version_dir / script), map_location=device).eval()
        if device.type == "cuda":
            prepare_trace_for_cuda(module, str(device))
            # as TorchScriptRuntime: shapes move every step (rows, positions), and the GPU fusers
            # would compile a kernel per new shape (process-wide switches)
            torch._C._jit_set_texpr_fuser_enabled(False)
            torch._C._jit_override_can_fuse_on_gpu(False)
        return TorchStepRuntime(module, input_names, output_names, device, "torchscript")
    if kind == "eager":
        from training import checkpoint
        from training.families import family_module

        model, _ = checkpoint.load(version_dir, device)
        step = family_module(manifest.family).StepModule(model).eval()
        return TorchStepRuntime(_EagerStep(step), input_names, output_names, device, "eager")
    raise ValueError(f"no torch step of kind {kind!r}")
