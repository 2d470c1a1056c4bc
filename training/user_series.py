"""A user's own series for the rnn forecaster (issue 15, section 1): read, validate, put in time order.

The file is a table, one row per time step: csv (also parquet or json lines, as for the mlp tables
in training/user_data.py), read with Hugging Face `datasets` offline and with a temporary cache
(user_data._load). Columns:

- the value column (`value_column`): the numbers to forecast. Default: the only numeric column
  (the time column left aside); with more than one, it must be named;
- an optional time column (`time_column`) to sort the rows by: numbers (years, seconds, ...) or
  dates/times (anything pandas parses, e.g. `2020-01-31` or `2020-01-31 12:00`; timezones are taken
  to UTC, a time without one counts as UTC). Without it, rows are in file order. Times must be
  distinct; they need not be evenly spaced (the model sees only the sequence of values);
- any other columns are ignored (recorded in the lineage).

The forecaster's examples are cut from the values in time order by series.make_split (history of
series.MIN_LEN..MAX_LEN steps, the config's horizon, chronological 70/15/15 by target), so the
series must be long enough that each part gets at least one example (`min_rows`).

Bad data raises user_data.DataError before anything trains, one line naming the file and the
row (counted from 1, the header not counted) or column: a missing file, a missing or ambiguous
value column, a non-numeric or empty value, an unparseable, empty or duplicate time, a series too
short for the window, horizon and split.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.user_data import TABLE_FORMATS, DataError, _is_number, _load, _show, files_sha256

# the same chronological split fractions as series.make_split's defaults
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


@dataclass
class UserSeries:
    """A user's series in time order, and what the checkpoint's lineage needs from it."""

    values: np.ndarray                  # (N,) float32, in time order
    sha256: str                         # over the file: its name, then its bytes (user_data.files_sha256)
    rows: int                           # N
    columns: list[str]                  # every column of the file, in file order
    value_column: str
    time_column: str | None
    source: Path                        # resolved path of the file
    details: dict[str, Any] = field(default_factory=dict)   # lineage.dataset_details

    @property
    def name(self) -> str:
        """The dataset name for lineage."""
        order = f", sorted by {self.time_column!r}" if self.time_column else ", in file order"
        return f"user series {self.source} (column {self.value_column!r}{order})"


def split_counts(n: int, horizon: int, min_len: int, val_fraction: float = VAL_FRACTION,
                 test_fraction: float = TEST_FRACTION) -> dict[str, int]:
    """How many examples series.make_split cuts from `n` values for each part (its rules, counted)."""
    test_start = int(n * (1 - test_fraction))
    val_start = int(n * (1 - test_fraction - val_fraction))
    ends = np.arange(min_len - 1, n - horizon)
    first, last = ends + 1, ends + horizon
    return {"train": int((last < val_start).sum()),
            "val": int(((first >= val_start) & (last < test_start)).sum()),
            "test": int((first >= test_start).sum())}


def min_rows(horizon: int, min_len: int, val_fraction: float = VAL_FRACTION,
             test_fraction: float = TEST_FRACTION) -> int:
    """The fewest values that give every part (train, val, test) at least one example."""
    n = min_len + horizon
    while min(split_counts(n, horizon, min_len, val_fraction, test_fraction).values()) < 1:
        n += 1
    return n


def read_series(path: str | os.PathLike, horizon: int, min_len: int, value_column: str | None = None,
                time_column: str | None = None, val_fraction: float = VAL_FRACTION,
                test_fraction: float = TEST_FRACTION) -> UserSeries:
    """The value column of the table at `path`, in time order (module docstring); DataError for bad
    data. `horizon` and `min_len` (the shortest history) decide how many rows are enough."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise DataError(f"{where}: no such file")
    if path.is_dir():
        raise DataError(f"{where}: is a folder; a series is one csv file, one row per time step")
    builder = TABLE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{where}: unknown table format {path.suffix or '(no extension)'!r} "
                        f"(use {', '.join(TABLE_FORMATS)})")
    if value_column is not None and value_column == time_column:
        raise DataError(f"the value column and the time column are both {value_column!r}")
    if builder == "csv":           # `datasets` refuses a header-only csv with a message about splits
        lines = []
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    lines.append(line)
                if len(lines) == 2:
                    break
        if len(lines) < 2:
            raise DataError(f"{where}: " + ("no rows (only a header)" if lines else "empty file"))
    frame = _load(builder, where, data_files=str(path)).to_pandas()
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    listed = ", ".join(columns)
    if time_column is not None and time_column not in columns:
        raise DataError(f"{where}: no time column {time_column!r} (columns: {listed})")
    if value_column is not None and value_column not in columns:
        raise DataError(f"{where}: no value column {value_column!r} (columns: {listed})")
    n = len(frame)
    if n == 0:
        raise DataError(f"{where}: no rows")
    value_column = value_column or _default_value_column(where, frame, columns, time_column)
    values = _values(where, frame[value_column], value_column)
    order = np.arange(n)
    times, kind = None, None
    if time_column is not None:
        times, kind = _times(where, frame[time_column], time_column)
        order = np.argsort(times, kind="stable")
        _check_distinct(where, frame[time_column], time_column, times, order)
    need = min_rows(horizon, min_len, val_fraction, test_fraction)
    if n < need:
        raise DataError(f"{where}: {n} rows: too short for histories of at least {min_len} steps and a horizon "
                        f"of {horizon} in each of training, validation ({val_fraction:.0%}) and test "
                        f"({test_fraction:.0%}): {need} or more rows")
    ordered = values[order]
    source = path.resolve()
    details: dict[str, Any] = {
        "source": str(source), "format": path.suffix.lower().lstrip("."),
        "reader": f"datasets.load_dataset({builder!r})", "files": 1,
        "rows": {"total": n}, "columns": columns,
        "value_column": value_column, "time_column": time_column,
        "order": "file order" if time_column is None else f"sorted by {time_column!r} ({kind})",
        "value_summary": {"first": float(ordered[0]), "last": float(ordered[-1]), "min": float(ordered.min()),
                          "max": float(ordered.max()), "mean": float(ordered.mean(dtype=np.float64))},
        "sha256_of": "the file's name, then its bytes",
    }
    if time_column is not None:
        raw = frame[time_column]
        details["time_range"] = [_show_time(raw.iloc[int(order[0])]), _show_time(raw.iloc[int(order[-1])])]
        details["was_in_time_order"] = bool((order == np.arange(n)).all())
    return UserSeries(values=ordered, sha256=files_sha256(source.parent, [source]), rows=n, columns=columns,
                      value_column=value_column, time_column=time_column, source=source, details=details)


def _is_numeric(column) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _default_value_column(where: str, frame, columns: list[str], time_column: str | None) -> str:
    """The only numeric column besides the time column; else the only column besides it (whose bad
    cell _values then names); else an error asking for value_column."""
    others = [c for c in columns if c != time_column]
    numeric = [c for c in others if _is_numeric(frame[c])]
    if len(numeric) == 1:
        return numeric[0]
    if len(numeric) > 1:
        hint = "" if time_column else " (a time column to sort by is named with --time-column)"
        raise DataError(f"{where}: {len(numeric)} numeric columns ({', '.join(numeric)}): name the one to "
                        f"forecast with --value-column{hint}")
    if len(others) == 1:
        return others[0]
    if not others:
        raise DataError(f"{where}: no value column: only the time column {time_column!r}")
    raise DataError(f"{where}: no numeric column (columns: {', '.join(columns)}): name the one to forecast "
                    "with --value-column")


def _values(where: str, column, name: str) -> np.ndarray:
    """The value column as float32; DataError naming the column and the first bad row."""
    import pandas as pd

    if _is_numeric(column):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = np.empty(len(column))
        for i, v in enumerate(column):
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
                values[i] = float(v)
            elif v is None or (isinstance(v, str) and not v.strip()):
                values[i] = np.nan
            elif isinstance(v, str) and _is_number(v):
                values[i] = float(v)
            else:
                raise DataError(f"{where}: value column {name!r} is not numeric: row {i + 1} holds {_show(v)}")
    with np.errstate(over="ignore"):
        out = values.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        i = int(bad[0])
        v = column.iloc[i]
        empty = v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()) \
            or v is pd.NA
        what = "is empty" if empty else f"holds {_show(v)}"
        raise DataError(f"{where}: value column {name!r}: row {i + 1} {what} "
                        "(values must be finite numbers, within float32 range)")
    return out


def _times(where: str, column, name: str) -> tuple[np.ndarray, str]:
    """Each row's time as a sortable float (numbers) or int64 nanoseconds since 1970 UTC (dates), and
    which of the two; DataError naming the first empty or unparseable row."""
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(column):
        parsed = pd.to_datetime(column, utc=True)
        kind = "datetime"
    elif _is_numeric(column):
        numbers = column.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.flatnonzero(~np.isfinite(numbers))
        if len(bad):
            i = int(bad[0])
            v = column.iloc[i]
            what = "has no time" if pd.isna(v) else f"holds {_show(v)}"
            raise DataError(f"{where}: time column {name!r}: row {i + 1} {what}")
        return numbers, "number"
    else:
        for i, v in enumerate(column):
            if v is None or pd.isna(v) or (isinstance(v, str) and not v.strip()):
                raise DataError(f"{where}: time column {name!r}: row {i + 1} has no time")
            if isinstance(v, (bool, np.bool_)):
                raise DataError(f"{where}: time column {name!r}: row {i + 1} holds {_show(v)}: "
                                "not a date/time or a number")
        text = column.astype(str).str.strip()
        if all(_is_number(t) for t in text):
            numbers = text.astype(np.float64).to_numpy()
            bad = np.flatnonzero(~np.isfinite(numbers))
            if len(bad):
                raise DataError(f"{where}: time column {name!r}: row {bad[0] + 1} holds {_show(column.iloc[bad[0]])}")
            return numbers, "number"
        parsed = pd.to_datetime(text, utc=True, format="mixed", errors="coerce")
        kind = "datetime"
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        i = int(bad[0])
        v = column.iloc[i]
        if v is None or pd.isna(v):
            raise DataError(f"{where}: time column {name!r}: row {i + 1} has no time")
        raise DataError(f"{where}: time column {name!r}: row {i + 1} holds {_show(v)}: not a date/time or a number")
    stamps = parsed.dt.tz_convert(None).to_numpy()       # datetime64 at pandas' resolution for the column
    return stamps.astype(np.int64), kind


def _check_distinct(where: str, column, name: str, times: np.ndarray, order: np.ndarray) -> None:
    """DataError for two rows at the same time, naming both (the later in file order repeats the earlier)."""
    ordered = times[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not len(same):
        return
    # of every tied pair in time order, the one whose later row comes first in the file
    pairs = sorted((max(int(order[k]), int(order[k + 1])), min(int(order[k]), int(order[k + 1]))) for k in same)
    later, earlier = pairs[0]
    raise DataError(f"{where}: time column {name!r}: row {later + 1} repeats the time of row {earlier + 1} "
                    f"({_show_time(column.iloc[later])}); times must be distinct")


def _show_time(value: Any) -> str:
    """A time cell as the user wrote it (numbers and strings), or ISO for a parsed datetime."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)
