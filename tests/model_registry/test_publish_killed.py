"""A publish killed with SIGKILL half way leaves no version that a server would load: versions
appear only by the final rename of a finished, fsynced staging folder, and staging folders are
never versions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from model_registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def test_a_publish_killed_half_way_leaves_no_version(registry_copy, tmp_path):
    reg = Registry(registry_copy)
    big = tmp_path / "big"
    shutil.copytree(registry_copy / "mlp-digits" / "1", big)
    m = json.loads((big / "manifest.json").read_text())     # publish re-hashes what it is given
    m["files"] = {}
    (big / "manifest.json").write_text(json.dumps(m))
    with open(big / "padding.bin", "wb") as f:          # ~200 MB to copy, hash and fsync: time to kill it
        block = os.urandom(1 << 20)
        for _ in range(200):
            f.write(block)
    before = reg.versions("mlp-digits")
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "registry", "publish", "--registry",
                             str(registry_copy), "mlp-digits", str(big)], cwd=ROOT)
    model_dir = registry_copy / "mlp-digits"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:                  # kill it once its staging folder holds part of the copy
        staging = [p for p in model_dir.iterdir() if p.name.startswith(".staging-")]
        if staging and any(f.stat().st_size > (1 << 20) for f in staging[0].rglob("*") if f.is_file()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the publish finished before it could be killed; make the padding larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reg.versions("mlp-digits") == before          # nothing half-published became a version
    leftovers = [p for p in model_dir.iterdir() if p.name.startswith(".staging-")]
    assert leftovers                                      # the leftover is there...
    for version in reg.versions("mlp-digits"):
        reg.verify("mlp-digits", version)                 # ...and every version still verifies
    (big / "padding.bin").unlink()
    assert reg.publish("mlp-digits", big) == max(before) + 1     # the next publish takes the next number
    for leftover in leftovers:                            # (a few hundred MB: not kept in the tmp folders)
        shutil.rmtree(leftover)
