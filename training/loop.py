"""The shared training loop: AdamW, linear warm-up then cosine decay, gradient clipping,
early stopping on validation loss (the best weights are restored), a tqdm progress bar.

One model, one loss (`family.loss(model, batch)`); the GAN keeps its own loop.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

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


def train(model: torch.nn.Module, loss_fn: Callable, train_data: Batch, val_data: Batch,
          cfg: TrainConfig, progress: bool = True) -> dict[str, float]:
    """Train in place; returns best_val_loss, epochs_run, steps."""
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(train_data[0].shape[0] / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, cfg.warmup_steps, total_steps))
    best_loss, best_state, bad_epochs, step, epoch, last_loss = math.inf, None, 0, 0, 0, math.nan
    bar = tqdm(range(cfg.epochs), desc=type(model).__name__, disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        for batch in _batches(train_data, cfg.batch_size, generator):
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            last_loss = loss.item()
        val_loss = evaluate(model, loss_fn, val_data)
        bar.set_postfix(train_loss=f"{last_loss:.3f}", val_loss=f"{val_loss:.3f}")
        if val_loss < best_loss - 1e-4:
            best_loss, best_state, bad_epochs = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best_val_loss": best_loss, "epochs_run": epoch + 1, "steps": step}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Batch, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on (images, labels)."""
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in _batches(data, batch_size, None))
    return correct / data[0].shape[0]
