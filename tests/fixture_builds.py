"""Work the tests run two at a time on the 2-core machine instead of leaving a core idle: models a
session or module fixture builds in spawned processes (`run_two_at_a_time`, one torch thread
each), and a reference training run in the background of the run it is compared with
(`in_background`)."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def build_token_model(work: Path, name: str, family: str, preset: str, steps: int, vocab_size: int,
                      train_overrides: dict[str, Any], config_overrides: dict[str, Any]) -> Path:
    """Train `family` at `preset` on the bundled corpus and package it (export and parity) into
    work/name/package; returns that folder."""
    import importlib

    import torch

    from training import export
    from training.lm import train_token_family

    torch.set_num_threads(1)
    model_config = None
    if config_overrides:
        module = importlib.import_module(f"training.models.{family}")
        model_config = module.Config(**{**module.PRESETS[preset], **config_overrides},
                                     vocab_size=vocab_size, block_size=128)
    train_token_family(family, preset, work / name / "checkpoint", steps=steps, progress=False, block_size=128,
                       vocab_size=vocab_size, model_config=model_config, **train_overrides)
    export.package(work / name / "checkpoint", work / name / "package")
    return work / name / "package"


def publish_demo_model(registry_root: Path, name: str) -> int:
    """`zooserve demo`'s recipe for one model, with one torch thread; returns its version."""
    import torch

    from training.cli import publish_demo_model

    torch.set_num_threads(1)
    return publish_demo_model(registry_root, name)[0]


def train_on_folder(family: str, argv: list[str]) -> int:
    """`zooserve train family ...argv` with one torch thread; its exit status."""
    import torch

    from serve.cli import main

    torch.set_num_threads(1)
    return main(["train", family, *argv])


def train_folder_judge(folder: Path) -> tuple[Any, float, tuple[Any, Any]]:
    """test_user_generative's judge: a resnet trained on the folder's training split (read at 8x8), its
    test accuracy, and the held-out images in [-1, 1] with their labels."""
    import torch

    from training import judge, user_data
    from training.generative import pixels_unit

    torch.set_num_threads(1)
    split = user_data.read("gan", folder, image_size=8).split
    model, accuracy = judge.train_folder_judge(split.train, split.val, split.test)
    return model, accuracy, (pixels_unit(split.test[0]), split.test[1])


def run_two_at_a_time(calls: Iterable[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Each (function, args) in a spawned process, two at once; their results in order. Give the
    longest first: they start in the order given."""
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(function, *args) for function, args in calls]
        return [future.result() for future in futures]


@contextmanager
def in_background(argv: list[str], log: Path, timeout: float, **popen_kwargs: Any) -> Iterator[Callable[[], None]]:
    """Start `argv` (stdout and stderr to `log`) and run the with-block alongside it; yields `finish()`,
    which waits for it (at most `timeout` s from its start) and fails, with its output's tail, unless it
    exited 0. Killed if the block leaves before it ends."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **popen_kwargs)
        deadline = time.monotonic() + timeout

        def finish() -> None:
            try:
                rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = f"still running after {timeout} s"
            assert rc == 0, f"background run {argv}: {rc}\n{log.read_text()[-3000:]}"

        try:
            yield finish
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
