"""Train one family preset on its dataset and write a checkpoint with lineage."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from training import checkpoint, data, loop
from training.families import family_module, make_config

# which dataset each family trains on
DATASETS = {"mlp": "digits", "resnet": "digits", "decoder": "text", "mamba": "text",
            "rnn": "series", "rnn_lm": "text"}
# the generative families train on digits scaled to [-1, 1] (training.generative.digits_unit)
DATASETS.update({"gan": "digits", "vae": "digits", "diffusion": "digits"})


def code_revision() -> str | None:
    """The git commit of this checkout, when there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def train_classifier(family: str, preset: str, out_dir: str | Path, train_cfg: loop.TrainConfig | None = None,
                     progress: bool = True) -> dict:
    """Train a classifier on digits; writes a checkpoint and returns its metrics."""
    train_cfg = train_cfg or loop.TrainConfig()
    fam = family_module(family)
    config = make_config(family, preset)
    split = data.digits(seed=train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    model = fam.Model(config)
    started = time.perf_counter()
    result = loop.train(model, fam.loss, split.train, split.val, train_cfg, progress=progress)
    metrics = {
        "val_loss": result["best_val_loss"],
        "test_accuracy": loop.accuracy(model, split.test),
        "epochs_run": float(result["epochs_run"]),
        "train_seconds": time.perf_counter() - started,
    }
    meta = {
        "family": family,
        "labels": data.DIGITS_LABELS,
        "lineage": {
            "training_config": {"preset": preset, "model": dataclasses.asdict(config),
                                "train": dataclasses.asdict(train_cfg)},
            "dataset": split.name, "dataset_split": split.split, "dataset_sha256": split.sha256,
            "seed": train_cfg.seed, "metrics": metrics, "code_revision": code_revision(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    }
    checkpoint.save(out_dir, model, config, meta)
    return metrics


def train(family: str, preset: str, out_dir: str | Path, progress: bool = True) -> dict:
    """Train `family` at `preset` into `out_dir`."""
    if family in ("gan", "vae", "diffusion"):   # own recipes, samples judged by a digits classifier
        from training import generative

        return generative.train(family, preset, out_dir, progress=progress)
    if DATASETS.get(family) == "digits":
        return train_classifier(family, preset, out_dir, progress=progress)
    if DATASETS.get(family) == "series":
        from training.series import train_forecaster

        return train_forecaster(family, preset, out_dir, progress=progress)
    if family == "rnn_lm":   # character level: the byte-level tokenizer without merges (vocab 260)
        from training.lm import train_token_family

        return train_token_family(family, preset, out_dir, progress=progress,
                                  vocab_size=family_module(family).Config.vocab_size)
    if DATASETS.get(family) == "text":
        from training.lm import train_token_family

        return train_token_family(family, preset, out_dir, progress=progress)
    raise ValueError(f"no training recipe for family {family!r}")
