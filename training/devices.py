"""Where and in what precision training runs: `--device cpu|cuda|auto` and
`--precision fp32|bf16|fp16`, for every family: the shared loop (training/loop.py: mlp, resnet,
rnn, vae, diffusion), the token loop (training/lm.py train_lm: decoder, mamba, rnn_lm) and the
GAN's own loop (training/models/gan.py train) take them alike.

- `cpu`: always there. `cuda`: refused (DeviceError naming what is missing) when this torch has
  no CUDA build or sees no device. `auto`: cuda when torch sees a CUDA device, else cpu.
- `fp32`: plain float32 everywhere. `bf16`/`fp16`: torch.autocast on CUDA (matmuls and
  convolutions in half width, reductions and the loss in float32; the weights and the
  optimiser's state stay float32); fp16 adds a GradScaler so that small gradients do not flush
  to zero. On the CPU only fp32 is allowed: CPU autocast would run slower than fp32 on most
  CPUs and change the results, and quietly training in fp32 instead would ignore what was asked.

Whatever the device and precision, the checkpoint holds float32 CPU tensors (the loop moves the
model back before it returns): it exports and serves on a CPU-only machine.

`validate` needs no torch, so the command line can refuse a bad pair before importing it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_DEVICE = "cpu"
DEFAULT_PRECISION = "fp32"


class DeviceError(ValueError):
    """A device or precision that this machine, or this combination, cannot train with."""


def validate(device: str, precision: str) -> None:
    """What can be refused without torch: unknown names, and half precision on `cpu`."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise DeviceError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if device == "cpu" and precision != "fp32":
        raise DeviceError(f"--precision {precision} is autocast on CUDA; on the CPU training runs in fp32 "
                          "(drop --precision, or use --device cuda)")


def resolve(device: str | torch.device) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` -> a torch.device; DeviceError when CUDA is asked and absent."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if torch.version.cuda is None:
            raise DeviceError(f"--device {device}: this torch ({torch.__version__}) is a CPU-only build, "
                              "without CUDA; install a CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: torch (CUDA {torch.version.cuda}) sees no CUDA device "
                              "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it); use --device cpu or auto")
        resolved = torch.device(device)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return resolved
    raise DeviceError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")


def check(device: torch.device, precision: str) -> None:
    """Refuse a precision the resolved `device` cannot train in (after `auto` became cpu, too)."""
    import torch

    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"training runs on cpu or cuda, not {device.type}")
    if device.type == "cpu" and precision != "fp32":
        raise DeviceError(f"--precision {precision} is autocast on CUDA, and training runs on the CPU here "
                          "(no CUDA device); drop --precision, or train where CUDA is")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                          "use --precision fp16 or fp32")


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The context the forward pass and the loss run in: autocast for bf16/fp16 on CUDA, else nothing."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (whose narrow exponent loses small gradients); None otherwise
    (bf16 has float32's exponent range and needs none)."""
    import torch

    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def describe(device: torch.device) -> str:
    """The device as lineage records it: `cpu`, or `cuda:N (GPU name)`."""
    import torch

    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
