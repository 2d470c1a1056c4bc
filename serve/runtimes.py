"""Runtimes: what executes an exported artifact. One interface, chosen by the manifest's format.

ONNX Runtime is primary (CUDA provider first when present, else CPU; the chosen provider is
confirmed with `session.get_providers()` because a missing CUDA library falls back silently).
TorchScript is second: deprecated in torch 2.13, so it stays behind this interface, where a
`torch.export`/AOTInductor runtime can replace it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger("zooserve.runtime")


class Runtime(Protocol):
    format: str
    device: str          # "cuda" or "cpu": where it really runs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute one batch; inputs and outputs keyed by signature name."""
        ...


class OnnxRuntime:
    format = "onnx"

    def __init__(self, path: Path, output_names: list[str], threads: int = 1, device: str = "auto"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        wanted = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            wanted.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=wanted)
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise RuntimeError(f"CUDA was required but ONNX Runtime runs on {self.providers}")
        if wanted[0] != self.providers[0]:
            log.warning("ONNX Runtime fell back from %s to %s for %s", wanted[0], self.providers[0], path)
        self.output_names = output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs))


class TorchScriptRuntime:
    format = "torchscript"

    def __init__(self, path: Path, input_names: list[str], output_names: list[str], threads: int = 1,
                 device: str = "auto"):
        import torch   # imported only when a TorchScript version is served

        torch.set_num_threads(threads)   # one pool per process; 2 shared cores thrash with 2 threads
        self._torch = torch
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if device == "cuda" and not cuda:
            raise RuntimeError("CUDA was required but torch sees no GPU")
        self.device = "cuda" if cuda else "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        if cuda:
            prepare_trace_for_cuda(self.module, self.device)
            # TorchScript's GPU fusers compile a kernel per new input shape, and served shapes move
            # every step (batch rows, KV positions): with them on, an H200 made 446 tokens/s on
            # decoder-tiny and 4,267 images/s on resnet-digits; off, 3,753 and 10,633 (bench/gpu.py).
            # Process-wide switches: every TorchScript version in this server runs unfused.
            torch._C._jit_set_texpr_fuser_enabled(False)
            torch._C._jit_override_can_fuse_on_gpu(False)
        self.input_names, self.output_names = input_names, output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(inputs[n]).to(self.device) for n in self.input_names]
            outs = self.module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {n: o.cpu().numpy() for n, o in zip(self.output_names, outs)}


class SplitPrefillRuntime:
    """A recurrent token model's step with prompts (T > 1) through its split prefill (ONNX
    segments with the native selective scan between them: training/split_prefill.py, ~1.8x faster
    on a 512-token Mamba prompt) and decode steps (T = 1) through the whole step."""

    def __init__(self, whole: Runtime, version_dir: Path, segments: list[str], threads: int = 1):
        from training.split_prefill import SplitPrefill, step_runner   # KernelUnavailable where it cannot load

        self.whole, self.format, self.device = whole, whole.format, whole.device
        self.split = SplitPrefill(version_dir, segments, threads)
        self.prefill = f"split: ONNX segments and the native {Path(self.split.kernel.path).name}"
        self._step = step_runner(self.split, whole.run)     # the same dispatch export's parity checked

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._step(inputs)


def with_split_prefill(runtime: Runtime, manifest, version_dir: Path, threads: int = 1) -> Runtime:
    """`runtime`, wrapped in SplitPrefillRuntime where the manifest has a split prefill, the step
    runs in ONNX Runtime on the CPU (the kernel is CPU code) and the kernel loads; otherwise as
    it is, with `prefill` saying why."""
    from training.kernels.selective_scan import KernelUnavailable

    spec = getattr(manifest, "prefill", None)
    if spec is None:
        return runtime
    why = ("the step runs on cuda; the kernel is CPU code" if runtime.device != "cpu"
           else f"the server runs {runtime.format}" if runtime.format != "onnx" else None)
    if why is None:
        try:
            return SplitPrefillRuntime(runtime, version_dir, spec.segments, threads)
        except KernelUnavailable as exc:
            why = str(exc)
    log.warning("%s: prompts run through the whole step (%s)", version_dir, why)
    runtime.prefill = f"whole step: {why}"
    return runtime


def prepare_trace_for_cuda(module, device: str) -> None:
    """Two things a trace bakes in that `map_location` does not touch, fixed in every method's
    graph before the first run compiles it:
    - the tracing device in ops that create tensors (`torch.arange(n, device=x.device)` becomes
      `device="cpu"`): the decoder and Mamba steps failed on cuda with "two devices";
    - `allow_tf32=True` in every `aten::_convolution` (cuDNN's default when traced), so that the
      global `torch.backends.cudnn.allow_tf32` has no effect: TF32 convolutions put the diffusion
      denoiser 4-5e-4 off its fp32 golden on an H200 (tolerance 1e-4). Set to False: fp32 as exported.
    """
    for sub in module.modules():
        for name in sub._c._method_names():
            graph = sub._c._get_method(name).graph
            for node in graph.findAllNodes("prim::Constant"):
                if node.output().type().kind() == "DeviceObjType" and node.s("value") == "cpu":
                    node.s_("value", device)
            for node in graph.findAllNodes("aten::_convolution"):
                allow_tf32 = list(node.inputs())[-1]          # (..., cudnn_enabled, allow_tf32)
                if allow_tf32.toIValue() is not False:
                    no = graph.create("prim::Constant")       # a new constant: the old one may be shared
                    no.i_("value", 0)
                    no.output().setType(allow_tf32.type())
                    no.insertBefore(node)
                    node.replaceInput(len(list(node.inputs())) - 1, no.output())


def open_runtime(version_dir: Path, fmt: str, artifact: str, input_names: list[str], output_names: list[str],
                 threads: int = 1, device: str = "auto") -> Runtime:
    """The runtime for `fmt` over `version_dir/artifact`."""
    path = version_dir / artifact
    if fmt == "onnx":
        return OnnxRuntime(path, output_names, threads, device)
    if fmt == "torchscript":
        return TorchScriptRuntime(path, input_names, output_names, threads, device)
    raise ValueError(f"no runtime for format {fmt!r}")


# ---- classify batches through pinned host buffers (issue 18) ----------------------------------

class StagingBuffers:
    """Reusable host buffers, one per key: a batch is written into the first rows of its key's
    buffer, which is replaced only when a batch needs more rows (the new one holds the next power
    of two, so a load that grows reallocates a few times, then never) or another dtype or row
    shape. Pinned (page-locked) when `pin`, so that copies to and from a CUDA device can be
    asynchronous; pinning needs CUDA, so a CPU runtime keeps `pin` False."""

    def __init__(self, pin: bool):
        import torch

        self._torch = torch
        self.pin = pin
        self.allocations = 0                  # buffers allocated so far (the reuse is tested by it)
        self._buffers: dict = {}

    @staticmethod
    def capacity(rows: int, current: int = 0) -> int:
        """Rows for a new buffer that must hold `rows`: the next power of two, at least twice `current`."""
        return max(1 << max(rows - 1, 0).bit_length(), 2 * current, 1)

    def rows(self, key) -> int:
        """Rows the key's buffer holds now (0: none yet)."""
        buf = self._buffers.get(key)
        return 0 if buf is None else buf.shape[0]

    def host(self, key, shape: tuple[int, ...], dtype) -> "torch.Tensor":
        """The first shape[0] rows of the key's buffer (grown or replaced as needed), a torch dtype."""
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != dtype or tuple(buf.shape[1:]) != tuple(shape[1:]) or buf.shape[0] < shape[0]:
            same_kind = buf is not None and buf.dtype == dtype and tuple(buf.shape[1:]) == tuple(shape[1:])
            rows = self.capacity(shape[0], buf.shape[0] if same_kind else 0)
            buf = self._torch.empty((rows, *shape[1:]), dtype=dtype, pin_memory=self.pin)
            self._buffers[key] = buf
            self.allocations += 1
        return buf[:shape[0]]

    def stage(self, key, array: np.ndarray) -> "torch.Tensor":
        """`array` copied into the key's buffer; the host tensor over those rows."""
        if array.ndim == 0:                        # not a batch: nothing to reuse
            return self._torch.from_numpy(array.copy())
        dtype = self._torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
        host = self.host(key, array.shape, dtype)
        np.copyto(host.numpy(), array, casting="no")
        return host


class PinnedTorchRuntime:
    """A TorchScript runtime whose batches cross to the device and back through reusable pinned
    host buffers with non-blocking copies (the classify path on CUDA): numpy batch -> the pinned
    input buffer -> `to(device, non_blocking=True)` -> the module -> `copy_(non_blocking=True)` into
    a pinned output buffer -> one stream synchronize -> numpy (a copy: the buffer is reused by the
    next batch). Buffers are per calling thread, since execution instances run batches side by
    side on one runtime. On the CPU (pin False) the copies are no-ops and the logic is the same."""

    def __init__(self, inner: "TorchScriptRuntime", pin: bool | None = None):
        import threading

        self.inner, self._torch = inner, inner._torch
        self.format, self.device = inner.format, inner.device
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.pin = (inner.device == "cuda") if pin is None else pin
        if self.pin and not self._torch.cuda.is_available():
            raise RuntimeError("pinned host buffers need CUDA")
        self._local = threading.local()

    @property
    def module(self):
        return self.inner.module

    def buffers(self) -> StagingBuffers:
        """The calling thread's staging buffers."""
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = StagingBuffers(self.pin)
        return staging

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, staging = self._torch, self.buffers()
        args = [staging.stage(("in", n), np.asarray(inputs[n])).to(self.device, non_blocking=True)
                for n in self.input_names]
        with torch.inference_mode():
            outs = self.inner.module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        hosts = [staging.host(("out", n), tuple(o.shape), o.dtype).copy_(o, non_blocking=True)
                 for n, o in zip(self.output_names, outs)]
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()     # the outputs are in the host buffers
        return {n: h.numpy().copy() for n, h in zip(self.output_names, hosts)}


class BoundOnnxRuntime:
    """An ONNX Runtime session run through I/O binding (the classify path where ONNX Runtime runs on
    CUDA, `onnxruntime-gpu`): each batch's arrays are copied into input OrtValues that live on the
    device, the outputs are written by the session into OrtValues there too, and each comes back
    with one copy. The OrtValues are kept per calling thread (execution instances run batches side
    by side) and per shape, so a load of a few batch sizes allocates device memory a few times and
    then never; ONNX Runtime's own `run` makes new input and output buffers for every batch.

    The same code binds on the CPU (`device="cpu"`), which is how its tests hold it to `run` on a
    machine without CUDA."""

    def __init__(self, inner: OnnxRuntime, device: str | None = None):
        import threading

        import onnxruntime as ort

        self._ort, self.inner, self.session = ort, inner, inner.session
        self.format, self.device, self.output_names = inner.format, inner.device, inner.output_names
        self.bind_device = device or inner.device
        # non-batch dims of each output; None where one is symbolic (then ONNX Runtime allocates it)
        self._rest = {o.name: (tuple(o.shape[1:]) if all(isinstance(d, int) for d in o.shape[1:]) else None)
                      for o in self.session.get_outputs()}
        self._out_types = {o.name: o.type for o in self.session.get_outputs()}
        self._local = threading.local()
        self.allocations = 0                   # OrtValues made so far, all threads (the reuse is tested by it)

    def _values(self) -> tuple:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = (self.session.io_binding(), {})
        return state

    def _value(self, values: dict, key, shape: tuple[int, ...], dtype) -> "object":
        value = values.get(key)
        if value is None:
            if len(values) >= MAX_BOUND_VALUES:       # shapes without end (not a classify load): start over
                values.clear()
            value = values[key] = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype,
                                                                                  self.bind_device, 0)
            self.allocations += 1
        return value

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding, values = self._values()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        rows = None
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            rows = array.shape[0] if array.ndim and rows is None else rows
            value = self._value(values, ("in", name, array.shape, array.dtype.str), array.shape, array.dtype)
            value.update_inplace(array)                           # host -> the value's memory, one copy
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            rest, dtype = self._rest.get(name), _NUMPY_OF_ORT.get(self._out_types.get(name))
            if rest is None or dtype is None or rows is None:
                binding.bind_output(name, self.bind_device)          # ONNX Runtime allocates it
                continue
            shape = (rows, *rest)
            binding.bind_ortvalue_output(name, self._value(values, ("out", name, shape), shape, dtype))
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


MAX_BOUND_VALUES = 256
_NUMPY_OF_ORT = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
                 "tensor(bool)": np.bool_}


def with_device_io(runtime: Runtime) -> Runtime:
    """`runtime` with its batches' device copies managed, where it runs on CUDA: TorchScript behind
    PinnedTorchRuntime, ONNX Runtime behind BoundOnnxRuntime; otherwise as it is."""
    if isinstance(runtime, TorchScriptRuntime) and runtime.device == "cuda":
        return PinnedTorchRuntime(runtime)
    if isinstance(runtime, OnnxRuntime) and runtime.device == "cuda":
        return BoundOnnxRuntime(runtime)
    return runtime
