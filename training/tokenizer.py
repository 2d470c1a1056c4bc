"""The tokenizer shared by training and serving: byte-level BPE (HF `tokenizers`) with four
special tokens, a small chat template and incremental (streaming) detokenization.

Special tokens take ids 0..3 in this order: `<|endoftext|>` (end of text, the EOS id),
`<|user|>`, `<|assistant|>`, `<|system|>`. The byte-level alphabet is always in the vocabulary,
so any string encodes, and `decode(encode(s)) == s`.

Chat template (`render_chat`), one turn after another, then an open assistant turn:

    <|system|>{content}\n
    <|user|>{content}\n
    <|assistant|>{content}<|endoftext|>      (a past assistant turn)
    <|assistant|>                            (always last: generation continues from here)

The model stops an assistant turn by sampling `<|endoftext|>`.

Streaming (`DecodeStream`) maps each id to its raw bytes and runs them through Python's
incremental UTF-8 decoder, rather than `tokenizers.decoders.DecodeStream`: it costs O(1) a
token, and `flush()` gives back a character left incomplete at the end, which HF's stream
holds forever.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
SPECIAL_TOKENS = [EOS, USER, ASSISTANT, SYSTEM]   # ids 0..3
FILENAME = "tokenizer.json"

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level map inverted: printable stand-in character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def chunks(text: str, size: int = 1 << 16) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just before a plain space
    between two letters or digits ("word| word"). The byte-level pre-tokenizer always splits
    there (no piece with a visible character runs on into a space, and " word" is a piece of
    its own), whether or not a string starts or ends there, so encoding the pieces one by one
    gives exactly the ids of encoding the whole. (A cut after whitespace would not: at the end
    of a string "  \n" is one piece, inside a text it is "  " then "\n".)"""
    out, start = [], 0
    while start < len(text):
        end = start + max(2, size)
        while end + 1 < len(text) and not (text[end] == " " and text[end - 1].isalnum() and text[end + 1].isalnum()):
            end += 1
        end = end if end + 1 < len(text) else len(text)
        out.append(text[start:end])
        start = end
    return out


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the project's specials and template."""

    def __init__(self, inner: tokenizers.Tokenizer):
        self.inner = inner
        for i, token in enumerate(SPECIAL_TOKENS):
            if inner.token_to_id(token) != i:
                raise ValueError(f"tokenizer must have {token!r} at id {i}, has {inner.token_to_id(token)}")
        self._bytes: list[bytes | None] | None = None   # id -> bytes (None for specials), built lazily

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` (or a folder holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        return cls(tokenizers.Tokenizer.from_file(str(p)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json`; `path` may be a folder or the file itself."""
        p = Path(path)
        if p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / FILENAME
        self.inner.save(str(p))
        return p

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS.index(EOS)

    @property
    def special_ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(SPECIAL_TOKENS)}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single ids."""
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def encode_long(self, text: str) -> list[int]:
        """Exactly `encode(text)`, for a whole corpus, encoded in parallel chunks (`chunks`)."""
        return [i for ids in self.encode_batch(chunks(text)) for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.inner.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat template (module docstring) ending in an open assistant turn."""
        parts = []
        for m in messages:
            role, content = m.get("role"), m.get("content", "")
            if role not in ROLE_TOKENS:
                raise ValueError(f"unknown chat role {role!r}; known: {', '.join(ROLE_TOKENS)}")
            end = EOS if role == "assistant" else "\n"
            parts.append(f"{ROLE_TOKENS[role]}{content}{end}")
        parts.append(ASSISTANT)
        return "".join(parts)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes a token stands for; None for a special token."""
        if self._bytes is None:
            table = _byte_decoder()
            vocab = self.inner.get_vocab(with_added_tokens=True)
            out: list[bytes | None] = [None] * self.vocab_size
            for token, i in vocab.items():
                if i >= len(SPECIAL_TOKENS):
                    out[i] = bytes(table[c] for c in token)
            self._bytes = out
        return self._bytes[token_id]

    def decode_stream(self) -> "DecodeStream":
        return DecodeStream(self)


class DecodeStream:
    """Incremental detokenization: feed ids one at a time, get the new text.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character; those bytes are held
    back until the character is complete, so a delta never holds half a character. Special
    tokens produce no text. The deltas plus `flush()` concatenate to `decode(all_ids)`
    (invalid bytes become U+FFFD in both)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        """The text completed by this token ('' while a character is still incomplete)."""
        raw = self.tokenizer.token_bytes(int(token_id))
        return self._utf8.decode(raw) if raw else ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character becomes U+FFFD); call at the end."""
        return self._utf8.decode(b"", final=True)


def train_tokenizer(text: str, vocab_size: int = 2048) -> Tokenizer:
    """Train byte-level BPE on `text`, specials first (ids 0..3), the 256 byte symbols always in."""
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # in chunks cut where the pre-tokenizer always splits, so training sees the same pieces as encode
    inner.train_from_iterator(chunks(text), trainer=trainer)
    return Tokenizer(inner)
