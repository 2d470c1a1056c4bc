"""loadtest/plot.py on the stats history of a real (short) loadtest/run.sh run against a real server:
the PNG lands beside the CSVs, the time axis is the whole run, every line is in a legend, and the
spawn ramp is shaded instead of drawn as a throughput climb."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def load_plot():
    spec = importlib.util.spec_from_file_location("loadtest_plot", ROOT / "loadtest" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                     # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_run_sh_plots_the_whole_run_with_the_ramp_marked(demo_registry, start_server, tmp_path):
    pytest.importorskip("matplotlib")
    with start_server(demo_registry) as server:
        # 3 users at 1 a second: a ramp of 2 s (more while the first user loads sklearn) in a 12 s run
        env = {**os.environ, "ZOOSERVE_LOADTEST_MODELS": "mlp-digits", "ZOOSERVE_LOADTEST_OUT": str(tmp_path),
               "SPAWN_RATE": "1", "LOCUST_ARGS": "ClassifierUser"}
        proc = subprocess.run(["bash", "loadtest/run.sh", server.url, "3", "12s"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (history_csv,) = tmp_path.glob("*_stats_history.csv")
    png = tmp_path / history_csv.name.replace("_stats_history.csv", ".png")
    assert f"plot.py: wrote {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    plot = load_plot()
    h = plot.read_history(history_csv)
    assert h.windowed                                   # run.sh writes the full history: 10 s percentiles
    assert h.t[0] == 0 and h.t[-1] >= 10                # the rows span the run
    ramp_end, stop = h.steady()
    assert 2 <= ramp_end <= h.t[-1] - 2 and h.users[0] < 3 and max(h.users) == 3
    # the per-interval rates add up to locust's own running total
    rps, _, _ = h.rates()
    done = sum(r * (h.t[i] - h.t[i - 1]) for i, r in enumerate(rps) if i)
    assert done == pytest.approx(h.requests[-1] - h.requests[0])

    fig = plot.make_figure(h)
    top, bottom, users = fig.axes                       # the twin users axis comes last
    assert top.get_xlim() == (0, h.t[-1]) and bottom.get_xlim() == (0, h.t[-1])
    for ax, lines in ((top, top.get_lines() + users.get_lines()), (bottom, bottom.get_lines())):
        legend = {t.get_text() for t in ax.get_legend().get_texts()}
        assert {line.get_label() for line in lines} <= legend
        assert any(label.startswith("spawn ramp") for label in legend)
        ramp = next(p for p in ax.patches if p.get_label().startswith("spawn ramp"))
        assert (ramp.get_x(), ramp.get_x() + ramp.get_width()) == (0, ramp_end)     # a Rectangle (matplotlib 3.9+)
    # throughput and latency start where the ramp ends, and carry numbers there
    (requests,) = [line for line in top.get_lines() if line.get_label() == "requests/s"]
    x, y = requests.get_data()
    assert min(x) == ramp_end and max(x) <= stop and all(v > 0 for v in y)
    assert all(min(line.get_xdata()) >= ramp_end for line in top.get_lines() + bottom.get_lines())
    (mean,) = [line for line in bottom.get_lines() if line.get_label().startswith("mean")]
    assert all(v > 0 and not math.isnan(v) for v in mean.get_ydata())
    assert any(t.get_text() == "users (right axis)" for t in top.get_legend().get_texts())
