"""`zooserve train`, `zooserve export` and `zooserve demo`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from training.families import FAMILIES

# torch is imported inside the commands: `zooserve serve` builds this parser too and must not
# pay for torch (import time, and ~200k objects for the garbage collector to walk).
FORMATS = ("onnx", "torchscript")

# (registry name, family, preset) published by `zooserve demo`
DEMO_MODELS = [
    ("mlp-digits", "mlp", "tiny"),
    ("resnet-digits", "resnet", "tiny"),
    ("decoder-tiny", "decoder", "tiny"),
    ("decoder-moe-tiny", "decoder", "tiny-moe"),
    ("mamba-tiny", "mamba", "tiny"),
    ("lstm-forecast", "rnn", "tiny"),
    ("gru-forecast", "rnn", "tiny-gru"),
    ("rnn-forecast", "rnn", "tiny-rnn"),
    ("lstm-charlm", "rnn_lm", "tiny"),
    ("gan-digits", "gan", "tiny"),
    ("vae-digits", "vae", "tiny"),
    ("diffusion-digits", "diffusion", "tiny"),
]


def _train(args: argparse.Namespace) -> int:
    import torch

    from training.train import train

    torch.set_num_threads(args.threads)
    metrics = train(args.family, args.preset, args.out)
    print(f"checkpoint written to {args.out}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from training import export

    torch.set_num_threads(args.threads)
    manifest = export.package(args.checkpoint, args.out, tuple(args.formats), args.serve_format)
    for report in manifest.parity:
        print(f"{report.format}: max abs error vs eager {report.max_abs_error:.3g} (tolerance {report.tolerance})")
    print(f"publishable folder written to {args.out}")
    return 0


def demo(registry_root: str | Path, threads: int = 1, progress: bool = True,
         only: list[str] | None = None) -> dict[str, int]:
    """Train, export and publish every demo model (alias `stable` on it); returns name -> version."""
    import torch

    from model_registry import Registry
    from training import export
    from training.train import train

    torch.set_num_threads(threads)
    registry = Registry(registry_root)
    published = {}
    for name, family, preset in DEMO_MODELS:
        if only is not None and name not in only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"zooserve-{name}-") as tmp:
            ckpt, pkg = Path(tmp) / "checkpoint", Path(tmp) / "package"
            print(f"[demo] training {name} ({family}, preset {preset})", flush=True)
            metrics = train(family, preset, ckpt, progress=progress)
            export.package(ckpt, pkg)
            published[name] = registry.publish(name, pkg)
            registry.set_alias(name, "stable", published[name])
            print(f"[demo] published {name} version {published[name]}: {quality(metrics)}", flush=True)
    return published


def quality(metrics: dict[str, float]) -> str:
    """One line on how good a freshly trained demo model is, whatever its family measures."""
    if "test_accuracy" in metrics:
        return f"test accuracy {metrics['test_accuracy']:.3f}"
    if "test_mae" in metrics:
        return f"test MAE {metrics['test_mae']:.3f} (last-value baseline {metrics['naive_test_mae']:.3f})"
    if "val_perplexity" in metrics:
        return (f"held-out perplexity {metrics['val_perplexity']:.1f} "
                f"(unigram baseline {metrics['unigram_val_perplexity']:.1f})")
    # generative families, judged by a digits classifier (training/generative.py)
    judged = {"judge_agreement": "judge agrees with the asked digit on {:.1%} of samples",
              "judge_agreement_ddim50": "judge agrees with the asked digit on {:.1%} of DDIM-50 samples",
              "judge_entropy": "judged-label entropy {:.2f} nats (max ln 10 = 2.30)",
              "test_neg_elbo": "test -ELBO {:.2f} nats"}
    parts = [text.format(metrics[key]) for key, text in judged.items() if key in metrics]
    return "; ".join(parts) or ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _demo(args: argparse.Namespace) -> int:
    from model_registry.cli import resolve_root

    demo(resolve_root(args.registry), threads=args.threads, only=args.only)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `export` and `demo` to the zooserve CLI."""
    p = sub.add_parser("train", help="train a family preset into a checkpoint folder")
    p.add_argument("family", choices=sorted(FAMILIES), help="model family")
    p.add_argument("--preset", default="tiny", help="named size from the family's PRESETS")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="export a checkpoint to ONNX/TorchScript and check parity with eager")
    p.add_argument("checkpoint", help="checkpoint folder (from `zooserve train`) or registry version folder")
    p.add_argument("--out", required=True, help="publishable folder to write")
    p.add_argument("--formats", nargs="+", default=["onnx", "torchscript"], choices=FORMATS,
                   help="artifacts to export")
    p.add_argument("--serve-format", default="onnx", choices=FORMATS,
                   help="which artifact the server runs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.set_defaults(func=_export)

    p = sub.add_parser("demo", help="train, export and publish every demo model (tiny presets)")
    p.add_argument("--registry", default=None, help="registry root (default: $ZOOSERVE_REGISTRY or ./registry)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--only", nargs="+", default=None, choices=[m[0] for m in DEMO_MODELS],
                   help="publish only these demo models")
    p.set_defaults(func=_demo)
