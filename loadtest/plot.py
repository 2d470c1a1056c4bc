"""Plot a locust `_stats_history.csv`: throughput, latency and users over the whole run (one PNG).

    python loadtest/plot.py loadtest/results/<stamp>_stats_history.csv [OUT.png]

loadtest/run.sh runs it after every run: the PNG lands beside the CSVs, loadtest/results/<stamp>.png.
matplotlib comes with the dev extra; without it this prints a message and exits 0.

Drawn from the "Aggregated" rows, which count requests only (the locustfile keeps TTFT and token gaps
out of them):
  top     requests/s and failures/s per history interval (about 1 s), from the differences of locust's
          running totals; users on the right-hand axis. (Locust's own "Requests/s" column is a trailing
          ~10 s average: it climbs for 10 s at the start of any run, ramp or none, so it is not used.)
  bottom  mean latency per interval (from the running totals), and p50 / p95: over the last ~10 s
          when the CSV was written with --csv-full-history (run.sh does), else since the start of the
          run (that is what locust writes then); the legend says which.
  shaded  the spawn ramp (users below their peak at the start) and the stop (below it again at the
          end). Throughput and latency are drawn between the two only, where the user count is the
          one asked for: the ramp is marked as a ramp, not drawn as a throughput climb.
The time axis runs from locust's first history row to its last: the whole run.

    make_figure(read_history(path)) -> matplotlib Figure     # for tests and notebooks
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

NAN = float("nan")


@dataclass
class History:
    """One value per history row of the Aggregated entry (one row per second; a repeated second keeps its last)."""

    t: list[float] = field(default_factory=list)          # seconds since the first row
    users: list[float] = field(default_factory=list)
    requests: list[float] = field(default_factory=list)   # running totals
    failures: list[float] = field(default_factory=list)
    mean_ms: list[float] = field(default_factory=list)    # running mean latency
    p50: list[float] = field(default_factory=list)        # NaN where locust wrote N/A (or no window yet)
    p95: list[float] = field(default_factory=list)
    windowed: bool = False                                 # percentiles over the last ~10 s (full history)

    def rates(self) -> tuple[list[float], list[float], list[float]]:
        """Per interval (t[i-1], t[i]], at index i (index 0 is NaN): requests/s, failures/s, mean ms."""
        rps, fps, mean = [NAN], [NAN], [NAN]
        for i in range(1, len(self.t)):
            dt = self.t[i] - self.t[i - 1]
            dn = self.requests[i] - self.requests[i - 1]
            rps.append(dn / dt)
            fps.append((self.failures[i] - self.failures[i - 1]) / dt)
            mean.append((self.mean_ms[i] * self.requests[i] - self.mean_ms[i - 1] * self.requests[i - 1]) / dn
                        if dn > 0 else NAN)
        return rps, fps, mean

    def steady(self) -> tuple[float, float]:
        """(end of the spawn ramp, start of the stop): the first row at the peak user count, and the
        first row after it below the peak (the last row when users never drop)."""
        peak = max(self.users)
        up = next(i for i, u in enumerate(self.users) if u == peak)
        down = next((i for i in range(up, len(self.users)) if self.users[i] < peak), len(self.users) - 1)
        return self.t[up], self.t[down]


def _number(text: str | None) -> float:
    try:
        return float(text)                      # type: ignore[arg-type]
    except (TypeError, ValueError):             # "N/A" before the first response
        return NAN


def read_history(path: Path) -> History:
    rows: dict[int, dict[str, str]] = {}
    windowed = False
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") != "Aggregated":
                windowed = True                 # per-entry rows: written with --csv-full-history
                continue
            rows[int(float(row["Timestamp"]))] = row
    h = History(windowed=windowed)
    if not rows:
        return h
    start = min(rows)
    for stamp in sorted(rows):
        row = rows[stamp]
        h.t.append(float(stamp - start))
        h.users.append(_number(row["User Count"]))
        h.requests.append(_number(row["Total Request Count"]) if row["Total Request Count"] else 0.0)
        h.failures.append(_number(row["Total Failure Count"]) if row["Total Failure Count"] else 0.0)
        mean = _number(row["Total Average Response Time"])
        h.mean_ms.append(0.0 if math.isnan(mean) else mean)
        p50, p95, top = _number(row["50%"]), _number(row["95%"]), _number(row["100%"])
        if windowed and top == 0:               # locust writes 0 until it holds a window of response times
            p50 = p95 = NAN
        h.p50.append(p50)
        h.p95.append(p95)
    return h


def make_figure(h: History, title: str = "zooserve load test"):
    """The two-panel figure (matplotlib Figure); every line and shaded band is in its panel's legend."""
    from matplotlib.figure import Figure

    if len(h.t) < 2:
        raise ValueError("plot.py: a history of at least two rows (seconds) is needed")
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    end = h.t[-1]
    ramp_end, stop = h.steady()
    peak = int(max(h.users))

    # between the ramp and the stop only: the interval (t[i-1], t[i]] is steady when t[i-1] >= ramp_end
    rps, fps, mean = h.rates()
    steady = [i for i in range(1, len(h.t)) if h.t[i - 1] >= ramp_end and h.t[i] <= stop]
    steady = steady or list(range(1, len(h.t)))          # never at the peak for a whole interval: draw it all

    def per_interval(ax, values: list[float], **style) -> None:
        """A flat step over each steady interval (a rate or mean belongs to its interval, not to its end)."""
        xs = [h.t[steady[0] - 1]] + [h.t[i] for i in steady]
        ys = [values[i] for i in steady]
        ax.plot(xs, ys + ys[-1:], drawstyle="steps-post", **style)

    def at_rows(ax, values: list[float], **style) -> None:
        """A value that locust computed at each row (the percentiles), at the rows after the ramp."""
        ax.plot([h.t[i] for i in steady], [values[i] for i in steady], **style)

    for ax in (top, bottom):
        if ramp_end > 0:
            ax.axvspan(0, ramp_end, color="tab:orange", alpha=0.15, lw=0, label=f"spawn ramp (0 to {peak} users)")
        if stop < end:
            ax.axvspan(stop, end, color="tab:gray", alpha=0.15, lw=0, label="stopping")

    per_interval(top, rps, color="tab:blue", label="requests/s")
    per_interval(top, fps, color="tab:red", label="failures/s")
    top.set_ylabel("per second (each ~1 s interval)")
    top.set_ylim(bottom=0)
    users = top.twinx()
    users.plot(h.t, h.users, color="tab:gray", linestyle=":", label="users (right axis)")
    users.set_ylabel("users")
    users.set_ylim(0, max(peak * 1.2, 1))
    handles = top.get_legend_handles_labels()[0] + users.get_legend_handles_labels()[0]
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1), fontsize="small")

    span = "last ~10 s" if h.windowed else "since start"
    per_interval(bottom, mean, color="tab:green", label="mean (each interval)")
    at_rows(bottom, h.p50, color="tab:purple", label=f"p50 ({span})")
    at_rows(bottom, h.p95, color="tab:brown", label=f"p95 ({span})")
    bottom.set_ylabel("latency (ms)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds since the start of the run")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.08, 1), fontsize="small")

    top.set_xlim(0, end)
    fig.suptitle(title)
    return fig


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.with_name(src.name.replace("_stats_history.csv", "") + ".png")
    if importlib.util.find_spec("matplotlib") is None:
        print("plot.py: matplotlib is not installed (it comes with the dev extra), skipping the plot")
        return 0
    h = read_history(src)
    if len(h.t) < 2:
        print(f"plot.py: fewer than two Aggregated rows in {src}, nothing to plot")
        return 0
    make_figure(h, f"zooserve load test: {src.name.replace('_stats_history.csv', '')}").savefig(out, dpi=100)
    print(f"plot.py: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
