"""The shared training loop: AdamW, linear warm-up then cosine decay, gradient clipping,
early stopping on validation loss (the best weights are restored), a tqdm progress bar;
optionally a run folder that lets a killed run resume exactly (training/run_state.py).

One model, one loss (`family.loss(model, batch)`); the GAN keeps its own loop.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from training.run_state import MetricsLog, RunState, RunStateError, clean_temporaries, json_ready, tensor_fingerprint

Batch = tuple[torch.Tensor, ...]


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    grad_clip: float = 1.0
    patience: int = 8          # epochs without a better validation loss before stopping
    seed: int = 0
    # with a run folder (train's run_dir): a run-state checkpoint every this many optimiser steps,
    # besides those at each epoch end and at the end; 0: only those
    checkpoint_every: int = 0


def _batches(data: Batch, batch_size: int, generator: torch.Generator | None) -> list[Batch]:
    n = data[0].shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [tuple(t[order[i : i + batch_size]] for t in data) for i in range(0, n, batch_size)]


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn: Callable, data: Batch, batch_size: int = 256) -> float:
    """Mean loss over `data` in eval mode."""
    model.eval()
    total, n = 0.0, 0
    for batch in _batches(data, batch_size, None):
        total += float(loss_fn(model, batch)) * batch[0].shape[0]
        n += batch[0].shape[0]
    return total / n


@dataclass
class _Progress:
    """The loop's counters and early-stopping state."""

    step: int = 0
    last_loss: float = math.nan
    best_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0


def train(model: torch.nn.Module, loss_fn: Callable, train_data: Batch, val_data: Batch,
          cfg: TrainConfig, progress: bool = True, *, run_dir: str | os.PathLike | None = None,
          resume: bool = False, run_config: dict[str, Any] | None = None) -> dict[str, float]:
    """Train in place; returns best_val_loss, epochs_run, steps.

    `run_dir` (optional) makes the run survive being killed (training/run_state.py): a run-state
    checkpoint every `cfg.checkpoint_every` optimiser steps, at each epoch end and at the end, and
    metrics.jsonl (train_loss and lr each step, val_loss each evaluation). `resume=True` continues
    the run of `run_dir` from its last checkpoint and ends with the same weights as an
    uninterrupted run; it refuses (run_state.RunStateError) when `run_config` (the caller's model
    and train configuration, JSON-able), `cfg` or the data differ from what the run recorded.
    Without `run_dir` nothing is written."""
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(train_data[0].shape[0] / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, cfg.warmup_steps, total_steps))
    p, start_epoch, skip = _Progress(), 0, 0
    run = None
    if run_dir is not None:
        config = {"run": run_config or {}, "loop": dataclasses.asdict(cfg),
                  "data": {"train": tensor_fingerprint(train_data), "val": tensor_fingerprint(val_data)}}
        run = _Run(run_dir, config, model, opt, sched, generator)
        if resume:
            state = run.resume(p)
            if state.finished:
                run.close()
                return state.result
            start_epoch, skip = state.epoch, state.batches_done
        else:
            run.start()
    elif resume:
        raise ValueError("resume=True needs the run_dir of the run to resume")
    try:
        epoch = _fit(model, loss_fn, train_data, val_data, cfg, opt, sched, generator, p, run,
                     start_epoch, skip, progress)
        if p.best_state is not None:
            model.load_state_dict(p.best_state)
        model.eval()
        result = {"best_val_loss": p.best_loss, "epochs_run": epoch + 1, "steps": p.step}
        if run is not None:
            run.checkpoint(p, epoch + 1, 0, generator.get_state(), result=result)
        return result
    finally:
        if run is not None:
            run.close()


def _fit(model: torch.nn.Module, loss_fn: Callable, train_data: Batch, val_data: Batch, cfg: TrainConfig,
         opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
         p: _Progress, run: _Run | None, start_epoch: int, skip: int, progress: bool) -> int:
    """The epochs from `start_epoch` (its first `skip` batches already done); returns the last epoch run."""
    epoch = start_epoch
    bar = tqdm(range(start_epoch, cfg.epochs), desc=type(model).__name__, disable=not progress, unit="epoch",
               initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        shuffle_state = generator.get_state() if run is not None else None   # this epoch's data order
        model.train()
        for i, batch in enumerate(_batches(train_data, cfg.batch_size, generator)):
            if i < skip:   # done before the checkpoint this run resumed from
                continue
            lr = opt.param_groups[0]["lr"]
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            p.step += 1
            p.last_loss = loss.item()
            if run is not None:
                run.log(step=p.step, epoch=epoch, train_loss=p.last_loss, lr=lr)
                if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
                    run.checkpoint(p, epoch, i + 1, shuffle_state)
        skip = 0
        val_loss = evaluate(model, loss_fn, val_data)
        bar.set_postfix(train_loss=f"{p.last_loss:.3f}", val_loss=f"{val_loss:.3f}")
        if run is not None:
            run.log(step=p.step, epoch=epoch, val_loss=val_loss)
        if val_loss < p.best_loss - 1e-4:
            p.best_loss, p.best_state, p.bad_epochs = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            p.bad_epochs += 1
            if p.bad_epochs >= cfg.patience:
                break
        if run is not None and epoch + 1 < cfg.epochs:   # the last epoch's state is the final checkpoint
            run.checkpoint(p, epoch + 1, 0, generator.get_state())
    return epoch


class _Run:
    """A run folder bound to the live objects of one `train` call: starts or resumes the run,
    logs metrics and writes run-state checkpoints (training/run_state.py does the files)."""

    def __init__(self, run_dir: str | os.PathLike, config: dict[str, Any], model: torch.nn.Module,
                 opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                 generator: torch.Generator):
        self.run_dir, self.config = Path(run_dir), json_ready(config)
        self.model, self.opt, self.sched, self.generator = model, opt, sched, generator
        self.param_names = [name for name, _ in model.named_parameters()]
        self.metrics: MetricsLog | None = None
        self.seq = 0

    def start(self) -> None:
        if RunState.exists(self.run_dir):
            raise RunStateError(f"{self.run_dir} already holds a run (run_state.json): resume it, "
                                "or start the run in a new folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.run_dir)
        self.metrics = MetricsLog(self.run_dir)

    def resume(self, p: _Progress) -> RunState:
        """Load the last checkpoint into the model, optimiser, scheduler, RNGs and `p`."""
        state = RunState.load(self.run_dir)
        state.check_config(self.config, self.run_dir)
        state.check_parameters(self.model)
        clean_temporaries(self.run_dir)
        self.metrics, self.seq = MetricsLog(self.run_dir, keep_bytes=state.metrics_offset), state.seq
        self.model.load_state_dict(state.model)
        if state.finished:
            self.model.eval()
            return state
        self.opt.load_state_dict(state.optimizer)
        self.sched.load_state_dict(state.scheduler)
        self.generator.set_state(state.shuffle_state)
        torch.set_rng_state(state.torch_rng_state)
        p.step, p.last_loss, p.bad_epochs = state.step, state.last_loss, state.bad_epochs
        p.best_loss, p.best_state = state.best_loss, state.best_weights
        return state

    def log(self, **record: Any) -> None:
        self.metrics.write(**record)

    def checkpoint(self, p: _Progress, epoch: int, batches_done: int, shuffle_state: torch.Tensor,
                   result: dict[str, Any] | None = None) -> None:
        """Save the run as it stands: at `batches_done` batches into `epoch`, whose data order
        `shuffle_state` gives; `result` marks the run finished."""
        state = RunState(
            config=self.config, model=self.model.state_dict(), optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict(), param_names=self.param_names,
            epoch=epoch, batches_done=batches_done, step=p.step, shuffle_state=shuffle_state,
            torch_rng_state=torch.get_rng_state(), best_loss=p.best_loss, best_weights=p.best_state,
            bad_epochs=p.bad_epochs, last_loss=p.last_loss, metrics_offset=self.metrics.commit(),
            finished=result is not None, result=result, seq=self.seq)
        state.save(self.run_dir)
        self.seq = state.seq

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Batch, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on (images, labels)."""
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in _batches(data, batch_size, None))
    return correct / data[0].shape[0]
