"""Readiness, reloads and restarts over a registry with a corrupt version, on a real server: strict
readiness names the model that cannot answer (lenient on request), a load that refuses a version
answers 409 while what served keeps serving, a restart onto a corrupt newest version falls back
to the newest good one, and no answer shows the server's disk layout.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from model_registry import Registry
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

TOKEN = "a-long-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = load_digits().images[0].astype(np.float32)
BODY = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": IMAGE.flatten().tolist()}]}


def tamper(path) -> None:
    with open(path, "ab") as f:
        f.write(b"tampered")


@contextmanager
def loaded_server(registry, env: dict[str, str] | None = None):
    """A real server once its start-up load has finished, ready or not (strict readiness may keep
    it unready for good, so the fixture's wait for 200 does not fit)."""
    server = ServerProcess(registry, ["--admin-token", TOKEN], env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, server.logs()
            try:
                r = httpx.get(f"{server.url}/v2/health/ready", timeout=1)
                if r.status_code == 200 or "still loading" not in r.json()["error"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError(server.logs())
        yield server
    finally:
        server.stop()


def index(url: str) -> dict[tuple[str, str | None], dict]:
    return {(row["name"], row.get("version")): row for row in httpx.post(f"{url}/v2/repository/index").json()}


def test_strict_readiness_names_the_model_without_a_ready_version_and_lenient_keeps_the_old_rule(
        registry_copy, demo_registry):
    tamper(registry_copy / "resnet-digits" / "1" / "model.onnx")
    disk = str(registry_copy.parent)               # no answer may show where the registry lies
    with loaded_server(registry_copy) as server:
        r = httpx.get(f"{server.url}/v2/health/ready")
        assert r.status_code == 503
        error = r.json()["error"]
        assert "'resnet-digits' has no ready version" in error and "UNAVAILABLE: IntegrityError" in error
        assert "resnet-digits/1" in error and "ZOOSERVE_READINESS=lenient" in error and disk not in error
        assert "mlp-digits" not in error
        assert httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=BODY).status_code == 200
        r = httpx.post(f"{server.url}/v2/models/resnet-digits/infer", json=BODY)
        assert r.status_code == 503 and "resnet-digits/1" in r.json()["error"] and disk not in r.text
        row = index(server.url)[("resnet-digits", "1")]
        assert row["state"] == "UNAVAILABLE" and "model.onnx" in row["reason"] and disk not in row["reason"]

        # loading it again while it is still corrupt: 409, naming the version and why
        r = httpx.post(f"{server.url}/v2/repository/models/resnet-digits/load", headers=ADMIN)
        assert r.status_code == 409, r.text
        assert "version 1 was refused: IntegrityError" in r.json()["error"] and "no version serves" in r.json()["error"]
        assert disk not in r.text

        shutil.copy(demo_registry / "resnet-digits" / "1" / "model.onnx", registry_copy / "resnet-digits" / "1")
        r = httpx.post(f"{server.url}/v2/repository/models/resnet-digits/load", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {}
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}

    tamper(registry_copy / "resnet-digits" / "1" / "model.onnx")
    with loaded_server(registry_copy, {"ZOOSERVE_READINESS": "lenient"}) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
        assert httpx.post(f"{server.url}/v2/models/resnet-digits/infer", json=BODY).status_code == 503


def test_unloading_a_model_that_cannot_load_makes_a_strict_server_ready(registry_copy):
    tamper(registry_copy / "resnet-digits" / "1" / "model.onnx")
    with loaded_server(registry_copy) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
        assert httpx.post(f"{server.url}/v2/repository/models/resnet-digits/unload", headers=ADMIN).status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}


def test_a_restart_onto_a_corrupt_newest_version_falls_back_and_a_failed_reload_answers_409(
        registry_copy, demo_registry):
    reg = Registry(registry_copy)
    assert reg.publish("mlp-digits", registry_copy / "mlp-digits" / "1") == 2
    assert reg.publish("mlp-digits", registry_copy / "mlp-digits" / "1") == 3
    reg.remove_alias("mlp-digits", "stable")           # no aliased version: latest-1 chooses 3 alone
    tamper(registry_copy / "mlp-digits" / "3" / "model.onnx")
    disk = str(registry_copy.parent)
    with loaded_server(registry_copy) as server:
        url = server.url
        assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
        r = httpx.post(f"{url}/v2/models/mlp-digits/infer", json=BODY)
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"     # the newest that passes
        rows = index(url)
        refused = rows[("mlp-digits", "3")]
        assert refused["state"] == "UNAVAILABLE" and "mlp-digits/3" in refused["reason"]
        assert rows[("mlp-digits", "2")]["state"] == "READY"
        assert "serves in place of version(s) 3" in rows[("mlp-digits", "2")]["reason"]
        assert ("mlp-digits", "1") not in rows
        assert disk not in str(rows)
        note = httpx.get(f"{url}/v2/models/mlp-digits/config").json()["parameters"]["routing_error"]["string_value"]
        assert "version policy not in force" in note and "version(s) 2 serve in their place" in note
        assert "falling back to version 2" in server.logs()

        # a reload that still refuses version 3: 409 naming it and why; version 2 keeps serving
        r = httpx.post(f"{url}/v2/repository/models/mlp-digits/load", headers=ADMIN)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert "version 3 was refused: IntegrityError" in error and "version(s) 2 serve" in error
        assert "load again" in error and disk not in error
        assert httpx.post(f"{url}/v2/models/mlp-digits/infer", json=BODY).headers["x-model-version"] == "2"

        shutil.copy(demo_registry / "mlp-digits" / "1" / "model.onnx", registry_copy / "mlp-digits" / "3")
        r = httpx.post(f"{url}/v2/repository/models/mlp-digits/load", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {}
        assert httpx.post(f"{url}/v2/models/mlp-digits/infer", json=BODY).headers["x-model-version"] == "3"
        assert index(url)[("mlp-digits", "3")] == {"name": "mlp-digits", "version": "3", "state": "READY"}
        assert "routing_error" not in httpx.get(f"{url}/v2/models/mlp-digits/config").json()["parameters"]
