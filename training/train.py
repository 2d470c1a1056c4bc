"""Train one family preset on its dataset and write a checkpoint with lineage."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from training import checkpoint, devices, loop
from training import data as bundled
from training.families import family_module, make_config

# which dataset each family trains on
DATASETS = {"mlp": "digits", "resnet": "digits", "decoder": "text", "mamba": "text",
            "rnn": "series", "rnn_lm": "text"}
# the families trained by train_classifier (the shared loop, loop.train), which take user data,
# config overrides and resumable runs
CLASSIFIERS = ("mlp", "resnet")
# the families whose recipe runs the shared loop: --set/--config and --resume reach them
LOOP_FAMILIES = (*CLASSIFIERS, "rnn")
# the families whose recipe takes device, precision and tensorboard (training/devices.py): all of them
DEVICE_FAMILIES = (*CLASSIFIERS, "rnn", "decoder", "mamba", "rnn_lm", "gan", "vae", "diffusion")
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
                     progress: bool = True, data: str | Path | None = None,
                     data_options: dict | None = None, model_config=None, run_dir: str | Path | None = None,
                     resume: bool = False, device: str | torch.device = "cpu", precision: str = "fp32",
                     tensorboard: bool = False, ddp=None) -> dict:
    """Train a classifier on digits, or on the user's own `data` (training/user_data.py: a table
    for mlp, an image folder for resnet; `data_options` are user_data.read's keywords:
    label_column, image_size, channels); writes a checkpoint and returns its metrics. Bad data
    raises user_data.DataError before anything trains.

    `model_config`: the family's Config (default: the preset's; training/run_config.py resolves
    one from --set/--config); with `data`, the fields the data decides (features, classes, image
    size and channels) replace its own. `run_dir`: the run folder of loop.train (run-state
    checkpoints, metrics.jsonl); `resume` continues the run it holds (run_state.RunStateError when
    it cannot). `device`, `precision` and `tensorboard`: as loop.train takes them; lineage records
    the device and precision, and the checkpoint is float32 on the CPU whatever they were.
    `ddp` (a training.distributed.Rank, under torchrun): loop.train's data-parallel run; rank 0 alone
    writes the checkpoint, whose lineage records training_config.distributed (world size, backend,
    batch per rank)."""
    train_cfg = train_cfg or loop.TrainConfig()
    device = devices.resolve(device)      # before the data is read: a machine without CUDA stops at once
    devices.check(device, precision)
    fam = family_module(family)
    config = model_config if model_config is not None else make_config(family, preset)
    if data is None:
        split, labels, details = bundled.digits(seed=train_cfg.seed), bundled.DIGITS_LABELS, None
    else:
        from training import user_data

        user = user_data.read(family, data, seed=train_cfg.seed, **(data_options or {}))
        config = dataclasses.replace(config, **user.config_overrides())
        split, labels, details = user.split, user.class_names, user.details
    torch.manual_seed(train_cfg.seed)
    model = fam.Model(config)
    started = time.perf_counter()
    run_config = {"family": family, "preset": preset, "model": dataclasses.asdict(config),
                  "data": None if data is None else str(Path(data).resolve())}
    result = loop.train(model, fam.loss, split.train, split.val, train_cfg, progress=progress,
                        run_dir=run_dir, resume=resume, run_config=run_config if run_dir is not None else None,
                        device=device, precision=precision, tensorboard=tensorboard,
                        **({} if ddp is None else {"ddp": ddp}))
    metrics = {
        "val_loss": result["best_val_loss"],
        "test_accuracy": loop.accuracy(model, split.test),   # on the CPU in fp32, as it will be served
        "epochs_run": float(result["epochs_run"]),
        "train_seconds": time.perf_counter() - started,
    }
    meta = {
        "family": family,
        "labels": labels,
        "lineage": {
            "training_config": {"preset": preset, "model": dataclasses.asdict(config),
                                "train": dataclasses.asdict(train_cfg), "device": devices.describe(device),
                                "precision": precision},
            "dataset": split.name, "dataset_split": split.split, "dataset_sha256": split.sha256,
            "seed": train_cfg.seed, "metrics": metrics, "code_revision": code_revision(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    }
    if details is not None:
        meta["lineage"]["dataset_details"] = details
    if ddp is not None:
        meta["lineage"]["training_config"]["distributed"] = ddp.lineage(train_cfg.batch_size)
    if ddp is None or ddp.is_writer:
        checkpoint.save(out_dir, model, config, meta)
    return metrics


def train(family: str, preset: str, out_dir: str | Path, progress: bool = True, data: str | Path | None = None,
          data_options: dict | None = None, train_cfg: loop.TrainConfig | None = None, model_config=None,
          run_dir: str | Path | None = None, resume: bool = False, device: str | torch.device = "cpu",
          precision: str = "fp32", tensorboard: bool = False, ddp=None) -> dict:
    """Train `family` at `preset` into `out_dir`: on its bundled dataset, or for mlp/resnet/rnn on
    the user's own `data` (see train_classifier and series.train_forecaster, whose `data_options`
    are value_column and time_column; ValueError for other families). `train_cfg`,
    `model_config`, `run_dir` and `resume`: the classifiers' loop settings, model config and run
    folder (see train_classifier); the other families' recipes do not take them yet.
    decoder, mamba, rnn_lm: their own text with `data` (`data_options`: tokenizer), `train_cfg` an
    lm.LMTrainConfig, `model_config`, `run_dir` and `resume` as lm.train_token_family takes them.
    gan, vae, diffusion: an image folder with `data` (`data_options`: image_size, channels), the
    rest as generative.train_generative takes them (`train_cfg` a GANTrainConfig for gan).
    `device`, `precision`, `tensorboard` (training/devices.py): every family's recipe takes them
    (DEVICE_FAMILIES; loop.train, lm.train_lm, the GAN's loop); ValueError for a family outside it.
    `ddp` (a training.distributed.Rank: this process is one rank of a torchrun launch): data-parallel
    training for training.distributed.FAMILIES (mlp, resnet: loop.train; decoder, mamba, rnn_lm:
    lm.train_lm); ValueError for the others."""
    if ddp is not None:
        from training.distributed import FAMILIES as DISTRIBUTED_FAMILIES

        if family not in DISTRIBUTED_FAMILIES:
            raise ValueError(f"data-parallel training (torchrun) is for {', '.join(DISTRIBUTED_FAMILIES)}, "
                             f"not {family}")
        placement_ddp = {"ddp": ddp}
    else:
        placement_ddp = {}
    if family not in DEVICE_FAMILIES and (str(device) not in ("cpu", "auto") or precision != "fp32" or tensorboard):
        raise ValueError(f"device, precision and tensorboard are for {', '.join(DEVICE_FAMILIES)} so far, not {family} "
                         f"(asked: device {device}, precision {precision}, tensorboard {tensorboard})")
    placement = {"device": device, "precision": precision, "tensorboard": tensorboard}
    if family == "rnn":
        from training.series import train_forecaster

        options = data_options or {}
        overrides = {} if model_config is None else {k: v for k, v in dataclasses.asdict(model_config).items()
                                                     if k not in ("mean", "std", "step_std")}   # fit on the data
        return train_forecaster(family, preset, out_dir, train_cfg, progress=progress, data=data,
                                value_column=options.get("value_column"), time_column=options.get("time_column"),
                                run_dir=run_dir, resume=resume, **placement, **overrides)
    if DATASETS.get(family) == "text":  # decoder, mamba, rnn_lm: training/lm.py, its own loop and run folder
        from training.lm import train_token_family

        tokenizer = (data_options or {}).get("tokenizer")
        # rnn_lm is character level: the byte tokenizer without merges (vocab 260); a train_cfg
        # (training/run_config.py) carries that vocab_size already
        vocab = ({"vocab_size": family_module(family).Config.vocab_size}
                 if family == "rnn_lm" and train_cfg is None else {})
        return train_token_family(family, preset, out_dir, progress=progress, data=data, tokenizer_file=tokenizer,
                                  train_cfg=train_cfg, model_config=model_config, run_dir=run_dir, resume=resume,
                                  **vocab, **placement, **placement_ddp)
    if family in ("gan", "vae", "diffusion"):   # training/generative.py: digits or an image folder, judged
        from training import generative

        return generative.train(family, preset, out_dir, progress=progress, data_path=data,
                                data_options=data_options, train_cfg=train_cfg, model_config=model_config,
                                run_dir=run_dir, resume=resume, **placement)
    if data is not None or train_cfg is not None or model_config is not None or run_dir is not None:
        if family not in CLASSIFIERS:
            raise ValueError(f"--data, --set, --config and --resume are for {', '.join(LOOP_FAMILIES)} so far, "
                             f"not {family}")
        return train_classifier(family, preset, out_dir, train_cfg, progress=progress, data=data,
                                data_options=data_options, model_config=model_config, run_dir=run_dir,
                                resume=resume, **placement, **placement_ddp)
    if DATASETS.get(family) == "digits":
        return train_classifier(family, preset, out_dir, progress=progress, **placement, **placement_ddp)
    if DATASETS.get(family) == "series":
        from training.series import train_forecaster

        return train_forecaster(family, preset, out_dir, progress=progress, **placement)
    raise ValueError(f"no training recipe for family {family!r}")
