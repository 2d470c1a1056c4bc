"""A user's own text for the token families (issue 15, section 1): read, validate, split, tokenize.

What `train_token_family(..., data=PATH)` accepts:
- a `.txt` file: one document;
- a folder: every `.txt` file under it (recursively, hidden files and folders skipped), one document
  each, in sorted order of their paths relative to the folder;
- a `.jsonl` file: one document per line, from its string field `text` (other fields are ignored).

`.txt` files are read plainly (bytes, then a strict UTF-8 decode, so that a bad byte is named by its
offset and line). `.jsonl` is read with Hugging Face `datasets` (`load_dataset("json")`) offline and
with a temporary cache, as training/user_data.py reads tables; when that fails or a record has no
string `text`, a plain line-by-line scan names the line (counted from 1). Should `datasets` refuse a
file that the scan finds sound (another field holding mixed types, say), the scan's records are used
and the lineage says so. Newlines are normalised to "\\n" and a leading byte-order mark dropped;
documents that are empty or only whitespace are skipped (and counted).

Split (as text.split_corpus holds out the bundled plays, plus a test side): a seeded shuffle of the
documents, whole documents taken in that order for validation until they hold VAL_FRACTION of the
characters, then for test until TEST_FRACTION, so held-out text is never seen in training, not even in
part. When that cannot be done within twice each share (a single file, or a few large ones), the
documents are joined in order and cut instead: training the first 80% of the characters, validation
the next 10%, test the last 10%, each cut moved forward to the next line break when one is near.

Tokenizer: a byte-level BPE trained on the training split only, its vocabulary the train config's
`vocab_size` (rnn_lm passes 260: the byte-level alphabet plus the 4 specials, no merges), as for the
bundled corpus; or a local `tokenizer.json` (decoder, mamba) loaded with HF `tokenizers`, which must
fit what training and serving assume: the specials at ids 0..3, ids 0..V-1, byte-level tokens with all
256 byte symbols, decode(encode(s)) == s, and V at most `vocab_size`. rnn_lm refuses one.

Every split must hold one context window (block_size + 1 tokens): training samples windows from it,
validation and test score non-overlapping windows. Bad data raises user_data.DataError before anything
trains, with one line naming the file, line or byte.

Lineage (`dataset_details`): source, format, reader, files, bytes, documents, characters and tokens per
split, how it was split, the tokenizer's source, and a sha256 over the files (each file's path
relative to the data root, then its bytes: user_data.files_sha256).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import text
from training.tokenizer import FILENAME, SPECIAL_TOKENS, Tokenizer, _byte_decoder, train_tokenizer
from training.user_data import DataError, _first_line, _load, files_sha256

TEXT_SUFFIX = ".txt"
JSONL_SUFFIX = ".jsonl"
TEXT_FIELD = "text"
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
# held-out sides of a whole-document split may hold up to this many times their share of characters
MAX_OVERSHOOT = 2.0
# families whose tokenizer is fixed (byte-level without merges): a tokenizer file is refused
BYTE_TOKENIZER_FAMILIES = ("rnn_lm",)
# what a tokenizer file must give back unchanged (ASCII, Latin-1, CJK, an emoji, whitespace)
ROUND_TRIP_PROBE = "Hello, world! 123\n\tcafé naïve — 日本語 😀  end \r\n"
FORMATS_HINT = "give a .txt file, a folder of .txt files, or a .jsonl file with a string 'text' field per line"


@dataclass
class UserText:
    """A user's text read and validated: its documents and what lineage records about the files."""

    documents: list[text.Document]      # non-empty documents, in file (and line) order
    source: Path                        # the path given, resolved
    format: str                         # "txt", "txt folder" or "jsonl"
    reader: str
    files: list[Path]                   # resolved, sorted
    root: Path                          # what files_sha256 takes paths relative to
    skipped_empty: int = 0              # documents that were empty or whitespace only

    @property
    def sha256(self) -> str:
        return files_sha256(self.root, self.files)


# --- reading --------------------------------------------------------------------------------------

def read_text(path: str | os.PathLike) -> UserText:
    """The documents of a .txt file, a folder of .txt files or a .jsonl file (module docstring)."""
    given = Path(path)
    where = str(given)
    if not given.exists():
        raise DataError(f"{where}: no such file or folder ({FORMATS_HINT})")
    source = given.resolve()
    if source.is_dir():
        files = _txt_files(source, where)
        docs = [text.Document(f.relative_to(source).as_posix(), _read_txt(f)) for f in files]
        user = UserText(docs, source, "txt folder", "plain read, strict UTF-8", files, source)
    elif source.suffix.lower() == TEXT_SUFFIX:
        docs = [text.Document(source.name, _read_txt(source))]
        user = UserText(docs, source, "txt", "plain read, strict UTF-8", [source], source.parent)
    elif source.suffix.lower() == JSONL_SUFFIX:
        texts, reader = _read_jsonl(source, where)
        docs = [text.Document(f"record {i + 1}", _normalise(t)) for i, t in enumerate(texts)]
        user = UserText(docs, source, "jsonl", reader, [source], source.parent)
    else:
        raise DataError(f"{where}: unknown text format {source.suffix or '(no extension)'!r}: {FORMATS_HINT}")
    kept = [d for d in user.documents if d.text.strip()]
    user.skipped_empty = len(user.documents) - len(kept)
    user.documents = kept
    if not kept:
        what = "record" if user.format == "jsonl" else "file"
        raise DataError(f"{where}: no text: every {what} is empty or only whitespace")
    return user


def _txt_files(root: Path, where: str) -> list[Path]:
    """The .txt files under `root`, recursively, hidden ones skipped, sorted by relative path."""
    found, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            (found if name.lower().endswith(TEXT_SUFFIX) else others).append(Path(dirpath) / name)
    if not found:
        if not others:
            raise DataError(f"{where}: empty folder: no .txt files in it or below it")
        example = sorted(p.relative_to(root).as_posix() for p in others)[0]
        raise DataError(f"{where}: no .txt files in it or below it ({len(others)} other file(s), e.g. "
                        f"{example!r}); a folder is read for its .txt files only")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_txt(path: Path) -> str:
    raw = path.read_bytes()
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8: {_bad_byte(raw, exc.start)}; save it as UTF-8") from None
    return _normalise(decoded)


def _bad_byte(raw: bytes, offset: int, line_offset: int = 0) -> str:
    """'byte 0xff at offset N (line L, column C)': offset from the start of the file, line and
    column (in bytes) counted from 1; `line_offset`: where `raw` starts in the file."""
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    return f"byte 0x{raw[offset]:02x} at offset {line_offset + offset} (line {line}, column {column})"


def _normalise(s: str) -> str:
    """A leading byte-order mark dropped; \\r\\n and lone \\r become \\n (as text.py's read does)."""
    return s.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(path: Path, where: str) -> tuple[list[str], str]:
    """Each record's `text`, read with datasets; a plain scan names the line when something is wrong."""
    reader = "datasets.load_dataset('json')"
    try:
        table = _load("json", where, data_files=str(path))
        columns = table.column_names
        texts = list(table[TEXT_FIELD]) if TEXT_FIELD in columns else None   # strings decoded only here
    except Exception as exc:  # noqa: BLE001 - datasets, pyarrow (a bad UTF-8 byte surfaces on reading a column)
        texts = _scan_jsonl(path, where)        # raises naming the line when a line is at fault
        if not texts:
            raise DataError(f"{where}: no records: the file is empty") from None
        cause = str(exc) if isinstance(exc, DataError) else _first_line(exc)
        return texts, f"plain line-by-line read (datasets could not read it: {cause})"
    if texts is None:
        _scan_jsonl(path, where)
        raise DataError(f"{where}: no {TEXT_FIELD!r} field (fields: {', '.join(columns)})")
    if any(not isinstance(t, str) for t in texts):
        _scan_jsonl(path, where)
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise DataError(f"{where}: record {bad + 1}: {TEXT_FIELD!r} is not a string")
    if not texts:
        raise DataError(f"{where}: no records: the file is empty")
    return list(texts), reader


def _scan_jsonl(path: Path, where: str) -> list[str]:
    """Every non-blank line's `text`, read plainly; DataError naming the first bad line (from 1)."""
    raw = path.read_bytes()
    texts, start = [], 0
    for number, line in enumerate(raw.split(b"\n"), 1):
        line_start, start = start, start + len(line) + 1
        if not line.strip():
            continue
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = exc.start + 1
            raise DataError(f"{where}: line {number}: not UTF-8: byte 0x{line[exc.start]:02x} at offset "
                            f"{line_start + exc.start} (column {column}); save it as UTF-8") from None
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: line {number}: not JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: line {number}: a JSON {_json_type(record)}, not an object with a "
                            f"string {TEXT_FIELD!r} field")
        if TEXT_FIELD not in record:
            fields = ", ".join(map(repr, record)) or "none"
            raise DataError(f"{where}: line {number}: no {TEXT_FIELD!r} field (fields: {fields})")
        if not isinstance(record[TEXT_FIELD], str):
            raise DataError(f"{where}: line {number}: {TEXT_FIELD!r} is a JSON {_json_type(record[TEXT_FIELD])}, "
                            "not a string")
        texts.append(record[TEXT_FIELD])
    return texts


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


# --- splitting ------------------------------------------------------------------------------------

@dataclass
class TextSplit3:
    """Training, validation and test text, and how they were made (for lineage)."""

    train: str
    val: str
    test: str
    method: str                 # "whole documents" or "contiguous cut"
    description: str
    val_documents: list[str] = field(default_factory=list)
    test_documents: list[str] = field(default_factory=list)


def split_documents(documents: list[text.Document], seed: int = 0, val_fraction: float = VAL_FRACTION,
                    test_fraction: float = TEST_FRACTION) -> TextSplit3:
    """Whole documents held out by a seeded shuffle when each side stays within MAX_OVERSHOOT times
    its share of the characters; else the joined text cut contiguously (module docstring)."""
    total = sum(len(d.text) for d in documents)
    n = len(documents)
    if n >= 3:
        order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
        sides, pos = [], 0
        for fraction in (val_fraction, test_fraction):
            held, chars = [], 0
            while pos < n - 1 and chars < fraction * total:
                held.append(order[pos])
                chars += len(documents[order[pos]].text)
                pos += 1
            sides.append((sorted(held), chars))
        fits = all(held and fraction * total <= chars <= MAX_OVERSHOOT * fraction * total
                   for (held, chars), fraction in zip(sides, (val_fraction, test_fraction)))
        if fits:
            (val_idx, val_chars), (test_idx, test_chars) = sides
            held_out = set(val_idx) | set(test_idx)
            train_docs = [d for i, d in enumerate(documents) if i not in held_out]
            join = lambda idx: text.DOC_SEPARATOR.join(documents[i].text for i in idx)  # noqa: E731
            val_names = [documents[i].path for i in val_idx]
            test_names = [documents[i].path for i in test_idx]
            description = (f"held out whole documents, seeded shuffle seed={seed}, >= {val_fraction:.0%} and "
                           f">= {test_fraction:.0%} of characters: {len(val_idx)} val docs ({val_chars} chars: "
                           f"{_names(val_names)}), {len(test_idx)} test docs ({test_chars} chars: "
                           f"{_names(test_names)}), {len(train_docs)} train docs "
                           f"({total - val_chars - test_chars} chars)")
            return TextSplit3(text.DOC_SEPARATOR.join(d.text for d in train_docs), join(val_idx), join(test_idx),
                              "whole documents", description, val_names, test_names)
    joined = text.DOC_SEPARATOR.join(d.text for d in documents)
    length = len(joined)
    train_end = _cut(joined, int(length * (1 - val_fraction - test_fraction)), int(length * val_fraction / 4))
    val_end = max(train_end, _cut(joined, int(length * (1 - test_fraction)), int(length * test_fraction / 4)))
    why = "a single document" if n == 1 else (
        f"{n} documents: too few or too large to hold out whole within {MAX_OVERSHOOT:g}x each share")
    description = (f"contiguous cut ({why}): the documents joined in order, then train the first {train_end} chars, "
                   f"val the next {val_end - train_end}, test the last {length - val_end} "
                   f"(about {1 - val_fraction - test_fraction:.0%}/{val_fraction:.0%}/{test_fraction:.0%}, "
                   "each cut moved to the next line break when one is near)")
    return TextSplit3(joined[:train_end], joined[train_end:val_end], joined[val_end:], "contiguous cut", description)


def _cut(s: str, at: int, slack: int) -> int:
    """`at`, moved just past the next line break within `slack` characters when there is one."""
    newline = s.find("\n", at, at + slack)
    return newline + 1 if newline >= 0 else at


def _names(names: list[str], shown: int = 8) -> str:
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# --- tokenizer ------------------------------------------------------------------------------------

def load_tokenizer_file(path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """A local tokenizer.json (or a folder holding one) that fits training and serving (module
    docstring); DataError naming the file otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    where = str(p)
    if not p.is_file():
        raise DataError(f"{where}: no such file (the tokenizer is a tokenizer.json of HF tokenizers)")
    import tokenizers

    try:
        inner = tokenizers.Tokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a bad file
        raise DataError(f"{where}: does not load as an HF tokenizers tokenizer.json ({_first_line(exc)})") from None
    try:
        tok = Tokenizer(inner)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}: the specials {', '.join(SPECIAL_TOKENS)} must take ids 0..3 "
                        "(end of text and the chat template)") from None
    size = tok.vocab_size
    if size > vocab_size:
        raise DataError(f"{where}: vocabulary of {size} tokens is larger than allowed: vocab_size is {vocab_size} "
                        "(raise vocab_size or use a smaller tokenizer)")
    vocab = inner.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(size)):
        raise DataError(f"{where}: token ids are not 0..{size - 1} without gaps")
    alphabet = _byte_decoder()
    for token, i in sorted(vocab.items(), key=lambda item: item[1]):
        if i >= len(SPECIAL_TOKENS) and not all(c in alphabet for c in token):
            raise DataError(f"{where}: token {token!r} (id {i}) is not byte-level: serving streams each token's "
                            "bytes, so the tokenizer must be a byte-level BPE (GPT-2 byte alphabet)")
    missing = [c for c in alphabet if c not in vocab]
    if missing:
        raise DataError(f"{where}: {len(missing)} of the 256 byte-level symbols are missing from its vocabulary "
                        "(so some text would not encode)")
    if tok.decode(tok.encode(ROUND_TRIP_PROBE)) != ROUND_TRIP_PROBE:
        raise DataError(f"{where}: decode(encode(text)) does not give the text back (is its decoder ByteLevel?)")
    return tok


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_tokenizer_option(family: str, data: str | os.PathLike | None, tokenizer_file: str | os.PathLike) -> None:
    """A tokenizer file is for decoder and mamba on the user's own text; DataError otherwise."""
    if family in BYTE_TOKENIZER_FAMILIES:
        raise DataError(f"{tokenizer_file}: {family} keeps its byte-level tokenizer (256 bytes + 4 specials, "
                        "no merges): a tokenizer file is for decoder and mamba")
    if data is None:
        raise DataError(f"{tokenizer_file}: a tokenizer file is for training on your own text (--data); "
                        "the bundled corpus trains its own BPE")


# --- all together ---------------------------------------------------------------------------------

def prepare(family: str, data: str | os.PathLike, seed: int = 0, vocab_size: int = 2048, block_size: int = 128,
            tokenizer_file: str | os.PathLike | None = None, val_fraction: float = VAL_FRACTION,
            test_fraction: float = TEST_FRACTION, trained_tokenizer: Tokenizer | None = None):
    """Read, split and tokenize the user's text for `family`: lm.TokenData with test ids, the
    lineage's dataset_details and the tokenizer's lineage entry. DataError before anything trains.

    `trained_tokenizer`: the BPE that an earlier run trained on this text's train split (a resumed
    run keeps it in its run folder, training/lm.py), used instead of training it again; the lineage
    is that of training it. Not with `tokenizer_file`."""
    if trained_tokenizer is not None and tokenizer_file is not None:
        raise ValueError("prepare: give tokenizer_file or trained_tokenizer, not both")
    from training.lm import TokenData

    if tokenizer_file is not None:
        check_tokenizer_option(family, data, tokenizer_file)
    user = read_text(data)
    tokenizer = None
    if tokenizer_file is not None:      # checked before the split: a bad file is named first
        tokenizer = load_tokenizer_file(tokenizer_file, vocab_size)
    parts = split_documents(user.documents, seed, val_fraction, test_fraction)
    if tokenizer_file is None:
        tokenizer = (trained_tokenizer if trained_tokenizer is not None
                     else train_tokenizer(parts.train, vocab_size=vocab_size))
        merges = tokenizer.vocab_size - len(SPECIAL_TOKENS) - 256
        tokenizer_lineage = {"type": "byte-level BPE (HF tokenizers), trained on the train split" if merges > 0
                             else "byte-level (HF tokenizers): 256 bytes + 4 specials, no merges",
                             "source": "trained on the train split", "vocab_size": tokenizer.vocab_size,
                             "vocab_size_target": vocab_size}
    else:
        p = Path(tokenizer_file)
        p = (p / FILENAME if p.is_dir() else p).resolve()
        tokenizer_lineage = {"type": "byte-level BPE (HF tokenizers), loaded from a file",
                             "source": str(p), "sha256": _file_sha256(p), "vocab_size": tokenizer.vocab_size}
    ids = {name: torch.tensor(tokenizer.encode_long(s), dtype=torch.int64)
           for name, s in (("train", parts.train), ("val", parts.val), ("test", parts.test))}
    _check_enough(str(data), ids, block_size, val_fraction, test_fraction)
    sha256 = user.sha256
    details = {
        "source": str(user.source), "format": user.format, "reader": user.reader,
        "files": len(user.files), "bytes": sum(f.stat().st_size for f in user.files),
        "documents": len(user.documents), "skipped_empty_documents": user.skipped_empty,
        "characters": {"train": len(parts.train), "val": len(parts.val), "test": len(parts.test)},
        "tokens": {name: int(t.numel()) for name, t in ids.items()},
        "split_method": parts.method,
        "tokenizer": tokenizer_lineage,
        "sha256": sha256,
        "sha256_of": "each file's path relative to " + ("the folder" if user.format == "txt folder"
                                                        else "the file's folder") + ", then its bytes",
    }
    if user.format == "txt folder":
        details["file_names"] = [f.relative_to(user.root).as_posix() for f in user.files][:100]
    split = text.TextSplit(train=parts.train, val=parts.val, name=f"user text {user.source}",
                           split=parts.description, sha256=sha256, val_documents=parts.val_documents)
    return TokenData(split, tokenizer, ids["train"], ids["val"], test_ids=ids["test"], details=details,
                     tokenizer_lineage=tokenizer_lineage)


def _check_enough(where: str, ids: dict[str, torch.Tensor], block_size: int, val_fraction: float,
                  test_fraction: float) -> None:
    """Each split holds one window of block_size + 1 tokens; else DataError with how many tokens are
    needed (at the shares this text was split into) and how many there are."""
    window = block_size + 1
    counts = {name: int(t.numel()) for name, t in ids.items()}
    total = sum(counts.values())
    short = {name: n for name, n in counts.items() if n < window}
    if not short:
        return
    shares = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    needed = max(math.ceil(window * total / n) if n else math.ceil(window / shares[name])
                 for name, n in short.items())
    needed = max(needed, math.ceil(window / min(shares.values())))
    names = {"train": "training", "val": "validation", "test": "test"}
    raise DataError(f"{where}: too little text: {total} tokens, about {needed} needed: one context window "
                    f"(block_size {block_size} + 1 = {window} tokens) each for training, validation "
                    f"({val_fraction:.0%} held out) and test ({test_fraction:.0%}); "
                    + ", ".join(f"the {names[k]} split has {n}" for k, n in short.items()))
