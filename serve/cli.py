"""The `zooserve` command: train, export, registry, demo, serve, batch."""

from __future__ import annotations

import argparse
import signal
import sys


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from model_registry.cli import resolve_root
    from serve import logs
    from serve.app import create_app
    from serve.settings import ServeSettings

    overrides = {k: v for k, v in {
        "registry": resolve_root(args.registry), "host": args.host, "port": args.port, "device": args.device,
        "intra_op_threads": args.threads, "admin_token": args.admin_token, "log_level": args.log_level,
    }.items() if v is not None}
    settings = ServeSettings(**overrides)
    logs.configure(settings.log_level)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
                            log_level=settings.log_level)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that was in place
    # before it started; with the default one that kills the process (exit -15) after a clean
    # drain. A no-op handler there makes a drained shutdown exit 0, as supervisors expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0


def _batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model_registry.cli import resolve_root
    from serve import logs
    from serve.batch import BatchError, parse_range, run
    from serve.settings import ServeSettings

    overrides = {k: v for k, v in {
        "registry": resolve_root(args.registry), "device": args.device, "intra_op_threads": args.threads,
        "log_level": args.log_level,
    }.items() if v is not None}
    settings = ServeSettings(**overrides)
    logs.configure(settings.log_level)
    try:
        summary = run(settings, Path(args.input), Path(args.output), parse_range(args.lines), args.window,
                      args.created, progress=not args.no_progress)
    except BatchError as exc:
        print(f"zooserve batch: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.statuses.items(), key=lambda kv: str(kv[0])))
    print(f"zooserve batch: {summary.records} records in {args.output} ({summary.resumed} from an earlier run; "
          f"{counts or 'none'}); start-up {summary.startup_s:.1f} s, run {summary.run_s:.1f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from model_registry import cli as registry_cli
    from serve import rollout_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="zooserve", description="Train, register, export and serve models.")
    sub = parser.add_subparsers(dest="command", required=True)
    training_cli.add_parsers(sub)
    registry_cli.add_parser(sub)
    rollout_cli.add_parser(sub)
    p = sub.add_parser("serve", help="serve a registry over HTTP (KServe v2)")
    p.add_argument("--registry", default=None, help="registry root (default: $ZOOSERVE_REGISTRY or ./registry)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where models run")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per model (default 1)")
    p.add_argument("--admin-token", default=None, help="bearer token that enables repository load/unload")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None, help="log level")
    p.set_defaults(func=_serve)
    p = sub.add_parser("batch", help="answer a JSONL file of requests (OpenAI Batch format) in process, resumably")
    p.add_argument("--registry", default=None, help="registry root (default: $ZOOSERVE_REGISTRY or ./registry)")
    p.add_argument("-i", "--input", required=True, help="input JSONL: {custom_id, method, url, body} per line")
    p.add_argument("-o", "--output", required=True, help="output JSONL; an existing one is resumed")
    p.add_argument("--lines", default=None, help="shard: 0-based line range START:STOP (STOP exclusive)")
    p.add_argument("--window", type=int, default=None, help="requests in flight (default: twice the largest "
                   "batch a loaded model forms, at least 64)")
    p.add_argument("--created", type=int, default=0, help="`created` written into /v1 responses (default 0; "
                   "give every shard and rerun of a job the same value)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where models run")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per model (default 1)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None, help="log level")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
