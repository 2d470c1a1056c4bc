"""Plot a locust `_stats_history.csv`: requests/s and p50/p95 latency over time (one PNG).

    python loadtest/plot.py loadtest/results/<stamp>_stats_history.csv [OUT.png]

matplotlib is optional (not a zooserve dependency): without it this prints a message and exits 0.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def read_history(path: Path) -> dict[str, list[float]]:
    """The "Aggregated" rows: seconds since start, users, req/s, failures/s, p50 and p95 (ms)."""
    cols: dict[str, list[float]] = {k: [] for k in ("t", "users", "rps", "fails", "p50", "p95")}
    start = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") != "Aggregated":
                continue
            try:
                t = float(row["Timestamp"])
                values = [float(row["User Count"]), float(row["Requests/s"]), float(row["Failures/s"]),
                          float(row["50%"]), float(row["95%"])]
            except (KeyError, ValueError):      # early rows say "N/A" before the first response
                continue
            start = t if start is None else start
            for key, v in zip(cols, [t - start, *values]):
                cols[key].append(v)
    return cols


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.with_name(src.name.replace("_stats_history.csv", "") + ".png")
    try:
        import matplotlib
    except ImportError:
        print("plot.py: matplotlib is not installed, skipping the plot")
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = read_history(src)
    if not h["t"]:
        print(f"plot.py: no Aggregated rows with numbers in {src}, nothing to plot")
        return 0
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(h["t"], h["rps"], label="requests/s")
    top.plot(h["t"], h["fails"], label="failures/s", color="tab:red")
    top.set_ylabel("per second")
    top.legend(loc="upper left")
    users = top.twinx()
    users.plot(h["t"], h["users"], color="tab:gray", linestyle=":", label="users")
    users.set_ylabel("users")
    users.set_ylim(0, max(h["users"]) * 1.2 or 1)
    bottom.plot(h["t"], h["p50"], label="p50")
    bottom.plot(h["t"], h["p95"], label="p95")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="upper left")
    fig.suptitle(f"zooserve load test: {src.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot.py: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
