"""`zooserve train --data` (issue 15, first slice): mlp on a table (csv, jsonl), resnet on an image
folder, `--publish` into a registry, served over HTTP with raw values; bad data refused in one line.

Bars: held-out accuracy >= 0.85 on iris (3 classes, chance 0.33; 22 test rows), >= 0.9 on the digits
table (10 classes, chance 0.1) and >= 0.9 on the 3-class digits image folder (chance 0.33). Training
uses the default loop settings (early stopping ends them well before 60 epochs): ~1 s for iris,
~3 s for the digits table, ~15 s for the image folder on one core."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from serve.cli import main
from training import checkpoint, loop, user_data

IRIS_SPECIES = ["setosa", "versicolor", "virginica"]
DIGIT_FOLDERS = {0: "zero", 1: "one", 2: "two"}


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    """iris as csv (string label column `species`); digits as jsonl (string labels `d0`..`d9`)."""
    import pandas as pd
    from sklearn.datasets import load_digits, load_iris

    root = tmp_path_factory.mktemp("tables")
    iris = load_iris()
    frame = pd.DataFrame(iris.data, columns=["sepal_length", "sepal_width", "petal_length", "petal_width"])
    frame["species"] = [iris.target_names[t] for t in iris.target]
    frame.to_csv(root / "iris.csv", index=False)
    digits = load_digits()
    frame = pd.DataFrame(digits.data, columns=[f"p{i}" for i in range(64)])
    frame.insert(10, "label", [f"d{t}" for t in digits.target])     # the label need not be the last column
    frame.to_json(root / "digits.jsonl", orient="records", lines=True)
    return {"iris": root / "iris.csv", "digits": root / "digits.jsonl"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Digits 0, 1, 2 as 16x16 greyscale PNGs (8x8 upscaled, 0..255), one subfolder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("images") / "digits"
    digits = load_digits()
    for name in DIGIT_FOLDERS.values():
        (root / name).mkdir(parents=True)
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        if target in DIGIT_FOLDERS:
            pixels = (image * 255 / 16).round().astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16), Image.Resampling.NEAREST).save(
                root / DIGIT_FOLDERS[target] / f"{i}.png")
    return root


def _infer(server, name: str, input_name: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    body = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                        "data": x.astype(np.float32).ravel().tolist()}]}
    r = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"]), r.json()["model_version"]


def _served_matches_eager(server, name: str, ckpt: Path, x: np.ndarray, labels: list[str]) -> None:
    """Metadata names the classes; the served logits of raw values equal the eager model's, and so
    does each answer's class."""
    meta = httpx.get(f"{server.url}/v2/models/{name}", timeout=10).json()
    assert meta["parameters"]["labels"] == labels
    (spec,) = meta["inputs"]
    assert spec["shape"] == [-1, *x.shape[1:]] and spec["datatype"] == "FP32"
    served, version = _infer(server, name, spec["name"], x)
    assert version == "1"
    model, _ = checkpoint.load(ckpt)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(served, eager, atol=1e-4)
    assert [labels[i] for i in served.argmax(1)] == [labels[i] for i in eager.argmax(1)]


@pytest.mark.slow
def test_mlp_on_a_csv_trains_publishes_and_serves_raw_features(tables, tmp_path, start_server, capsys):
    ckpt, registry = tmp_path / "ckpt", tmp_path / "registry"
    rc = main(["train", "mlp", "--data", str(tables["iris"]), "--label-column", "species", "--out", str(ckpt),
               "--publish", "iris", "--registry", str(registry)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "published iris version 1" in out and "input features FP32 [-1, 4]" in out

    meta = checkpoint.read_meta(ckpt)
    assert meta["labels"] == IRIS_SPECIES
    lineage = meta["lineage"]
    details = lineage["dataset_details"]
    assert details["class_names"] == IRIS_SPECIES and details["label_column"] == "species"
    assert details["rows"] == {"total": 150, "train": 106, "val": 22, "test": 22}   # 70/15/15 as digits
    assert details["feature_columns"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert lineage["dataset_sha256"] == user_data.files_sha256(tables["iris"].parent, [tables["iris"]])
    assert lineage["dataset_split"].startswith("seeded permutation seed=0: test 22, val 22")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["n_features"] == 4 and config["n_classes"] == 3 and len(config["feature_std"]) == 4

    # accuracy recomputed on the held-out rows, from raw values (the model standardises them itself)
    split = user_data.read_table(tables["iris"], "species").split
    model, _ = checkpoint.load(ckpt)
    acc = loop.accuracy(model, split.test)
    assert acc >= 0.85 and acc == pytest.approx(lineage["metrics"]["test_accuracy"])
    manifest = json.loads((registry / "iris" / "1" / "manifest.json").read_text())
    assert manifest["labels"] == IRIS_SPECIES
    assert manifest["lineage"]["dataset_details"]["class_counts"] == {s: 50 for s in IRIS_SPECIES}
    assert all(report["passed"] for report in manifest["parity"])

    with start_server(registry) as server:
        _served_matches_eager(server, "iris", ckpt, split.test[0].numpy(), IRIS_SPECIES)


@pytest.mark.slow
def test_mlp_on_a_jsonl_table_with_the_label_in_the_middle(tables, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["train", "mlp", "--data", str(tables["digits"]), "--out", str(ckpt)]) == 0
    meta = checkpoint.read_meta(ckpt)
    assert meta["labels"] == [f"d{i}" for i in range(10)]
    assert len(meta["lineage"]["dataset_details"]["feature_columns"]) == 64
    assert meta["lineage"]["metrics"]["test_accuracy"] >= 0.9


@pytest.mark.slow
def test_resnet_on_an_image_folder_trains_publishes_and_serves_pixels(image_folder, tmp_path, start_server, capsys):
    ckpt, registry = tmp_path / "ckpt", tmp_path / "registry"
    rc = main(["train", "resnet", "--data", str(image_folder), "--out", str(ckpt),
               "--publish", "digits3", "--registry", str(registry)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "input image FP32 [-1, 1, 16, 16]" in out            # defaults: the first image's size, grey
    names = sorted(DIGIT_FOLDERS.values())
    meta = checkpoint.read_meta(ckpt)
    assert meta["labels"] == names == ["one", "two", "zero"]
    details = meta["lineage"]["dataset_details"]
    assert details["channels"] == 1 and details["image_size"] == 16 and details["class_names"] == names
    assert sum(details["rows"][k] for k in ("train", "val", "test")) == details["rows"]["total"] == details["files"]
    assert meta["lineage"]["metrics"]["test_accuracy"] >= 0.9
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["in_channels"], config["image_size"], config["n_classes"], config["input_scale"]) == (1, 16, 3, 255.0)

    test_x = user_data.read_image_folder(image_folder).split.test[0][:6].numpy()
    assert test_x.max() > 200       # pixels as stored, 0..255
    with start_server(registry) as server:
        _served_matches_eager(server, "digits3", ckpt, test_x, names)


def test_image_folder_defaults_follow_the_images(tmp_path):
    """Any size and mode: resized to the first image's larger side (at most 64), 3 channels when
    any image is in colour; --image-size / --channels override; the hash covers paths and bytes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, mode in (("a", "RGB"), ("b", "L")):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            shape = (90, 120, 3) if mode == "RGB" else (20 + i, 30)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(tmp_path / "data" / c / f"{i}.png")
    got = user_data.read_image_folder(tmp_path / "data")
    assert (got.channels, got.image_size) == (3, 64) and got.split.train[0].shape[1:] == (3, 64, 64)
    assert got.class_names == ["a", "b"] and got.details["rows"]["total"] == 10
    small = user_data.read_image_folder(tmp_path / "data", image_size=12, channels=1)
    assert small.split.test[0].shape[1:] == (1, 12, 12)
    assert small.split.sha256 == got.split.sha256
    (tmp_path / "data" / "b" / "0.png").write_bytes((tmp_path / "data" / "b" / "1.png").read_bytes())
    assert user_data.read_image_folder(tmp_path / "data").split.sha256 != got.split.sha256


def test_whole_number_labels_sort_as_numbers(tmp_path):
    rows = "".join(f"{i},{i % 3 * 10 + (i % 3 == 2)}\n" for i in range(20))   # labels 0, 10, 21
    (tmp_path / "t.csv").write_text("x,label\n" + rows)
    assert user_data.read_table(tmp_path / "t.csv").class_names == ["0", "10", "21"]


# --- bad data: exit 2, one line naming the file, row or column, nothing trained ---------------------

def _png(path: Path, value: int = 0, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def _folder(root: Path, classes: dict[str, int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / name / f"{i}.png", value=i * 20)
    return root


def _truncated(path: Path) -> Path:
    """A noisy 32x32 PNG cut in half: its header reads, its pixels do not."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:500])
    return path.parents[1]


def _bad_csv(root: Path, text: str) -> Path:
    (root / "t.csv").write_text(text)
    return root / "t.csv"


def _rows(n: int, label=lambda i: "ab"[i % 2], b=lambda i: i * 2) -> str:
    return "".join(f"{i},{b(i)},{label(i)}\n" for i in range(n))


BAD_DATA = {
    # case: (family, make data path under tmp, extra args, what the message must contain)
    "missing file": ("mlp", lambda t: t / "nope.csv", [], "nope.csv: no such file"),
    "missing folder": ("resnet", lambda t: t / "nope", [], "nope: no such folder"),
    "empty folder": ("resnet", lambda t: _folder(t / "empty", {}), [], "empty: empty folder"),
    "class folder with no images": (
        "resnet", lambda t: (_folder(t / "d", {"cat": 3, "dog": 4}), (t / "d" / "emu").mkdir(),
                             (t / "d" / "emu" / "notes.txt").write_text("x"))[0], [],
        "emu: class folder with no images"),
    "unreadable image": (
        "resnet", lambda t: (_folder(t / "d", {"cat": 5, "dog": 5}),
                             (t / "d" / "dog" / "3.png").write_bytes(b"not a png"))[0], [],
        "3.png: unreadable image"),
    "truncated image": ("resnet", lambda t: _truncated(_folder(t / "d", {"cat": 5, "dog": 5}) / "dog" / "2.png"),
                        [], "2.png: unreadable image"),
    "non-numeric feature column": (
        "mlp", lambda t: _bad_csv(t, "a,b,label\n" + _rows(20, b=lambda i: "six" if i == 6 else i)), [],
        "column 'b' is not numeric: row 7 holds 'six'"),
    "empty feature cell": (
        "mlp", lambda t: _bad_csv(t, "a,b,label\n" + _rows(20, b=lambda i: "" if i == 4 else i)), [],
        "column 'b': row 5 is empty"),
    "missing label column": (
        "mlp", lambda t: _bad_csv(t, "a,b,species\n" + _rows(20)), [], "no label column 'label' (columns: a, b, species)"),
    "missing label": (
        "mlp", lambda t: _bad_csv(t, "a,b,label\n" + _rows(20, label=lambda i: "" if i == 3 else "ab"[i % 2])), [],
        "column 'label': row 4 has no label"),
    "single class in a table": (
        "mlp", lambda t: _bad_csv(t, "a,b,label\n" + _rows(20, label=lambda i: "x")), [],
        "column 'label': a single class ('x')"),
    "single class folder": ("resnet", lambda t: _folder(t / "d", {"cat": 9}), [], "a single class folder ('cat')"),
    "too few rows": ("mlp", lambda t: _bad_csv(t, "a,b,label\n" + _rows(5)), [], "5 rows: too few to split"),
    "ragged csv": ("mlp", lambda t: _bad_csv(t, "a,b,label\n1,2,x\n3,4,y,5\n"), [], "cannot be read as csv"),
    "unknown table format": ("mlp", lambda t: _bad_csv(t, "x").rename(t / "t.xlsx"), [], "unknown table format '.xlsx'"),
    "image outside a class folder": (
        "resnet", lambda t: (_folder(t / "d", {"cat": 5, "dog": 5}), _png(t / "d" / "stray.png"))[0], [],
        "stray.png: an image outside a class subfolder"),
    "a folder for mlp": ("mlp", lambda t: _folder(t / "d", {"cat": 5, "dog": 5}), [], "is a folder"),
    "a table for resnet": ("resnet", lambda t: _bad_csv(t, "a,label\n"), [], "resnet takes an image folder"),
    "a table for an image family": ("gan", lambda t: _bad_csv(t, "a,label\n"), [], "gan takes an image folder"),
    "a table for a text family": ("decoder", lambda t: _bad_csv(t, "a,label\n"), [], "unknown text format '.csv'"),
    "--image-size for mlp": ("mlp", lambda t: _bad_csv(t, "a,label\n"), ["--image-size", "8"],
                             "--image-size is for resnet, gan, vae, diffusion --data, not mlp"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_exits_2_with_one_line_before_training(case, tmp_path, capsys, monkeypatch):
    family, make, extra, expected = BAD_DATA[case]
    data = make(tmp_path)
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("training started on bad data"))
    rc = main(["train", family, "--data", str(data), "--out", str(tmp_path / "ckpt"), *extra])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zooserve train: error: "), captured.err
    assert expected in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "ckpt").exists()


def test_data_options_need_data_and_publish_needs_a_valid_name(tmp_path, capsys):
    assert main(["train", "mlp", "--label-column", "y", "--out", str(tmp_path / "c")]) == 2
    assert "--label-column describes --data" in capsys.readouterr().err
    assert main(["train", "mlp", "--registry", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "give --publish too" in capsys.readouterr().err
    assert main(["train", "mlp", "--publish", "Bad Name", "--out", str(tmp_path / "c")]) == 2
    assert "--publish: invalid model name 'Bad Name'" in capsys.readouterr().err


def test_reading_stays_offline_and_out_of_the_shared_caches(tables, tmp_path, monkeypatch):
    """Offline, and the reader's cache is a temporary folder: nothing lands in the datasets or
    modules caches (~/.cache/huggingface by default)."""
    import datasets

    for name in ("HF_DATASETS_CACHE", "HF_MODULES_CACHE"):
        monkeypatch.setattr(datasets.config, name, tmp_path / name)
    user_data.read_table(tables["iris"], "species")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE
    assert not [p for name in ("HF_DATASETS_CACHE", "HF_MODULES_CACHE") for p in (tmp_path / name).rglob("*")]
