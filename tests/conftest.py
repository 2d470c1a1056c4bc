"""Shared fixtures: a demo registry trained once per session, and real servers on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _one_tls_context_for_every_httpx_client() -> None:
    """Every httpx client (each `httpx.get`/`post` makes one, and so does every OpenAI client)
    loads certifi's CA bundle into a new TLS context: ~45-75 ms of CPU on these machines, for
    requests that all go to loopback HTTP. The suite makes thousands (893 in test_routing_server and
    test_readiness alone: 70 s), so the default context is made once and shared; a client that
    asks for another (`verify=False`, its own context, a certificate) still gets its own. Only the
    tests' process: the servers under test keep httpx as it is. Skipped if httpx moves the name."""
    import httpx._transports.default as transport

    make = getattr(transport, "create_ssl_context", None)
    if make is None:
        return
    shared: dict[bool, object] = {}

    def shared_default(verify=True, cert=None, trust_env=True):
        if verify is not True or cert is not None:
            return make(verify=verify, cert=cert, trust_env=trust_env)
        if trust_env not in shared:
            shared[trust_env] = make(verify=verify, cert=cert, trust_env=trust_env)
        return shared[trust_env]

    transport.create_ssl_context = shared_default


_one_tls_context_for_every_httpx_client()


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` once for the whole run, and its answer (a path).

    Under pytest-xdist (`make test` runs two workers) each worker is a process with its own session
    fixtures; the registries are read-only for tests, so the first worker to ask builds one into the
    folder every worker shares and the others wait on its lock and reuse it, instead of training the
    same models twice on the same two cores. A build that failed leaves no marker: the next asker
    starts it again from an empty folder and fails in its own test."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{shared}.lock"):
        done = shared / ".built"
        if not done.exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            answer = build(shared)
            done.write_text(str(answer))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory) -> Path:
    """`zooserve demo`'s mlp-digits and resnet-digits in a session folder (~20 s). Read-only for tests."""
    return built_once(tmp_path_factory, "demo", _build_demo_registry)


def _build_demo_registry(work: Path) -> Path:
    from tests.fixture_builds import publish_demo_model, run_two_at_a_time

    root = work / "registry"
    # the two at once (a process each; the registry locks per model), as `zooserve demo` would publish them
    run_two_at_a_time((publish_demo_model, (root, name)) for name in ("resnet-digits", "mlp-digits"))
    return root


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory, demo_registry) -> Path:
    """decoder-tiny, decoder-moe-tiny, mamba-tiny and lstm-charlm, briefly trained on the real corpus (a real
    tokenizer, real export and parity), plus mlp-digits; aliases `stable` -> 1. Read-only for tests."""
    return built_once(tmp_path_factory, "tokens", lambda work: _build_token_registry(work, demo_registry))


def _build_token_registry(work: Path, demo_registry: Path) -> Path:
    from model_registry import Registry

    from tests.fixture_builds import build_token_model, run_two_at_a_time

    registry = Registry(work / "registry")
    # decoder-tiny trains long enough (~25 s) to beat the unigram baseline clearly (its final score
    # over every held-out window: tests/serve/test_openai.py reads it); the others only run, scored on
    # 4 batches. mamba-tiny has 2 layers, not the preset's 4: its ONNX export (torch.export tracing a
    # cond per layer) is ~17 s a layer, and two layers exercise the same per-layer states and prefill
    # segments. The character LSTM tokenizes bytes without merges (vocab 260). Longest first.
    brief = {"final_eval_batches": 4}
    builds = (("mamba-tiny", "mamba", "tiny", 40, 2048, brief, {"n_layer": 2}),
              ("decoder-tiny", "decoder", "tiny", 150, 2048, {}, {}),
              ("decoder-moe-tiny", "decoder", "tiny-moe", 30, 2048, brief, {}),
              ("lstm-charlm", "rnn_lm", "tiny", 30, 260, brief, {}))
    packages = run_two_at_a_time((build_token_model, (work, *build)) for build in builds)
    for (name, *_), package in zip(builds, packages):
        registry.set_alias(name, "stable", registry.publish(name, package))
    registry.publish("mlp-digits", demo_registry / "mlp-digits" / "1")
    return registry.root


@pytest.fixture(scope="session")
def generative_registry(tmp_path_factory) -> Path:
    """gan-digits, vae-digits and diffusion-digits, each trained for a moment (serving is under test,
    not quality), exported in parts with parity and published; alias `stable` -> 1. ~25 s. Read-only."""
    return built_once(tmp_path_factory, "generative", _build_generative_registry)


def _build_generative_registry(work: Path) -> Path:
    import torch

    from model_registry import Registry
    from training import export, generative, loop
    from training.models.gan import GANTrainConfig

    torch.set_num_threads(1)
    registry = Registry(work / "registry")
    brief = {"gan": GANTrainConfig(steps=20, batch_size=32), "vae": loop.TrainConfig(epochs=1, batch_size=256),
             "diffusion": loop.TrainConfig(epochs=1, batch_size=256)}
    for family, train_cfg in brief.items():
        name = f"{family}-digits"
        generative.train_generative(family, "tiny", work / name / "checkpoint", progress=False, eval_cfg=None,
                                    train_cfg=train_cfg)
        export.package(work / name / "checkpoint", work / name / "package")
        registry.set_alias(name, "stable", registry.publish(name, work / name / "package"))
    cfg = registry.model_config("gan-digits")
    cfg.batching.max_batch_size = 8          # so that a larger request goes through the batcher in slices
    registry.write_model_config(cfg)
    return registry.root


@pytest.fixture
def registry_copy(demo_registry, tmp_path) -> Path:
    """A private copy of the demo registry that a test may change."""
    dst = tmp_path / "registry"
    shutil.copytree(demo_registry, dst)
    return dst


def wait_for(check, timeout: float = 5.0, what: str = "condition"):
    """Poll `check()` until it returns something truthy, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not seen within {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `zooserve serve` subprocess on a loopback port."""

    def __init__(self, registry: Path, extra_args: list[str] | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = registry.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "serve.cli", "serve", "--registry", str(registry), "--port", str(self.port),
               "--threads", "1", *(extra_args or [])]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@contextmanager
def running_server(registry: Path, extra_args: list[str] | None = None,
                   env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(registry, extra_args, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def demo_server(demo_registry) -> Iterator[ServerProcess]:
    """One server over the demo registry, shared by a test module (admin token set)."""
    with running_server(demo_registry, ["--admin-token", "test-admin-token"]) as server:
        yield server


@pytest.fixture(scope="session")
def start_server():
    """`with start_server(registry, extra_args) as server:` runs a real server for the block."""
    return running_server


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test (deterministic reductions; 2 shared cores), then as before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
