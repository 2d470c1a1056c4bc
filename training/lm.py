"""Training recipe for the token families (language models) on the bundled text corpus, or on
the user's own text (`data=`: a .txt file, a folder of .txt files or a .jsonl with a `text` field;
training/user_text.py reads, validates, splits train/validation/test and tokenizes it).

The data path: `text.load_corpus()` -> `text.split_corpus()` (whole plays held out) -> a
byte-level BPE trained on the train split only -> token ids. Training samples random windows
of `block_size + 1` tokens (x = the first T, y = the last T); validation uses fixed,
non-overlapping windows of the held-out ids, so every run scores the same tokens. A unigram
model fit on the train ids is the floor to beat.

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

from training import checkpoint, loop, text
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
    tok = train_tokenizer(split.train, vocab_size=vocab_size)
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
                batch_size: int = 16, max_batches: int | None = None) -> float:
    """Mean loss over non-overlapping windows of `val_ids` taken from the start (the same
    windows every call), at most `max_batches` batches of them; the model is left in eval mode."""
    ids = torch.as_tensor(val_ids, dtype=torch.int64)
    n_windows = (ids.numel() - 1) // block_size
    if n_windows == 0:
        raise ValueError(f"need at least block_size + 1 = {block_size + 1} held-out ids")
    if max_batches:
        n_windows = min(n_windows, max_batches * batch_size)
    offsets = torch.arange(block_size + 1)
    model.eval()
    total = 0.0
    for first in range(0, n_windows, batch_size):
        starts = torch.arange(first, min(first + batch_size, n_windows)) * block_size   # (B,)
        window = ids[starts[:, None] + offsets]                                          # (B, T+1)
        total += float(loss_fn(model, (window[:, :-1], window[:, 1:]))) * len(starts)
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


def train_lm(model: torch.nn.Module, loss_fn: Callable, train_ids: torch.Tensor, val_ids: torch.Tensor,
             cfg: LMTrainConfig, progress: bool = True, desc: str = "lm") -> dict[str, float]:
    """Train in place for `cfg.steps` steps; returns initial/final validation and train losses."""
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: loop.cosine_with_warmup(s, cfg.warmup_steps, cfg.steps))
    evaluate = lambda n: evaluate_lm(model, loss_fn, val_ids, cfg.block_size, cfg.batch_size, n)  # noqa: E731
    initial_val = evaluate(cfg.eval_batches)
    val_loss, recent = initial_val, []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        model.train()
        loss = loss_fn(model, make_token_batches(train_ids, cfg.block_size, cfg.batch_size, generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.steps:
            val_loss = evaluate(cfg.eval_batches)
        bar.set_postfix(train_loss=f"{sum(recent) / len(recent):.3f}", val_loss=f"{val_loss:.3f}")
    final_val = evaluate(cfg.final_eval_batches or None)
    bar.set_postfix(train_loss=f"{sum(recent) / len(recent):.3f}", val_loss=f"{final_val:.3f}")
    bar.close()
    return {"initial_val_loss": initial_val, "val_loss": final_val,
            "train_loss": sum(recent) / max(1, len(recent))}


def _build_config(module: Any, preset: str, **overrides: Any) -> Any:
    """The family's Config from a preset plus overrides (only fields the Config has)."""
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(module.PRESETS)}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    values = {**module.PRESETS[preset], **{k: v for k, v in overrides.items() if k in fields}}
    return module.Config(**values)


def train_token_family(family: str, preset: str, out_dir: str | Path, steps: int | None = None,
                       progress: bool = True, seed: int = 0, vocab_size: int = 2048,
                       block_size: int = 128, data: str | Path | None = None,
                       tokenizer_file: str | Path | None = None, **train_overrides: Any) -> dict[str, float]:
    """Train `training.models.<family>` at `preset` on the text corpus, or on the user's own text
    `data` (a .txt file, a folder of .txt files, a .jsonl with a string `text` field per line:
    training/user_text.py); writes the checkpoint (weights, config, meta with lineage) and
    `tokenizer.json` into `out_dir`; returns metrics (with `data`, also test_loss/test_perplexity and
    the unigram's on the test split).

    `tokenizer_file`: with `data`, a local tokenizer.json (or a folder holding one) used instead of
    training a BPE; decoder and mamba only, its vocabulary at most `vocab_size`. Bad data or a bad
    tokenizer file raises user_data.DataError (one line) before anything trains."""
    from training.train import code_revision

    if tokenizer_file is not None:
        from training.user_text import check_tokenizer_option

        check_tokenizer_option(family, data, tokenizer_file)
    module = importlib.import_module(f"training.models.{family}")
    default_steps = DEFAULT_STEPS.get(f"{family}/{preset}", DEFAULT_STEPS.get(preset, FALLBACK_STEPS))
    cfg = LMTrainConfig(steps=steps or default_steps, block_size=block_size,
                        vocab_size=vocab_size, seed=seed, **train_overrides)
    started = time.perf_counter()
    if data is None:
        tokens = prepare_token_data(seed=seed, vocab_size=vocab_size)
    else:
        from training import user_text

        tokens = user_text.prepare(family, data, seed=seed, vocab_size=vocab_size, block_size=block_size,
                                   tokenizer_file=tokenizer_file)
    config = _build_config(module, preset, vocab_size=tokens.tokenizer.vocab_size, block_size=block_size)
    torch.manual_seed(seed)
    model = module.Model(config)
    data_seconds = time.perf_counter() - started
    result = train_lm(model, module.loss, tokens.train_ids, tokens.val_ids, cfg, progress, desc=f"{family}/{preset}")
    unigram = unigram_baseline(tokens.train_ids, tokens.val_ids, tokens.tokenizer.vocab_size)
    metrics = {
        **result,
        "val_perplexity": math.exp(result["val_loss"]),
        "unigram_val_loss": unigram,
        "unigram_val_perplexity": math.exp(unigram),
        "tokens_seen": float(cfg.steps * cfg.batch_size * cfg.block_size),
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
    tokenizer_lineage = tokens.tokenizer_lineage or {
        "type": "byte-level BPE (HF tokenizers), trained on the train split", "vocab_size": tokens.tokenizer.vocab_size}
    meta = {
        "family": family,
        "lineage": {
            "training_config": {"preset": preset, "model": dataclasses.asdict(config),
                                "train": dataclasses.asdict(cfg),
                                "tokenizer": tokenizer_lineage},
            "dataset": tokens.split.name, "dataset_split": tokens.split.split, "dataset_sha256": tokens.split.sha256,
            "seed": seed, "metrics": metrics, "code_revision": code_revision(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    }
    if tokens.details is not None:
        meta["lineage"]["dataset_details"] = tokens.details
    model.eval()
    checkpoint.save(out_dir, model, config, meta)
    tokens.tokenizer.save(out_dir)
    return metrics


def train_decoder(preset: str, out_dir: str | Path, steps: int | None = None, progress: bool = True,
                  seed: int = 0, vocab_size: int = 2048, block_size: int = 128,
                  **train_overrides: Any) -> dict[str, float]:
    """Train the decoder family at `preset` (see `train_token_family`)."""
    return train_token_family("decoder", preset, out_dir, steps=steps, progress=progress, seed=seed,
                              vocab_size=vocab_size, block_size=block_size, **train_overrides)
