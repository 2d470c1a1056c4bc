"""Text corpus, held-out split by document, and the shared tokenizer (template, streaming)."""

from __future__ import annotations

import pytest
import torch

from training import text
from training.tokenizer import SPECIAL_TOKENS, Tokenizer, chunks, train_tokenizer

MULTIBYTE = "naïve café — 東京 🎉, ‘quoted’ ü\n  indented  \nend"


@pytest.fixture(scope="module")
def corpus() -> text.Corpus:
    return text.load_corpus()


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    # a small slice keeps the test fast; the byte alphabet makes any text encodable anyway
    return train_tokenizer(corpus.text[:300_000], vocab_size=512)


def test_corpus_loads_whole_documents_in_path_order(corpus):
    assert corpus.name in (text.SHAKESPEARE, text.STDLIB)
    paths = [d.path for d in corpus.documents]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert len(corpus.documents) >= 30 and len(corpus.text) > 1_000_000
    assert all(not p.endswith(".pyc") for p in paths)
    if corpus.name == text.SHAKESPEARE:
        assert len(corpus.documents) == 38 and all(p.endswith(".md") for p in paths)
        assert any("hamlet" in p for p in paths)
    assert len(corpus.sha256) == 64


def test_split_is_fixed_and_disjoint_by_document(corpus):
    a, b = text.split_corpus(corpus, seed=0), text.split_corpus(corpus, seed=0)
    assert (a.train, a.val, a.split) == (b.train, b.val, b.split)
    assert a.sha256 == corpus.sha256 and a.name == corpus.name
    held = set(a.val_documents)
    assert 0 < len(held) < len(corpus.documents)
    assert all(p in a.split for p in held)                       # lineage names the held-out documents
    total = sum(len(d.text) for d in corpus.documents)
    assert 0.05 * total <= len(a.val) < 0.25 * total
    for d in corpus.documents:                                   # every document sits wholly on one side
        assert (d.text in a.val) == (d.path in held)
        assert (d.text in a.train) == (d.path not in held)
    other = text.split_corpus(corpus, seed=1)
    assert set(other.val_documents) != held


def test_split_needs_two_documents():
    one = text.Corpus("x", [text.Document("a", "hello")])
    with pytest.raises(ValueError, match="two documents"):
        text.split_corpus(one)


def test_special_tokens_take_ids_0_to_3(tok):
    assert [tok.inner.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_id == 0 and tok.encode("<|endoftext|>") == [0]
    assert tok.vocab_size == 512


def test_round_trip_and_save_load(tok, tmp_path, corpus):
    for s in ["To be, or not to be: that is the question.", MULTIBYTE, "  x\n\n\ty  ", "", corpus.text[:5000]]:
        assert tok.decode(tok.encode(s)) == s
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    again = Tokenizer.from_file(tmp_path)
    assert again.encode(MULTIBYTE) == tok.encode(MULTIBYTE) and again.vocab_size == tok.vocab_size


def test_encode_long_matches_one_encode(tok, corpus):
    sample = corpus.text[:200_000]
    assert len(chunks(sample, 5_000)) > 10
    assert [i for c in chunks(sample, 5_000) for i in tok.encode(c)] == tok.encode(sample)
    assert tok.encode_long(sample) == tok.encode(sample)


def test_chat_template_encodes_specials_as_single_ids(tok):
    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A player."}, {"role": "user", "content": "Say more."}]
    rendered = tok.render_chat(messages)
    assert rendered == ("<|system|>Speak in verse.\n<|user|>Who art thou?\n"
                        "<|assistant|>A player.<|endoftext|><|user|>Say more.\n<|assistant|>")
    ids = tok.encode(rendered)
    assert ids[0] == 3 and ids[-1] == 2
    assert [i for i in ids if i < 4] == [3, 1, 2, 0, 1, 2]
    assert tok.decode(ids) == "Speak in verse.\nWho art thou?\nA player.Say more.\n"   # specials skipped


def test_unknown_role_is_refused_by_name(tok):
    with pytest.raises(ValueError, match="'wizard'"):
        tok.render_chat([{"role": "wizard", "content": "hi"}])


def test_incremental_decode_never_splits_a_character(tok):
    ids = tok.encode(MULTIBYTE) + [tok.eos_id] + tok.encode(" more 東京")
    assert any(tok.token_bytes(i) is not None and tok.decode([i]) == "\ufffd" for i in ids)   # bytes split chars
    stream = tok.decode_stream()
    deltas = [stream.step(i) for i in ids]
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + stream.flush() == tok.decode(ids)
    # an incomplete character at the end is held back, and flush() gives what decode() gives
    cut = tok.encode("東")[:-1]
    stream = tok.decode_stream()
    assert "".join(stream.step(i) for i in cut) == ""
    assert stream.flush() == tok.decode(cut)


def test_incremental_decode_matches_decode_on_arbitrary_ids(tok):
    # random ids include lone continuation bytes and cut characters: invalid bytes must come out
    # as U+FFFD exactly where decode() puts them
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(0, tok.vocab_size, (30,), generator=g).tolist()
        stream = tok.decode_stream()
        assert "".join(stream.step(i) for i in ids) + stream.flush() == tok.decode(ids)
