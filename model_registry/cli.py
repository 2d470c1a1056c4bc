"""`registry` subcommands of the project CLI: list, show, publish, alias, split, shadow, promote,
rollback, verify, import."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from .errors import IntegrityError, NotFound, RegistryError
from .manifest import ModelConfig
from .store import Registry, dump_json

ENV_VAR = "ZOOSERVE_REGISTRY"
DEFAULT_ROOT = "registry"
# the help of every command's --registry (registry, rollout, demo, serve, batch): one wording everywhere
REGISTRY_HELP = f"registry root folder (default: ${ENV_VAR}, else ./{DEFAULT_ROOT})"


class HelpFormatter(argparse.HelpFormatter):
    """The `zooserve` commands' help: a description's lines are paragraphs, wrapped to the terminal,
    except lines indented by two spaces (examples), kept as written so they can be copied; no line
    is broken at a hyphen (mlp-digits, --sticky-key)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if line.startswith("  ") or not line.strip():
                lines.append(indent + line if line.strip() else "")
            else:
                lines.append(textwrap.fill(" ".join(line.split()), width, initial_indent=indent,
                                           subsequent_indent=indent, break_on_hyphens=False))
        return "\n".join(lines)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def resolve_root(arg: str | None) -> Path:
    """Registry root: the --registry argument, else $ZOOSERVE_REGISTRY, else ./registry."""
    return Path(arg or os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _command(func: Callable[[argparse.Namespace, Registry], int]) -> Callable[[argparse.Namespace], int]:
    """Give func the registry and turn a RegistryError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args, Registry(resolve_root(args.registry)))
        except RegistryError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def _require_root(reg: Registry) -> None:
    """NotFound when the registry root is not a folder (a mistyped --registry reads as no models)."""
    if not reg.root.is_dir():
        raise NotFound(f"registry {reg.root} does not exist or is not a folder")


@_command
def _list(args: argparse.Namespace, reg: Registry) -> int:
    _require_root(reg)
    models = reg.models()
    if not models:
        print(f"no models in {reg.root}", file=sys.stderr)
    for name in models:
        versions = ",".join(map(str, reg.versions(name))) or "-"
        aliases = reg.model_config(name).routing.aliases
        alias_text = " ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "-"
        print(f"{name}  versions: {versions}  aliases: {alias_text}")
    return 0


@_command
def _show(args: argparse.Namespace, reg: Registry) -> int:
    if args.ref is None:
        print(dump_json(reg.model_config(args.name)), end="")
    else:
        print(dump_json(reg.manifest(args.name, reg.resolve(args.name, args.ref))), end="")
    return 0


@_command
def _publish(args: argparse.Namespace, reg: Registry) -> int:
    print(reg.publish(args.name, args.src_dir, force=args.force))
    return 0


@_command
def _alias(args: argparse.Namespace, reg: Registry) -> int:
    if args.remove:
        if args.version is not None:
            raise RegistryError("give no VERSION with --remove")
        reg.remove_alias(args.name, args.alias)
        print(f"{args.name}: removed alias {args.alias}")
        return 0
    if args.version is None:
        raise RegistryError("VERSION is required (or use --remove)")
    version = reg.resolve(args.name, args.version)
    reg.set_alias(args.name, args.alias, version)
    print(f"{args.name}: {args.alias} -> {version}")
    return 0


def _parse_weight(item: str) -> tuple[str, int]:
    alias, sep, weight = item.partition("=")
    if not sep or not weight.strip().isdigit():
        raise RegistryError(f"bad split entry {item!r}: expected ALIAS=WEIGHT with WEIGHT an integer >= 0")
    return alias, int(weight)


@_command
def _split(args: argparse.Namespace, reg: Registry) -> int:
    weights: dict[str, int] = {}
    for item in args.weights:
        alias, weight = _parse_weight(item)
        if alias in weights:
            raise RegistryError(f"alias {alias!r} appears twice in the split")
        weights[alias] = weight
    cfg = reg.set_split(args.name, weights, sticky_key=args.sticky_key)
    sticky = f"sticky key {cfg.routing.sticky_key}" if cfg.routing.sticky_key else "no sticky key"
    print(f"{args.name}: split {_split_text(cfg)}, {sticky} (revision {cfg.revision})")
    return 0


def _split_text(cfg: ModelConfig) -> str:
    return " ".join(f"{a}={w}" for a, w in cfg.routing.split.items()) or "none"


SHADOW_OFF = "off"


def _parse_percent(text: str) -> float:
    try:
        percent = float(text)
    except ValueError:
        percent = float("nan")
    if not 0 < percent <= 100:
        raise RegistryError(f"bad shadow percent {text!r}: expected a number in (0, 100], e.g. 10 or 2.5")
    return percent


@_command
def _shadow(args: argparse.Namespace, reg: Registry) -> int:
    if args.alias == SHADOW_OFF:
        if args.percent is not None:
            raise RegistryError(f"give no PERCENT with '{SHADOW_OFF}'")
        cfg = reg.set_shadow(args.name, None, None)
        print(f"{args.name}: shadow off (revision {cfg.revision})")
        return 0
    if args.percent is None:
        raise RegistryError(f"PERCENT is required (or use '{SHADOW_OFF}' to turn the shadow off)")
    cfg = reg.set_shadow(args.name, args.alias, _parse_percent(args.percent))
    shadow = cfg.routing.shadow
    version = cfg.routing.aliases[shadow.alias]
    print(f"{args.name}: shadow {shadow.alias} (version {version}) on {shadow.percent:g}% of requests "
          f"(revision {cfg.revision})")
    return 0


@_command
def _promote(args: argparse.Namespace, reg: Registry) -> int:
    now = time.time()
    cfg = reg.promote(args.name, args.reason, now, canary=args.canary)
    stable = next(iter(cfg.routing.split))
    print(f"{args.name}: {stable} -> version {cfg.routing.aliases[stable]}, split {_split_text(cfg)}"
          f"{_rollout_note(cfg, now)} (revision {cfg.revision})")
    return 0


@_command
def _rollback(args: argparse.Namespace, reg: Registry) -> int:
    now = time.time()
    cfg = reg.rollback(args.name, args.reason, now, canary=args.canary)
    stable = next(iter(cfg.routing.split))
    print(f"{args.name}: rolled back to {stable} (version {cfg.routing.aliases[stable]}), split "
          f"{_split_text(cfg)}{_rollout_note(cfg, now)} (revision {cfg.revision})")
    return 0


def _rollout_note(cfg: ModelConfig, now: float) -> str:
    """', rollout promoted' when this command ended a running rollout (its last event is now's)."""
    status = cfg.rollout.status if cfg.rollout else None
    ended_now = status is not None and status.history and status.history[-1].at == now
    return f", rollout {status.state}" if ended_now else ""


@_command
def _verify(args: argparse.Namespace, reg: Registry) -> int:
    targets = _verify_targets(args, reg)
    if not targets:
        print(f"no models in {reg.root}", file=sys.stderr)
    failed = sum(_verify_versions(reg, name, versions) for name, versions in targets.items())
    return 1 if failed else 0


def _verify_targets(args: argparse.Namespace, reg: Registry) -> dict[str, list[int]]:
    """The versions to verify: the one named, every version of the model named, or of every model."""
    if args.name is None:
        _require_root(reg)
        return {name: reg.versions(name) for name in reg.models()}
    if args.ref is None:
        return {args.name: reg.versions(args.name)}
    return {args.name: [reg.resolve(args.name, args.ref)]}


def _verify_versions(reg: Registry, name: str, versions: list[int]) -> int:
    """Print OK or FAILED (with each problem) per version; return how many failed."""
    if not versions:
        print(f"{name}: no versions to verify")
    failed = 0
    for version in versions:
        try:
            reg.verify(name, version)
        except IntegrityError as e:
            failed += 1
            print(f"{name}/{version}: FAILED")
            for problem in e.problems or [str(e)]:
                print(f"  {problem}")
        else:
            print(f"{name}/{version}: OK")
    return failed


@_command
def _import(args: argparse.Namespace, reg: Registry) -> int:
    from training.import_model import import_model   # onnx / torch: loaded only by this verb

    imported = import_model(reg, args.name, args.file, labels=args.labels, input_shape=args.input_shape,
                            input_name=args.input_name, output_name=args.output_name, datatype=args.datatype,
                            batch=not args.no_batch, seed=args.seed, force=args.force)
    sig = imported.manifest.signature
    tensors = [", ".join(f"{s.name} {s.datatype} {s.shape}" for s in specs) for specs in (sig.inputs, sig.outputs)]
    print(f"{imported.name}: imported {args.file} as version {imported.version} "
          f"({imported.manifest.format}: {tensors[0]} -> {tensors[1]})", file=sys.stderr)
    for note in imported.notes:
        print(f"note: {note}", file=sys.stderr)
    print(imported.version)
    return 0


def _verb(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, name: str, help_text: str,
          more: str = "") -> argparse.ArgumentParser:
    """A registry subcommand whose own --help opens with its one-line summary (and `more`)."""
    description = help_text[0].upper() + help_text[1:] + "." + (f" {more}" if more else "")
    return sub.add_parser(name, parents=[common], help=help_text, description=description,
                          formatter_class=HelpFormatter)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `registry` command and its subcommands to the project's CLI."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="DIR", default=None, help=REGISTRY_HELP)
    parser = subparsers.add_parser(
        "registry", help="inspect and change a model registry", formatter_class=HelpFormatter,
        description="Inspect and change a model registry: a folder with one folder per model, holding its "
                    "numbered versions (the files, each hashed in manifest.json) and model.json (aliases, "
                    "traffic split, shadow, rollout). A running `zooserve serve` follows every change within "
                    "a poll (0.5 s). Every subcommand takes --registry DIR; `zooserve registry COMMAND --help` "
                    "for its arguments.")
    sub = parser.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)

    p = _verb(sub, common, "list", "list models with their versions and aliases")
    p.set_defaults(func=_list)

    p = _verb(sub, common, "show", "print model.json, or one version's manifest")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("ref", metavar="VERSION_OR_ALIAS", nargs="?", default=None,
                   help="version number or alias whose manifest to print (default: print model.json)")
    p.set_defaults(func=_show)

    p = _verb(sub, common, "publish", "publish a folder as the next version",
              "The folder is what `zooserve export --out` writes; its files are copied and hashed, the new "
              "version number is printed. Give it an alias with `zooserve registry alias`.")
    p.add_argument("name", metavar="NAME", help="model name (created by its first version)")
    p.add_argument("src_dir", metavar="SRC_DIR",
                   help="folder holding manifest.json and the model files (from `zooserve export --out`)")
    p.add_argument("--force", action="store_true",
                   help="publish a package of another family than the model's versions (refused otherwise)")
    p.set_defaults(func=_publish)

    p = _verb(sub, common, "alias", "point an alias at a version, or remove it",
              "Requests without a version in the URL follow the split (`zooserve registry split`) when "
              "there is one, else go to the `stable` alias, else to the newest ready version.")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("alias", metavar="ALIAS", help="alias name, e.g. stable or canary")
    p.add_argument("version", metavar="VERSION", nargs="?", default=None,
                   help="version number (or an existing alias, to copy its version); omit with --remove")
    p.add_argument("--remove", action="store_true",
                   help="remove the alias instead of setting it (refused while the split, the shadow or a running "
                        "rollout uses it)")
    p.set_defaults(func=_alias)

    p = _verb(sub, common, "split", "set the traffic split over aliases",
              "Example:\n  zooserve registry split mlp-digits stable=90 canary=10 --sticky-key x-user")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("weights", metavar="ALIAS=WEIGHT", nargs="+",
                   help="integer weight (>= 0, at least one above 0) of an existing alias; traffic is shared in "
                        "proportion to the weights, e.g. stable=90 canary=10")
    sticky = p.add_mutually_exclusive_group()
    sticky.add_argument("--sticky-key", dest="sticky_key", metavar="HEADER",
                        help="pin each caller to one alias by this request header's value (the OpenAI `user` "
                             "field pins too)")
    sticky.add_argument("--no-sticky-key", dest="sticky_key", action="store_const", const=None,
                        help="stop pinning callers (default: keep the sticky key as it is)")
    p.set_defaults(func=_split, sticky_key=...)

    _add_routing_parsers(sub, common)

    p = _verb(sub, common, "verify", "re-hash version files against their manifests",
              "Prints OK or FAILED (with each problem) per version; exits 1 when any version failed.")
    p.add_argument("name", metavar="NAME", nargs="?", default=None, help="model name (default: every model)")
    p.add_argument("ref", metavar="VERSION", nargs="?", default=None,
                   help="version number or alias to verify (default: every version)")
    p.set_defaults(func=_verify)

    p = _verb(sub, common, "import",
              "publish an ONNX or TorchScript file trained elsewhere as the next version",
              "It is served like a classifier: tensors in, tensors out, through the dynamic batcher (KServe v2). "
              "A golden pair is recorded by running the file on seeded inputs; a file the server could not "
              "serve is refused before anything is published. Prints the new version number. Examples:\n"
              "  zooserve registry import my-cnn model.onnx --labels labels.txt\n"
              "  zooserve registry import my-cnn model.pt --input-shape 1,3,32,32")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("file", metavar="FILE", help="model file: FILE.onnx, or TorchScript FILE.pt / FILE.ts")
    p.add_argument("--labels", metavar="FILE", default=None, help="class names, one a line (classifiers)")
    p.add_argument("--input-shape", metavar="DIMS", default=None,
                   help="example input shape, batch dim first, e.g. 1,1,8,8 (required for TorchScript; for ONNX, "
                        "fills variable dims beyond the batch)")
    p.add_argument("--input-name", metavar="NAME", default=None,
                   help="TorchScript input name (default: input); ONNX takes the graph's")
    p.add_argument("--output-name", metavar="NAME", default=None,
                   help="TorchScript output name (default: output; NAME_<i> for a tuple); ONNX takes the graph's")
    p.add_argument("--datatype", metavar="TYPE", default=None,
                   help="KServe v2 datatype of the TorchScript input, e.g. FP32, INT64 (default: FP32); "
                        "ONNX takes the graph's")
    p.add_argument("--no-batch", action="store_true",
                   help="the model has no batch axis (fixed first dim): serve one request at a time")
    p.add_argument("--seed", type=int, default=0, help="seed of the golden inputs (default: 0)")
    p.add_argument("--force", action="store_true",
                   help="import into a model whose versions are of another family (e.g. a canary of a trained model)")
    p.set_defaults(func=_import)


def _add_routing_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The shadow, promote and rollback subcommands."""
    p = _verb(sub, common, "shadow", "copy a share of requests to an alias, or stop",
              "The copies' answers are compared with the primary's (zooserve_shadow_requests_total), never "
              f"returned. Examples:\n  zooserve registry shadow mlp-digits canary 10\n"
              f"  zooserve registry shadow mlp-digits {SHADOW_OFF}")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("alias", metavar="ALIAS",
                   help=f"alias to shadow (same signature as the primary), or '{SHADOW_OFF}'")
    p.add_argument("percent", metavar="PERCENT", nargs="?", default=None,
                   help=f"share of the primary's requests copied to it, in (0, 100]; omit with '{SHADOW_OFF}'")
    p.set_defaults(func=_shadow)

    for verb, func, text in (("promote", _promote, "point stable at the canary's version, all traffic to it"),
                             ("rollback", _rollback, "send all traffic to stable at once (canary kept)")):
        p = _verb(sub, common, verb, text, "Ends a running rollout, if any, recording --reason in its history.")
        p.add_argument("name", metavar="NAME", help="model name")
        p.add_argument("--canary", metavar="ALIAS", default=None,
                       help="canary alias (default: the running rollout's canary, else 'canary')")
        p.add_argument("--reason", metavar="TEXT", default=f"{verb} from the command line",
                       help="why, recorded in the rollout's history (default: '%(default)s')")
        p.set_defaults(func=func)
