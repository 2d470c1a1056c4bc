"""Training recipe for the token families (language models) on the bundled text corpus, or on
the user's own text (`data=`: a .txt file, a folder of .txt files or a .jsonl with a `text` field;
training/user_text.py reads, validates, splits train/validation/test and tokenizes it).

The data path: `text.load_corpus()` -> `text.split_corpus()` (whole plays held out) -> a
byte-level BPE trained on the train split only -> token ids. Training samples random windows
of `block_size + 1` tokens (x = the first T, y = the last T); validation uses fixed,
non-overlapping windows of the held-out ids, so every run scores the same tokens. A unigram
model fit on the train ids is the floor to beat.

Configuration: `train_token_family` takes the family's model Config and an LMTrainConfig resolved by
training/run_config.py (`zooserve train ... --set/--config`); the model's vocab_size and block_size
are derived (the trained tokenizer's size, the train window). Early stopping (`patience`, off by
default) counts evaluations without a better validation loss and restores the best weights.

Run folder (`run_dir`, `zooserve train --out DIR` keeps it in DIR/run): metrics.jsonl (train_loss
and lr each step, val_loss each evaluation) and run-state checkpoints (training/run_state.py: model,
AdamW, scheduler, the batch sampler's generator, torch's RNG, the early-stopping state), written
every `checkpoint_every` steps, at each evaluation and at the end. The tokenizer the run trained is
kept there too (tokenizer.json): a resumed run encodes the text with it rather than training it again,
so it sees the same ids. `resume=True` continues from the last checkpoint and ends with the same
weights as the uninterrupted run (one torch thread, same machine); a different configuration or
data is refused (run_state.RunStateError).

Dimensions: B batch, T window (block_size), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from training import checkpoint, devices, loop, text
from training.run_state import RunFolder, RunState, RunStateError, tensor_fingerprint, write_atomically
from training.tokenizer import FILENAME as TOKENIZER_FILE
from training.tokenizer import Tokenizer, train_tokenizer

# default optimiser steps per preset: `tiny` trains in about three minutes on one CPU thread
# (~0.15 s a step), `tiny-moe` in about the same time (its dense-computed experts cost ~1.6x a step);
# a "family/preset" key wins over the preset alone: mamba tiny costs ~0.35 s a step (its scan)
DEFAULT_STEPS = {"tiny": 1000, "tiny-moe": 600, "small": 2000, "mamba/tiny": 400, "rnn_lm/tiny": 600}
FALLBACK_STEPS = 1000


@dataclass
class LMTrainConfig:
    steps: int = 1000
    batch_size: int = 8          # at a fixed token budget, 8 x 128 beat 16 x 128 and 4 x 128 (tiny, CPU)
    block_size: int = 128        # training window T; also the model's context length
    lr: float = 4e-3             # 4e-3 and 6e-3 tie for tiny; 2e-3 is clearly worse at this budget
    weight_decay: float = 0.1    # on matrices only; norms, biases and gains are not decayed
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_interval: int = 100     # steps between validations during training
    eval_batches: int = 4        # batches per validation during training
    final_eval_batches: int = 0  # batches for the final score; 0 = every held-out window
    vocab_size: int = 2048       # BPE vocabulary target (the tokenizer's actual size goes to the model)
    seed: int = 0
    # early stopping: evaluations (every eval_interval steps, eval_batches batches) in a row without a
    # validation loss 1e-4 below the best before training stops; the best weights are then restored.
    # 0 = off: every step runs and the last weights are kept (the presets: the demo models train so)
    patience: int = 0
    # with a run folder: a run-state checkpoint every this many steps, besides those at each
    # evaluation and at the end; 0 = only those (it may change between a run and its resumption)
    checkpoint_every: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "block_size", "eval_interval", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, not {getattr(self, name)}")
        for name in ("warmup_steps", "eval_batches", "final_eval_batches", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be above 0, not {self.lr}")


@dataclass
class TokenData:
    """The corpus split, its tokenizer and the encoded ids of each side."""

    split: text.TextSplit
    tokenizer: Tokenizer
    train_ids: torch.Tensor   # (N_train,) int64
    val_ids: torch.Tensor     # (N_val,) int64
    # the user's own text only (training/user_text.py); the bundled corpus has no test side
    test_ids: torch.Tensor | None = None            # (N_test,) int64
    details: dict[str, Any] | None = None           # lineage.dataset_details
    tokenizer_lineage: dict[str, Any] | None = None  # lineage.training_config.tokenizer


@functools.lru_cache(maxsize=2)
def prepare_token_data(seed: int = 0, vocab_size: int = 2048) -> TokenData:
    """Load and split the corpus, train the BPE on the train split, encode both sides (~7 s;
    cached per process, so several runs in one process, e.g. a test session, pay it once.
    Nothing downstream mutates the result)."""
    split = text.split_corpus(text.load_corpus(), seed=seed)
    return encode_token_data(split, train_tokenizer(split.train, vocab_size=vocab_size))


def encode_token_data(split: text.TextSplit, tok: Tokenizer) -> TokenData:
    """Both sides of `split` encoded with `tok` (a resumed run passes the tokenizer it trained)."""
    as_ids = lambda s: torch.tensor(tok.encode_long(s), dtype=torch.int64)  # noqa: E731
    return TokenData(split, tok, as_ids(split.train), as_ids(split.val))


def make_token_batches(ids: np.ndarray | torch.Tensor, block_size: int, batch_size: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: x, y both (B, T) int64 with y[:, t] == x[:, t + 1]."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    if ids.numel() < block_size + 1:
        raise ValueError(f"need at least block_size + 1 = {block_size + 1} ids, have {ids.numel()}")
    starts = torch.randint(0, ids.numel() - block_size, (batch_size,), generator=generator)  # (B,)
    window = ids[starts[:, None] + torch.arange(block_size + 1)]                              # (B, T+1)
    return window[:, :-1], window[:, 1:]


def unigram_baseline(train_ids, val_ids, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of an add-one-smoothed unigram model fit on train."""
    train = torch.as_tensor(train_ids, dtype=torch.int64)
    val = torch.as_tensor(val_ids, dtype=torch.int64)
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0   # (V,)
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[val].mean())


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, loss_fn: Callable, val_ids, block_size: int,
                batch_size: int = 16, max_batches: int | None = None, *, precision: str = "fp32") -> float:
    """Mean loss over non-overlapping windows of `val_ids` taken from the start (the same
    windows every call), at most `max_batches` batches of them; the model is left in eval mode.
    On the model's device (the windows are cut on the CPU and moved), under autocast for bf16/fp16."""
    ids = torch.as_tensor(val_ids, dtype=torch.int64)
    n_windows = (ids.numel() - 1) // block_size
    if n_windows == 0:
        raise ValueError(f"need at least block_size + 1 = {block_size + 1} held-out ids")
    if max_batches:
        n_windows = min(n_windows, max_batches * batch_size)
    offsets = torch.arange(block_size + 1)
    model.eval()
    device = loop._device_of(model)
    total = 0.0
    for first in range(0, n_windows, batch_size):
        starts = torch.arange(first, min(first + batch_size, n_windows)) * block_size   # (B,)
        window = ids[starts[:, None] + offsets].to(device)                               # (B, T+1)
        with devices.autocast(device, precision):
            loss = loss_fn(model, (window[:, :-1], window[:, 1:]))
        total += float(loss) * len(starts)
    return total / n_windows


def _optimizer(model: torch.nn.Module, cfg: LMTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, linears) only; a parameter marked
    `_no_weight_decay` (mamba's A_log, a matrix of log decay rates) is never decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decayed) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


@dataclass
class _Progress:
    """train_lm's counters and early-stopping state (what a run-state checkpoint must carry)."""

    step: int = 0
    recent: list[float] = dataclasses.field(default_factory=list)   # the last 20 train losses
    initial_val: float = math.nan
    val_loss: float = math.nan          # the latest evaluation's
    best_loss: float = math.inf         # early stopping only (patience > 0)
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals: int = 0

    @property
    def train_loss(self) -> float:
        return sum(self.recent) / max(1, len(self.recent))

    @classmethod
    def resumed(cls, state: RunState) -> _Progress:
        """The counters as a run-state checkpoint recorded them (the token loop's own in `extra`)."""
        extra = state.extra
        return cls(step=state.step, recent=list(extra["recent"]), initial_val=extra["initial_val"],
                   val_loss=extra["val_loss"], best_loss=state.best_loss, best_step=extra["best_step"],
                   best_state=state.best_weights, bad_evals=state.bad_epochs)

    def saved(self) -> dict[str, Any]:
        """What a run-state checkpoint records of these (RunFolder.save's keywords)."""
        return dict(step=self.step, best_loss=self.best_loss, best_weights=self.best_state,
                    bad_epochs=self.bad_evals, last_loss=self.recent[-1] if self.recent else math.nan,
                    extra={"recent": self.recent, "initial_val": self.initial_val, "val_loss": self.val_loss,
                           "best_step": self.best_step})


def train_lm(model: torch.nn.Module, loss_fn: Callable, train_ids: torch.Tensor, val_ids: torch.Tensor,
             cfg: LMTrainConfig, progress: bool = True, desc: str = "lm", *,
             run_dir: str | Path | None = None, resume: bool = False,
             run_config: dict[str, Any] | None = None, device: str | torch.device = "cpu", precision: str = "fp32",
             tensorboard: bool = False, ddp: Any = None) -> dict[str, float]:
    """Train in place for `cfg.steps` steps, or until early stopping (`cfg.patience`) restores the
    best weights; returns initial/final validation and train losses and steps_run (with patience also
    best_val_loss and best_step, the evaluation the weights come from).

    `run_dir` (optional): the run folder (module docstring); `resume=True` continues its run and
    refuses (RunStateError) when `run_config` (the caller's model config, tokenizer and dataset,
    JSON-able), `cfg` or the ids differ from what it recorded. Without `run_dir` nothing is written.

    `device`, `precision` and `tensorboard`: as loop.train takes them (training/devices.py): the model
    and each batch on `device` (the windows are still drawn on the CPU, so the data order is the same
    anywhere), the loss (training and evaluation) under autocast for bf16/fp16 on CUDA, fp16 through
    a GradScaler; the model comes back on the device it was on (the CPU) before this returns. The
    precision is part of the recorded configuration, the device is not (a GPU run resumes on the
    CPU). `tensorboard` (needs `run_dir`): metrics.jsonl's scalars as event files in run_dir/tensorboard.

    `ddp` (a training.distributed.Rank, under torchrun): each step draws world x batch_size window
    starts and this rank trains on its batch of them, in DistributedDataParallel; rank 0 alone writes
    the run folder, which records the world size. distributed.DistributedError before anything runs
    when the training ids hold fewer batches of distinct windows than there are ranks."""
    if ddp is not None:
        ddp.check_token_batches(train_ids.numel(), cfg.block_size, cfg.batch_size)
        device = ddp.device if ddp.device.type == "cuda" else device
    device = devices.resolve(device)
    devices.check(device, precision)
    if tensorboard and run_dir is None:
        raise ValueError("tensorboard=True writes into the run folder: give run_dir too")
    home = loop._device_of(model)
    generator = torch.Generator().manual_seed(cfg.seed)   # the training windows' starts (on the CPU)
    model.to(device)   # before the optimiser exists: its state is made beside the parameters
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: loop.cosine_with_warmup(s, cfg.warmup_steps, cfg.steps))
    scaler = devices.grad_scaler(device, precision)
    evaluate = lambda n: evaluate_lm(model, loss_fn, val_ids, cfg.block_size, cfg.batch_size, n,  # noqa: E731
                                     precision=precision)
    if ddp is not None:   # rank 0's score on every rank: early stopping decides alike
        evaluate = lambda n: ddp.broadcast_float(evaluate_lm(model, loss_fn, val_ids, cfg.block_size,  # noqa: E731
                                                             cfg.batch_size, n, precision=precision))
    p, run = _Progress(), None
    try:
        if run_dir is not None:
            config = {"run": run_config or {}, "train": dataclasses.asdict(cfg), "precision": precision,
                      "data": {"train": tensor_fingerprint((train_ids,)), "val": tensor_fingerprint((val_ids,))}}
            if ddp is not None:
                config["distributed"] = ddp.run_config()
            run = RunFolder(run_dir, config, model, opt, sched, generator, scaler, device, tensorboard,
                            writer=ddp is None or ddp.is_writer)
            if resume:
                state = run.resume()
                if state.finished:      # killed after its last checkpoint: the final weights are loaded
                    return state.result
                if state.extra is None:
                    raise RunStateError(f"{run.run_dir}: its run_state.json is not a token-family run's (no 'extra')")
                p = _Progress.resumed(state)
            else:
                run.start()
        elif resume:
            raise ValueError("resume=True needs the run_dir of the run to resume")
        if p.step == 0:
            p.initial_val = p.val_loss = evaluate(cfg.eval_batches)
            if run is not None:
                run.log(step=0, val_loss=p.val_loss)
        if ddp is not None:
            ddp.wrap(model)
        bar = _fit(model, loss_fn, train_ids, cfg, opt, sched, generator, evaluate, p, run, progress, desc,
                   device, precision, scaler, ddp)
        if p.best_state is not None:    # early stopping on: the best evaluation's weights
            model.load_state_dict(p.best_state)
        final_val = evaluate(cfg.final_eval_batches or None)
        bar.set_postfix(train_loss=f"{p.train_loss:.3f}", val_loss=f"{final_val:.3f}")
        bar.close()
        result = {"initial_val_loss": p.initial_val, "val_loss": final_val, "train_loss": p.train_loss,
                  "steps_run": p.step}
        if cfg.patience:
            result.update(best_val_loss=p.best_loss, best_step=p.best_step)
        if run is not None:
            run.log(step=p.step, final_val_loss=final_val, **({"early_stopped": p.step < cfg.steps,
                                                               "best_val_loss": p.best_loss,
                                                               "best_step": p.best_step} if cfg.patience else {}))
            run.save(result=result, **p.saved())
        return result
    finally:
        model.to(home)   # back where it was (the CPU): the checkpoint, test metrics and export see it there
        if run is not None:
            run.close()


def _fit(model: torch.nn.Module, loss_fn: Callable, train_ids: torch.Tensor, cfg: LMTrainConfig,
         opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
         evaluate: Callable[[int | None], float], p: _Progress, run: RunFolder | None, progress: bool,
         desc: str, device: torch.device = torch.device("cpu"), precision: str = "fp32",
         scaler: torch.amp.GradScaler | None = None, ddp: Any = None) -> tqdm:
    """The steps from `p.step` to cfg.steps, or to early stopping; returns the progress bar, open."""
    net = model if ddp is None else ddp.net   # the training forward: through DistributedDataParallel
    bar = tqdm(range(p.step, cfg.steps), desc=desc, disable=not progress, unit="step", initial=p.step,
               total=cfg.steps)
    for step in bar:
        net.train()
        lr = opt.param_groups[0]["lr"]
        batch = (make_token_batches(train_ids, cfg.block_size, cfg.batch_size, generator) if ddp is None  # on the CPU
                 else ddp.token_batch(train_ids, cfg.block_size, cfg.batch_size, generator))
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
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
        p.step = step + 1
        p.recent = (p.recent + [loss.item() if ddp is None else ddp.mean(loss.item())])[-20:]
        if ddp is not None:
            ddp.after_step(p.step, model, batch)
        if run is not None:
            run.log(step=p.step, train_loss=p.recent[-1], lr=lr)
        # the last step is scored by the final evaluation instead, unless early stopping needs the
        # final weights compared with the best on the same eval_batches windows
        evaluating = (p.step % cfg.eval_interval == 0 and p.step < cfg.steps) or (cfg.patience and p.step == cfg.steps)
        stop = False
        if evaluating:
            p.val_loss = evaluate(cfg.eval_batches)
            if run is not None:
                run.log(step=p.step, val_loss=p.val_loss)
            if cfg.patience:
                if p.val_loss < p.best_loss - 1e-4:
                    p.best_loss, p.best_step, p.bad_evals = p.val_loss, p.step, 0
                    p.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    p.bad_evals += 1
                    stop = p.bad_evals >= cfg.patience
        bar.set_postfix(train_loss=f"{p.train_loss:.3f}", val_loss=f"{p.val_loss:.3f}")
        if stop:
            break
        if run is not None and p.step < cfg.steps and (
                evaluating or (cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0)):
            run.save(**p.saved())   # the last step's state is the final checkpoint
    return bar


def _build_config(module: Any, preset: str, **overrides: Any) -> Any:
    """The family's Config from a preset plus overrides (only fields the Config has)."""
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(module.PRESETS)}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    values = {**module.PRESETS[preset], **{k: v for k, v in overrides.items() if k in fields}}
    return module.Config(**values)


def train_token_family(family: str, preset: str, out_dir: str | Path, steps: int | None = None,
                       progress: bool = True, seed: int | None = None, vocab_size: int | None = None,
                       block_size: int | None = None, data: str | Path | None = None,
                       tokenizer_file: str | Path | None = None, *, train_cfg: LMTrainConfig | None = None,
                       model_config: Any = None, run_dir: str | Path | None = None, resume: bool = False,
                       device: str | torch.device = "cpu", precision: str = "fp32", tensorboard: bool = False,
                       ddp: Any = None, **train_overrides: Any) -> dict[str, float]:
    """Train `training.models.<family>` at `preset` on the text corpus, or on the user's own text
    `data` (a .txt file, a folder of .txt files, a .jsonl with a string `text` field per line:
    training/user_text.py); writes the checkpoint (weights, config, meta with lineage) and
    `tokenizer.json` into `out_dir`; returns metrics (with `data`, also test_loss/test_perplexity and
    the unigram's on the test split).

    The train config: `train_cfg` (an LMTrainConfig, as training/run_config.py resolves it), or its
    fields as keywords: `steps` (default: DEFAULT_STEPS for the family/preset), `seed` (0; it also
    seeds the corpus split and the model's initialisation), `vocab_size` (2048), `block_size` (128)
    and **train_overrides; not both. `model_config`: the family's Config (default: the preset's);
    its vocab_size and block_size are derived (the trained tokenizer's size, the train block_size), so
    they must equal the train config's vocab_size (the BPE target) and block_size.

    `run_dir`: the run folder (metrics.jsonl, run-state checkpoints, the tokenizer: module docstring);
    `resume=True` continues the run it holds, with its tokenizer, and ends with the same weights as an
    uninterrupted run; run_state.RunStateError when there is none, or its configuration or data differ.

    `tokenizer_file`: with `data`, a local tokenizer.json (or a folder holding one) used instead of
    training a BPE; decoder and mamba only, its vocabulary at most `vocab_size`. Bad data or a bad
    tokenizer file raises user_data.DataError (one line) before anything trains.

    `device`, `precision`, `tensorboard`: as train_lm takes them (devices.DeviceError, before the data
    is read, when this machine cannot); lineage records the device and precision, and the
    checkpoint is float32 on the CPU whatever they were.

    `ddp` (a training.distributed.Rank, under torchrun): train_lm's data-parallel run; rank 0 alone
    writes the run's tokenizer, the checkpoint and its tokenizer; lineage records
    training_config.distributed."""
    from training.train import code_revision

    device = devices.resolve(device)      # before the data is prepared: a machine without CUDA stops at once
    devices.check(device, precision)

    if tokenizer_file is not None:
        from training.user_text import check_tokenizer_option

        check_tokenizer_option(family, data, tokenizer_file)
    module = importlib.import_module(f"training.models.{family}")
    if train_cfg is None:
        default_steps = DEFAULT_STEPS.get(f"{family}/{preset}", DEFAULT_STEPS.get(preset, FALLBACK_STEPS))
        cfg = LMTrainConfig(steps=steps or default_steps, block_size=128 if block_size is None else block_size,
                            vocab_size=2048 if vocab_size is None else vocab_size, seed=seed or 0, **train_overrides)
    else:
        given = [name for name, value in (("steps", steps), ("seed", seed), ("vocab_size", vocab_size),
                                          ("block_size", block_size)) if value is not None] + sorted(train_overrides)
        if given:
            raise TypeError(f"train_token_family: {', '.join(given)} given besides train_cfg; set them in train_cfg")
        if not isinstance(train_cfg, LMTrainConfig):
            raise TypeError(f"train_token_family: train_cfg must be an lm.LMTrainConfig, not {type(train_cfg).__name__}")
        cfg = train_cfg
    if model_config is not None:
        if not isinstance(model_config, module.Config):
            raise TypeError(f"train_token_family: model_config must be a {family} Config, "
                            f"not {type(model_config).__name__}")
        for name in ("block_size", "vocab_size"):     # derived: a different value would be silently replaced
            if getattr(model_config, name) != getattr(cfg, name):
                raise ValueError(f"model_config.{name} is {getattr(model_config, name)} but the train config's is "
                                 f"{getattr(cfg, name)}: the {family} recipe derives it from train.{name}; set that")
    run_dir = None if run_dir is None else Path(run_dir)
    stored_tokenizer = None
    if run_dir is None and resume:
        raise ValueError("resume=True needs the run_dir of the run to resume")
    if run_dir is not None:     # checked before the data is prepared (seconds) and anything is written
        if resume and not RunState.exists(run_dir):
            raise RunStateError(f"{run_dir} has no run_state.json: no run-state checkpoint to resume from")
        if not resume and RunState.exists(run_dir):
            raise RunStateError(f"{run_dir} already holds a run (run_state.json): resume it, "
                                "or start the run in a new folder")
        if resume and tokenizer_file is None:   # the BPE this run trained, not a new one
            if not (run_dir / TOKENIZER_FILE).exists():
                raise RunStateError(f"{run_dir / TOKENIZER_FILE} is missing: the run's tokenizer, needed to resume it")
            stored_tokenizer = Tokenizer.from_file(run_dir / TOKENIZER_FILE)
    seed = cfg.seed
    started = time.perf_counter()
    if data is None:
        if stored_tokenizer is None:
            tokens = prepare_token_data(seed=seed, vocab_size=cfg.vocab_size)
        else:
            tokens = encode_token_data(text.split_corpus(text.load_corpus(), seed=seed), stored_tokenizer)
    else:
        from training import user_text

        tokens = user_text.prepare(family, data, seed=seed, vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                                   tokenizer_file=tokenizer_file, trained_tokenizer=stored_tokenizer)
    if model_config is None:
        config = _build_config(module, preset, vocab_size=tokens.tokenizer.vocab_size, block_size=cfg.block_size)
    else:
        config = dataclasses.replace(model_config, vocab_size=tokens.tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = module.Model(config)
    data_seconds = time.perf_counter() - started
    tokenizer_lineage = tokens.tokenizer_lineage or {
        "type": "byte-level BPE (HF tokenizers), trained on the train split", "vocab_size": tokens.tokenizer.vocab_size}
    run_config = None
    if run_dir is not None:
        run_config = {"family": family, "preset": preset, "model": dataclasses.asdict(config),
                      "tokenizer": tokenizer_lineage, "dataset_sha256": tokens.split.sha256}
        if not resume and (ddp is None or ddp.is_writer):
            write_atomically(run_dir / TOKENIZER_FILE, lambda tmp: tokens.tokenizer.inner.save(str(tmp)))
    result = train_lm(model, module.loss, tokens.train_ids, tokens.val_ids, cfg, progress, desc=f"{family}/{preset}",
                      run_dir=run_dir, resume=resume, run_config=run_config, device=device, precision=precision,
                      tensorboard=tensorboard, **({} if ddp is None else {"ddp": ddp}))
    unigram = unigram_baseline(tokens.train_ids, tokens.val_ids, tokens.tokenizer.vocab_size)
    metrics = {
        **result,
        "val_perplexity": math.exp(result["val_loss"]),
        "unigram_val_loss": unigram,
        "unigram_val_perplexity": math.exp(unigram),
        "tokens_seen": float(result["steps_run"] * cfg.batch_size * cfg.block_size
                             * (1 if ddp is None else ddp.world_size)),
        "train_tokens": float(tokens.train_ids.numel()),
        "val_tokens": float(tokens.val_ids.numel()),
        "chars_per_token": len(tokens.split.train) / max(1, tokens.train_ids.numel()),
        "data_seconds": data_seconds,
        "train_seconds": time.perf_counter() - started - data_seconds,
    }
    if tokens.test_ids is not None:     # the user's text: scored once on its test split too
        test_loss = evaluate_lm(model, module.loss, tokens.test_ids, cfg.block_size, cfg.batch_size)
        unigram_test = unigram_baseline(tokens.train_ids, tokens.test_ids, tokens.tokenizer.vocab_size)
        metrics.update({"test_loss": test_loss, "test_perplexity": math.exp(test_loss),
                        "unigram_test_loss": unigram_test, "unigram_test_perplexity": math.exp(unigram_test),
                        "test_tokens": float(tokens.test_ids.numel())})
    meta = {
        "family": family,
        "lineage": {
            "training_config": {"preset": preset, "model": dataclasses.asdict(config),
                                "train": dataclasses.asdict(cfg),
                                "tokenizer": tokenizer_lineage, "device": devices.describe(device),
                                "precision": precision},
            "dataset": tokens.split.name, "dataset_split": tokens.split.split, "dataset_sha256": tokens.split.sha256,
            "seed": seed, "metrics": metrics, "code_revision": code_revision(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    }
    if tokens.details is not None:
        meta["lineage"]["dataset_details"] = tokens.details
    if ddp is not None:
        meta["lineage"]["training_config"]["distributed"] = ddp.lineage(cfg.batch_size)
    model.eval()
    if ddp is None or ddp.is_writer:
        checkpoint.save(out_dir, model, config, meta)
        tokens.tokenizer.save(out_dir)
    return metrics


def train_decoder(preset: str, out_dir: str | Path, steps: int | None = None, progress: bool = True,
                  seed: int = 0, vocab_size: int = 2048, block_size: int = 128,
                  **train_overrides: Any) -> dict[str, float]:
    """Train the decoder family at `preset` (see `train_token_family`)."""
    return train_token_family("decoder", preset, out_dir, steps=steps, progress=progress, seed=seed,
                              vocab_size=vocab_size, block_size=block_size, **train_overrides)
