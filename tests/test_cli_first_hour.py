"""A user's first hour with the `zooserve` command: the real CLI run as a subprocess where exit
codes and output are the point. A registry that does not exist is refused (unless asked for on
purpose), an empty one warned about; a package of another family is not published into a model
by accident; a bad ZOOSERVE_* variable or flag value is one line naming it; `--version`, a
whole-registry verify, an access log, text logs and a ready line."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from model_registry import Manifest, Registry, Signature, TensorSpec, dump_json
from serve import logs

ROOT = Path(__file__).resolve().parents[1]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("ZOOSERVE_")}
LINEAR_BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def zooserve(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**CLEAN_ENV, **(env or {})}, timeout=timeout)


def package(folder: Path, family: str) -> Path:
    """A classify package of `family` (placeholder bytes: publishing never runs it)."""
    folder.mkdir(parents=True)
    manifest = Manifest(family=family, kind="classify", format="onnx", artifacts={"onnx": "model.onnx"},
                        signature=Signature(inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 64])],
                                            outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])]))
    (folder / "manifest.json").write_text(dump_json(manifest))
    (folder / "model.onnx").write_bytes(b"onnx " + family.encode())
    return folder


def linear_onnx(path: Path) -> Path:
    """x FP32 [batch, 4] -> MatMul (4, 3) -> y: a real model that `registry import` takes in seconds."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def import_linear(registry: Path, name: str, tmp_path: Path) -> None:
    done = zooserve("registry", "import", "--registry", str(registry), name, str(linear_onnx(tmp_path / "m.onnx")))
    assert done.returncode == 0, done.stderr


def log_entries(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.1)


# ---- 3: a registry that is not there ------------------------------------------------------------

def test_serve_refuses_a_registry_that_does_not_exist(tmp_path):
    missing = tmp_path / "typo"
    done = zooserve("serve", "--registry", str(missing), "--port", "0")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and str(missing) in done.stderr and "--allow-empty" in done.stderr
    assert not missing.exists()


def test_serve_refuses_a_file_as_registry(tmp_path):
    file = tmp_path / "registry"
    file.write_text("not a folder")
    done = zooserve("serve", "--registry", str(file), "--port", "0")
    assert done.returncode == 2 and done.stderr == f"zooserve serve: registry {file} is not a folder\n"


def test_allow_empty_creates_the_registry_and_serves_what_is_published_later(tmp_path, start_server):
    registry = tmp_path / "registry"          # missing (its log goes beside it)
    with start_server(registry, env={"ZOOSERVE_ALLOW_EMPTY": "true"}) as server:    # the variable, as --allow-empty
        assert registry.is_dir()
        assert "holds no models" not in server.logs()                                # empty on purpose: no warning
        import_linear(registry, "linear", tmp_path)
        wait_for(lambda: httpx.post(f"{server.url}/v2/models/linear/infer", json=LINEAR_BODY).status_code == 200)


def test_an_empty_registry_starts_with_one_warning(tmp_path, start_server):
    empty = tmp_path / "registry"
    empty.mkdir()
    with start_server(empty) as server:
        entries = log_entries(server.logs())
    warnings = [e["message"] for e in entries if e["level"] == "warning"]
    assert len(warnings) == 1 and "holds no models" in warnings[0] and str(empty) in warnings[0]
    assert any(e["message"].startswith("ready: 0 models, 0 versions, in ") for e in entries)


def test_registry_list_and_verify_refuse_a_missing_registry(tmp_path):
    for verb in ("list", "verify"):
        done = zooserve("registry", verb, "--registry", str(tmp_path / "typo"))
        assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


# ---- 4: a package of another family ----------------------------------------------------------------

def test_publish_refuses_another_family_unless_forced(tmp_path):
    root = tmp_path / "registry"
    Registry(root).publish("resnet-digits", package(tmp_path / "resnet", "resnet"))
    mlp = package(tmp_path / "mlp", "mlp")
    done = zooserve("registry", "publish", "--registry", str(root), "resnet-digits", str(mlp))
    assert done.returncode == 2 and "'mlp'" in done.stderr and "'resnet'" in done.stderr and "--force" in done.stderr
    assert Registry(root).versions("resnet-digits") == [1]
    forced = zooserve("registry", "publish", "--registry", str(root), "resnet-digits", str(mlp), "--force")
    assert (forced.returncode, forced.stdout) == (0, "2\n")


def test_import_refuses_a_model_of_another_family(tmp_path):
    root = tmp_path / "registry"
    Registry(root).publish("digits", package(tmp_path / "mlp", "mlp"))
    done = zooserve("registry", "import", "--registry", str(root), "digits", str(linear_onnx(tmp_path / "m.onnx")))
    assert done.returncode == 2 and "'imported'" in done.stderr and "'mlp'" in done.stderr
    assert Registry(root).versions("digits") == [1]


# ---- 6: a malformed setting -------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "env", "names"), [
    (["serve"], {"ZOOSERVE_PORT": "eighty"}, ["ZOOSERVE_PORT", "'eighty'", "integer", "65535"]),
    (["serve", "--port", "70000"], {}, ["--port 70000", "65535"]),
    (["serve"], {"ZOOSERVE_READINESS": "loose"}, ["ZOOSERVE_READINESS", "strict, lenient"]),
    (["serve"], {"ZOOSERVE_ALLOW_NON_FINITE": "maybe"}, ["ZOOSERVE_ALLOW_NON_FINITE", "true or false"]),
    (["batch", "-i", "in.jsonl", "-o", "out.jsonl"], {"ZOOSERVE_DEVICE": "gpu"},
     ["zooserve batch: ZOOSERVE_DEVICE='gpu'", "auto, cpu, cuda"]),
    (["batch", "-i", "in.jsonl", "-o", "out.jsonl", "--threads", "0"], {}, ["--threads 0", ">= 1"]),
])
def test_a_bad_setting_is_one_line_naming_it(tmp_path, argv, env, names):
    (tmp_path / "registry").mkdir()
    done = zooserve(*argv, "--registry", str(tmp_path / "registry"), env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(name in done.stderr for name in names), done.stderr


def test_a_bad_admin_token_is_not_echoed(tmp_path):
    done = zooserve("serve", "--registry", str(tmp_path), env={"ZOOSERVE_ADMIN_TOKEN": "s3cret"})
    assert done.returncode == 2 and "ZOOSERVE_ADMIN_TOKEN" in done.stderr and "8 characters" in done.stderr
    assert "s3cret" not in done.stderr


# ---- 8: version, whole-registry verify, access log, log format, ready line ----------------------------

def test_version_is_the_installed_packages():
    done = zooserve("--version")
    assert (done.returncode, done.stdout) == (0, f"zooserve {version('zooserve')}\n")


def test_verify_without_a_name_checks_every_model(tmp_path):
    root = tmp_path / "registry"
    reg = Registry(root)
    reg.publish("a", package(tmp_path / "a", "mlp"))
    reg.publish("b", package(tmp_path / "b", "resnet"))
    done = zooserve("registry", "verify", "--registry", str(root))
    assert (done.returncode, done.stdout) == (0, "a/1: OK\nb/1: OK\n")
    (reg.version_dir("b", 1) / "model.onnx").write_bytes(b"corrupt")
    done = zooserve("registry", "verify", "--registry", str(root))
    assert done.returncode == 1 and "a/1: OK" in done.stdout and "b/1: FAILED" in done.stdout


def access_lines(text: str) -> list[str]:
    return [e["message"] for e in log_entries(text) if e["logger"] == "zooserve.access"]


def test_the_access_log_is_off_by_default_and_one_line_per_request_when_on(tmp_path, start_server):
    registry = tmp_path / "registry"
    import_linear(registry, "linear", tmp_path)
    with start_server(registry) as server:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert access_lines(server.log_path.read_text()) == []                 # read once the server has stopped
    with start_server(registry, ["--access-log"]) as server:
        ok = httpx.post(f"{server.url}/v2/models/linear/infer", json=LINEAR_BODY)         # the fast path
        missing = httpx.get(f"{server.url}/v2/models/nope", headers={"x-request-id": "mine-1"})
        expected = [rf"POST /v2/models/linear/infer 200 [0-9.]+ ms {ok.headers['x-request-id']}",
                    r"GET /v2/models/nope 404 [0-9.]+ ms mine-1"]
        # a line is written once its answer has gone (after the readiness polls' lines)
        wait_for(lambda: all(any(re.fullmatch(pattern, line) for line in access_lines(server.logs()))
                             for pattern in expected))
    assert ok.status_code == 200 and missing.status_code == 404


def test_text_logs_by_flag_and_the_ready_line(tmp_path, start_server):
    registry = tmp_path / "registry"
    import_linear(registry, "linear", tmp_path)
    with start_server(registry, ["--log-format", "text"]) as server:
        wait_for(lambda: "ready:" in server.logs())
        text = server.logs()
    assert log_entries(text) == []
    assert re.search(r"Z info +zooserve: ready: 1 model, 1 version, in [0-9]+\.[0-9] s\n", text), text
    assert "holds no models" not in text


def test_auto_log_format_is_text_on_a_terminal_and_json_otherwise(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(logs.formatter("auto"), logs.TextFormatter)
    assert isinstance(logs.formatter("json"), logs.JsonFormatter)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(logs.formatter("auto"), logs.JsonFormatter)
    record = logging.LogRecord("zooserve", logging.WARNING, __file__, 1, "registry %s holds no models", ("r",), None)
    assert logs.TextFormatter().format(record).endswith(" warning zooserve: registry r holds no models")
