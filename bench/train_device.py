"""Training throughput of one family on the CPU against CUDA, in the same run (issue 15).

    python3 bench/train_device.py                               # mlp tiny: cpu fp32, then cuda fp32 and bf16
    python3 bench/train_device.py --family resnet --batch-size 256 --precisions fp32 bf16 fp16 --out r.json

Trains the family with the shared loop (training/loop.py, as `zooserve train --device/--precision`
does, without a run folder) on the bundled digits: one untimed warm-up epoch on each device (CUDA
context, kernel selection), then --epochs timed epochs with early stopping off. Throughput is
training examples seen per second (epochs x training rows / seconds, validation included, as a run
spends it). Prints one line per device and precision and the cuda / cpu ratio of each; without a
CUDA device it prints the CPU figures and says that there is no GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FAMILIES = ("mlp", "resnet")   # the classifiers on digits: a batch of images per step, so examples/s reads plainly
PRECISIONS = ("fp32", "bf16", "fp16")


def measure(family: str, preset: str, device: str, precision: str, epochs: int, batch_size: int) -> dict:
    """Seconds and examples/s of `epochs` epochs after one warm-up epoch, on `device` in `precision`."""
    import torch

    from training import data, loop
    from training.families import family_module, make_config

    fam, split = family_module(family), data.digits(seed=0)
    rows = split.train[0].shape[0]

    def run(n: int) -> float:
        torch.manual_seed(0)
        model = fam.Model(make_config(family, preset))
        cfg = loop.TrainConfig(epochs=n, batch_size=batch_size, patience=n + 1)   # no early stop: n epochs
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = loop.train(model, fam.loss, split.train, split.val, cfg, progress=False, device=device,
                            precision=precision)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        assert result["epochs_run"] == n, result
        return time.perf_counter() - started

    run(1)                       # warm-up, not counted
    seconds = run(epochs)
    return {"family": family, "preset": preset, "device": device, "precision": precision, "epochs": epochs,
            "batch_size": batch_size, "train_rows": rows, "seconds": seconds,
            "examples_per_s": epochs * rows / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--family", choices=FAMILIES, default="mlp", help="the family to train (default mlp)")
    p.add_argument("--preset", default="tiny", help="its preset (default tiny)")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs on each device, after one warm-up (default 5)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="training batch size; a GPU gains more from larger ones (default 64, the loop's)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"],
                   help="the precisions measured on CUDA; the CPU runs fp32 only (default: fp32 bf16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the CPU side (default 1, as `zooserve train --threads`)")
    p.add_argument("--out", metavar="FILE", type=Path, default=None,
                   help="also write the results as JSON here (default: printed only)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = [measure(args.family, args.preset, "cpu", "fp32", args.epochs, args.batch_size)]
    has_cuda = torch.cuda.is_available()
    if has_cuda:
        rows += [measure(args.family, args.preset, "cuda", precision, args.epochs, args.batch_size)
                 for precision in args.precisions]
    cpu = rows[0]["examples_per_s"]
    print(f"{args.family} {args.preset}, batch {args.batch_size}, {args.epochs} epochs of {rows[0]['train_rows']} "
          f"digits; CPU {args.threads} thread(s)")
    for row in rows:
        ratio = f"  x{row['examples_per_s'] / cpu:.2f} vs cpu" if row["device"] != "cpu" else ""
        print(f"  {row['device']:>4} {row['precision']:>4}: {row['examples_per_s']:10.0f} examples/s "
              f"({row['seconds']:.2f} s){ratio}")
    if not has_cuda:
        print("no GPU: torch sees no CUDA device, so only the CPU was measured")
    if args.out is not None:
        report = {"when": dt.datetime.now(dt.timezone.utc).isoformat(), "host": platform.node(),
                  "cpu_count": os.cpu_count(), "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name(0) if has_cuda else None, "results": rows}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
