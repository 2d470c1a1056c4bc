"""Progressive rollout end to end: real servers route by the split the controller writes; a
faulty canary (fails ~5 % of inputs, or adds ~50 ms) is rolled back within two analysis
intervals, a good one is promoted; no request fails that the canary did not fail itself, and the
canary never takes more than its step's share. Once with the controller embedded in a lone
server, once as `zooserve rollout run --servers` over two replicas of one registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from model_registry import Registry
from tests.faulty_models import build_failing_canary, build_slow_canary
from training.import_model import import_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DIGITS = load_digits()


def body(i: int) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": DIGITS.images[i % len(DIGITS.images)].astype(np.float32).flatten().tolist()}]}


class Load:
    """Closed-loop callers, each sending one request after another with no version named, and every
    answer kept as (time, status, version that answered)."""

    def __init__(self, urls: list[str], callers: int = 2):
        self.urls, self.answers, self.stop = urls, [], threading.Event()
        self.threads = [threading.Thread(target=self._call, args=(k,), daemon=True) for k in range(callers)]

    def _call(self, k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                url = self.urls[int(rng.integers(len(self.urls)))]
                r = client.post(f"{url}/v2/models/mlp-digits/infer", json=body(int(rng.integers(1797))))
                self.answers.append((time.time(), r.status_code, r.headers.get("x-model-version")))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def add_canary(registry_root: Path, tmp_path: Path, kind: str) -> int:
    """Publish the canary as the next mlp-digits version, alias `canary`: a twin of version 1, or a
    faulty one built from version 1's TorchScript."""
    reg = Registry(registry_root)
    if kind == "good":
        version = reg.publish("mlp-digits", registry_root / "mlp-digits" / "1")
    else:
        ts = next((registry_root / "mlp-digits" / "1").glob("*.ts"), None) or \
            next(p for p in (registry_root / "mlp-digits" / "1").iterdir() if p.suffix in (".pt", ".ts"))
        build = build_failing_canary if kind == "failing" else build_slow_canary
        artifact = build(ts, tmp_path / f"{kind}.pt")
        # force: an import's family is `imported`, not `mlp`
        version = import_model(reg, "mlp-digits", artifact, input_shape="1,1,8,8", input_name="image",
                               output_name="logits", force=True).version
    reg.set_alias("mlp-digits", "canary", version)
    return version


def warm(url: str, versions: list[int]) -> None:
    """First requests after a load are slower (allocations, caches): warm both arms alike, so the
    latency judge compares versions, not a cold start."""
    with httpx.Client(timeout=30) as client:
        for _ in range(40):
            for v in versions:
                client.post(f"{url}/v2/models/mlp-digits/versions/{v}/infer", json=body(v))


def start_rollout(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "serve.cli", "rollout", "start", "--registry", str(root), "mlp-digits",
                    "--canary", "canary", *args], cwd=ROOT, check=True, capture_output=True, text=True)


def wait_for_end(root: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Registry(root).model_config("mlp-digits").rollout.status
        if status.state != "running":
            return status.model_dump()
        time.sleep(0.1)
    raise AssertionError(f"rollout still running after {timeout} s: {status}")


def figure(what: str, answers: list, canary: int, status: dict, started: float) -> None:
    """One line for docs/routing.md (shown with pytest -s): when it was decided, what the callers saw."""
    failed = sum(a[1] != 200 for a in answers)
    on_canary = sum(a[2] == str(canary) for a in answers)
    print(f"\nrollout figure: {what}: {status['state']} {status['history'][-1]['at'] - started:.1f} s after the "
          f"start; {len(answers)} requests, {on_canary} on the canary, {failed} failed (all on the canary); "
          f"reason: {status['reason']}")


def check_answers(answers: list, canary: int, status: dict, settle: float = 0.7) -> None:
    """Only the canary fails; the canary never takes more than its step's share (3 sigma over the
    answers of that step); after a rollback it takes nothing. `settle`: the watch interval plus the
    time the servers take to see a change."""
    failed = [a for a in answers if a[1] != 200]
    assert all(a[2] == str(canary) for a in failed), [a for a in failed if a[2] != str(canary)][:5]
    events = status["history"]
    for event, following in zip(events, events[1:] + [None]):
        until = following["at"] if following else float("inf")
        during = [a for a in answers if event["at"] + settle < a[0] < until]
        if len(during) < 20:
            continue
        share = sum(a[2] == str(canary) for a in during) / len(during)
        p = event["weight"] / 100
        assert share <= p + 3 * (p * (1 - p) / len(during)) ** 0.5 + 0.02, (event, share, len(during))
    if status["state"] == "rolled_back":
        after = [a for a in answers if a[0] > events[-1]["at"] + settle]
        late = [a[0] - events[-1]["at"] for a in after if a[2] == str(canary)]
        assert after and not late, f"canary answers up to {max(late, default=0):.2f} s after the rollback"


@pytest.mark.parametrize("kind", ["failing", "slow"])
def test_a_faulty_canary_is_rolled_back_within_two_intervals(kind, registry_copy, start_server, tmp_path):
    canary = add_canary(registry_copy, tmp_path, kind)
    interval = 3.0
    with start_server(registry_copy) as server:          # the controller runs inside the server
        warm(server.url, [1, canary])
        with Load([server.url]) as load:
            time.sleep(0.5)
            start_rollout(registry_copy, "--steps", "20,50,100", "--interval", f"{interval}s", "--min-requests", "40")
            started = time.time()
            status = wait_for_end(registry_copy, 6 * interval)
            time.sleep(1.5)
    figure(f"{kind} canary, embedded controller, interval {interval} s", load.answers, canary, status, started)
    assert status["state"] == "rolled_back", status
    decided = status["history"][-1]["at"]
    assert decided - started <= 2 * interval + 1.5, (decided - started, status["history"])
    assert ("error" in status["reason"]) if kind == "failing" else ("p99" in status["reason"]), status["reason"]
    check_answers(load.answers, canary, status)
    cfg = Registry(registry_copy).model_config("mlp-digits")
    assert cfg.routing.aliases == {"stable": 1, "canary": canary}       # the canary is kept for inspection
    assert cfg.routing.split == {"stable": 100}


def test_a_good_canary_is_promoted(registry_copy, start_server, tmp_path):
    canary = add_canary(registry_copy, tmp_path, "good")
    with start_server(registry_copy) as server:
        warm(server.url, [1, canary])
        with Load([server.url]) as load:
            time.sleep(0.5)
            # alpha 0.01: identical twins on a shared 2-core machine; a window is still judged on evidence
            start_rollout(registry_copy, "--steps", "50,100", "--interval", "2s", "--min-requests", "40",
                          "--alpha", "0.01", "--max-p99-ratio", "2")
            started = time.time()
            status = wait_for_end(registry_copy, 30)
            time.sleep(1.5)
    figure("good canary, embedded controller, steps 50,100, interval 2 s", load.answers, canary, status, started)
    assert status["state"] == "promoted", status
    assert [e["event"] for e in status["history"]] == ["started", "stepped", "promoted"]
    assert not [a for a in load.answers if a[1] != 200]
    check_answers(load.answers, canary, status)
    cfg = Registry(registry_copy).model_config("mlp-digits")
    assert cfg.routing.aliases["stable"] == canary and cfg.routing.split == {"stable": 100}
    last = [a for a in load.answers if a[0] > status["history"][-1]["at"] + 0.7]
    assert last and all(a[2] == str(canary) for a in last)            # stable is the canary's version now


def test_two_replicas_converge_and_one_controller_drives_both(registry_copy, start_server, tmp_path):
    canary = add_canary(registry_copy, tmp_path, "failing")
    reg = Registry(registry_copy)
    reg.set_split("mlp-digits", {"stable": 50, "canary": 50}, sticky_key="x-user")
    no_embedded = {"ZOOSERVE_ROLLOUT_CONTROLLER": "false"}
    with start_server(registry_copy, env=no_embedded) as a, start_server(registry_copy, env=no_embedded) as b:
        # a sticky key reaches the same version through either replica, with no shared state
        for user in (f"user-{i}" for i in range(40)):
            va = httpx.post(f"{a.url}/v2/models/mlp-digits/infer", json=body(3), headers={"x-user": user})
            vb = httpx.post(f"{b.url}/v2/models/mlp-digits/infer", json=body(3), headers={"x-user": user})
            assert va.headers["x-model-alias"] == vb.headers["x-model-alias"]
        # a change reaches both within the watch interval
        reg.set_split("mlp-digits", {"stable": 100})
        time.sleep(1.2)
        for url in (a.url, b.url):
            config = httpx.get(f"{url}/v2/models/mlp-digits/config").json()
            assert json.loads(config["parameters"]["routing"]["string_value"])["split"] == {"stable": 100}
        warm(a.url, [1, canary])
        warm(b.url, [1, canary])
        interval = 3.0
        controller = subprocess.Popen([sys.executable, "-m", "serve.cli", "rollout", "run", "--registry",
                                       str(registry_copy), "mlp-digits", "--period", "0.5", "--servers", a.url, b.url],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ})
        try:
            with Load([a.url, b.url], callers=2) as load:
                time.sleep(0.5)
                start_rollout(registry_copy, "--steps", "20,50,100", "--interval", f"{interval}s",
                              "--min-requests", "40")
                started = time.time()
                status = wait_for_end(registry_copy, 6 * interval)
                time.sleep(1.5)
        finally:
            controller.terminate()
            out, _ = controller.communicate(timeout=30)
    figure(f"failing canary, `zooserve rollout run --servers` over 2 replicas, interval {interval} s", load.answers,
           canary, status, started)
    assert status["state"] == "rolled_back", (status, out[-2000:])
    assert status["history"][-1]["at"] - started <= 2 * interval + 1.5
    # two servers, a controller and four callers on two cores: a poll can come late
    check_answers(load.answers, canary, status, settle=1.5)
