"""The rnn forecaster on a user's own series (issue 15, section 1): a csv read with HF `datasets`
(training/user_series.py), rows put in time order by a time column, trained through
series.train_forecaster(data=...), beating the last-value baseline, lineage recording the data,
exported and served as the co2 forecaster is; bad data refused in one line before anything trains.

The series: 10 + sin(2 pi t / 25) + noise (sd 0.05), 600 daily rows written in a shuffled order with a
`date` column, so that only sorting by it gives the sine back (in file order the values are noise).
Bar: test MAE below 0.5 x the last-value baseline's (4 steps ahead the sine has moved: naive ~0.39, model ~0.09
after 12 epochs, ~2 s on one thread)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model_registry import Registry
from training import checkpoint, export, loop, series, user_series
from training.user_data import DataError, files_sha256

N, PERIOD = 600, 25
FEW_EPOCHS = loop.TrainConfig(**{**series.TRAIN, "epochs": 12})


def sine(n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (10 + np.sin(2 * np.pi * t / PERIOD) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def write_series(path: Path, values: np.ndarray, shuffle: bool = True, seed: int = 1) -> Path:
    """`date,value,note` rows (daily from 2020-01-01), in a seeded shuffled order."""
    import pandas as pd

    dates = pd.date_range("2020-01-01", periods=len(values), freq="D").strftime("%Y-%m-%d")
    frame = pd.DataFrame({"date": dates, "value": values, "note": [f"n{i % 3}" for i in range(len(values))]})
    if shuffle:
        frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))]
    frame.to_csv(path, index=False, float_format="%.6f")
    return path


@pytest.fixture(scope="module")
def sine_csv(tmp_path_factory) -> Path:
    return write_series(tmp_path_factory.mktemp("series") / "sine.csv", sine())


@pytest.fixture(scope="module")
def trained(sine_csv, tmp_path_factory):
    """The tiny LSTM trained for 12 epochs on the shuffled sine (a few seconds): (checkpoint, metrics)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trained") / "checkpoint"
    metrics = series.train_forecaster("rnn", "tiny", out, train_cfg=FEW_EPOCHS, progress=False,
                                      data=sine_csv, time_column="date")
    return out, metrics


# ---- reading --------------------------------------------------------------------------------------

def test_rows_are_sorted_by_the_time_column(sine_csv, tmp_path):
    got = user_series.read_series(sine_csv, horizon=4, min_len=series.MIN_LEN, time_column="date")
    np.testing.assert_allclose(got.values, sine(), rtol=0, atol=2e-6)          # the sine again, not the shuffle
    assert got.value_column == "value" and got.time_column == "date" and got.rows == N   # the only numeric column
    assert got.columns == ["date", "value", "note"]
    assert got.details["was_in_time_order"] is False
    assert got.details["time_range"] == ["2020-01-01", "2021-08-22"]
    assert got.sha256 == files_sha256(sine_csv.parent, [sine_csv])
    # without the time column: file order, the shuffle
    unsorted = user_series.read_series(sine_csv, horizon=4, min_len=series.MIN_LEN)
    assert unsorted.details["order"] == "file order" and not np.allclose(unsorted.values, got.values)
    # numeric times (fractional years here), named value column among several numeric ones
    (tmp_path / "t.csv").write_text("year,other,ppm\n" + "".join(
        f"{2000 + (29 - i) / 12:.4f},{i},{i * 1.5}\n" for i in range(30)))     # latest first
    years = user_series.read_series(tmp_path / "t.csv", 4, series.MIN_LEN, value_column="ppm", time_column="year")
    np.testing.assert_allclose(years.values, [i * 1.5 for i in reversed(range(30))])
    assert years.details["order"] == "sorted by 'year' (number)"
    # dates with times and timezones sort as instants
    (tmp_path / "z.csv").write_text("when,v\n" + "".join(
        f"2024-03-01T{h:02d}:00:00+02:00,{h}\n" for h in reversed(range(24))) + "2024-03-01 00:30:00Z,99\n")
    zoned = user_series.read_series(tmp_path / "z.csv", 4, series.MIN_LEN, time_column="when")
    assert zoned.values.tolist()[:4] == [0, 1, 2, 99]     # 02:30+02 == 00:30Z falls between 02:00+02 and 03:00+02


# ---- training, export, serving ------------------------------------------------------------------

@pytest.mark.slow
def test_training_on_a_csv_beats_the_last_value_baseline(trained, sine_csv):
    out, metrics = trained
    assert metrics["naive_test_mae"] > 0.3
    assert metrics["test_mae"] < 0.5 * metrics["naive_test_mae"]
    meta = checkpoint.read_meta(out)
    lineage = meta["lineage"]
    assert meta["family"] == "rnn" and lineage["metrics"]["test_mae"] == metrics["test_mae"]
    assert lineage["dataset"] == f"user series {sine_csv.resolve()} (column 'value', sorted by 'date')"
    assert lineage["dataset_sha256"] == files_sha256(sine_csv.parent, [sine_csv])
    assert lineage["dataset_split"].startswith("chronological by target row: val targets from row 420, "
                                               "test from row 510 of 600")
    details = lineage["dataset_details"]
    assert details["rows"] == {"total": 600, "train": 420, "val": 90, "test": 90}
    assert details["value_column"] == "value" and details["time_column"] == "date"
    assert details["order"] == "sorted by 'date' (datetime)" and details["columns"] == ["date", "value", "note"]
    assert details["examples"]["test"] == 87 and details["horizon"] == 4      # targets 510..599, 4 each
    assert lineage["training_config"]["data"]["value_column"] == "value"
    # the scaling comes from the training rows of the sorted series
    model, config = checkpoint.load(out)
    assert config.mean == pytest.approx(float(sine()[:420].mean()), abs=1e-4)
    assert config.std == pytest.approx(float(sine()[:420].std()), abs=1e-4)


@pytest.mark.slow
def test_the_trained_forecaster_exports_and_serves_as_co2_does(trained, tmp_path, start_server):
    out, _ = trained
    manifest = export.package(out, tmp_path / "package")
    assert manifest.kind == "sequence" and all(r.passed for r in manifest.parity)
    assert manifest.lineage.dataset_details["value_column"] == "value"
    registry = Registry(tmp_path / "registry")
    registry.set_alias("sine", "stable", registry.publish("sine", tmp_path / "package"))
    stored = json.loads((tmp_path / "registry" / "sine" / "1" / "manifest.json").read_text())
    assert stored["lineage"]["dataset_details"]["time_column"] == "date"
    history = sine()[500:540]
    model, _ = checkpoint.load(out)
    with torch.no_grad():
        expected = model(torch.from_numpy(history).view(1, -1, 1))[0].numpy()
    with start_server(registry.root) as server:
        body = {"inputs": [{"name": "series", "shape": [1, len(history), 1], "datatype": "FP32",
                            "data": history.tolist()}]}
        r = httpx.post(f"{server.url}/v2/models/sine/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    (got,) = r.json()["outputs"]
    assert got["shape"] == [1, 4]
    np.testing.assert_allclose(np.asarray(got["data"], np.float32).reshape(1, 4), expected, rtol=0, atol=1e-4)
    truth = sine(N)[540:544]           # and the forecast follows the sine
    assert np.abs(expected[0] - truth).mean() < 0.3


# ---- bad data: one line naming the file, row or column, nothing trained -------------------------

def _csv(text: str):
    def make(tmp: Path) -> Path:
        (tmp / "s.csv").write_text(text)
        return tmp / "s.csv"
    return make


def _date(i: int) -> str:
    """Row i's day: 2021-01-01 onwards."""
    return f"2021-01-{i + 1:02d}" if i < 31 else f"2021-02-{i - 30:02d}"


def _rows(n: int, value=lambda i: f"{i % 7}.5", time=_date) -> str:
    return "".join(f"{time(i)},{value(i)}\n" for i in range(n))


TOO_FEW = user_series.min_rows(4, series.MIN_LEN) - 1
BAD_DATA = {
    # case: (make the data under tmp, train_forecaster keywords, what the message must contain)
    "missing file": (lambda t: t / "nope.csv", {}, "nope.csv: no such file"),
    "a folder": (lambda t: t, {}, "is a folder; a series is one csv file"),
    "missing value column": (_csv("date,v\n" + _rows(40)), {"value_column": "price"},
                             "s.csv: no value column 'price' (columns: date, v)"),
    "ambiguous value column": (_csv("a,b\n" + "".join(f"{i},{i}\n" for i in range(40))), {},
                               "s.csv: 2 numeric columns (a, b): name the one to forecast with --value-column"),
    "missing time column": (_csv("date,v\n" + _rows(40)), {"time_column": "when"},
                            "s.csv: no time column 'when' (columns: date, v)"),
    "non-numeric value": (_csv("date,v\n" + _rows(40, value=lambda i: "six" if i == 6 else i)), {"time_column": "date"},
                          "s.csv: value column 'v' is not numeric: row 7 holds 'six'"),
    "empty value": (_csv("date,v\n" + _rows(40, value=lambda i: "" if i == 4 else i)), {"time_column": "date"},
                    "s.csv: value column 'v': row 5 is empty"),
    "unparseable time": (_csv("date,v\n" + _rows(40, time=lambda i: "yesterday" if i == 2 else _date(i))),
                         {"time_column": "date"}, "s.csv: time column 'date': row 3 holds 'yesterday'"),
    "empty time": (_csv("t,v\n" + _rows(40, time=lambda i: "" if i == 9 else i)), {"time_column": "t"},
                   "s.csv: time column 't': row 10 has no time"),
    "duplicate time": (_csv("t,v\n" + _rows(40, time=lambda i: 3 if i == 12 else i)), {"time_column": "t"},
                       "s.csv: time column 't': row 13 repeats the time of row 4 (3)"),
    "duplicate date": (_csv("date,v\n" + _rows(40, time=lambda i: _date(4) if i == 30 else _date(i))),
                       {"time_column": "date"},
                       "s.csv: time column 'date': row 31 repeats the time of row 5 (2021-01-05)"),
    "too short": (_csv("date,v\n" + _rows(TOO_FEW)), {"time_column": "date"},
                  f"s.csv: {TOO_FEW} rows: too short for histories of at least {series.MIN_LEN} steps "
                  "and a horizon of 4"),
    "no rows": (_csv("date,v\n"), {}, "s.csv: no rows"),
    "value_column without data": (None, {"value_column": "v"},
                                  "--value-column and --time-column describe a series given with --data"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_before_training(case, tmp_path, monkeypatch):
    make, keywords, expected = BAD_DATA[case]
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("training started on bad data"))
    data = make(tmp_path) if make else None
    with pytest.raises(DataError) as raised:
        series.train_forecaster("rnn", "tiny", tmp_path / "ckpt", progress=False, data=data, **keywords)
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and expected in message, message
    assert not (tmp_path / "ckpt").exists()


def test_too_short_names_the_rows_needed_and_that_many_train(tmp_path, monkeypatch):
    need = user_series.min_rows(4, series.MIN_LEN)
    assert min(user_series.split_counts(need, 4, series.MIN_LEN).values()) == 1
    with pytest.raises(DataError, match=f"{need - 1} rows: too short .* {need} or more rows"):
        user_series.read_series(_csv("v\n" + "".join(f"{i}\n" for i in range(need - 1)))(tmp_path), 4, series.MIN_LEN)
    # with exactly that many, make_split gives every part an example (and a longer horizon needs more)
    got = user_series.read_series(_csv("v\n" + "".join(f"{i}\n" for i in range(need)))(tmp_path), 4, series.MIN_LEN)
    split = series.make_split(got.values, 4, unit="row")
    assert [len(p[1]) for p in (split.train, split.val, split.test)] == [
        user_series.split_counts(need, 4, series.MIN_LEN)[k] for k in ("train", "val", "test")]
    assert user_series.min_rows(12, series.MIN_LEN) > need
