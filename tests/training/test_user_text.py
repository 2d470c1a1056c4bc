"""The token families on the user's own text (issue 15, section 1; training/user_text.py): decoder on a
folder of .txt files (a BPE trained on it; exported, published and served over /v1/completions), mamba
on a .jsonl with a `text` field and a tokenizer.json given, rnn_lm on a single .txt with its byte
tokenizer; bad data refused in one line before anything trains.

The corpus is generated sentences from a small grammar (subject, verb, object, ending: 600 sentences
possible, each word sequence fixed), so that a tiny model beats a unigram model of the same text on
held-out text within a few dozen steps (as the demo's quality line compares them)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path

import httpx
import pytest

from training import checkpoint, user_text
from training.lm import train_token_family
from training.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from training.user_data import DataError

SUBJECTS = ["the cat", "a dog", "my friend", "the old king", "her brother", "the small bird"]
VERBS = ["sees", "likes", "follows", "calls", "finds"]
OBJECTS = ["the river", "a green field", "the tall tower", "his own shadow", "the morning light"]
ENDINGS = ["today.", "at night.", "again and again.", "without a word."]
BRIEF = dict(steps=60, block_size=32, batch_size=8, warmup_steps=5, eval_interval=1000, lr=4e-3)


# one torch thread: results independent of the machine's cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sentences(n: int, seed: int) -> str:
    """`n` generated sentences, four to a line."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n):
        line.append(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                    f"{rng.choice(ENDINGS)}")
        if len(line) == 4:
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines + [" ".join(line)] if line else lines) + "\n"


def sha256_of(root: Path, files: list[Path]) -> str:
    """What lineage promises, computed here: each file's path relative to root, then its bytes."""
    digest = hashlib.sha256()
    for rel in sorted(f.relative_to(root).as_posix() for f in files):
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A folder of 12 .txt files (two in a subfolder, a hidden one and a .md to ignore), a .jsonl of
    300 records (with a blank line and another field), a single .txt."""
    root = tmp_path_factory.mktemp("text")
    folder = root / "stories"
    (folder / "part2").mkdir(parents=True)
    for i in range(12):
        sub = folder / "part2" if i >= 10 else folder
        (sub / f"story{i:02d}.txt").write_text(sentences(120, seed=i))
    (folder / ".hidden.txt").write_text("not read\n")
    (folder / "notes.md").write_text("not read either\n")
    records = [json.dumps({"id": i, "text": sentences(4, seed=100 + i)}) for i in range(300)]
    (root / "lines.jsonl").write_text("\n".join(records[:150] + [""] + records[150:]) + "\n")
    (root / "one.txt").write_text(sentences(800, seed=7))
    return {"folder": folder, "jsonl": root / "lines.jsonl", "txt": root / "one.txt", "root": root}


def beats_unigram(metrics: dict[str, float]) -> None:
    assert metrics["val_perplexity"] < metrics["unigram_val_perplexity"], metrics
    assert metrics["test_perplexity"] < metrics["unigram_test_perplexity"], metrics
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))


# --- reading and splitting (no training) -----------------------------------------------------------

def test_a_folder_is_read_recursively_in_sorted_order_skipping_hidden_and_other_files(corpus):
    user = user_text.read_text(corpus["folder"])
    names = [d.path for d in user.documents]
    assert names == sorted(names) and len(names) == 12
    assert names[:2] == ["part2/story10.txt", "part2/story11.txt"]     # 'p' sorts before 's'
    assert not any("hidden" in n or n.endswith(".md") for n in names)
    assert user.format == "txt folder" and user.reader.startswith("plain")


def test_jsonl_records_and_line_endings(tmp_path, corpus):
    user = user_text.read_text(corpus["jsonl"])
    assert len(user.documents) == 300 and user.reader == "datasets.load_dataset('json')"
    assert user.documents[0].text == sentences(4, seed=100)
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert user_text.read_text(crlf).documents[0].text == "one\ntwo\nthree\n"


def test_split_holds_out_whole_documents_when_they_are_small_else_cuts_the_text(corpus):
    docs = user_text.read_text(corpus["jsonl"]).documents
    parts = user_text.split_documents(docs, seed=0)
    total = sum(len(d.text) for d in docs)
    assert parts.method == "whole documents" and parts.val_documents and parts.test_documents
    assert not set(parts.val_documents) & set(parts.test_documents)
    assert 0.1 * total <= len(parts.val) <= 0.2 * total + 10 and 0.1 * total <= len(parts.test) <= 0.2 * total + 10
    assert user_text.split_documents(docs, seed=0) == parts and user_text.split_documents(docs, seed=1) != parts
    single = user_text.read_text(corpus["txt"]).documents
    cut = user_text.split_documents(single, seed=0)
    assert cut.method == "contiguous cut" and "a single document" in cut.description
    assert cut.train + cut.val + cut.test == single[0].text
    assert cut.train.endswith("\n") and cut.val.endswith("\n")                  # cut at line breaks
    assert 0.08 < len(cut.val) / len(single[0].text) < 0.12


# --- training on it ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decoder_on_folder(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("decoder-folder") / "checkpoint"
    metrics = train_token_family("decoder", "tiny", out, progress=False, vocab_size=512, data=corpus["folder"], **BRIEF)
    return out, metrics


@pytest.mark.slow
def test_decoder_on_a_folder_beats_unigram_and_records_lineage(decoder_on_folder, corpus):
    out, metrics = decoder_on_folder
    beats_unigram(metrics)
    meta = checkpoint.read_meta(out)
    lineage = meta["lineage"]
    details = lineage["dataset_details"]
    files = sorted(corpus["folder"].rglob("story*.txt"))
    assert lineage["dataset_sha256"] == details["sha256"] == sha256_of(corpus["folder"].resolve(),
                                                                        [f.resolve() for f in files])
    assert details["files"] == details["documents"] == 12 and details["format"] == "txt folder"
    assert details["bytes"] == sum(f.stat().st_size for f in files)
    assert details["tokens"]["test"] == metrics["test_tokens"] and details["tokens"]["val"] == metrics["val_tokens"]
    assert details["tokenizer"]["source"] == "trained on the train split"
    assert lineage["training_config"]["tokenizer"] == details["tokenizer"]
    assert lineage["dataset"] == f"user text {corpus['folder'].resolve()}"
    assert "val docs" in lineage["dataset_split"] and "test docs" in lineage["dataset_split"]
    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == json.loads((out / "config.json").read_text())["vocab_size"] <= 512


@pytest.mark.slow
def test_the_checkpoint_exports_publishes_and_serves(decoder_on_folder, tmp_path, start_server):
    from model_registry import Registry
    from training import export

    out, _ = decoder_on_folder
    manifest = export.package(out, tmp_path / "package")
    assert manifest.tokenizer == "tokenizer.json" and all(r.passed for r in manifest.parity)
    assert manifest.lineage.dataset_details["documents"] == 12
    registry = Registry(tmp_path / "registry")
    registry.publish("stories", tmp_path / "package")
    with start_server(registry.root) as server:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "stories", "prompt": "The cat sees",
                                                              "max_tokens": 6, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["text"], str) and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_mamba_on_jsonl_with_a_given_tokenizer_file(decoder_on_folder, corpus, tmp_path):
    given = tmp_path / "my-tokenizer.json"
    given.write_bytes((decoder_on_folder[0] / "tokenizer.json").read_bytes())
    out = tmp_path / "checkpoint"
    metrics = train_token_family("mamba", "tiny", out, progress=False, vocab_size=512, data=corpus["jsonl"],
                                 tokenizer_file=given, **BRIEF)
    beats_unigram(metrics)
    assert (out / "tokenizer.json").read_text() == given.read_text()        # what export copies
    details = checkpoint.read_meta(out)["lineage"]["dataset_details"]
    assert details["format"] == "jsonl" and details["documents"] == 300 and details["split_method"] == "whole documents"
    assert details["tokenizer"]["source"] == str(given.resolve())
    assert details["tokenizer"]["sha256"] == hashlib.sha256(given.read_bytes()).hexdigest()
    assert details["sha256"] == sha256_of(corpus["root"].resolve(), [corpus["jsonl"].resolve()])


@pytest.mark.slow
def test_rnn_lm_on_a_single_txt_keeps_its_byte_tokenizer(corpus, tmp_path):
    out = tmp_path / "checkpoint"
    metrics = train_token_family("rnn_lm", "tiny", out, progress=False, vocab_size=260, data=corpus["txt"],
                                 **{**BRIEF, "steps": 150})
    beats_unigram(metrics)
    assert Tokenizer.from_file(out).vocab_size == 260
    lineage = checkpoint.read_meta(out)["lineage"]
    assert "no merges" in lineage["training_config"]["tokenizer"]["type"]
    details = lineage["dataset_details"]
    assert details["split_method"] == "contiguous cut" and details["documents"] == 1
    assert sum(details["tokens"].values()) == len(corpus["txt"].read_bytes())     # one token a byte


# --- bad data: one line, before anything trains ------------------------------------------------------

def _tokenizer_with_wrong_specials(path: Path) -> Path:
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", *SPECIAL_TOKENS],     # EOS at id 1
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    inner.train_from_iterator(["some text"], trainer)
    inner.save(str(path))
    return path


def _case(name: str, tmp: Path) -> tuple[dict, list[str]]:
    """(train_token_family keywords, fragments the one-line message must hold) for a bad-data case."""
    good = tmp / "good.txt"
    good.write_text(sentences(400, seed=1))
    if name == "missing path":
        return {"data": tmp / "nope.txt"}, ["nope.txt", "no such file"]
    if name == "empty folder":
        (tmp / "empty").mkdir()
        return {"data": tmp / "empty"}, ["empty", "empty folder"]
    if name == "folder without txt":
        (tmp / "docs" / "sub").mkdir(parents=True)
        (tmp / "docs" / "sub" / "a.md").write_text("text")
        return {"data": tmp / "docs"}, ["no .txt files", "'sub/a.md'"]
    if name == "unknown format":
        (tmp / "data.csv").write_text("text\nhello\n")
        return {"data": tmp / "data.csv"}, ["data.csv", "unknown text format '.csv'"]
    if name == "not utf-8 txt":
        (tmp / "folder").mkdir()
        (tmp / "folder" / "a.txt").write_text(sentences(50, seed=0))
        (tmp / "folder" / "b.txt").write_bytes(b"first line\nsecond \xff line\n")
        return {"data": tmp / "folder"}, ["b.txt: not UTF-8", "byte 0xff at offset 18", "line 2, column 8"]
    if name == "only whitespace":
        (tmp / "blank.txt").write_text("  \n\n\t\n")
        return {"data": tmp / "blank.txt"}, ["blank.txt: no text"]
    if name == "jsonl without text":
        (tmp / "d.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text here"}\n{"text": "fine"}\n')
        return {"data": tmp / "d.jsonl"}, ["d.jsonl: line 3: no 'text' field", "'body'"]
    if name == "jsonl text not a string":
        (tmp / "d.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": 42}\n')
        return {"data": tmp / "d.jsonl"}, ["d.jsonl: line 3: 'text' is a JSON number, not a string"]
    if name == "jsonl not json":
        (tmp / "d.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated}\n')
        return {"data": tmp / "d.jsonl"}, ["d.jsonl: line 2: not JSON"]
    if name == "jsonl not utf-8":
        (tmp / "d.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        return {"data": tmp / "d.jsonl"}, ["d.jsonl: line 2: not UTF-8", "byte 0xe9 at offset 30"]
    if name == "too short":
        (tmp / "short.txt").write_text(sentences(20, seed=0))
        return {"data": tmp / "short.txt"}, ["short.txt: too little text", "block_size 32 + 1 = 33 tokens",
                                             "needed", "split has"]
    if name == "tokenizer does not load":
        (tmp / "tokenizer.json").write_text("{not json")
        return {"data": good, "tokenizer_file": tmp / "tokenizer.json"}, ["tokenizer.json: does not load"]
    if name == "tokenizer vocabulary too large":
        train_tokenizer(sentences(400, seed=2), vocab_size=400).save(tmp / "big.json")
        return ({"data": good, "tokenizer_file": tmp / "big.json", "vocab_size": 300},
                ["big.json: vocabulary of", "larger than allowed: vocab_size is 300"])
    if name == "tokenizer with other specials":
        return ({"data": good, "tokenizer_file": _tokenizer_with_wrong_specials(tmp / "other.json")},
                ["other.json", "must take ids 0..3"])
    if name == "rnn_lm refuses a tokenizer file":
        train_tokenizer(sentences(50, seed=2), vocab_size=300).save(tmp / "t.json")
        return ({"family": "rnn_lm", "data": good, "tokenizer_file": tmp / "t.json", "vocab_size": 260},
                ["rnn_lm keeps its byte-level tokenizer"])
    if name == "tokenizer file without data":
        train_tokenizer(sentences(50, seed=2), vocab_size=300).save(tmp / "t.json")
        return {"data": None, "tokenizer_file": tmp / "t.json"}, ["for training on your own text"]
    raise AssertionError(name)


BAD = ["missing path", "empty folder", "folder without txt", "unknown format", "not utf-8 txt", "only whitespace",
       "jsonl without text", "jsonl text not a string", "jsonl not json", "jsonl not utf-8", "too short",
       "tokenizer does not load", "tokenizer vocabulary too large", "tokenizer with other specials",
       "rnn_lm refuses a tokenizer file", "tokenizer file without data"]


@pytest.mark.parametrize("case", BAD)
def test_bad_data_raises_one_line_naming_the_file_before_training(case, tmp_path, monkeypatch):
    from training import lm

    kwargs, fragments = _case(case, tmp_path)
    family = kwargs.pop("family", "decoder")
    kwargs.setdefault("vocab_size", 512)
    monkeypatch.setattr(lm, "train_lm", lambda *a, **k: pytest.fail("trained on bad data"))
    with pytest.raises(DataError) as info:
        train_token_family(family, "tiny", tmp_path / "out", progress=False, block_size=32, steps=1, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "out").exists()


def test_too_short_says_how_many_tokens_are_needed_and_how_many_there_are(tmp_path):
    (tmp_path / "short.txt").write_text(sentences(10, seed=0))
    with pytest.raises(DataError, match=r"too little text: (\d+) tokens, about (\d+) needed") as info:
        user_text.prepare("rnn_lm", tmp_path / "short.txt", vocab_size=260, block_size=64)
    have, needed = map(int, re.search(r"(\d+) tokens, about (\d+) needed", str(info.value)).groups())
    assert have == len((tmp_path / "short.txt").read_bytes()) and needed > have   # bytes: one token each
    # with that many bytes it trains
    (tmp_path / "long.txt").write_text(sentences(10 * (needed // have + 2), seed=0))
    data = user_text.prepare("rnn_lm", tmp_path / "long.txt", vocab_size=260, block_size=64)
    assert min(data.train_ids.numel(), data.val_ids.numel(), data.test_ids.numel()) >= 65
