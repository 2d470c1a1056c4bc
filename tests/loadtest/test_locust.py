"""locust, headless and for real, against a real server: classifier and streaming token users."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_run_sh_drives_every_user_class_without_failures(token_registry, start_server, tmp_path):
    with start_server(token_registry) as server:
        env = {**os.environ, "ZOOSERVE_LOADTEST_MODELS": "mlp-digits",
               "ZOOSERVE_LOADTEST_TOKEN_MODELS": "decoder-tiny:1,decoder-moe-tiny:1,mamba-tiny:1",
               "ZOOSERVE_LOADTEST_MAX_TOKENS": "8", "ZOOSERVE_LOADTEST_OUT": str(tmp_path)}
        proc = subprocess.run(["bash", "loadtest/run.sh", server.url, "4", "6s"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (stats,) = tmp_path.glob("*_stats.csv")
    with stats.open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Request Count"]) > 10 and rows["Aggregated"]["Failure Count"] == "0"
    assert "/v2/models/mlp-digits/infer" in rows
    assert any(name.startswith("/v1/completions decoder-") for name in rows)
    assert any(name.startswith("ttft decoder-") for name in rows)
    assert any(name.startswith("itl decoder-") for name in rows)
    # the Aggregated row counts requests: the TTFT and inter-token rows (type SSE) are outside it
    requests = [row for name, row in rows.items() if name != "Aggregated" and row["Type"] != "SSE"]
    assert {row["Type"] for name, row in rows.items() if name.startswith(("ttft ", "itl "))} == {"SSE"}
    assert int(rows["Aggregated"]["Request Count"]) == sum(int(row["Request Count"]) for row in requests)
    assert "/v1/completions mamba-tiny (stream)" in rows        # dozens of completions, a third of them Mamba
