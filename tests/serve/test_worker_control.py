"""serve/worker_control.py: the control log that carries a load or unload to every worker. Two
WorkerControl objects over one folder stand for two workers (tests/serve/test_workers.py runs real
worker processes); the repository under them is a small stand-in that records what it was told."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from serve import worker_control
from serve.errors import ServeError
from serve.worker_control import WorkerControl, append, fingerprint, last_action_per_model, read_log


class Repository:
    """What WorkerControl calls of serve.repository.ModelRepository: tables, load_model, unload_model."""

    def __init__(self, models=("a", "b"), root=None):
        self.registry = types.SimpleNamespace(root=root or Path("/nonexistent-registry"))
        self.tables = {m: {} for m in models}
        self.calls: list[tuple[str, str]] = []
        self.refuse: dict[str, ServeError] = {}

    async def load_model(self, name):
        self.calls.append(("load", name))
        if name in self.refuse:
            raise self.refuse[name]
        self.tables[name] = {}
        return []

    async def unload_model(self, name):
        self.calls.append(("unload", name))
        if name not in self.tables:
            raise ServeError(404, f"model {name!r} is already unloaded")
        del self.tables[name]

    def refusal_message(self, name, refused):
        return f"{name}: refused {refused}"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_log_numbers_actions_in_order_and_leaves_a_line_being_written(tmp_path):
    assert read_log(tmp_path) == ([], 0)
    assert [append(tmp_path, "unload", "a"), append(tmp_path, "load", "a"), append(tmp_path, "unload", "b")] == [1, 2, 3]
    entries, offset = read_log(tmp_path)
    assert [(e["seq"], e["action"], e["model"]) for e in entries] == [(1, "unload", "a"), (2, "load", "a"),
                                                                     (3, "unload", "b")]
    assert {m: e["action"] for m, e in last_action_per_model(entries).items()} == {"a": "load", "b": "unload"}
    with open(tmp_path / worker_control.LOG_FILE, "ab") as f:
        f.write(b'{"seq": 4, "act')                     # another worker's append, half way
    assert read_log(tmp_path, offset) == ([], offset)
    with pytest.raises(ValueError):
        append(tmp_path, "delete", "a")


def test_an_action_is_answered_once_every_live_worker_applied_it_with_the_first_refusal(tmp_path):
    async def scenario():
        repo_a, repo_b = Repository(), Repository()
        a = WorkerControl(tmp_path, repo_a, pid=os.getpid())
        b = WorkerControl(tmp_path, repo_b, pid=os.getppid())     # a live process that is not this one
        await a.start()
        await b.start()
        try:
            await a.request("unload", "a")
            # answered only after b had applied it too
            assert repo_a.calls == repo_b.calls == [("unload", "a")] and b.applied == 1
            # b refuses the next one (its registry differs, say): the answer is b's refusal
            repo_b.refuse["a"] = ServeError(409, "version 1 was refused: bad hash")
            with pytest.raises(ServeError) as refused:
                await a.request("load", "a")
            assert refused.value.status == 409 and "bad hash" in refused.value.message
            assert "a" in repo_a.tables
            # the same refusal everywhere: the asked worker's own is the answer
            await b.request("unload", "b")
            assert "b" not in repo_a.tables and "b" not in repo_b.tables
            with pytest.raises(ServeError) as gone:
                await a.request("unload", "b")
            assert gone.value.status == 404 and "already unloaded" in gone.value.message
            # a worker whose action fails unexpectedly answers 500 naming it, and follows the log on
            repo_b.refuse["b"] = RuntimeError("disk on fire")
            with pytest.raises(ServeError) as crashed:
                await a.request("load", "b")
            assert crashed.value.status == 500 and f"worker {os.getppid()}" in crashed.value.message
            assert "disk on fire" in crashed.value.message
            # a dead worker's state is not waited for (its replacement replays the log)
            (tmp_path / f"{dead_pid()}{worker_control.STATE_SUFFIX}").write_text('{"applied": 0, "results": {}}')
            # and one the supervisor reaped is forgotten, even if its pid came back as another process's
            reaped = tmp_path / f"{os.getppid()}{worker_control.STATE_SUFFIX}"
            worker_control.forget(tmp_path, os.getppid())
            assert not reaped.exists()
            b._publish()
            del repo_b.refuse["b"]
            await a.request("load", "b")
            assert "b" in repo_a.tables and "b" in repo_b.tables
            assert a.applied == b.applied == 6
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_a_worker_started_later_matches_the_last_action_per_model_before_it_serves(tmp_path):
    registry = tmp_path / "registry"
    for model in ("a", "b", "c", "d"):
        (registry / model).mkdir(parents=True)
        (registry / model / "model.json").write_text("{}")
    log_folder = tmp_path / "workers"
    log_folder.mkdir()
    for action, model in (("unload", "a"), ("load", "a"), ("unload", "b"), ("load", "c"), ("unload", "d")):
        append(log_folder, action, model, fingerprint(registry, model))
    # d changed in the registry after its unload (a publish): every running worker's watch reloaded it
    os.utime(registry / "d" / "model.json", ns=(1, 1))

    async def scenario():
        repo = Repository(("a", "b", "d"), root=registry)    # its start-up load: a, b, d, not c
        late = WorkerControl(log_folder, repo, pid=os.getpid())
        await late.start()
        await late.stop()
        return repo, late

    repo, late = asyncio.run(scenario())
    # a was unloaded then loaded again: left alone; b unloaded; c loaded by hand beside the start-up
    # set; d's unload predates its registry change: left loaded
    assert sorted(repo.calls) == [("load", "c"), ("unload", "b")]
    assert sorted(repo.tables) == ["a", "c", "d"] and late.applied == 5
