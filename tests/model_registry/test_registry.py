"""Tests of model_registry: names, publish, resolve, verify, model.json updates, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_registry import (
    IntegrityError,
    InvalidName,
    Manifest,
    ModelConfig,
    NotFound,
    Registry,
    RegistryError,
    Signature,
    TensorSpec,
    dump_json,
    validate_alias,
    validate_name,
)

REPO = Path(__file__).resolve().parents[2]


def make_source(folder: Path, payload: bytes = b"\x00onnx-bytes\xff", kind: str = "classify") -> Path:
    """A publishable folder: manifest.json plus a couple of small binary files."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        family="mlp",
        kind=kind,
        format="onnx",
        artifacts={"onnx": "model.onnx"},
        signature=Signature(
            inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])],
            outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        ),
        labels=[str(i) for i in range(10)],
    )
    (folder / "manifest.json").write_text(dump_json(manifest))
    (folder / "model.onnx").write_bytes(payload)
    (folder / "weights").mkdir(exist_ok=True)
    (folder / "weights" / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return folder


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src")


# ---- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist", "mlp-digits", "a", "0", "gpt2.small_v1", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "..", "a..b", "../etc", "a/b", "/abs", "Upper", ".hidden", "-dash", "a b",
             "a\n", "x" * 129, "caf\u00e9"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName) as e:
        validate_name(name)
    assert repr(name) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_alias_names() -> None:
    assert validate_alias("stable") == "stable"
    assert validate_alias("v2") == "v2"
    for bad in ["12", "0", "../x", "Stable", ""]:
        with pytest.raises(InvalidName, match="alias"):
            validate_alias(bad)


def test_registry_refuses_bad_names(reg: Registry, src: Path) -> None:
    for bad in ["../escape", "/tmp/x", "a/b", ".."]:
        with pytest.raises(InvalidName):
            reg.publish(bad, src)
        with pytest.raises(InvalidName):
            reg.versions(bad)
    assert not (reg.root.parent / "escape").exists()


# ---- publish -------------------------------------------------------------------------------

def test_publish_creates_versions(reg: Registry, src: Path) -> None:
    assert reg.models() == []
    assert reg.publish("digits", src) == 1
    assert reg.publish("digits", src) == 2
    assert reg.versions("digits") == [1, 2]
    assert reg.models() == ["digits"]
    vdir = reg.version_dir("digits", 2)
    assert vdir == reg.root / "digits" / "2"
    assert sorted(p.relative_to(vdir).as_posix() for p in vdir.rglob("*") if p.is_file()) == [
        "manifest.json", "model.onnx", "weights/model.safetensors",
    ]
    cfg = reg.model_config("digits")
    assert (cfg.name, cfg.family, cfg.kind) == ("digits", "mlp", "classify")
    assert cfg.routing.aliases == {}
    # no staging folder left behind
    assert [p.name for p in (reg.root / "digits").iterdir() if p.name.startswith(".staging")] == []


def test_manifest_fields_and_hashes(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    m = reg.manifest("digits", 1)
    assert (m.name, m.version, m.family, m.kind, m.format) == ("digits", 1, "mlp", "classify", "onnx")
    assert m.files == {
        "model.onnx": sha((src / "model.onnx").read_bytes()),
        "weights/model.safetensors": sha((src / "weights" / "model.safetensors").read_bytes()),
    }
    text = (reg.version_dir("digits", 1) / "manifest.json").read_text()
    assert text == json.dumps(m.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    reg.verify("digits", 1)


def test_republish_version_folder_into_other_registry(tmp_path: Path, src: Path) -> None:
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    a.publish("digits", src)
    a.publish("digits", src)
    b.publish("other", src)
    version = b.publish("other", a.version_dir("digits", 2))
    assert version == 2
    m = b.manifest("other", 2)
    assert (m.name, m.version) == ("other", 2)
    assert m.files == a.manifest("digits", 2).files
    b.verify("other", 2)


def test_republish_refuses_corrupted_version(tmp_path: Path, src: Path) -> None:
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    a.publish("digits", src)
    (a.version_dir("digits", 1) / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="model.onnx"):
        b.publish("digits", a.version_dir("digits", 1))
    assert b.versions("digits") == []


def test_publish_refuses_missing_artifact(reg: Registry, src: Path) -> None:
    (src / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="model.onnx"):
        reg.publish("digits", src)
    assert reg.versions("digits") == []


def test_publish_refuses_symlinks(reg: Registry, src: Path) -> None:
    (src / "link.bin").symlink_to(src / "model.onnx")
    with pytest.raises(RegistryError, match="symlink"):
        reg.publish("digits", src)
    assert reg.versions("digits") == []
    assert list((reg.root / "digits").glob(".staging-*")) == []


def test_publish_refuses_bad_source(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not a folder"):
        reg.publish("digits", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="manifest.json"):
        reg.publish("digits", tmp_path / "empty")
    bad = make_source(tmp_path / "bad")
    (bad / "manifest.json").write_text('{"family": "mlp"}')
    with pytest.raises(RegistryError, match="not a valid Manifest"):
        reg.publish("digits", bad)


def test_kind_mismatch_refused(reg: Registry, src: Path, tmp_path: Path) -> None:
    reg.publish("digits", src)
    other = make_source(tmp_path / "seq", kind="sequence")
    with pytest.raises(RegistryError, match="kind"):
        reg.publish("digits", other)
    assert reg.versions("digits") == [1]
    assert list((reg.root / "digits").glob(".staging-*")) == []


def test_versions_ignore_staging_and_junk(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    model_dir = reg.root / "digits"
    for junk in [".staging-abc", "0", "01", "x1", ".5", "tmp"]:
        (model_dir / junk).mkdir()
    (model_dir / "7").write_text("a file, not a folder")
    assert reg.versions("digits") == [1]
    assert reg.publish("digits", src) == 2
    # a model folder without model.json, or with an invalid name, is not a model
    (reg.root / "half").mkdir()
    (reg.root / "Bad").mkdir()
    (reg.root / "Bad" / "model.json").write_text("{}")
    assert reg.models() == ["digits"]


# ---- model.json ----------------------------------------------------------------------------

def test_write_model_config_is_atomic(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    cfg = reg.model_config("digits")
    cfg.batching.max_batch_size = 8
    reg.write_model_config(cfg)
    assert reg.model_config("digits").batching.max_batch_size == 8
    names = sorted(p.name for p in (reg.root / "digits").iterdir())
    assert names == [".lock", "1", "model.json"]
    text = (reg.root / "digits" / "model.json").read_text()
    assert text == dump_json(cfg)


def test_write_model_config_creates_model(reg: Registry) -> None:
    reg.write_model_config(ModelConfig(name="fresh", family="mlp", kind="classify"))
    assert reg.models() == ["fresh"]
    assert reg.versions("fresh") == []
    with pytest.raises(NotFound, match="no published versions"):
        reg.resolve("fresh")


def test_aliases_and_split(reg: Registry, src: Path) -> None:
    for _ in range(3):
        reg.publish("digits", src)
    reg.set_alias("digits", "stable", 1)
    reg.set_alias("digits", "canary", 3)
    with pytest.raises(NotFound, match="no version 9"):
        reg.set_alias("digits", "canary", 9)
    with pytest.raises(InvalidName):
        reg.set_alias("digits", "42", 1)
    reg.set_split("digits", {"stable": 90, "canary": 10})
    routing = reg.model_config("digits").routing
    assert routing.aliases == {"stable": 1, "canary": 3}
    assert routing.split == {"stable": 90, "canary": 10}
    with pytest.raises(NotFound, match="shadow"):
        reg.set_split("digits", {"stable": 1, "shadow": 1})
    with pytest.raises(RegistryError, match=">= 0"):
        reg.set_split("digits", {"stable": -1, "canary": 2})
    with pytest.raises(RegistryError, match="more than 0"):
        reg.set_split("digits", {"stable": 0, "canary": 0})
    with pytest.raises(RegistryError, match="split"):
        reg.remove_alias("digits", "canary")
    reg.set_split("digits", {"stable": 100})
    reg.remove_alias("digits", "canary")
    assert reg.model_config("digits").routing.aliases == {"stable": 1}
    with pytest.raises(NotFound, match="canary"):
        reg.remove_alias("digits", "canary")


# ---- resolve -------------------------------------------------------------------------------

def test_resolve(reg: Registry, src: Path) -> None:
    for _ in range(3):
        reg.publish("digits", src)
    assert reg.resolve("digits") == 3           # newest when there is no stable alias
    assert reg.resolve("digits", 2) == 2
    assert reg.resolve("digits", "2") == 2
    reg.set_alias("digits", "stable", 1)
    reg.set_alias("digits", "canary", 2)
    assert reg.resolve("digits") == 1           # stable wins over newest
    assert reg.resolve("digits", None) == 1
    assert reg.resolve("digits", "canary") == 2


def test_not_found_messages(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    reg.set_alias("digits", "stable", 1)
    with pytest.raises(NotFound) as e:
        reg.resolve("digits", 5)
    assert "no version 5" in str(e.value) and "versions: 1" in str(e.value)
    with pytest.raises(NotFound) as e:
        reg.resolve("digits", "7")
    assert "no version 7" in str(e.value)
    with pytest.raises(NotFound) as e:
        reg.resolve("digits", "beta")
    assert "'beta'" in str(e.value) and "aliases: stable" in str(e.value)
    with pytest.raises(NotFound) as e:
        reg.resolve("letters")
    assert "'letters'" in str(e.value) and "models: digits" in str(e.value)
    with pytest.raises(NotFound, match="no model.json"):
        reg.model_config("letters")
    with pytest.raises(NotFound, match="no version 3"):
        reg.manifest("digits", 3)
    assert isinstance(e.value, LookupError)


def test_resolve_alias_to_missing_version(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    cfg = reg.model_config("digits")
    cfg.routing.aliases["stable"] = 4
    # the registry refuses to write a dangling alias, so make one as a hand edit (or a version
    # folder deleted by hand) would
    with pytest.raises(NotFound, match="no version 4"):
        reg.write_model_config(cfg)
    (reg.root / "digits" / "model.json").write_text(dump_json(cfg))
    with pytest.raises(NotFound, match="points at version 4"):
        reg.resolve("digits")


# ---- verify --------------------------------------------------------------------------------

def test_verify_detects_modified_missing_and_extra(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    vdir = reg.version_dir("digits", 1)
    reg.verify("digits", 1)
    (vdir / "model.onnx").write_bytes(b"modified")
    (vdir / "weights" / "model.safetensors").unlink()
    (vdir / "notes.txt").write_text("extra")
    with pytest.raises(IntegrityError) as e:
        reg.verify("digits", 1)
    problems = e.value.problems
    assert len(problems) == 3
    message = str(e.value)
    assert "hash mismatch 'model.onnx'" in message
    assert "missing file 'weights/model.safetensors'" in message
    assert "extra file 'notes.txt'" in message


@pytest.mark.parametrize("damage", ["modify", "delete", "extra"])
def test_verify_each_problem_alone(reg: Registry, src: Path, damage: str) -> None:
    reg.publish("digits", src)
    vdir = reg.version_dir("digits", 1)
    if damage == "modify":
        (vdir / "weights" / "model.safetensors").write_bytes(b"x")
    elif damage == "delete":
        (vdir / "model.onnx").unlink()
    else:
        (vdir / "weights" / "stray.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError) as e:
        reg.verify("digits", 1)
    assert len(e.value.problems) == 1


def test_verify_refuses_unsafe_manifest_path(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    path = reg.version_dir("digits", 1) / "manifest.json"
    data = json.loads(path.read_text())
    data["files"]["../../outside"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="unsafe path"):
        reg.verify("digits", 1)


# ---- concurrency ---------------------------------------------------------------------------

# Each publisher is a separate Python process; they wait for a "go" file so they race for real.
PUBLISHER = """
import os, sys, time
from model_registry import Registry
root, src, go = sys.argv[1:4]
while not os.path.exists(go):
    time.sleep(0.001)
print(Registry(root).publish("digits", src))
"""


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    go = tmp_path / "go"
    sources = [make_source(tmp_path / f"src{i}", payload=f"payload-{i}".encode() * 1000) for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(root), str(s), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for s in sources]
    time.sleep(1.0)   # let every interpreter start and wait on the go file
    go.touch()
    versions = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        versions.append(int(out.strip()))
    reg = Registry(root)
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    assert reg.versions("digits") == [1, 2, 3, 4, 5, 6]
    expected = {sha((s / "model.onnx").read_bytes()) for s in sources}
    seen = set()
    for v in range(1, 7):
        reg.verify("digits", v)
        m = reg.manifest("digits", v)
        assert m.version == v
        seen.add(m.files["model.onnx"])
    assert seen == expected
    assert list((root / "digits").glob(".staging-*")) == []


def test_does_not_import_heavy_packages() -> None:
    code = (
        "import sys, model_registry, model_registry.cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'training', 'serve')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_fsync_does_not_leave_temp_files_after_failure(reg: Registry, src: Path, monkeypatch) -> None:
    reg.publish("digits", src)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        reg.set_alias("digits", "stable", 1)
    assert sorted(p.name for p in (reg.root / "digits").iterdir()) == [".lock", "1", "model.json"]
    assert reg.model_config("digits").routing.aliases == {}


def test_alias_ops_on_unknown_model_create_nothing(reg: Registry, src: Path) -> None:
    reg.publish("digits", src)
    with pytest.raises(NotFound, match="models: digits"):
        reg.set_alias("ghost", "stable", 1)
    with pytest.raises(NotFound):
        reg.remove_alias("ghost", "stable")
    with pytest.raises(NotFound):
        reg.set_split("ghost", {"stable": 1})
    assert not (reg.root / "ghost").exists()
