"""`registry` subcommands of the project CLI: list, show, publish, alias, split, verify."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import IntegrityError, RegistryError
from .store import Registry, dump_json

ENV_VAR = "ZOOSERVE_REGISTRY"
DEFAULT_ROOT = "registry"


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


@_command
def _list(args: argparse.Namespace, reg: Registry) -> int:
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
    print(reg.publish(args.name, args.src_dir))
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
    reg.set_split(args.name, weights)
    print(f"{args.name}: split " + " ".join(f"{a}={w}" for a, w in weights.items()))
    return 0


@_command
def _verify(args: argparse.Namespace, reg: Registry) -> int:
    if args.ref is None:
        versions = reg.versions(args.name)
    else:
        versions = [reg.resolve(args.name, args.ref)]
    if not versions:
        print(f"{args.name}: no versions to verify")
    failed = 0
    for version in versions:
        try:
            reg.verify(args.name, version)
        except IntegrityError as e:
            failed += 1
            print(f"{args.name}/{version}: FAILED")
            for problem in e.problems or [str(e)]:
                print(f"  {problem}")
        else:
            print(f"{args.name}/{version}: OK")
    return 1 if failed else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `registry` command and its subcommands to the project's CLI."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", metavar="DIR", default=None,
        help=f"registry root folder (default: ${ENV_VAR}, else ./{DEFAULT_ROOT})",
    )
    parser = subparsers.add_parser("registry", help="inspect and change a model registry")
    sub = parser.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", parents=[common], help="list models with their versions and aliases")
    p.set_defaults(func=_list)

    p = sub.add_parser("show", parents=[common], help="print model.json, or one version's manifest")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("ref", metavar="VERSION_OR_ALIAS", nargs="?", default=None,
                   help="version number or alias whose manifest to print (default: print model.json)")
    p.set_defaults(func=_show)

    p = sub.add_parser("publish", parents=[common], help="publish a folder as the next version")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("src_dir", metavar="SRC_DIR", help="folder holding manifest.json and the model files")
    p.set_defaults(func=_publish)

    p = sub.add_parser("alias", parents=[common], help="point an alias at a version, or remove it")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("alias", metavar="ALIAS", help="alias name, e.g. stable or canary")
    p.add_argument("version", metavar="VERSION", nargs="?", default=None,
                   help="version number (or an existing alias, to copy its version); omit with --remove")
    p.add_argument("--remove", action="store_true", help="remove the alias instead of setting it")
    p.set_defaults(func=_alias)

    p = sub.add_parser("split", parents=[common], help="set the traffic split over aliases")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("weights", metavar="ALIAS=WEIGHT", nargs="+",
                   help="integer weight (>= 0) of an existing alias, e.g. stable=90 canary=10")
    p.set_defaults(func=_split)

    p = sub.add_parser("verify", parents=[common], help="re-hash version files against their manifests")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("ref", metavar="VERSION", nargs="?", default=None,
                   help="version number or alias to verify (default: every version)")
    p.set_defaults(func=_verify)
