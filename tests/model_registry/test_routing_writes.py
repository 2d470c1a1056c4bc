"""Tests of safe routing writes: revisions and conflicts, checks against the registry, the routing
and rollout verbs, concurrent writers, the rollout lease, and the CLI verbs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from model_registry import (
    Conflict,
    Manifest,
    ModelConfig,
    NotFound,
    Registry,
    RegistryError,
    Rollout,
    Signature,
    TensorSpec,
    dump_json,
    rollout_ops,
)

REPO = Path(__file__).resolve().parents[2]
DIGITS = Signature(
    inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])],
    outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
)
WIDER = Signature(
    inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 16, 16])],
    outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
)


def make_source(folder: Path, signature: Signature = DIGITS) -> Path:
    """A tiny publishable version folder (no training): manifest.json and a fake artifact."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(family="mlp", kind="classify", format="onnx", artifacts={"onnx": "model.onnx"},
                        signature=signature)
    (folder / "manifest.json").write_text(dump_json(manifest))
    (folder / "model.onnx").write_bytes(b"\x00fake-onnx\xff")
    return folder


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """Model `digits` with versions 1-3 (one signature) and 4 (another); stable -> 1, canary -> 2."""
    registry = Registry(tmp_path / "registry")
    same = make_source(tmp_path / "src")
    for _ in range(3):
        registry.publish("digits", same)
    registry.publish("digits", make_source(tmp_path / "wider", WIDER))
    registry.set_alias("digits", "stable", 1)
    registry.set_alias("digits", "canary", 2)
    return registry


def model_json(reg: Registry) -> bytes:
    return (reg.root / "digits" / "model.json").read_bytes()


def refused(reg: Registry, error: type[Exception], match: str, write, *args, **kwargs) -> Exception:
    """Run a write that must be refused with `error` matching `match`, and leave model.json as it was."""
    before = model_json(reg)
    with pytest.raises(error, match=match) as e:
        write(*args, **kwargs)
    assert model_json(reg) == before
    return e.value


# ---- revisions and conflicts -------------------------------------------------------------------

def test_every_write_raises_the_revision_by_one(reg: Registry) -> None:
    # publish wrote revision 1, the two set_alias calls 2 and 3
    assert reg.model_config("digits").revision == 3
    assert reg.set_split("digits", {"stable": 90, "canary": 10}).revision == 4
    cfg = reg.model_config("digits")
    cfg.batching.max_batch_size = 4
    written = reg.write_model_config(cfg)
    assert written.revision == cfg.revision == 5     # the caller's object carries the written revision
    assert reg.model_config("digits") == written
    assert reg.write_model_config(cfg, expected_revision=cfg.revision).revision == 6


def test_new_model_starts_at_revision_one(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    assert reg.write_model_config(ModelConfig(name="fresh", family="mlp", kind="classify")).revision == 1
    reg.publish("digits", make_source(tmp_path / "src"))
    assert reg.model_config("digits").revision == 1


def test_stale_revision_is_refused_and_nothing_is_overwritten(reg: Registry) -> None:
    stale = reg.model_config("digits")               # revision 3
    reg.set_split("digits", {"stable": 90, "canary": 10})
    stale.routing.split = {"stable": 100}
    e = refused(reg, Conflict, "revision 4", reg.write_model_config, stale, expected_revision=stale.revision)
    assert "revision 3" in str(e) and "re-read" in str(e)
    assert (e.current, e.expected) == (4, 3)
    assert isinstance(e, RegistryError)
    refused(reg, Conflict, "revision 4.*revision 3", reg.update_model_config, "digits",
            lambda cfg: None, expected_revision=3)
    refused(reg, Conflict, "revision 4.*revision 2", reg.set_shadow, "digits", "canary", 5, expected_revision=2)
    refused(reg, Conflict, "revision 4", reg.promote, "digits", "ok", 1.0, expected_revision=3)
    assert reg.model_config("digits").routing.split == {"stable": 90, "canary": 10}
    assert reg.set_sticky_key("digits", "x-user", expected_revision=4).revision == 5


def test_update_model_config_applies_a_change_under_one_lock(reg: Registry) -> None:
    def double_batch(cfg: ModelConfig) -> None:
        cfg.batching.max_batch_size *= 2

    written = reg.update_model_config("digits", double_batch)
    assert written.batching.max_batch_size == 64 and written.revision == 4
    assert reg.model_config("digits") == written

    def fail(cfg: ModelConfig) -> None:
        cfg.batching.max_batch_size = 1
        raise RegistryError("changed my mind")

    refused(reg, RegistryError, "changed my mind", reg.update_model_config, "digits", fail)
    refused(reg, RegistryError, "may not rename", reg.update_model_config, "digits",
            lambda cfg: setattr(cfg, "name", "other"))
    refused(reg, NotFound, "models: digits", reg.update_model_config, "ghost", double_batch)


# ---- checks against the registry ----------------------------------------------------------------

def test_alias_to_a_missing_version_is_refused(reg: Registry) -> None:
    refused(reg, NotFound, "no version 9; versions: 1, 2, 3, 4", reg.set_alias, "digits", "beta", 9)
    cfg = reg.model_config("digits")
    cfg.routing.aliases["beta"] = 7
    refused(reg, NotFound, "'beta' of 'digits' would point at version 7", reg.write_model_config, cfg)


def test_split_weights_refused_with_clear_messages(reg: Registry) -> None:
    refused(reg, RegistryError, "split weight of 'stable' must be an integer >= 0, got -1",
            reg.set_split, "digits", {"stable": -1, "canary": 2})
    refused(reg, RegistryError, "must sum to more than 0.*positive weight",
            reg.set_split, "digits", {"stable": 0, "canary": 0})
    refused(reg, RegistryError, "must be an integer >= 0, got 2.5", reg.set_split, "digits", {"stable": 2.5})
    # a change that edits the split in place is checked just the same
    refused(reg, RegistryError, "split weight of 'canary' must be an integer >= 0, got -5",
            reg.update_model_config, "digits", lambda cfg: cfg.routing.split.update(stable=10, canary=-5))
    refused(reg, RegistryError, "more than 0", reg.update_model_config, "digits",
            lambda cfg: cfg.routing.split.update(stable=0))


def test_split_and_shadow_must_name_known_aliases(reg: Registry) -> None:
    refused(reg, NotFound, "no alias 'beta'; aliases: canary, stable",
            reg.set_split, "digits", {"stable": 1, "beta": 1})
    refused(reg, NotFound, "no shadow alias 'beta'; aliases: canary, stable",
            reg.set_shadow, "digits", "beta", 10)
    refused(reg, NotFound, "no alias 'beta'", reg.update_model_config, "digits",
            lambda cfg: cfg.routing.split.update(beta=1))
    reg.set_shadow("digits", "canary", 10)
    refused(reg, RegistryError, "is the shadow", reg.remove_alias, "digits", "canary")
    refused(reg, NotFound, "no shadow alias 'canary'", reg.update_model_config, "digits",
            lambda cfg: cfg.routing.aliases.pop("canary"))


def test_shadow_signature_must_match_the_primary(reg: Registry) -> None:
    reg.set_alias("digits", "wide", 4)
    # no split: the primary is the stable alias's version
    e = refused(reg, RegistryError, "signature|same tensors", reg.set_shadow, "digits", "wide", 5)
    assert "version 4" in str(e) and "primary version 1" in str(e) and "[-1, 1, 16, 16]" in str(e)
    # with a split, every version it routes to is a primary
    reg.set_split("digits", {"stable": 50, "wide": 50})
    refused(reg, RegistryError, "same tensors", reg.set_shadow, "digits", "canary", 5)
    reg.set_split("digits", {"stable": 100, "wide": 0})     # weight 0 routes nothing to version 4
    assert reg.set_shadow("digits", "canary", 5).routing.shadow.alias == "canary"
    # moving the split onto a version the shadow does not match is refused the same way
    refused(reg, RegistryError, "primary version 4", reg.set_split, "digits", {"stable": 50, "wide": 50})


def test_shadow_percent_and_sticky_key_refused_with_clear_messages(reg: Registry) -> None:
    for bad in (0, -1, 101, None, "10"):
        refused(reg, RegistryError, "shadow percent must be a number in \\(0, 100\\]",
                reg.set_shadow, "digits", "canary", bad)
    refused(reg, RegistryError, "sticky_key must be a header name", reg.set_sticky_key, "digits", "x user")


def test_running_rollout_aliases_are_protected(reg: Registry) -> None:
    reg.set_alias("digits", "canary", 1)
    refused(reg, RegistryError, "both point at version 1", reg.start_rollout, "digits",
            Rollout(canary="canary"), 10.0)
    reg.set_alias("digits", "canary", 2)
    reg.start_rollout("digits", Rollout(canary="canary"), 10.0)
    refused(reg, RegistryError, "would both point at version 1", reg.set_alias, "digits", "canary", 1)
    refused(reg, RegistryError, "compares stable version 1 with canary version 2",
            reg.set_alias, "digits", "canary", 3)
    refused(reg, RegistryError, "split", reg.remove_alias, "digits", "canary")


# ---- plain routing verbs ------------------------------------------------------------------------

def test_set_split_keeps_sets_and_clears_the_sticky_key(reg: Registry) -> None:
    cfg = reg.set_split("digits", {"stable": 90, "canary": 10}, sticky_key="X-User")
    assert (cfg.routing.split, cfg.routing.sticky_key) == ({"stable": 90, "canary": 10}, "x-user")
    assert reg.set_split("digits", {"stable": 80, "canary": 20}).routing.sticky_key == "x-user"
    assert reg.set_split("digits", {"stable": 80, "canary": 20}, sticky_key=None).routing.sticky_key is None
    assert reg.set_sticky_key("digits", "session").routing.sticky_key == "session"
    assert reg.set_sticky_key("digits", None).routing.sticky_key is None


def test_shadow_on_and_off(reg: Registry) -> None:
    cfg = reg.set_shadow("digits", "canary", 12.5)
    assert cfg.routing.shadow.model_dump() == {"alias": "canary", "percent": 12.5}
    assert reg.set_shadow("digits", None, None).routing.shadow is None


def test_aliases_take_expected_revision(reg: Registry) -> None:
    assert reg.set_alias("digits", "beta", 3, expected_revision=3).routing.aliases["beta"] == 3
    refused(reg, Conflict, "revision 4", reg.remove_alias, "digits", "beta", expected_revision=3)
    assert "beta" not in reg.remove_alias("digits", "beta", expected_revision=4).routing.aliases


# ---- rollouts ----------------------------------------------------------------------------------

def events(cfg: ModelConfig) -> list[tuple[str, int, int, str]]:
    return [(e.event, e.step, e.weight, e.reason) for e in cfg.rollout.status.history]


def test_rollout_start_step_hold_promote(reg: Registry) -> None:
    reg.set_sticky_key("digits", "x-user")
    reg.set_shadow("digits", "canary", 50)
    cfg = reg.start_rollout("digits", Rollout(canary="canary", steps=[10, 50, 100]), 100.0)
    status = cfg.rollout.status
    assert (status.state, status.step, status.weight) == ("running", 0, 10)
    assert (status.started_at, status.updated_at, status.window_started_at) == (100.0, 100.0, 100.0)
    assert (status.stable_version, status.canary_version) == (1, 2)
    assert cfg.routing.split == {"stable": 90, "canary": 10} and cfg.routing.sticky_key == "x-user"
    assert events(cfg) == [("started", 0, 10, "")]
    refused(reg, RegistryError, "already has a running rollout of 'canary' \\(step 0, weight 10\\)",
            reg.start_rollout, "digits", Rollout(canary="canary"), 101.0)

    cfg = reg.rollout_step("digits", 1, "window ok", 130.0)
    assert cfg.routing.split == {"stable": 50, "canary": 50}
    status = cfg.rollout.status
    assert (status.step, status.weight, status.window_started_at) == (1, 50, 130.0)
    refused(reg, RegistryError, "index into steps \\[10, 50, 100\\] \\(0..2\\), got 3",
            reg.rollout_step, "digits", 3, "too far", 131.0)

    cfg = reg.rollout_hold("digits", "too few requests", 160.0)
    assert cfg.routing.split == {"stable": 50, "canary": 50}
    status = cfg.rollout.status
    assert (status.window_started_at, status.updated_at, status.reason) == (160.0, 160.0, "too few requests")

    cfg = reg.promote("digits", "all windows passed", 190.0)
    assert cfg.routing.aliases == {"stable": 2, "canary": 2}
    assert cfg.routing.split == {"stable": 100} and cfg.routing.shadow is None
    assert cfg.routing.sticky_key == "x-user"
    status = cfg.rollout.status
    assert (status.state, status.reason, status.updated_at) == ("promoted", "all windows passed", 190.0)
    assert events(cfg) == [("started", 0, 10, ""), ("stepped", 1, 50, "window ok"),
                           ("held", 1, 50, "too few requests"), ("promoted", 1, 100, "all windows passed")]
    assert [e.at for e in status.history] == [100.0, 130.0, 160.0, 190.0]
    # once it has ended, the controller's verbs are refused
    for verb, args in ((reg.rollout_step, (2, "late", 200.0)), (reg.rollout_hold, ("late", 200.0)),
                       (reg.abort_rollout, ("late", 200.0))):
        refused(reg, RegistryError, "no running rollout \\(last rollout: promoted\\)", verb, "digits", *args)


def test_rollout_rollback_keeps_the_canary(reg: Registry) -> None:
    reg.set_shadow("digits", "canary", 50)
    reg.start_rollout("digits", Rollout(canary="canary"), 1.0)
    reg.rollout_step("digits", 1, "ok", 2.0)
    cfg = reg.rollback("digits", "error rate up", 3.0)
    assert cfg.routing.split == {"stable": 100}
    assert cfg.routing.aliases == {"stable": 1, "canary": 2}
    assert cfg.routing.shadow is not None            # only a promote clears the canary's shadow
    assert cfg.rollout.status.state == "rolled_back"
    assert events(cfg)[-1] == ("rolled_back", 1, 0, "error rate up")
    # a new rollout may start once the last one has ended
    assert reg.start_rollout("digits", Rollout(canary="canary"), 4.0).rollout.status.history[0].at == 4.0


def test_rollout_abort(reg: Registry) -> None:
    refused(reg, RegistryError, "no running rollout \\(last rollout: never started\\)",
            reg.abort_rollout, "digits", "stop", 1.0)
    reg.start_rollout("digits", Rollout(canary="canary", steps=[20, 100]), 1.0)
    cfg = reg.abort_rollout("digits", "operator stop", 2.0)
    assert cfg.routing.split == {"stable": 100} and cfg.rollout.status.state == "aborted"
    assert events(cfg) == [("started", 0, 20, ""), ("aborted", 0, 0, "operator stop")]


def test_rollout_with_other_aliases(reg: Registry) -> None:
    reg.set_alias("digits", "prod", 1)
    reg.set_alias("digits", "next", 3)
    cfg = reg.start_rollout("digits", Rollout(canary="next", stable="prod", steps=[100]), 1.0)
    assert cfg.routing.split == {"prod": 0, "next": 100}
    refused(reg, RegistryError, "running rollout of canary 'next', not 'canary'",
            reg.promote, "digits", "go", 2.0, canary="canary")
    cfg = reg.promote("digits", "go", 2.0)
    assert cfg.routing.aliases["prod"] == 3 and cfg.routing.aliases["stable"] == 1
    assert cfg.routing.split == {"prod": 100}


def test_manual_promote_and_rollback_without_a_rollout(reg: Registry) -> None:
    reg.set_split("digits", {"stable": 90, "canary": 10})
    cfg = reg.rollback("digits", "looks bad", 1.0)
    assert cfg.routing.split == {"stable": 100} and cfg.rollout is None
    reg.set_alias("digits", "beta", 3)
    cfg = reg.promote("digits", "looks good", 2.0, canary="beta")
    assert cfg.routing.aliases["stable"] == 3 and cfg.routing.split == {"stable": 100} and cfg.rollout is None
    refused(reg, NotFound, "no canary alias 'gamma'", reg.promote, "digits", "?", 3.0, canary="gamma")


def test_rollout_ops_are_pure(reg: Registry) -> None:
    cfg = reg.model_config("digits")
    before = cfg.model_copy(deep=True)
    started = rollout_ops.start_rollout(cfg, Rollout(canary="canary"), 5.0)
    promoted = rollout_ops.promote(started, "ok", 6.0)
    assert cfg == before and started.rollout.status.state == "running"
    assert promoted.rollout.status.state == "promoted" and started.routing.split == {"stable": 95, "canary": 5}


# ---- concurrent writers -------------------------------------------------------------------------

def bump_batch(cfg: ModelConfig) -> None:
    cfg.batching.max_batch_size += 1


def test_threads_never_tear_model_json(reg: Registry) -> None:
    writers, writes_each = 8, 25
    start = reg.model_config("digits")
    torn: list[str] = []
    done = threading.Event()

    def read_constantly() -> None:
        while not done.is_set():
            try:
                ModelConfig.model_validate_json(model_json(reg))
            except Exception as e:          # noqa: BLE001 - any failure to parse is a torn file
                torn.append(repr(e))

    def write() -> None:
        mine = Registry(reg.root)           # each writer its own Registry, as separate servers would
        for _ in range(writes_each):
            mine.update_model_config("digits", bump_batch)

    reader = threading.Thread(target=read_constantly)
    reader.start()
    threads = [threading.Thread(target=write) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    cfg = reg.model_config("digits")
    assert torn == []
    assert cfg.revision == start.revision + writers * writes_each
    assert cfg.batching.max_batch_size == start.batching.max_batch_size + writers * writes_each


# Each writer is its own process; they wait for a "go" file so they race for real. Half of them
# write with expected_revision and retry on Conflict, as a rollout controller would.
WRITER = """
import os, sys, time
from model_registry import Conflict, Registry
root, go, writes, careful = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
reg = Registry(root)
while not os.path.exists(go):
    time.sleep(0.001)
conflicts = 0
for _ in range(writes):
    while True:
        cfg = reg.model_config("digits")
        cfg.batching.max_batch_size += 1
        try:
            reg.write_model_config(cfg, expected_revision=cfg.revision if careful else None)
            break
        except Conflict:
            conflicts += 1
print(conflicts)
"""


def test_processes_never_tear_model_json(reg: Registry, tmp_path: Path) -> None:
    go = tmp_path / "go"
    writers, writes_each = 4, 30
    start = reg.model_config("digits")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(reg.root), str(go), str(writes_each), "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(writers)]
    time.sleep(1.0)                         # let every interpreter start and wait on the go file
    go.touch()
    seen = set()
    while any(p.poll() is None for p in procs):
        seen.add(ModelConfig.model_validate_json(model_json(reg)).revision)   # never torn
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cfg = reg.model_config("digits")
    # careful writers retried every conflict, so no write was lost
    assert cfg.revision == start.revision + writers * writes_each
    assert cfg.batching.max_batch_size == start.batching.max_batch_size + writers * writes_each
    assert max(seen) <= cfg.revision
    assert sorted(p.name for p in (reg.root / "digits").iterdir() if p.name.startswith(".")) == [".lock"]


# ---- the rollout lease --------------------------------------------------------------------------

def test_lease_one_owner_at_a_time(reg: Registry) -> None:
    assert reg.lease("digits") is None
    assert reg.acquire_lease("digits", "controller-a", ttl_s=30, now=1000.0)
    assert reg.lease("digits").model_dump() == {"owner": "controller-a", "expires_at": 1030.0}
    assert not reg.acquire_lease("digits", "controller-b", ttl_s=30, now=1010.0)
    assert reg.acquire_lease("digits", "controller-a", ttl_s=30, now=1020.0)    # renewal
    assert reg.lease("digits").expires_at == 1050.0
    assert not reg.acquire_lease("digits", "controller-b", ttl_s=30, now=1049.0)
    assert reg.acquire_lease("digits", "controller-b", ttl_s=30, now=1050.0)    # expired: taken over
    assert not reg.release_lease("digits", "controller-a")                      # not the holder
    assert reg.lease("digits").owner == "controller-b"
    assert not reg.acquire_lease("digits", "controller-a", ttl_s=30, now=1051.0)
    assert reg.release_lease("digits", "controller-b")
    assert reg.lease("digits") is None and not reg.release_lease("digits", "controller-b")
    assert reg.acquire_lease("digits", "controller-a", ttl_s=5)                 # now defaults to the clock
    assert reg.lease("digits").expires_at > time.time()


def test_lease_refusals(reg: Registry) -> None:
    with pytest.raises(NotFound, match="models: digits"):
        reg.acquire_lease("ghost", "a", ttl_s=30)
    with pytest.raises(RegistryError, match="ttl_s must be > 0"):
        reg.acquire_lease("digits", "a", ttl_s=0)
    with pytest.raises(RegistryError, match="non-empty"):
        reg.acquire_lease("digits", "", ttl_s=30)
    (reg.root / "digits" / ".rollout-lease").write_text("garbage")
    with pytest.raises(RegistryError, match="delete it"):
        reg.acquire_lease("digits", "a", ttl_s=30)


def test_lease_and_temporary_files_leave_versions_alone(reg: Registry) -> None:
    reg.acquire_lease("digits", "controller-a", ttl_s=30, now=1.0)
    (reg.root / "digits" / ".model.json.tmp-leftover").write_text("{")      # a crash mid-write
    (reg.root / "digits" / ".rollout-lease.tmp-leftover").write_text("{")
    assert reg.versions("digits") == [1, 2, 3, 4]
    assert reg.models() == ["digits"]
    for version in reg.versions("digits"):
        reg.verify("digits", version)
    assert reg.set_split("digits", {"stable": 1}).revision == 4
    assert reg.publish("digits", reg.version_dir("digits", 1)) == 5


# ---- CLI end to end -----------------------------------------------------------------------------

def zooserve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serve.cli", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_split_shadow_promote_rollback(reg: Registry) -> None:
    root = str(reg.root)
    r = zooserve("registry", "split", "--registry", root, "digits", "stable=90", "canary=10",
                 "--sticky-key", "X-User")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "digits: split stable=90 canary=10, sticky key x-user (revision 4)\n"
    r = zooserve("registry", "split", "--registry", root, "digits", "stable=80", "canary=20")
    assert reg.model_config("digits").routing.sticky_key == "x-user"
    r = zooserve("registry", "split", "--registry", root, "digits", "stable=80", "canary=20", "--no-sticky-key")
    assert r.returncode == 0 and "no sticky key" in r.stdout
    assert reg.model_config("digits").routing.sticky_key is None
    r = zooserve("registry", "split", "--registry", root, "digits", "stable=1", "--sticky-key", "a",
                 "--no-sticky-key")
    assert r.returncode == 2 and "not allowed with" in r.stderr

    r = zooserve("registry", "shadow", "--registry", root, "digits", "canary", "2.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("digits: shadow canary (version 2) on 2.5% of requests")
    assert reg.model_config("digits").routing.shadow.percent == 2.5
    r = zooserve("registry", "shadow", "--registry", root, "digits", "off")
    assert (r.returncode, reg.model_config("digits").routing.shadow) == (0, None)

    r = zooserve("registry", "promote", "--registry", root, "digits")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("digits: stable -> version 2, split stable=100")
    cfg = reg.model_config("digits")
    assert cfg.routing.aliases == {"stable": 2, "canary": 2} and cfg.routing.split == {"stable": 100}

    reg.set_alias("digits", "canary", 3)
    reg.set_split("digits", {"stable": 50, "canary": 50})
    r = zooserve("registry", "rollback", "--registry", root, "digits", "--canary", "canary")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("digits: rolled back to stable (version 2), split stable=100")
    assert reg.model_config("digits").routing.aliases["canary"] == 3


def test_cli_refusals_exit_2(reg: Registry) -> None:
    root = str(reg.root)
    reg.set_alias("digits", "wide", 4)
    for argv, message in (
        (("shadow", "digits", "wide", "10"), "same tensors"),
        (("shadow", "digits", "canary"), "PERCENT is required"),
        (("shadow", "digits", "off", "10"), "give no PERCENT"),
        (("shadow", "digits", "canary", "200"), "bad shadow percent '200'"),
        (("shadow", "digits", "beta", "10"), "no shadow alias 'beta'"),
        (("split", "digits", "stable=0", "canary=0"), "more than 0"),
        (("promote", "digits", "--canary", "beta"), "no canary alias 'beta'"),
        (("split", "ghost", "stable=1"), "'ghost'"),
    ):
        r = zooserve("registry", argv[0], "--registry", root, *argv[1:])
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert reg.model_config("digits").revision == 4


def test_cli_show_prints_the_rollout_status(reg: Registry) -> None:
    reg.start_rollout("digits", Rollout(canary="canary", steps=[10, 100]), 50.0, reason="new model")
    reg.rollout_step("digits", 1, "window passed", 80.0)
    r = zooserve("registry", "show", "--registry", str(reg.root), "digits")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["revision"] == 5
    status = shown["rollout"]["status"]
    assert (status["state"], status["step"], status["weight"]) == ("running", 1, 100)
    assert [e["event"] for e in status["history"]] == ["started", "stepped"]
    assert shown["routing"]["split"] == {"stable": 0, "canary": 100}
    r = zooserve("registry", "rollback", "--registry", str(reg.root), "digits")
    assert r.returncode == 0 and ", rollout rolled_back" in r.stdout, r.stderr
