"""The language-model recipe: batches, the unigram floor, held-out evaluation, a short run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import lm
from training.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on shared cores a second OpenMP thread that gets descheduled makes every
    op wait on it (the short run below took 30 s instead of 7 s with two threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Bigram(nn.Module):
    """Stand-in token model: logits depend on the current token only."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)                      # (B, T, V)


def bigram_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def test_batches_are_shifted_windows():
    ids = torch.arange(1000)
    g = torch.Generator().manual_seed(0)
    x, y = lm.make_token_batches(ids.numpy(), block_size=16, batch_size=8, generator=g)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))   # contiguous windows
    assert int(y.max()) <= 999
    x2, _ = lm.make_token_batches(ids, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        lm.make_token_batches(torch.arange(10), 16, 2)


def test_unigram_baseline_is_sane():
    g = torch.Generator().manual_seed(0)
    vocab = 64
    skewed = torch.multinomial(torch.linspace(1, 20, vocab), 20_000, replacement=True, generator=g)
    loss = lm.unigram_baseline(skewed[:15_000], skewed[15_000:], vocab)
    assert 0 < loss < math.log(vocab)
    uniform = torch.randint(0, vocab, (20_000,), generator=g)
    assert lm.unigram_baseline(uniform[:15_000], uniform[15_000:], vocab) == pytest.approx(math.log(vocab), abs=0.02)
    # an id never seen in training still gets a finite (add-one) probability
    assert math.isfinite(lm.unigram_baseline(torch.zeros(10, dtype=torch.int64), torch.tensor([5]), vocab))


def test_evaluate_uses_fixed_non_overlapping_windows():
    vocab, model = 16, Bigram(16)
    ids = torch.randint(0, vocab, (1 + 10 * 8,), generator=torch.Generator().manual_seed(1))
    seen = []

    def recording_loss(m, batch):
        seen.append(batch[0].clone())
        return bigram_loss(m, batch)

    full = lm.evaluate_lm(model, recording_loss, ids, block_size=8, batch_size=4)
    windows = torch.cat(seen)
    assert windows.shape == (10, 8) and torch.equal(windows.flatten(), ids[:-1])
    with torch.no_grad():
        expected = float(bigram_loss(model, (ids[:-1][None], ids[1:][None])))
        first_batch = float(bigram_loss(model, (ids[:32][None], ids[1:33][None])))
    assert full == pytest.approx(expected, rel=1e-5)
    assert lm.evaluate_lm(model, bigram_loss, ids, 8, 4) == full
    assert lm.evaluate_lm(model, bigram_loss, ids, 8, 4, max_batches=1) == pytest.approx(first_batch, rel=1e-5)


def test_train_lm_lowers_held_out_loss_of_a_stand_in():
    # text with structure: token t is followed by t + 1 (mod V) most of the time
    vocab, g = 32, torch.Generator().manual_seed(0)
    noise = torch.rand(6000, generator=g) < 0.1
    ids = torch.cumsum(torch.where(noise, torch.randint(0, vocab, (6000,), generator=g), 1), 0) % vocab
    cfg = lm.LMTrainConfig(steps=60, batch_size=8, block_size=16, lr=5e-2, warmup_steps=5, eval_interval=20)
    torch.manual_seed(0)
    result = lm.train_lm(Bigram(vocab), bigram_loss, ids[:5000], ids[5000:], cfg, progress=False)
    assert result["val_loss"] < 0.5 * result["initial_val_loss"]
    assert result["val_loss"] < lm.unigram_baseline(ids[:5000], ids[5000:], vocab)


def test_short_train_decoder_writes_a_complete_checkpoint(tmp_path):
    pytest.importorskip("training.models.decoder")
    out = tmp_path / "tiny"
    metrics = lm.train_decoder("tiny", out, steps=20, progress=False, vocab_size=512, block_size=32,
                               batch_size=8, warmup_steps=5, eval_interval=10, final_eval_batches=4)
    for name in ("model.safetensors", "config.json", "meta.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert metrics["val_loss"] < metrics["initial_val_loss"]
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert 0 < metrics["unigram_val_loss"] < math.log(512)
    assert metrics["tokens_seen"] == 20 * 8 * 32
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512 and config["block_size"] == 32
    meta = json.loads((out / "meta.json").read_text())
    assert meta["family"] == "decoder"
    lineage = meta["lineage"]
    assert {"training_config", "dataset", "dataset_split", "dataset_sha256", "seed", "metrics",
            "code_revision", "created_at"} <= set(lineage)
    assert "held out whole documents" in lineage["dataset_split"]
    assert lineage["metrics"]["val_loss"] == pytest.approx(metrics["val_loss"])
    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 512 and tok.eos_id == 0
