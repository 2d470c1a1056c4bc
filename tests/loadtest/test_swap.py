"""Hot swaps under load, for real: loadtest/swap.py runs a headless locust against a real server
while it flips aliases, publishes versions and changes the split in the registry the server
follows; not one request may fail, and requests must have run across the changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("source", "model"), [("demo_registry", "mlp-digits"), ("token_registry", "decoder-tiny")])
def test_no_request_fails_across_flips_publishes_and_split_changes(source, model, request, start_server, tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    shutil.copytree(request.getfixturevalue(source) / model, registry / model)    # the fixtures are read-only
    results = tmp_path / "results"
    with start_server(registry) as server:
        proc = subprocess.run(
            [sys.executable, "loadtest/swap.py", "--registry", str(registry), "--host", server.url, "--model", model,
             "--flips", "4", "--publishes", "2", "--splits", "2", "--users", "2", "--warmup", "1", "--cooldown", "2",
             "--out", str(results)],
            cwd=ROOT, env={**os.environ, "ZOOSERVE_LOADTEST_MAX_TOKENS": "8"}, capture_output=True, text=True,
            timeout=150)
        server_log = server.logs()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + server_log[-3000:]
    (report_file,) = results.glob("*_swap.json")
    report = json.loads(report_file.read_text())
    assert report["failures"] == 0 and report["locust_exit_code"] == 0 and report["failure_reasons"] == []
    assert (report["flips"], report["publishes"], report["splits"]) == (4, 2, 2)
    assert report["requests_during_changes"] >= 20, report
    # the changes moved real traffic: versions 1, 2 (set up as stable and canary) and the two published
    # ones; at least three of them answered requests
    assert report["versions_seen"] == [1, 2, 3, 4]
    assert len(report["answered_by_version"]) >= 3, report["answered_by_version"]
    # the default policy ("latest 1" plus aliased versions) keeps the loads sane: stable and canary
    # (and a version on its way in or out), and at the end just what the aliases name
    assert report["max_versions_held"] <= 4, report["held_at_max"]
    assert report["settled"] and 1 <= len(report["held_after"]) <= 2, report["held_after"]
    assert all(c["in_force_after_s"] < 10 for c in report["changes"])
