"""`zooserve rollout`: start, status, abort, and run the controller for a fleet.

    zooserve rollout start --registry DIR NAME --canary ALIAS [--stable ALIAS] [--steps 5,25,50,100]
                           [--interval 30s] [--min-requests N] [--max-error-rate-delta X]
                           [--max-p99-ratio X] [--min-agreement X] [--alpha X]
    zooserve rollout status --registry DIR NAME
    zooserve rollout abort --registry DIR NAME [--reason TEXT]
    zooserve rollout run --registry DIR NAME... (--servers URL [URL ...] | --prometheus URL) [--once]

Errors print `error: ...` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from pydantic import ValidationError

from model_registry import Registry, RegistryError
from model_registry.routing import Rollout

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)?")


# ---- argument types ------------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """Seconds of `30s`, `2m`, `500ms`, `1h` or plain seconds (`45`, `0.5`); > 0."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"a duration looks like 30s, 2m, 500ms or plain seconds, got {text!r}")
    seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be more than 0, got {text!r}")
    return seconds


def parse_steps(text: str) -> list[int]:
    """Canary weights `5,25,50,100` (the schema checks that they increase within 1..100)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps are comma-separated integer weights like 5,25,50,100, got {text!r}")


# ---- commands ------------------------------------------------------------------------------

def _command(func: Callable[[argparse.Namespace, Registry], int]) -> Callable[[argparse.Namespace], int]:
    """Give func the registry; turn a registry, validation or metrics error into `error: ...`, exit 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from model_registry.cli import resolve_root
        from serve.rollout import MetricsError     # here, not at import: it loads scipy and httpx

        try:
            return func(args, Registry(resolve_root(args.registry)))
        except ValidationError as e:
            print(f"error: {describe_validation(e)}", file=sys.stderr)
        except (RegistryError, MetricsError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
        return 2

    return run


def describe_validation(error: ValidationError) -> str:
    """One line per problem, without pydantic's links."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or error.title}: {e['msg']}" for e in error.errors())


@_command
def _start(args: argparse.Namespace, registry: Registry) -> int:
    given = {"canary": args.canary, "stable": args.stable, "steps": args.steps, "interval_s": args.interval,
             "min_requests": args.min_requests, "max_error_rate_delta": args.max_error_rate_delta,
             "max_p99_ratio": args.max_p99_ratio, "min_agreement": args.min_agreement, "alpha": args.alpha}
    rollout = Rollout(**{key: value for key, value in given.items() if value is not None})
    cfg = registry.start_rollout(args.name, rollout, now=time.time(), reason=args.reason)
    print(describe_rollout(cfg.name, cfg.rollout, history=False))
    return 0


@_command
def _status(args: argparse.Namespace, registry: Registry) -> int:
    cfg = registry.model_config(args.name)
    if cfg.rollout is None or cfg.rollout.status is None:
        print(f"{args.name}: no rollout was ever started")
        return 0
    print(describe_rollout(args.name, cfg.rollout))
    lease = registry.lease(args.name)
    if lease is not None and lease.expires_at > time.time():
        print(f"controller: {lease.owner} (lease until {_when(lease.expires_at)})")
    return 0


@_command
def _abort(args: argparse.Namespace, registry: Registry) -> int:
    cfg = registry.abort_rollout(args.name, args.reason, now=time.time())
    print(describe_rollout(cfg.name, cfg.rollout, history=False))
    return 0


@_command
def _run(args: argparse.Namespace, registry: Registry) -> int:
    from serve import logs
    from serve.rollout import PrometheusSource, RolloutController, ServerMetricsSource

    for name in args.names:
        registry.model_config(name)                      # unknown model: NotFound now, not every tick
    logs.configure(args.log_level)
    source = PrometheusSource(args.prometheus) if args.prometheus else ServerMetricsSource(args.servers)
    # the lease must outlive the time between two ticks, whatever the rollouts' intervals
    controller = RolloutController(registry, source, args.owner, models=args.names,
                                   min_lease_s=max(10.0, 3 * args.period))
    if args.once:
        return _run_one_window(controller, registry, args.names)
    asyncio.run(_run_until_signalled(controller, args.period))
    return 0


def _run_one_window(controller, registry: Registry, names: list[str]) -> int:
    """Open a window, let it fill for one interval, judge it, print the decisions."""
    from serve.rollout import next_due_s

    controller.tick()
    try:
        wait_s = next_due_s(registry, names)
        if wait_s:
            time.sleep(wait_s)
        decisions = controller.tick()
    finally:
        controller.release_leases()
    for name in names:
        decision = decisions.get(name)
        print(f"{name}: {decision.action}: {decision.reason}" if decision else f"{name}: no decision "
              "(no running rollout, lease held by another controller, or the metrics could not be read)")
    return 0


async def _run_until_signalled(controller, period_s: float) -> None:
    from serve.rollout import run

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run(controller, stop, period_s)


# ---- output --------------------------------------------------------------------------------

def describe_rollout(name: str, rollout: Rollout, history: bool = True) -> str:
    """State, step, weight, reason and (optionally) history of a rollout, for people."""
    status = rollout.status
    lines = [
        f"{name}: {status.state}, step {status.step + 1}/{len(rollout.steps)} (steps {rollout.steps}), "
        f"canary weight {status.weight}%",
        f"canary {rollout.canary!r} (version {status.canary_version}) against {rollout.stable!r} "
        f"(version {status.stable_version}); window {rollout.interval_s:g} s, min {rollout.min_requests} "
        f"requests per arm",
        f"reason: {status.reason or '-'}",
    ]
    if history:
        lines.append("history:")
        lines += [f"  {_when(e.at)}  {e.event:<11} step {e.step + 1} weight {e.weight:>3}%  {e.reason}"
                  for e in status.history]
    return "\n".join(lines)


def _when(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- parser --------------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    from model_registry.cli import REGISTRY_HELP, HelpFormatter

    p = sub.add_parser(
        "rollout", help="progressive rollouts of a canary: start, status, abort, run the controller",
        formatter_class=HelpFormatter,
        description="Progressive rollouts: the canary alias takes a growing share of traffic, step by step; "
                    "each window judges it against stable (errors, latency, shadow agreement) and the rollout "
                    "promotes or rolls back by itself. `start`, `status` and `abort` write and read the "
                    "registry; a running `zooserve serve` drives the rollout (its controller is on by "
                    "default), or `zooserve rollout run` does for a fleet of servers. Errors print `error: ...` "
                    "and exit 2. `zooserve rollout COMMAND --help` for each command.")
    verbs = p.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)

    start = _verb(verbs, "start", "start a rollout of the canary alias against the stable alias", _start,
                  "Both aliases must exist (`zooserve registry alias`). Example:\n"
                  "  zooserve rollout start mlp-digits --canary canary --steps 5,25,50,100 --interval 30s")
    start.add_argument("--canary", required=True, metavar="ALIAS", help="alias of the new version")
    start.add_argument("--stable", default=None, metavar="ALIAS", help="alias of the version in service "
                       "(default stable)")
    start.add_argument("--steps", type=parse_steps, default=None, metavar="W,W,...",
                       help="the canary's share of traffic at each step, in percent: increasing integers in "
                            "1..100 (default 5,25,50,100)")
    start.add_argument("--interval", type=parse_duration, default=None, metavar="DURATION",
                       help="analysis window, one per step: 30s, 2m, 500ms, 1h or plain seconds (default 30s)")
    start.add_argument("--min-requests", type=int, default=None, metavar="N",
                       help="requests each arm (canary and stable) needs in a window before it is judged "
                            "(default 50)")
    start.add_argument("--max-error-rate-delta", type=float, default=None, metavar="X",
                       help="canary error rate (5xx share, 0..1) may exceed stable's by this much (default 0.01)")
    start.add_argument("--max-p99-ratio", type=float, default=None, metavar="X",
                       help="canary p99 latency may be this many times stable's, >= 1 (default 1.5)")
    start.add_argument("--min-agreement", type=float, default=None, metavar="X",
                       help="shadow agreement floor 0..1, checked when a shadow ran (default: not checked)")
    start.add_argument("--alpha", type=float, default=None, metavar="X",
                       help="significance level of each statistical test, 0..1 (default 0.05)")
    start.add_argument("--reason", metavar="TEXT", default="started by hand (zooserve rollout start)",
                       help="recorded in the rollout's history (default: '%(default)s')")

    _verb(verbs, "status", "show a rollout's state, step, weight, reason and history", _status)

    abort = _verb(verbs, "abort", "stop the running rollout; all traffic back to stable", _abort)
    abort.add_argument("--reason", metavar="TEXT", default="aborted by hand (zooserve rollout abort)",
                       help="recorded in the rollout's history (default: '%(default)s')")

    run = verbs.add_parser(
        "run", help="run the rollout controller for the named models", formatter_class=HelpFormatter,
        description="Run the rollout controller for the named models: for a fleet, where each server's own "
                    "controller sees only its own traffic (turn those off with ZOOSERVE_ROLLOUT_CONTROLLER=false "
                    "on every replica). It reads the metrics of every replica (--servers) or of a Prometheus "
                    "that scrapes them (--prometheus) and writes the decisions into the registry; a lease "
                    "in the registry keeps one controller per model. Runs until Ctrl-C or SIGTERM, or one "
                    "window with --once. Example:\n"
                    "  zooserve rollout run mlp-digits --servers http://10.0.0.1:8000 http://10.0.0.2:8000")
    run.add_argument("--registry", metavar="DIR", default=None, help=REGISTRY_HELP)
    run.add_argument("names", nargs="+", metavar="NAME", help="models whose rollouts this controller drives")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--servers", nargs="+", metavar="URL", help="base URL of every server replica, e.g. "
                        "http://10.0.0.1:8000 (their /metrics are scraped and summed); put NAMEs before this "
                        "option")
    source.add_argument("--prometheus", metavar="URL", help="base URL of a Prometheus that scrapes every "
                        "replica, e.g. http://127.0.0.1:9090")
    run.add_argument("--once", action="store_true",
                     help="judge one window of each rollout (waiting for it to fill), print the decisions, exit")
    run.add_argument("--period", type=parse_duration, default=2.0, metavar="DURATION",
                     help="time between ticks: 2s, 500ms or plain seconds (default 2s)")
    run.add_argument("--owner", default=f"{socket.gethostname()}:{os.getpid()}",
                     help="lease owner id (default host:pid; reuse one to resume a lease at once)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                     help="log level (default info)")
    run.set_defaults(func=_run)


def _verb(verbs: argparse._SubParsersAction, name: str, help_text: str, func,
          more: str = "") -> argparse.ArgumentParser:
    from model_registry.cli import REGISTRY_HELP, HelpFormatter

    description = help_text[0].upper() + help_text[1:] + "." + (f" {more}" if more else "")
    p = verbs.add_parser(name, help=help_text, description=description, formatter_class=HelpFormatter)
    p.add_argument("--registry", metavar="DIR", default=None, help=REGISTRY_HELP)
    p.add_argument("name", metavar="NAME", help="model name")
    p.set_defaults(func=func)
    return p
