"""The shared training loop: AdamW, linear warm-up then cosine decay, gradient clipping,
early stopping on validation loss (the best weights are restored), a tqdm progress bar;
optionally a run folder that lets a killed run resume exactly (training/run_state.py).

One model, one loss (`family.loss(model, batch)`); the GAN keeps its own loop.

Device and precision (training/devices.py): the model and each batch go to `device`, the loss
(training and evaluation) runs under autocast for bf16/fp16 on CUDA, fp16 through a GradScaler.
The model goes back to the device it came from (the CPU) before `train` returns, so the metrics
computed afterwards, the checkpoint and the export all see the float32 CPU model that is served.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from training import devices
from training.run_state import RunFolder, RunState, tensor_fingerprint

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


def _on(batch: Batch, device: torch.device) -> Batch:
    """`batch` on `device` (the data stays on the CPU; a batch at a time goes over)."""
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn: Callable, data: Batch, batch_size: int = 256, *,
             precision: str = "fp32") -> float:
    """Mean loss over `data` in eval mode, on the model's device (under autocast for bf16/fp16)."""
    model.eval()
    device = _device_of(model)
    total, n = 0.0, 0
    for batch in _batches(data, batch_size, None):
        batch = _on(batch, device)
        with devices.autocast(device, precision):
            loss = loss_fn(model, batch)
        total += float(loss) * batch[0].shape[0]
        n += batch[0].shape[0]
    return total / n


def _device_of(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@dataclass
class _Progress:
    """The loop's counters and early-stopping state."""

    step: int = 0
    last_loss: float = math.nan
    best_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0

    @classmethod
    def resumed(cls, state: RunState) -> _Progress:
        """The counters as a run-state checkpoint recorded them."""
        return cls(step=state.step, last_loss=state.last_loss, best_loss=state.best_loss,
                   best_state=state.best_weights, bad_epochs=state.bad_epochs)

    def saved(self) -> dict[str, Any]:
        """What a run-state checkpoint records of these (RunFolder.save's keywords)."""
        return dict(step=self.step, last_loss=self.last_loss, best_loss=self.best_loss,
                    best_weights=self.best_state, bad_epochs=self.bad_epochs)


def train(model: torch.nn.Module, loss_fn: Callable, train_data: Batch, val_data: Batch,
          cfg: TrainConfig, progress: bool = True, *, run_dir: str | os.PathLike | None = None,
          resume: bool = False, run_config: dict[str, Any] | None = None,
          device: str | torch.device = "cpu", precision: str = "fp32", tensorboard: bool = False,
          ddp: Any = None) -> dict[str, float]:
    """Train in place; returns best_val_loss, epochs_run, steps.

    `run_dir` (optional) makes the run survive being killed (training/run_state.py): a run-state
    checkpoint every `cfg.checkpoint_every` optimiser steps, at each epoch end and at the end, and
    metrics.jsonl (train_loss and lr each step, val_loss each evaluation). `resume=True` continues
    the run of `run_dir` from its last checkpoint and ends with the same weights as an
    uninterrupted run; it refuses (run_state.RunStateError) when `run_config` (the caller's model
    and train configuration, JSON-able), `cfg` or the data differ from what the run recorded.
    Without `run_dir` nothing is written.

    `device` (cpu, cuda, cuda:N, auto) and `precision` (fp32; bf16, fp16 on CUDA): where and how
    the steps run (training/devices.py; DeviceError when this machine cannot). The model comes back
    on the device it was on. The precision is part of the run's configuration (a resumed run must
    use the same); the device is not: a run saved on a GPU resumes on the CPU. `tensorboard`
    (needs `run_dir`): TensorBoard event files in `run_dir`/tensorboard with metrics.jsonl's scalars.

    `ddp` (a training.distributed.Rank, under torchrun): this rank's shard of each epoch's seeded
    order, batch_size rows per rank, the model in DistributedDataParallel; rank 0 alone writes the
    run folder (the others only read it to resume), whose configuration records the world size.
    distributed.DistributedError before anything runs when the ranks outnumber the batches."""
    if ddp is not None:
        ddp.check_batches(train_data[0].shape[0], cfg.batch_size)
        device = ddp.device if ddp.device.type == "cuda" else device
    device = devices.resolve(device)
    devices.check(device, precision)
    if tensorboard and run_dir is None:
        raise ValueError("tensorboard=True writes into the run folder: give run_dir too")
    home = _device_of(model)
    generator = torch.Generator().manual_seed(cfg.seed)   # on the CPU: the data order is the same on any device
    steps_per_epoch = math.ceil((train_data[0].shape[0] if ddp is None else ddp.shard_size(train_data[0].shape[0]))
                                / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    model.to(device)   # before the optimiser exists: its state is made beside the parameters
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, cfg.warmup_steps, total_steps))
    scaler = devices.grad_scaler(device, precision)
    p, start_epoch, skip = _Progress(), 0, 0
    run = None
    try:
        if run_dir is not None:
            config = {"run": run_config or {}, "loop": dataclasses.asdict(cfg), "precision": precision,
                      "data": {"train": tensor_fingerprint(train_data), "val": tensor_fingerprint(val_data)}}
            if ddp is not None:
                config["distributed"] = ddp.run_config()
            run = RunFolder(run_dir, config, model, opt, sched, generator, scaler, device, tensorboard,
                            writer=ddp is None or ddp.is_writer)
            if resume:
                state = run.resume()
                if state.finished:
                    return state.result
                p, start_epoch, skip = _Progress.resumed(state), state.epoch, state.batches_done
            else:
                run.start()
        elif resume:
            raise ValueError("resume=True needs the run_dir of the run to resume")
        if ddp is not None:
            ddp.wrap(model)
        epoch = _fit(model, loss_fn, train_data, val_data, cfg, opt, sched, generator, p, run,
                     start_epoch, skip, progress, device, precision, scaler, ddp)
        if p.best_state is not None:
            model.load_state_dict(p.best_state)
        model.eval()
        result = {"best_val_loss": p.best_loss, "epochs_run": epoch + 1, "steps": p.step}
        if run is not None:
            run.save(epoch=epoch + 1, batches_done=0, result=result, **p.saved())
        return result
    finally:
        model.to(home)   # the caller's model back where it was (the CPU): metrics, checkpoint and export see it there
        if run is not None:
            run.close()


def _fit(model: torch.nn.Module, loss_fn: Callable, train_data: Batch, val_data: Batch, cfg: TrainConfig,
         opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
         p: _Progress, run: RunFolder | None, start_epoch: int, skip: int, progress: bool, device: torch.device,
         precision: str, scaler: torch.amp.GradScaler | None, ddp: Any = None) -> int:
    """The epochs from `start_epoch` (its first `skip` batches already done); returns the last epoch run."""
    epoch = start_epoch
    net = model if ddp is None else ddp.net   # the training forward: through DistributedDataParallel
    bar = tqdm(range(start_epoch, cfg.epochs), desc=type(model).__name__, disable=not progress, unit="epoch",
               initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        shuffle_state = generator.get_state() if run is not None else None   # this epoch's data order
        net.train()
        batches = (_batches(train_data, cfg.batch_size, generator) if ddp is None
                   else ddp.shard_batches(train_data, cfg.batch_size, generator))
        for i, batch in enumerate(batches):
            if i < skip:   # done before the checkpoint this run resumed from
                continue
            batch = _on(batch, device)
            lr = opt.param_groups[0]["lr"]
            with devices.autocast(device, precision):
                loss = loss_fn(net, batch)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            else:   # fp16: scaled backward; clip the true gradients; a step with inf/NaN gradients is skipped
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
            sched.step()
            p.step += 1
            p.last_loss = loss.item() if ddp is None else ddp.mean(loss.item())
            if ddp is not None:
                ddp.after_step(p.step, model, batch)
            if run is not None:
                run.log(step=p.step, epoch=epoch, train_loss=p.last_loss, lr=lr)
                if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
                    run.save(epoch=epoch, batches_done=i + 1, shuffle_state=shuffle_state, **p.saved())
        skip = 0
        if ddp is not None:
            ddp.sync_buffers(model)   # BatchNorm statistics: rank 0's everywhere
        val_loss = evaluate(model, loss_fn, val_data, precision=precision)
        if ddp is not None:
            val_loss = ddp.broadcast_float(val_loss)   # early stopping decides alike on every rank
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
            run.save(epoch=epoch + 1, batches_done=0, **p.saved())
    return epoch


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Batch, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on (images, labels), on the model's device."""
    model.eval()
    device = _device_of(model)
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in
                  (_on(batch, device) for batch in _batches(data, batch_size, None)))
    return correct / data[0].shape[0]
