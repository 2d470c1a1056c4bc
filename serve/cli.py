"""The `zooserve` command: train, export, registry, demo, serve, batch."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError


# ServeSettings fields that flags of `serve` and `batch` set: setting -> flag (its dest the flag's name)
FLAGS = {"host": "--host", "port": "--port", "grpc_port": "--grpc-port", "device": "--device",
         "intra_op_threads": "--threads",
         "execution_instances": "--instances",
         "admin_token": "--admin-token", "log_level": "--log-level", "log_format": "--log-format",
         "access_log": "--access-log", "allow_empty": "--allow-empty", "frontend": "--frontend",
         "workers": "--workers"}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """The settings that flags on this command line gave: setting -> flag."""
    return {name: flag for name, flag in FLAGS.items() if getattr(args, _dest(flag), None) is not None}


def _serve(args: argparse.Namespace) -> int:
    from model_registry.cli import resolve_root
    from serve import logs
    from serve.settings import ServeSettings

    given = {name: getattr(args, _dest(flag)) for name, flag in given_flags(args).items()}
    settings = ServeSettings(registry=resolve_root(args.registry), **given)
    refusal = open_registry(settings.registry, settings.allow_empty)
    if refusal is not None:
        print(f"zooserve serve: {refusal}", file=sys.stderr)
        return 2
    if settings.frontend == "litserve":          # imported only when chosen: litserve pulls in its own stack
        from serve.api import litserve_frontend

        refusal = litserve_frontend.refusal(settings, given_flags(args))
        if refusal is not None:
            print(f"zooserve serve: --frontend litserve: {refusal}", file=sys.stderr)
            return 2
    logs.configure(settings.log_level, settings.log_format)
    if not settings.allow_empty:
        warn_if_empty(settings.registry)
    if settings.frontend == "litserve":
        return litserve_frontend.serve(settings)
    if settings.workers > 1:
        from serve.workers import Supervisor

        return Supervisor(settings).run()
    return run_server(settings)


def run_server(settings, shared_folder: Path | None = None, sockets: list | None = None) -> int:
    """One server process (uvicorn, our HTTP protocol, the app) until SIGTERM; exit status 0, or 3
    when it could not start. A worker of several passes its SO_REUSEPORT socket and the folder the
    workers share their metrics through (serve/workers.py)."""
    import uvicorn

    from serve.api.http_protocol import ZooserveHttpProtocol
    from serve.app import create_app    # here: LitServe's processes fork from this one and need none of it

    config = uvicorn.Config(create_app(settings, shared_folder), host=settings.host, port=settings.port,
                            log_config=None, http=ZooserveHttpProtocol,
                            access_log=False, timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
                            log_level=settings.log_level)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that was in place
    # before it started; with the default one that kills the process (exit -15) after a clean
    # drain. A no-op handler there makes a drained shutdown exit 0, as supervisors expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    # a start-up that failed (a gRPC port already taken) has been logged; say so in the exit status
    return 0 if server.started else 3


def open_registry(root: Path, allow_empty: bool) -> str | None:
    """Why `serve` must not start on `root` (missing, not a folder), or None; with allow_empty a
    missing root is created, for the models published into it later."""
    if root.is_dir():
        return None
    if root.exists():
        return f"registry {root} is not a folder"
    if not allow_empty:
        return (f"registry {root} does not exist; give --allow-empty (or ZOOSERVE_ALLOW_EMPTY=true) to create "
                "it and serve the models published into it later")
    try:
        root.mkdir(parents=True)
    except OSError as exc:
        return f"cannot create registry {root}: {exc.strerror}"
    return None


def warn_if_empty(root: Path) -> None:
    """One warning line when the registry holds no model."""
    from model_registry import Registry

    if not Registry(root).models():
        logging.getLogger("zooserve").warning("registry %s holds no models: serving none until one is published "
                                              "into it", root)


def _batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model_registry.cli import resolve_root
    from serve import logs
    from serve.batch import BatchError, parse_range, run
    from serve.settings import ServeSettings

    if (args.shards is None) != (args.ray is None):
        print("zooserve batch: --ray ADDRESS and --shards N go together (the cluster, and how many ranges to cut "
              "the input into); without them the job runs in this process", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in {
        "registry": resolve_root(args.registry), "device": args.device, "intra_op_threads": args.threads,
        "log_level": args.log_level,
    }.items() if v is not None}
    settings = ServeSettings(**overrides)
    logs.configure(settings.log_level, settings.log_format)
    try:
        if args.ray is not None:
            from serve.batch_ray import run_on_ray

            summary = run_on_ray(settings, Path(args.input), Path(args.output), args.ray, args.shards,
                                 parse_range(args.lines), args.window, args.created, progress=not args.no_progress)
        else:
            summary = run(settings, Path(args.input), Path(args.output), parse_range(args.lines), args.window,
                          args.created, progress=not args.no_progress)
    except BatchError as exc:
        print(f"zooserve batch: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.statuses.items(), key=lambda kv: str(kv[0])))
    shards = f"; {summary.shards_line()}" if args.ray is not None else ""
    print(f"zooserve batch: {summary.records} records in {args.output} ({summary.resumed} from an earlier run; "
          f"{counts or 'none'}){shards}; start-up {summary.startup_s:.1f} s, run {summary.run_s:.1f} s",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from model_registry import cli as registry_cli
    from model_registry.cli import REGISTRY_HELP, HelpFormatter
    from serve import rollout_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="zooserve", formatter_class=HelpFormatter,
        description="Train, register, export and serve models.",
        epilog="The first steps, in a fresh folder (the registry is ./registry unless --registry DIR or "
               "$ZOOSERVE_REGISTRY says otherwise):\n"
               "  zooserve demo --only mlp-digits     # train and publish one demo model (seconds)\n"
               "  zooserve serve                      # serve it on http://127.0.0.1:8000\n"
               "  zooserve COMMAND --help             # each command's arguments\n"
               "Or, from a checkout, `make serve`: the whole demo, trained beside a running server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    training_cli.add_parsers(sub)
    registry_cli.add_parser(sub)
    rollout_cli.add_parser(sub)
    p = sub.add_parser(
        "serve", help="serve a registry over HTTP: KServe v2, and the OpenAI API for token models",
        formatter_class=HelpFormatter,
        description="Serve every model of a registry over HTTP: KServe v2 under /v2 (the stock tritonclient "
                    "works), the OpenAI API under /v1 for the token models, PNG grids under /v1/images, "
                    "Prometheus metrics on /metrics. Versions published later, alias and split changes load "
                    "within a poll (0.5 s). Every flag is also a ZOOSERVE_* environment variable "
                    "(ZOOSERVE_PORT, ZOOSERVE_ADMIN_TOKEN, ...; more settings in serve/settings.py); a flag "
                    "wins over its variable. Ctrl-C or SIGTERM drains and stops. Example:\n"
                    "  zooserve serve --registry registry --port 8000")
    p.add_argument("--registry", metavar="DIR", default=None,
                   help=REGISTRY_HELP + "; refused if it does not exist, unless --allow-empty")
    p.add_argument("--host", metavar="ADDR", default=None,
                   help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    p.add_argument("--grpc-port", metavar="PORT", type=int, default=None,
                   help="also serve KServe v2 over gRPC (Triton's GRPCInferenceService; the stock "
                        "tritonclient.grpc works) on this port (default 0: no gRPC)")
    p.add_argument("--frontend", choices=["native", "litserve"], default=None,
                   help="the HTTP front end: native, our own ASGI layer (the fastest; every option), or "
                        "litserve, the same app and engines behind LitServe's API server and inference worker "
                        "processes (for a LitServe deployment; no gRPC, a port from 1024, host 0.0.0.0, "
                        "127.0.0.1 or ::) (default native; ZOOSERVE_FRONTEND)")
    p.add_argument("--workers", metavar="N", type=int, default=None,
                   help="server processes on the one port, each a whole server with its own engines (the "
                        "kernel spreads connections; /metrics sums them; a stateful sequence must keep to "
                        "one connection; repository load/unload are refused) (default 1; ZOOSERVE_WORKERS)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where models run (default auto: CUDA when present, else CPU; cuda refuses a version "
                        "whose runtime cannot run on the GPU)")
    p.add_argument("--threads", metavar="N", type=int, default=None,
                   help="intra-op threads per model (default 1: on small shared CPUs more is slower)")
    p.add_argument("--instances", metavar="N", type=int, default=None,
                   help="execution instances per classify model, batches that run side by side (Triton's "
                        "instance_group count), where its model.json does not set instance_group.count "
                        "(default: none, one per usable core over --threads)")
    p.add_argument("--admin-token", metavar="TOKEN", default=None,
                   help="bearer token, 8 characters or more, that turns on the admin routes: repository "
                        "load/unload, routing and rollouts (default: none, those routes answer 404); "
                        "ZOOSERVE_ADMIN_TOKEN keeps it out of the process list")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                   help="log level (default info)")
    p.add_argument("--log-format", choices=["auto", "json", "text"], default=None,
                   help="log lines as JSON or text (default auto: text on a terminal, else JSON)")
    p.add_argument("--access-log", action="store_true", default=None,
                   help="log one line per request: method, path, status, ms, request id (default off)")
    p.add_argument("--allow-empty", action="store_true", default=None,
                   help="start on a registry folder that does not exist (it is created; models published "
                        "into it later are loaded) (default off: refused, exit 2)")
    p.set_defaults(func=_serve)
    p = sub.add_parser(
        "batch", help="answer a JSONL file of requests (OpenAI Batch format) in process, resumably",
        formatter_class=HelpFormatter,
        description="Answer a file of requests in the OpenAI Batch format, in this process, through the same "
                    "routes and models as the server (no server needed), and write one result line per input "
                    "line, in input order, with a progress bar. Stopped (Ctrl-C, a full disk), the same "
                    "command again keeps what was written and finishes the rest; reruns write the same bytes. "
                    "Other settings come from ZOOSERVE_* variables (e.g. ZOOSERVE_LOG_FORMAT), as for "
                    "`zooserve serve`. Examples:\n"
                    "  zooserve batch -i requests.jsonl -o results.jsonl\n"
                    "  zooserve batch -i requests.jsonl -o part-0.jsonl --lines 0:1000   # one shard\n"
                    "  zooserve batch -i requests.jsonl -o results.jsonl --ray auto --shards 64   # on a Ray cluster")
    p.add_argument("--registry", metavar="DIR", default=None, help=REGISTRY_HELP)
    p.add_argument("-i", "--input", metavar="FILE", required=True,
                   help='input JSONL, one request a line: {"custom_id": "...", "method": "POST", "url": '
                        '"/v2/models/M/infer", "body": {...}}; url: any inference route (/v2/models/M/infer, '
                        '/v1/completions, /v1/chat/completions, GET /v1/images/M)')
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="output JSONL, one record per input line; an existing one is resumed")
    p.add_argument("--lines", metavar="START:STOP", default=None,
                   help="only these input lines, a shard: 0-based, STOP exclusive, like a Python slice (editor "
                        "lines 1-1000 are 0:1000; START or STOP may be left out: 1000: is the rest) (default: "
                        "every line)")
    p.add_argument("--window", metavar="N", type=int, default=None, help="requests in flight (default: twice "
                   "the largest batch a loaded model forms, at least 64)")
    p.add_argument("--created", metavar="UNIX_S", type=int, default=0,
                   help="`created` (Unix seconds) written into /v1 responses (default 0; give every shard and "
                        "rerun of a job the same value)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where models run (default auto: CUDA when present, else CPU)")
    p.add_argument("--threads", metavar="N", type=int, default=None,
                   help="intra-op threads per model (default 1)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                   help="log level (default info)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on stderr)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the job on the Ray cluster at ADDRESS (the head's HOST:PORT, or auto: $RAY_ADDRESS, "
                        "else the cluster started last on this machine), with --shards; every node must see the "
                        "registry, the input and the output's folder at the same paths (a shared volume). Parts "
                        "go to OUTPUT.parts/ and are merged into OUTPUT, the bytes a run without --ray writes "
                        "(default: this process)")
    p.add_argument("--shards", metavar="N", type=int, default=None,
                   help="with --ray, and needed by it: cut the lines (or --lines' range) into N ranges, one Ray "
                        "task each, taking --threads CPUs (and a GPU with --device cuda); more shards than lines "
                        "make one a line. A rerun skips finished shards and resumes a partial one")
    p.set_defaults(func=_batch)
    return parser


def version() -> str:
    """The installed project's version (package metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("zooserve")
    except PackageNotFoundError:
        from serve import __version__
        return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:             # a bad ZOOSERVE_* variable or flag value: one line each, exit 2
        from serve.settings import ServeSettings, explain

        if exc.title != ServeSettings.__name__:
            raise
        for line in explain(exc, given_flags(args)):
            print(f"zooserve {args.command}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
