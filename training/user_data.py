"""A user's own data for the classifier and generative families (issue 15): read, validate, split.

- a table (`.csv`, `.parquet`, `.jsonl`/`.json` lines) for `mlp`: every column but the label is a
  numeric feature; the label column (default `label`) holds strings or whole numbers;
- an image folder for `resnet`: one subfolder per class, its images of any size and mode, resized
  to one square size and converted to 1 or 3 channels; pixels stay 0..255 (the model scales them);
- the same image folder for the samplers `gan`, `vae`, `diffusion`: one class folder is enough
  (then they are conditioned on that one class), the default size is the first image's larger side
  rounded down to a multiple of 4 and at most MAX_GENERATIVE_IMAGE_SIZE, and a given --image-size
  must be a multiple of 4 (their networks halve the image twice); pixels stay 0..255 here and
  training.generative scales them to [-1, 1].

Both are read with Hugging Face `datasets` (`load_dataset("csv"|"parquet"|"json", data_files=...)`,
`load_dataset("imagefolder", data_dir=...)`), offline (HF_DATASETS_OFFLINE=1) and with a temporary
cache folder, so nothing reaches the network or ~/.cache. The image folder's listing comes from
`imagefolder` (its extensions, hidden files skipped); each image is then decoded here with PIL so
that an unreadable one is named, and class names are the top-level subfolders (imagefolder labels a
file by its *immediate* folder, which would split a class with nested folders into several).

The result is the same `Split` as the bundled digits (training/data.py, the same seeded 70/15/15
permutation), plus the class names (sorted: distinct labels, whole numbers in numeric order; or the
subfolder names) and what lineage records: a sha256 over the data files (each file's path relative
to the data root, then its bytes, in sorted path order), rows per split, class names and counts.

Bad data raises DataError before anything trains, with one line naming the file, row or column.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Split, seeded_split

# table formats by file extension -> the `datasets` packaged builder that reads them
TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
DEFAULT_LABEL_COLUMN = "label"
# the default --image-size is the first image's larger side, at most this (CPU training)
MAX_DEFAULT_IMAGE_SIZE = 64
# the samplers' default --image-size: at most this (each trains for minutes on a CPU at 8x8 already)
MAX_GENERATIVE_IMAGE_SIZE = 32
GENERATIVE_FAMILIES = ("gan", "vae", "diffusion")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}


class DataError(ValueError):
    """Data that cannot be trained on; the message is one line naming the file, row or column."""


@dataclass
class UserData:
    """A user's data split for training, and what the checkpoint and lineage need from it."""

    split: Split
    class_names: list[str]
    details: dict[str, Any]                       # lineage.dataset_details
    # table (mlp)
    feature_names: list[str] = field(default_factory=list)
    feature_mean: list[float] = field(default_factory=list)   # of the training split
    feature_std: list[float] = field(default_factory=list)
    # image folder (resnet)
    channels: int = 0
    image_size: int = 0

    def config_overrides(self) -> dict[str, Any]:
        """Fields of the family's Config that the data sets (mlp: a table; resnet: an image folder)."""
        if self.feature_names:
            return {"n_features": len(self.feature_names), "feature_mean": tuple(self.feature_mean),
                    "feature_std": tuple(self.feature_std), "n_classes": len(self.class_names)}
        return {"in_channels": self.channels, "image_size": self.image_size, "n_classes": len(self.class_names),
                "input_scale": 255.0}

    def sampler_overrides(self, family: str) -> dict[str, Any]:
        """Fields of a sampler's Config (gan, vae, diffusion) that an image folder sets (the VAE is
        unconditional: no class count)."""
        fields = {"image_size": self.image_size, "image_channels": self.channels}
        return fields if family == "vae" else {**fields, "n_classes": len(self.class_names)}


def files_sha256(root: Path, files: list[Path]) -> str:
    """sha256 over `files` in sorted order of their paths relative to `root`: each path (posix, then a
    NUL byte), then the file's bytes (then a NUL byte)."""
    digest = hashlib.sha256()
    for rel in sorted(f.relative_to(root).as_posix() for f in files):
        digest.update(rel.encode() + b"\0")
        with open(root / rel, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _datasets():
    """The `datasets` package, offline and quiet (imported on first use: it is slow to import)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"     # read at import; local files need no network
    import datasets

    datasets.config.HF_HUB_OFFLINE = True         # in case it was imported before with other settings
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)   # failures become DataError
    return datasets


def _load(builder: str, where: str, **kwargs):
    """load_dataset(builder, ...)["train"] with a throw-away cache; any failure as one-line DataError."""
    ds = _datasets()
    with tempfile.TemporaryDirectory(prefix="zooserve-data-") as cache:
        try:
            loaded = ds.load_dataset(builder, cache_dir=cache, split="train", keep_in_memory=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - pandas, pyarrow and datasets each raise their own
            raise DataError(f"{where}: cannot be read as {builder}: {_root_cause(exc)}") from exc
        return loaded


def _root_cause(exc: BaseException) -> str:
    """The innermost explicit cause's first line (datasets wraps the reader's own error)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not str(exc).strip()):
        exc = exc.__cause__ or exc.__context__
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _check_splittable(where: str, n: int, val_fraction: float, test_fraction: float, what: str) -> None:
    if int(n * val_fraction) >= 1 and int(n * test_fraction) >= 1:
        return
    need = next(m for m in range(1, 10_000) if int(m * val_fraction) >= 1 and int(m * test_fraction) >= 1)
    raise DataError(f"{where}: {n} {what}: too few to split (validation and test need at least one each: "
                    f"{need} or more)")


def _class_index(where: str, values: list) -> tuple[list[str], np.ndarray]:
    """Class names (sorted distinct labels as strings; whole numbers in numeric order) and each
    row's class index; DataError for a single class."""
    distinct = sorted(set(values))
    if len(distinct) < 2:
        only = f" ({str(distinct[0])!r})" if distinct else ""
        raise DataError(f"{where}: a single class{only}: a classifier needs at least 2")
    index = {v: i for i, v in enumerate(distinct)}
    return [str(v) for v in distinct], np.array([index[v] for v in values], dtype=np.int64)


# --- tables (mlp) ---------------------------------------------------------------------------------

def read_table(path: str | os.PathLike, label_column: str = DEFAULT_LABEL_COLUMN, seed: int = 0,
               val_fraction: float = 0.15, test_fraction: float = 0.15) -> UserData:
    """A csv/parquet/jsonl table: numeric features (every column but `label_column`), one label per
    row; features standardised by the training split's statistics (returned, not applied)."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise DataError(f"{where}: no such file")
    if path.is_dir():
        raise DataError(f"{where}: is a folder; a table is one file ({', '.join(TABLE_FORMATS)}); "
                        "image folders are for resnet")
    builder = TABLE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{where}: unknown table format {path.suffix or '(no extension)'!r} "
                        f"(use {', '.join(TABLE_FORMATS)})")
    frame = _load(builder, where, data_files=str(path)).to_pandas()
    if label_column not in frame.columns:
        raise DataError(f"{where}: no label column {label_column!r} (columns: {', '.join(map(str, frame.columns))}); "
                        "name it with --label-column")
    if len(frame) == 0:
        raise DataError(f"{where}: no rows")
    columns = [c for c in frame.columns if c != label_column]
    if not columns:
        raise DataError(f"{where}: no feature columns: only the label column {label_column!r}")
    feature_names = [str(c) for c in columns]
    features = np.stack([_numeric_column(where, frame[c], str(c)) for c in columns], axis=1).astype(np.float32)
    labels = _label_values(where, frame[label_column], label_column)
    class_names, y = _class_index(f"{where}: column {label_column!r}", labels)
    _check_splittable(where, len(y), val_fraction, test_fraction, "rows")
    train, val, test, description = seeded_split(features, y, seed, val_fraction, test_fraction)
    mean = train[0].double().mean(0)
    std = train[0].double().std(0, unbiased=False)
    std = np.where(std.numpy() > 0, std.numpy(), 1.0)     # a constant column: centred, not scaled
    split = Split(train=train, val=val, test=test, name=f"user table {path.resolve()}", split=description,
                  sha256=files_sha256(path.resolve().parent, [path.resolve()]))
    details = {
        "source": str(path.resolve()), "format": path.suffix.lower().lstrip("."),
        "reader": f"datasets.load_dataset({builder!r})", "files": 1,
        "rows": {"total": len(y), "train": len(train[1]), "val": len(val[1]), "test": len(test[1])},
        "label_column": label_column, "feature_columns": feature_names,
        "class_names": class_names, "class_counts": dict(zip(class_names, np.bincount(y).tolist())),
        "sha256_of": "each file's path relative to the table's folder, then its bytes",
    }
    return UserData(split=split, class_names=class_names, details=details, feature_names=feature_names,
                    feature_mean=mean.tolist(), feature_std=std.tolist())


def _numeric_column(where: str, column, name: str) -> np.ndarray:
    """A feature column as float64; DataError naming the column and the first bad row (counted from
    1, the header not counted)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = np.empty(len(column))
        for i, v in enumerate(column):
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                values[i] = float(v)
            elif v is None:
                values[i] = np.nan
            elif isinstance(v, str) and _is_number(v):
                values[i] = float(v)
            else:
                raise DataError(f"{where}: column {name!r} is not numeric: row {i + 1} holds {_show(v)} "
                                "(features must be numbers; the label column is named by --label-column)")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        v = column.iloc[bad[0]]
        what = "is empty" if v is None or (isinstance(v, float) and math.isnan(v)) else f"holds {_show(v)}"
        raise DataError(f"{where}: column {name!r}: row {bad[0] + 1} {what} (features must be finite numbers)")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_values(where: str, column, name: str) -> list:
    """Each row's label: whole numbers (int) or strings; DataError naming the first bad row."""
    out = []
    for i, v in enumerate(column):
        if isinstance(v, (bool, np.bool_)):
            out.append(str(bool(v)))
        elif isinstance(v, (int, np.integer)):
            out.append(int(v))
        elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
            out.append(int(v))
        elif isinstance(v, str) and v.strip():
            out.append(v)
        else:
            empty = v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())
            raise DataError(f"{where}: column {name!r}: row {i + 1} " +
                            ("has no label" if empty else f"holds {_show(v)}: labels are strings or whole numbers"))
    if any(isinstance(v, str) for v in out):      # mixed: all as strings, so that they sort
        out = [str(v) for v in out]
    return out


def _show(value: Any) -> str:
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- image folders (resnet) -----------------------------------------------------------------------

def read_image_folder(folder: str | os.PathLike, image_size: int | None = None, channels: int | None = None,
                      seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                      family: str = "resnet") -> UserData:
    """One subfolder per class; images resized to `image_size` square (default: the first image's
    larger side, at most MAX_DEFAULT_IMAGE_SIZE; for the samplers see the module doc) and converted
    to `channels` (default 1 when every image is greyscale, else 3). X is (N, C, S, S) float32 with
    values 0..255. `family`: resnet, or a sampler (GENERATIVE_FAMILIES: one class is enough)."""
    from PIL import Image

    sampler = family in GENERATIVE_FAMILIES
    root = Path(folder)
    where = str(root)
    if not root.exists():
        raise DataError(f"{where}: no such folder")
    if not root.is_dir():
        raise DataError(f"{where}: not a folder: {family} takes an image folder, one subfolder per class")
    if channels not in (None, 1, 3):
        raise DataError(f"--channels must be 1 or 3, not {channels}")
    if image_size is not None and image_size < 4:
        raise DataError(f"--image-size must be 4 or more, not {image_size}")
    if sampler and image_size is not None and image_size % 4:
        raise DataError(f"--image-size must be a multiple of 4 for {family} (its networks halve the image "
                        f"twice), not {image_size}")
    root = root.resolve()
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    classes = [e.name for e in entries if e.is_dir()]
    if not entries:
        raise DataError(f"{where}: empty folder: it needs one subfolder per class, holding that class's images")
    if not classes:
        raise DataError(f"{where}: no class subfolders: it needs one subfolder per class, holding that class's images")
    paths = _image_paths(root, where)
    strays = [p for p in paths if len(p.relative_to(root).parts) < 2]
    if strays:
        raise DataError(f"{strays[0]}: an image outside a class subfolder (put each image in its class's folder)")
    by_class = {c: [] for c in classes}
    for p in paths:
        by_class[p.relative_to(root).parts[0]].append(p)
    for c in classes:
        if not by_class[c]:
            raise DataError(f"{root / c}: class folder with no images")
    if len(classes) < 2 and not sampler:
        raise DataError(f"{where}: a single class folder ({classes[0]!r}): a classifier needs at least 2")
    files = [p for c in classes for p in sorted(by_class[c])]
    _check_splittable(where, len(files), val_fraction, test_fraction, "images")

    modes, first_size = set(), None
    for p in files:                                  # headers only: mode and size
        try:
            with Image.open(p) as img:
                modes.add(img.mode)
                first_size = first_size or img.size
        except Exception as exc:  # noqa: BLE001 - PIL raises several kinds
            raise DataError(f"{p}: unreadable image ({_first_line(exc)})") from exc
    if sampler:     # a multiple of 4, at least 4
        size = image_size or max(4, min(max(first_size), MAX_GENERATIVE_IMAGE_SIZE) // 4 * 4)
    else:
        size = image_size or min(max(first_size), MAX_DEFAULT_IMAGE_SIZE)
    channels = channels or (1 if modes <= GREY_MODES else 3)
    x = np.empty((len(files), channels, size, size), dtype=np.float32)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - a truncated file fails only when decoded
            raise DataError(f"{p}: unreadable image ({_first_line(exc)})") from exc
        x[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    y = np.array([classes.index(p.relative_to(root).parts[0]) for p in files], dtype=np.int64)
    train, val, test, description = seeded_split(x, y, seed, val_fraction, test_fraction)
    split = Split(train=train, val=val, test=test, name=f"user image folder {root}", split=description,
                  sha256=files_sha256(root, files))
    details = {
        "source": str(root), "format": "imagefolder",
        "reader": "datasets.load_dataset('imagefolder') for the listing, PIL for the pixels", "files": len(files),
        "rows": {"total": len(y), "train": len(train[1]), "val": len(val[1]), "test": len(test[1])},
        "class_names": classes, "class_counts": {c: len(by_class[c]) for c in classes},
        "image_size": size, "channels": channels, "source_modes": sorted(modes),
        "sha256_of": "each image's path relative to the folder, then its bytes",
    }
    return UserData(split=split, class_names=classes, details=details, channels=channels, image_size=size)


def _image_paths(root: Path, where: str) -> list[Path]:
    """The image files `imagefolder` finds under `root` (decoding left to the caller)."""
    ds = _datasets()
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if not any(Path(f).suffix.lower() in ImageFolder.EXTENSIONS for _, _, files in os.walk(root) for f in files):
        return []                       # imagefolder would refuse the folder; the caller names what is empty
    loaded = _load("imagefolder", where, data_dir=str(root)).cast_column("image", ds.Image(decode=False))
    return sorted(Path(item["path"]).resolve() for item in loaded["image"])


def read(family: str, source: str | os.PathLike, seed: int = 0, label_column: str | None = None,
         image_size: int | None = None, channels: int | None = None) -> UserData:
    """The user data for `family`: a table for mlp, an image folder for resnet and the samplers
    (gan, vae, diffusion)."""
    if family == "mlp":
        if image_size is not None or channels is not None:
            raise DataError("--image-size and --channels are for resnet with an image folder, not mlp")
        return read_table(source, label_column or DEFAULT_LABEL_COLUMN, seed=seed)
    if family == "resnet":
        if label_column is not None:
            raise DataError("--label-column is for mlp with a table; resnet's classes are its subfolders")
        if Path(source).is_file():
            raise DataError(f"{source}: a file: resnet takes an image folder, one subfolder per class "
                            "(tables are for mlp)")
        return read_image_folder(source, image_size, channels, seed=seed)
    if family in GENERATIVE_FAMILIES:
        if label_column is not None:
            raise DataError(f"--label-column is for mlp with a table; {family}'s classes are its subfolders")
        if Path(source).is_file():
            raise DataError(f"{source}: a file: {family} takes an image folder, one subfolder per class")
        return read_image_folder(source, image_size, channels, seed=seed, family=family)
    raise DataError(f"--data is for the classifier families mlp (a table) and resnet (an image folder) and the "
                    f"samplers {', '.join(GENERATIVE_FAMILIES)} (an image folder), not {family}")
