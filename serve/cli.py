"""The `zooserve` command: train, export, registry, demo, serve."""

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


def build_parser() -> argparse.ArgumentParser:
    from model_registry import cli as registry_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="zooserve", description="Train, register, export and serve models.")
    sub = parser.add_subparsers(dest="command", required=True)
    training_cli.add_parsers(sub)
    registry_cli.add_parser(sub)
    p = sub.add_parser("serve", help="serve a registry over HTTP (KServe v2)")
    p.add_argument("--registry", default=None, help="registry root (default: $ZOOSERVE_REGISTRY or ./registry)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where models run")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per model (default 1)")
    p.add_argument("--admin-token", default=None, help="bearer token that enables repository load/unload")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None, help="log level")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
