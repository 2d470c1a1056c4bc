"""Tests of the `registry` CLI subcommands, run in-process through a tiny parser."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_registry import Manifest, Registry, Signature, TensorSpec, dump_json
from model_registry.cli import add_parser, resolve_root

REPO = Path(__file__).resolve().parents[2]


def make_source(folder: Path) -> Path:
    folder.mkdir(parents=True)
    manifest = Manifest(
        family="mlp", kind="classify", format="onnx", artifacts={"onnx": "model.onnx"},
        signature=Signature(
            inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])],
            outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        ),
    )
    (folder / "manifest.json").write_text(dump_json(manifest))
    (folder / "model.onnx").write_bytes(b"\x01\x02onnx")
    (folder / "golden.safetensors").write_bytes(b"\x03golden")
    return folder


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="zooserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "registry")


@pytest.fixture
def src(tmp_path: Path) -> str:
    return str(make_source(tmp_path / "src"))


def test_resolve_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZOOSERVE_REGISTRY", raising=False)
    assert resolve_root(None) == Path("registry")
    monkeypatch.setenv("ZOOSERVE_REGISTRY", "/env/reg")
    assert resolve_root(None) == Path("/env/reg")
    assert resolve_root("/arg/reg") == Path("/arg/reg")


def test_publish_list_show(root: str, src: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("registry", "publish", "--registry", root, "digits", src) == 0
    assert capsys.readouterr().out == "1\n"
    assert cli("registry", "publish", "digits", src, "--registry", root) == 0
    assert capsys.readouterr().out == "2\n"
    assert cli("registry", "alias", "--registry", root, "digits", "stable", "1") == 0
    capsys.readouterr()

    assert cli("registry", "list", "--registry", root) == 0
    assert capsys.readouterr().out == "digits  versions: 1,2  aliases: stable=1\n"

    assert cli("registry", "show", "--registry", root, "digits") == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["name"] == "digits" and cfg["routing"]["aliases"] == {"stable": 1}

    assert cli("registry", "show", "--registry", root, "digits", "2") == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert cli("registry", "show", "--registry", root, "digits", "stable") == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1


def test_env_root(root: str, src: str, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ZOOSERVE_REGISTRY", root)
    assert cli("registry", "publish", "digits", src) == 0
    assert Registry(root).versions("digits") == [1]


def test_alias_and_split(root: str, src: str, capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(root)
    reg.publish("digits", src)
    reg.publish("digits", src)
    assert cli("registry", "alias", "--registry", root, "digits", "stable", "1") == 0
    assert cli("registry", "alias", "--registry", root, "digits", "canary", "2") == 0
    assert cli("registry", "split", "--registry", root, "digits", "stable=90", "canary=10") == 0
    assert reg.model_config("digits").routing.split == {"stable": 90, "canary": 10}
    # promote: point stable at canary's version
    assert cli("registry", "split", "--registry", root, "digits", "stable=1") == 0
    assert cli("registry", "alias", "--registry", root, "digits", "stable", "canary") == 0
    assert cli("registry", "alias", "--registry", root, "digits", "canary", "--remove") == 0
    assert reg.model_config("digits").routing.aliases == {"stable": 2}
    capsys.readouterr()

    assert cli("registry", "alias", "--registry", root, "digits", "beta") == 2
    assert "VERSION is required" in capsys.readouterr().err
    assert cli("registry", "alias", "--registry", root, "digits", "stable", "9") == 2
    assert "no version 9" in capsys.readouterr().err
    assert cli("registry", "split", "--registry", root, "digits", "stable") == 2
    assert "ALIAS=WEIGHT" in capsys.readouterr().err
    assert cli("registry", "split", "--registry", root, "digits", "ghost=1") == 2
    assert "ghost" in capsys.readouterr().err


def test_verify(root: str, src: str, capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(root)
    reg.publish("digits", src)
    reg.publish("digits", src)
    assert cli("registry", "verify", "--registry", root, "digits") == 0
    assert capsys.readouterr().out == "digits/1: OK\ndigits/2: OK\n"

    (reg.version_dir("digits", 2) / "model.onnx").write_bytes(b"corrupt")
    assert cli("registry", "verify", "--registry", root, "digits") == 1
    out = capsys.readouterr().out
    assert "digits/1: OK" in out and "digits/2: FAILED" in out and "hash mismatch 'model.onnx'" in out
    assert cli("registry", "verify", "--registry", root, "digits", "1") == 0
    assert cli("registry", "verify", "--registry", root, "digits", "2") == 1


def test_errors_exit_2_without_traceback(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("registry", "show", "--registry", root, "nope") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'nope'" in err and "Traceback" not in err
    assert cli("registry", "verify", "--registry", root, "nope") == 2
    assert cli("registry", "publish", "--registry", root, "../evil", root) == 2
    assert "invalid model name" in capsys.readouterr().err
    assert cli("registry", "list", "--registry", root) == 2                # a registry that does not exist
    assert "does not exist" in capsys.readouterr().err


def test_subprocess_round_trip(root: str, src: str) -> None:
    code = (
        "import argparse, sys\n"
        "from model_registry.cli import add_parser\n"
        "p = argparse.ArgumentParser(prog='zooserve')\n"
        "add_parser(p.add_subparsers(dest='command', required=True))\n"
        "a = p.parse_args(sys.argv[1:])\n"
        "sys.exit(a.func(a))\n"
    )

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)

    r = run("registry", "publish", "--registry", root, "digits", src)
    assert (r.returncode, r.stdout) == (0, "1\n")
    r = run("registry", "verify", "--registry", root, "digits")
    assert (r.returncode, r.stdout) == (0, "digits/1: OK\n")
    r = run("registry", "show", "--registry", root, "digits", "3")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = run("registry", "--help")
    assert r.returncode == 0 and "verify" in r.stdout
