"""The forecasting data and recipe: statsmodels' bundled `co2` series, split by time, and the
training of the `rnn` family on it (the shared loop in `training.loop`).

Data: weekly atmospheric CO2 at Mauna Loa, March 1958 to December 2001 (2,284 weeks, 59 gaps
filled by linear interpolation; public domain, shipped inside statsmodels).

Examples are (history, next K values): a history is the `length` weeks up to and including week
e, the targets are weeks e+1..e+K. Every week e gives one example, with a seeded random history
length in [min_len, max_len]. The split is chronological by target: the last `test_fraction`
of the weeks are test targets, the `val_fraction` before them validation targets, the rest
training targets; no target of one split lies in another. Histories may reach back across a
split boundary (that is the past, which a forecaster always sees). Scaling constants are fit
on the training targets' weeks only.

Shapes: series (N, max_len, 1) float32 raw ppm, right-padded with 0; lengths (N,) int64;
targets (N, K) float32 raw ppm.

A user's own series (train_forecaster(..., data=csv): training/user_series.py reads it, in time
order) is cut and split the same way, its steps called rows; lineage then names the file, its
sha256 and the columns used (dataset_details).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from training import checkpoint, devices, loop

CO2 = "statsmodels.datasets.co2 (weekly Mauna Loa CO2 in ppm, 1958-2001, gaps linearly interpolated)"
# history lengths the forecaster trains on (weeks); serving accepts any length up to the server's limit
MIN_LEN, MAX_LEN = 8, 52
# the loop's settings for this recipe: 20-30 s for each tiny preset on one (shared) CPU thread
TRAIN = dict(epochs=40, batch_size=64, lr=5e-3, patience=10, warmup_steps=20)

Examples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # series, lengths, targets


@dataclass
class SeriesSplit:
    """Chronological train / validation / test examples plus what lineage records about them."""

    train: Examples
    val: Examples
    test: Examples
    scaling: dict[str, float]   # mean, std (of values), step_std (of target - last value), train only
    ends: dict[str, np.ndarray] # split name -> last history week of each example (for checks)
    name: str                   # dataset name for lineage
    split: str                  # how it was split, for lineage
    sha256: str                 # hash of the series, for lineage


def load_co2() -> np.ndarray:
    """The weekly co2 series (2,284,) float32 ppm with its NaN gaps interpolated."""
    from statsmodels.datasets import co2

    values = co2.load_pandas().data["co2"].interpolate(method="linear")
    out = values.to_numpy(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("co2 still has gaps after interpolation")
    return out


def windows(values: np.ndarray, ends: np.ndarray, lengths: np.ndarray, horizon: int, max_len: int) -> Examples:
    """Examples ending at weeks `ends` with history `lengths`: right-padded series, lengths, targets."""
    series = np.zeros((len(ends), max_len, 1), np.float32)
    for i, (e, n) in enumerate(zip(ends, lengths)):
        series[i, :n, 0] = values[e - n + 1 : e + 1]
    targets = np.stack([values[e + 1 : e + 1 + horizon] for e in ends]).astype(np.float32)   # (N, K)
    return torch.from_numpy(series), torch.from_numpy(lengths.astype(np.int64)), torch.from_numpy(targets)


def make_split(values: np.ndarray, horizon: int, seed: int = 0, min_len: int = MIN_LEN, max_len: int = MAX_LEN,
               val_fraction: float = 0.15, test_fraction: float = 0.15, unit: str = "week") -> SeriesSplit:
    """Every week with `min_len` weeks of past and `horizon` weeks of future is one example;
    which split it is in depends on where its targets lie (module docstring). `unit` names a step
    in the split's description ("row" for a user's series). A constant training part (std 0) is
    centred, not scaled (std 1)."""
    n = len(values)
    test_start = int(n * (1 - test_fraction))          # first week that is a test target
    val_start = int(n * (1 - test_fraction - val_fraction))
    rng = np.random.default_rng(seed)
    ends = np.arange(min_len - 1, n - horizon)          # last history week of each example
    lengths = np.minimum(rng.integers(min_len, max_len + 1, len(ends)), ends + 1)
    first_target, last_target = ends + 1, ends + horizon
    parts = {"train": last_target < val_start,
             "val": (first_target >= val_start) & (last_target < test_start),
             "test": first_target >= test_start}
    made = {k: windows(values, ends[m], lengths[m], horizon, max_len) for k, m in parts.items()}
    train_values = values[:val_start]
    train_changes = made["train"][2] - last_value(made["train"][0], made["train"][1])[:, None]   # (N, K)
    scaling = {"mean": float(train_values.mean()), "std": float(train_values.std()) or 1.0,
               "step_std": float(train_changes.std()) or 1.0}
    counts = ", ".join(f"{k} {len(v[1])}" for k, v in made.items())
    return SeriesSplit(
        train=made["train"], val=made["val"], test=made["test"], scaling=scaling,
        ends={k: ends[m] for k, m in parts.items()}, name=CO2,
        split=(f"chronological by target {unit}: val targets from {unit} {val_start}, test from {unit} {test_start} "
               f"of {n}; history lengths {min_len}..{max_len} drawn with seed {seed}; horizon {horizon}; "
               f"examples: {counts}"),
        sha256=hashlib.sha256(values.tobytes()).hexdigest(),
    )


def last_value(series: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The last real value of each right-padded row: (N,)."""
    return series[torch.arange(len(lengths)), lengths - 1, 0]


def naive_forecast(series: torch.Tensor, lengths: torch.Tensor, horizon: int) -> torch.Tensor:
    """The baseline: the last value, repeated K times (N, K)."""
    return last_value(series, lengths)[:, None].expand(-1, horizon)


def errors(forecast: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Mean absolute and root-mean-square error over every row and horizon step, in raw units."""
    diff = (forecast - targets).double()
    return {"mae": float(diff.abs().mean()), "rmse": float(diff.pow(2).mean().sqrt())}


@torch.no_grad()
def predict(model: torch.nn.Module, examples: Examples, batch_size: int = 256) -> torch.Tensor:
    """The model's forecasts for every example (N, K), in eval mode."""
    model.eval()
    series, lengths, _ = examples
    return torch.cat([model(series[i : i + batch_size], lengths[i : i + batch_size])[0]
                      for i in range(0, len(lengths), batch_size)])


def train_forecaster(family: str, preset: str, out_dir: str | Path, train_cfg: loop.TrainConfig | None = None,
                     progress: bool = True, data: str | Path | None = None, value_column: str | None = None,
                     time_column: str | None = None, run_dir: str | Path | None = None, resume: bool = False,
                     device: str | torch.device = "cpu", precision: str = "fp32", tensorboard: bool = False,
                     **overrides) -> dict[str, float]:
    """Train `family` (rnn) at `preset` on co2, or on the user's own series `data` (a csv, one row per
    step: training/user_series.py; `value_column` is the column to forecast, default the only
    numeric one; `time_column` an optional column to sort the rows by, numbers or dates). Writes
    the checkpoint and returns its metrics, with the test errors of the model and of the last-value
    baseline (`config` fields may be overridden: horizon among them). Bad data raises
    user_data.DataError before anything trains. `run_dir`/`resume`: the run folder of loop.train
    (run-state checkpoints, metrics.jsonl) and whether to continue the run it holds. `device`,
    `precision`, `tensorboard`: as loop.train takes them (training/models/rnn.py makes its state,
    masks and level shifts on the batch's device); lineage records the device and precision, and the
    test errors are computed on the CPU model after training."""
    from training.families import family_module, make_config
    from training.train import code_revision

    device = devices.resolve(device)
    devices.check(device, precision)
    train_cfg = train_cfg or loop.TrainConfig(**TRAIN)
    fam = family_module(family)
    unscaled = make_config(family, preset, **overrides)
    horizon = unscaled.horizon
    details = None
    if data is None:
        if value_column is not None or time_column is not None:
            from training.user_data import DataError

            raise DataError("--value-column and --time-column describe a series given with --data")
        split = make_split(load_co2(), horizon, seed=train_cfg.seed)
    else:
        from training import user_series

        user = user_series.read_series(data, horizon, MIN_LEN, value_column, time_column)
        split = make_split(user.values, horizon, seed=train_cfg.seed, val_fraction=user_series.VAL_FRACTION,
                           test_fraction=user_series.TEST_FRACTION, unit="row")
        split = dataclasses.replace(split, name=user.name, sha256=user.sha256)
        n = user.rows
        test_start = int(n * (1 - user_series.TEST_FRACTION))
        val_start = int(n * (1 - user_series.TEST_FRACTION - user_series.VAL_FRACTION))
        details = {**user.details,
                   "rows": {"total": n, "train": val_start, "val": test_start - val_start, "test": n - test_start},
                   "examples": {k: int(len(getattr(split, k)[1])) for k in ("train", "val", "test")},
                   "horizon": horizon, "history": [MIN_LEN, MAX_LEN]}
    config = dataclasses.replace(unscaled, **split.scaling)
    torch.manual_seed(train_cfg.seed)
    model = fam.Model(config)
    started = time.perf_counter()
    run_config = {"family": family, "preset": preset, "model": dataclasses.asdict(config),
                  "data": None if data is None else str(Path(data).resolve()),
                  "value_column": value_column, "time_column": time_column}
    result = loop.train(model, fam.loss, split.train, split.val, train_cfg, progress=progress,
                        run_dir=run_dir, resume=resume, run_config=run_config if run_dir is not None else None,
                        device=device, precision=precision, tensorboard=tensorboard)
    model_err = errors(predict(model, split.test), split.test[2])
    naive_err = errors(naive_forecast(split.test[0], split.test[1], horizon), split.test[2])
    metrics = {
        "val_loss": result["best_val_loss"],
        "test_mae": model_err["mae"], "test_rmse": model_err["rmse"],
        "naive_test_mae": naive_err["mae"], "naive_test_rmse": naive_err["rmse"],
        "epochs_run": float(result["epochs_run"]),
        "train_seconds": time.perf_counter() - started,
    }
    data_config = {"min_len": MIN_LEN, "max_len": MAX_LEN, "horizon": horizon}
    if data is not None:
        data_config.update(source=details["source"], value_column=details["value_column"],
                           time_column=details["time_column"])
    meta = {
        "family": family,
        "lineage": {
            "training_config": {"preset": preset, "model": dataclasses.asdict(config),
                                "train": dataclasses.asdict(train_cfg), "data": data_config,
                                "device": devices.describe(device), "precision": precision},
            "dataset": split.name, "dataset_split": split.split, "dataset_sha256": split.sha256,
            "seed": train_cfg.seed, "metrics": metrics, "code_revision": code_revision(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    }
    if details is not None:
        meta["lineage"]["dataset_details"] = details
    checkpoint.save(out_dir, model, config, meta)
    return metrics
