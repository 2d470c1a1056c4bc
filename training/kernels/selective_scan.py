"""The fused selective scan (selective_scan.c), built on first use and called through ctypes.

Why native code: ONNX Runtime has no op for Mamba-1's scan (its decay differs per channel and
state index). The best standard-op graph made eight passes over a (chunk, N, E) tensor per chunk
and was ~60 % of a 512-token prefill. Its contrib ops that fit the recurrence exactly were slower:
`LinearAttention` ~8x, `GatedDeltaNet` ~5x. This loop does the same work in one pass, with the step size's softplus
before it and the skip term and gate after it (elementwise work a graph spends passes on).

The library is compiled with the machine's C compiler (`$CC`, else `cc`) for this CPU
(-march=native) into a cache folder (`$ZOOSERVE_KERNEL_CACHE`, else ~/.cache/zooserve/kernels),
named by a hash of the source, the flags, the compiler and the CPU. A machine without a compiler
gets `KernelUnavailable`, and its callers use the standard-op graph. `ZOOSERVE_NATIVE_KERNELS=0`
turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("selective_scan.c")
FLAGS = ("-O3", "-ffast-math", "-march=native", "-shared", "-fPIC")
SYMBOL = "zooserve_selective_scan"
CONV_SYMBOL = "zooserve_causal_conv_silu"


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (no compiler, turned off, a failed build)."""


class SelectiveScanKernel:
    """One layer's scan with its softplus, skip term and gate, and the causal conv before it
    (selective_scan.c has the shapes)."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._fn = getattr(library, SYMBOL)
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_long] * 4
        self._conv = getattr(library, CONV_SYMBOL)
        self._conv.restype = ctypes.c_int
        self._conv.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 4

    def scan(self, x: np.ndarray, z: np.ndarray, dt_raw: np.ndarray, a_t: np.ndarray, B: np.ndarray,
             C: np.ndarray, d: np.ndarray, n_new: np.ndarray, state: np.ndarray,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> y (B, T, E) gated, and the new state (B, N, E) (a copy: `state` is left as it was).
        `out`, a float32 (B, T, E) buffer, receives y (a prefill reuses one across its layers)."""
        b, t, e = x.shape
        n = a_t.shape[0]
        expected = {"x": (b, t, e), "z": (b, t, e), "dt_raw": (b, t, e), "a_t": (n, e), "B": (b, t, n),
                    "C": (b, t, n), "d": (e,), "n_new": (b,), "state": (b, n, e)}
        given = {"x": x, "z": z, "dt_raw": dt_raw, "a_t": a_t, "B": B, "C": C, "d": d, "n_new": n_new,
                 "state": state}
        _require_shapes("selective scan", expected, given)
        x, z, dt_raw, a_t, B, C, d = (np.ascontiguousarray(v, dtype=np.float32) for v in (x, z, dt_raw, a_t, B, C, d))
        n_new = np.ascontiguousarray(n_new, dtype=np.int64)
        new_state = np.array(state, dtype=np.float32, order="C", copy=True)
        if out is None or out.shape != (b, t, e) or out.dtype != np.float32 or not out.flags.c_contiguous:
            out = np.empty((b, t, e), np.float32)
        # ctypes releases the GIL for the call: other engine threads run meanwhile
        if self._fn(*(v.ctypes.data for v in (x, z, dt_raw, a_t, B, C, d, n_new, new_state, out)), b, t, e, n):
            raise MemoryError("selective scan: out of memory")
        return out, new_state

    def conv(self, x: np.ndarray, state: np.ndarray, w: np.ndarray, bias: np.ndarray,
             n_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The causal depthwise conv with its silu: x (B, T, E), state (B, K-1, E), w (K, E),
        bias (E,), n_new (B,) -> out (B, T, E) and the conv state after each row's real tokens."""
        b, t, e = x.shape
        k = w.shape[0]
        expected = {"x": (b, t, e), "state": (b, k - 1, e), "w": (k, e), "bias": (e,), "n_new": (b,)}
        given = {"x": x, "state": state, "w": w, "bias": bias, "n_new": n_new}
        _require_shapes("causal conv", expected, given)
        x, state, w, bias = (np.ascontiguousarray(v, dtype=np.float32) for v in (x, state, w, bias))
        n_new = np.ascontiguousarray(n_new, dtype=np.int64)
        out, new_state = np.empty((b, t, e), np.float32), np.empty((b, k - 1, e), np.float32)
        self._conv(*(v.ctypes.data for v in (x, state, w, bias, n_new, out, new_state)), b, t, e, k)
        return out, new_state


def _require_shapes(op: str, expected: dict[str, tuple], given: dict[str, np.ndarray]) -> None:
    """The C loops trust their shapes: check every array before they read."""
    for name, shape in expected.items():
        if given[name].shape != shape:
            raise ValueError(f"{op}: {name} has shape {given[name].shape}, expected {shape}")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    root = os.environ.get("ZOOSERVE_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "zooserve" / "kernels"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def load() -> SelectiveScanKernel:
    """The kernel, compiled once per machine; KernelUnavailable says why not."""
    if os.environ.get("ZOOSERVE_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        raise KernelUnavailable("native kernels are turned off (ZOOSERVE_NATIVE_KERNELS=0)")
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler (set $CC, or install cc/gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"C compiler {cc!r} does not run: {exc}") from exc
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_name(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"selective_scan-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: concurrent builders never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            build = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                   text=True, timeout=300)
            if build.returncode != 0:
                raise KernelUnavailable(f"{cc} failed to build {SOURCE.name}: {build.stderr.strip()[-2000:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return SelectiveScanKernel(ctypes.CDLL(str(path)), path)
    except OSError as exc:
        raise KernelUnavailable(f"cannot load {path}: {exc}") from exc


def available() -> str | None:
    """None when the kernel loads, else the reason it does not."""
    try:
        load()
    except KernelUnavailable as exc:
        return str(exc)
    return None
