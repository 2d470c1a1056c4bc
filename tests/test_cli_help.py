"""Every `--help` read as a newcomer would (issue 14): each command and subcommand of `zooserve`,
the bench scripts, loadtest/swap.py and loadtest/run.sh answer --help with exit 0; every command
says what it does; every option has a help that says its default where it has one, in the same
words as the code; every example in a help parses; a missing subcommand is named `COMMAND`.

All in process (argparse), except run.sh: about a second in all."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from model_registry.cli import REGISTRY_HELP
from model_registry.routing import Rollout
from serve.cli import FLAGS, build_parser, main
from serve.settings import ServeSettings
from training.cli import DEMO_MODELS, FAMILY_HELP
from training.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench/batch.py", "bench/classify.py", "bench/tokens.py", "bench/gpu.py", "bench/first_start.py",
           "bench/soak.py", "bench/overload.py", "bench/instances.py", "bench/train_device.py",
           "bench/classify_grpc.py", "loadtest/swap.py"]
UNSET = (None, False, argparse.SUPPRESS, ...)


def says_default(action: argparse.Action) -> bool:
    """An option whose default a newcomer must be told: set to something (0 too), not required."""
    return bool(action.option_strings) and not action.required and not any(action.default is u for u in UNSET)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for the parser and every subcommand under it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


COMMANDS = dict(commands(build_parser()))


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                                             argparse._SubParsersAction))]


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help as its parser prints it (a formatter may add the default), one line."""
    text = parser.formatter_class(prog=parser.prog)._get_help_string(action) or ""
    params = {**vars(action), "prog": parser.prog, "default": action.default}
    return " ".join((text % params).split())


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0, argv
    return capsys.readouterr().out


def test_every_command_answers_help_and_says_what_it_does(capsys):
    assert len(COMMANDS) == 1 + 7 + 10 + 4   # zooserve, its 7 commands, 10 registry and 4 rollout subcommands
    for path, parser in COMMANDS.items():
        out = help_text(list(path), capsys)
        assert out.startswith(f"usage: zooserve {' '.join(path)}".rstrip()), path
        assert parser.description and len(parser.description) > 20, f"zooserve {' '.join(path)}: no description"


def test_every_option_has_help_and_says_its_default():
    for path, parser in COMMANDS.items():
        for action in options(parser):
            where = f"zooserve {' '.join(path)} {action.option_strings or action.metavar or action.dest}"
            assert action.help, f"{where}: no help"
            if says_default(action):
                assert "default" in shown_help(parser, action), f"{where}: default {action.default!r} not said"


def test_serve_and_batch_flags_say_the_settings_defaults():
    """The flags of serve and batch default to None (the ServeSettings value applies): the help must
    say that value, the one serve/settings.py holds."""
    for command in ("serve", "batch"):
        parser = COMMANDS[(command,)]
        for action in options(parser):
            flag = action.option_strings[-1]
            setting = next((name for name, f in FLAGS.items() if f == flag), None)
            if setting is None:
                continue
            default = ServeSettings.model_fields[setting].default
            text = shown_help(parser, action)
            if default is None:
                assert "default: none" in text, (command, flag, text)
            elif isinstance(default, bool):
                assert "default off" in text, (command, flag, text)
            else:
                assert re.search(rf"default:? {re.escape(str(default))}\b", text), (command, flag, default, text)


def test_rollout_start_help_says_the_rollout_defaults():
    parser = COMMANDS[("rollout", "start")]
    said = {a.dest: shown_help(parser, a) for a in options(parser)}
    fields = Rollout.model_fields
    assert f"default {fields['stable'].default}" in said["stable"]
    assert f"default {','.join(map(str, fields['steps'].default_factory()))}" in said["steps"]
    assert f"default {fields['interval_s'].default:g}s" in said["interval"]
    for dest in ("min_requests", "max_error_rate_delta", "max_p99_ratio", "alpha"):
        assert f"default {fields[dest].default:g}" in said[dest], dest
    assert "not checked" in said["min_agreement"] and fields["min_agreement"].default is None


def test_every_registry_flag_reads_the_same():
    seen = 0
    for path, parser in COMMANDS.items():
        for action in options(parser):
            if "--registry" in action.option_strings:
                seen += 1
                assert action.metavar == "DIR", path
                assert action.help.startswith(REGISTRY_HELP), path
    assert seen == 2 + 10 + 4 + 2            # demo and train (--publish), registry *, rollout *, serve and batch


def test_every_example_in_the_help_parses(capsys):
    """Lines `  zooserve ...` in a description or epilog are meant to be copied: each must parse."""
    examples = []
    for path in COMMANDS:
        out = help_text(list(path), capsys)
        examples += [line.split("#")[0].strip() for line in out.splitlines() if line.startswith("  zooserve ")]
    assert len(examples) >= 12, examples
    parser = build_parser()
    for example in examples:
        argv = shlex.split(example)[1:]
        if argv[-1] == "--help":
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"example does not parse: {example}")
        assert callable(args.func), example


def test_a_missing_subcommand_is_named_command(capsys):
    for argv in ([], ["registry"], ["rollout"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "required: COMMAND" in capsys.readouterr().err, argv


def test_train_help_says_what_every_family_is_and_demo_help_names_every_demo_model(capsys):
    assert set(FAMILY_HELP) == set(FAMILIES) and all(FAMILY_HELP.values())
    train = " ".join(help_text(["train"], capsys).split())
    for family, what in FAMILY_HELP.items():
        assert f"{family}: {what}" in train
    demo = " ".join(help_text(["demo"], capsys).split())
    for name, _, _ in DEMO_MODELS:
        assert name in demo
    assert "{mlp-digits," not in demo        # the usage line names NAME, not all twelve choices twice


def test_export_refuses_a_serve_format_it_does_not_export_in_one_line(tmp_path, capsys):
    code = main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "pkg"), "--formats", "torchscript"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "--serve-format onnx" in err and "--formats (torchscript)" in err
    assert not (tmp_path / "pkg").exists()


# ---- bench/*.py and loadtest/swap.py -------------------------------------------------------------

def script_parser(relpath: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's main builds, caught as it parses --help."""
    spec = importlib.util.spec_from_file_location(f"_help_{Path(relpath).stem}", ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)     # its dataclasses look their module up
    monkeypatch.setattr(sys, "argv", [relpath, "--help"])
    spec.loader.exec_module(module)
    caught = []

    def parse_args(self, args=None, namespace=None):
        caught.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    entry = getattr(module, "main", None) if relpath.startswith("bench/") else module.parse_args
    with pytest.raises(SystemExit):
        entry(["--help"]) if entry.__code__.co_argcount else entry()
    monkeypatch.undo()
    return caught[0]


@pytest.mark.parametrize("relpath", SCRIPTS)
def test_script_help(relpath, monkeypatch):
    parser = script_parser(relpath, monkeypatch)
    assert parser.description
    flat = " ".join(parser.format_help().split())
    assert "(default: None)" not in flat
    for action in options(parser):
        assert action.help, f"{relpath} {action.option_strings}: no help"
        shown = shown_help(parser, action)
        assert shown.count("(default") <= 1, f"{relpath}: the default said twice: {shown}"
        if says_default(action):
            assert "default" in shown, f"{relpath} {action.option_strings}: default {action.default!r} not said"
    assert not re.search(r"\[\d+(, \d+)+\]", flat), "a list default shown as a Python list, not as typed"


def test_loadtest_run_sh_help_prints_its_usage_and_runs_nothing():
    done = subprocess.run(["bash", "loadtest/run.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and "loadtest/run.sh [HOST_URL] [USERS] [DURATION]" in done.stdout
    assert "run.sh:" not in done.stdout + done.stderr           # locust was not started
    done = subprocess.run(["bash", "loadtest/run.sh", "--users"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "unknown option --users" in done.stderr
