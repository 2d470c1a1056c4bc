"""`zooserve train`, `zooserve export` and `zooserve demo`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from training.families import FAMILIES, preset_names

# torch is imported inside the commands: `zooserve serve` builds this parser too and must not
# pay for torch (import time, and ~200k objects for the garbage collector to walk).
FORMATS = ("onnx", "torchscript")
# the families `zooserve train --data` trains on the user's own data: a table or an image folder
# (training/user_data.py), a series (user_series.py), text (user_text.py); and the option that
# describes each kind of data
DATA_FAMILIES = (
    "mlp", "resnet",                # a table, an image folder (training/user_data.py)
    "rnn",                          # a csv series (training/user_series.py)
    "decoder", "mamba", "rnn_lm",   # text (training/user_text.py)
    "gan", "vae", "diffusion",      # an image folder (training/user_data.py, scaled by training/generative.py)
)
DATA_OPTIONS = {
    "label_column": ("mlp",),
    "image_size": ("resnet",
                   "gan", "vae", "diffusion"),
    "channels": ("resnet",
                 "gan", "vae", "diffusion"),
    "value_column": ("rnn",),
    "time_column": ("rnn",),
    "tokenizer": ("decoder", "mamba"),
}
# the families whose recipe takes --set/--config and --resume (a run folder, training/run_state.py)
LOOP_FAMILIES = (
    "mlp", "resnet",                # training/train.py train_classifier (the shared loop, training/loop.py)
    "rnn",                          # training/series.py train_forecaster (the shared loop)
    "decoder", "mamba", "rnn_lm",   # training/lm.py train_token_family (its own loop, train_lm)
    "gan", "vae", "diffusion",      # training/generative.py train_generative (gan: its own loop; vae, diffusion: the shared loop)
)
# the families whose recipe takes --device cuda, --precision bf16|fp16 and --tensorboard (training/devices.py):
# every family; one added outside it trains on the CPU in fp32 (--device cpu and auto are accepted for any)
DEVICE_FAMILIES = (
    "mlp", "resnet",                # training/train.py train_classifier (the shared loop, training/loop.py)
    "rnn",                          # training/series.py train_forecaster (the shared loop)
    "decoder", "mamba", "rnn_lm",   # training/lm.py train_token_family (its own loop, train_lm)
    "gan", "vae", "diffusion",      # training/generative.py train_generative (gan: its own loop; vae, diffusion: the shared loop)
)
# inside --out: the run folder (run-state checkpoints and metrics.jsonl, training/run_state.py)
RUN_FOLDER = "run"
# the `zooserve train` parser, once built: `--nproc` rebuilds the command line for its ranks from it
_TRAIN_PARSER: dict[str, argparse.ArgumentParser] = {}
# the launcher's own options: the ranks do not get them
LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")

# (registry name, family, preset) published by `zooserve demo`, in the order their training starts
DEMO_MODELS = [
    ("mlp-digits", "mlp", "tiny"),
    ("mamba-tiny", "mamba", "tiny"),
    ("decoder-tiny", "decoder", "tiny"),
    ("decoder-moe-tiny", "decoder", "tiny-moe"),
    ("lstm-charlm", "rnn_lm", "tiny"),
    ("diffusion-digits", "diffusion", "tiny"),
    ("gan-digits", "gan", "tiny"),
    ("vae-digits", "vae", "tiny"),
    ("resnet-digits", "resnet", "tiny"),
    ("lstm-forecast", "rnn", "tiny"),
    ("gru-forecast", "rnn", "tiny-gru"),
    ("rnn-forecast", "rnn", "tiny-rnn"),
]
DEMO_FAMILIES = {name: (family, preset) for name, family, preset in DEMO_MODELS}


def _train(args: argparse.Namespace) -> int:
    from training import distributed    # no torch at import

    if distributed.in_rank():           # one rank of --nproc: torchrun started this process
        return distributed.run_rank(_train_command, args)
    return _train_command(args)


def _train_command(args: argparse.Namespace) -> int:
    def error(message: str) -> int:     # one line, as argparse would, exit 2
        print(f"zooserve train: error: {message}", file=sys.stderr)
        return 2

    from training import distributed

    launch_error = distributed.launch_flags_error(args)     # --nproc for a family that cannot: at once
    if launch_error is not None:
        return error(launch_error)
    known = preset_names(args.family)
    if args.preset is not None and args.preset not in known:   # before torch is imported: one line at once
        return error(f"argument --preset: invalid choice {args.preset!r} for {args.family} "
                     f"(choose from {', '.join(known)})")
    # these need no torch (resolving the config below loads it): refused at once
    if args.alias is not None:
        if args.publish is None:
            return error("--alias points a registry alias at the version --publish NAME publishes; give --publish too")
        from model_registry import InvalidName
        from model_registry.names import validate_alias

        try:
            validate_alias(args.alias)
        except InvalidName as exc:
            return error(f"--alias: {exc}")
    asked = [flag for flag, on in (("--device cuda", args.device == "cuda"),
                                   (f"--precision {args.precision}", args.precision != "fp32"),
                                   ("--tensorboard", args.tensorboard)) if on]
    if asked and args.family not in DEVICE_FAMILIES:
        return error(f"--device cuda, --precision bf16|fp16 and --tensorboard are for {', '.join(DEVICE_FAMILIES)} "
                     f"so far, not {args.family} (asked: {', '.join(asked)}; its recipe trains on the CPU in fp32)")
    from training.devices import DeviceError, validate

    try:
        validate(args.device, args.precision)    # bf16/fp16 with --device cpu
    except DeviceError as exc:
        return error(str(exc))
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        return error("--tensorboard needs the tensorboard package, which is not installed (pip install tensorboard)")
    from training.run_config import DATA_DECIDES, ConfigError, resolve

    try:
        run = resolve(args.family, args.preset, args.set, args.config)
    except ConfigError as exc:
        return error(str(exc))
    if args.print_config:
        print(run.render(), end="")
        return 0
    if args.out is None:
        return error("the following arguments are required: --out")
    tuned = bool(args.set or args.config or args.resume)
    if tuned and args.family not in LOOP_FAMILIES:
        return error(f"--set, --config and --resume are for {', '.join(LOOP_FAMILIES)} so far, not "
                     f"{args.family} (its recipe takes only its preset; --print-config shows what it would use)")
    if args.data is not None and (args.set or args.config):
        baseline = resolve(args.family, run.preset).model
        changed = [k for k in DATA_DECIDES.get(args.family, ()) if run.model[k] != baseline[k]]
        if changed:
            return error(f"model.{changed[0]} comes from --data (with it, {', '.join(DATA_DECIDES[args.family])} "
                         f"are read from the data); do not set it")
    data_options = {k: getattr(args, k) for k in DATA_OPTIONS if getattr(args, k) is not None}
    if args.data is not None and args.family not in DATA_FAMILIES:
        return error(f"--data is for {', '.join(DATA_FAMILIES)}, not {args.family}")
    for key in data_options:
        flag = "--" + key.replace("_", "-")
        if args.family not in DATA_OPTIONS[key]:
            return error(f"{flag} is for {', '.join(DATA_OPTIONS[key])} --data, not {args.family}")
        if args.data is None:
            return error(f"{flag} describes --data, which is not given")
    if args.registry is not None and args.publish is None:
        return error("--registry is where --publish NAME publishes; give --publish too")
    if args.publish is not None:
        from model_registry import InvalidName
        from model_registry.names import validate_name

        try:
            validate_name(args.publish)
        except InvalidName as exc:
            return error(f"--publish: {exc}")
    import torch

    from training.train import train
    from training.user_data import DataError

    torch.set_num_threads(args.threads)
    from training.run_state import RunStateError

    placement = {}
    if args.family in DEVICE_FAMILIES:
        from training import devices

        try:    # before the old run folder goes: a machine that cannot train so changes nothing
            device = devices.resolve(args.device)
            devices.check(device, args.precision)
        except DeviceError as exc:
            return error(str(exc))
        placement = {"device": device, "precision": args.precision, "tensorboard": args.tensorboard}
        if args.device != "cpu":      # auto or cuda: say what it became
            print(f"training on {devices.describe(device)} in {args.precision}", flush=True)
    ddp = None
    if distributed.in_rank():           # join the other ranks (gloo, or nccl on cuda:LOCAL_RANK)
        try:
            ddp = distributed.init(placement.get("device", torch.device("cpu")))
        except distributed.DistributedError as exc:
            return error(str(exc))
    elif args.nproc > 1 or args.nnodes > 1:     # the launcher: this command again in every rank, under torchrun
        return _launch_ranks(args, placement, error)
    run_dir = Path(args.out) / RUN_FOLDER
    if args.family in LOOP_FAMILIES and not args.resume and run_dir.exists() and (ddp is None or ddp.is_writer):
        shutil.rmtree(run_dir)          # a new run into --out: its files are overwritten, the old run's too
    if ddp is not None:
        ddp.barrier()                   # rank 0 has removed the old run folder before any rank looks at it
    try:
        if args.family in LOOP_FAMILIES:
            metrics = train(args.family, run.preset, args.out, data=args.data, data_options=data_options,
                            train_cfg=run.train_config(), model_config=run.model_config(), run_dir=run_dir,
                            resume=args.resume, **placement,
                            **({} if ddp is None else {"ddp": ddp, "progress": ddp.is_writer}))
        else:
            metrics = train(args.family, run.preset, args.out, data=args.data, data_options=data_options)
    except DataError as exc:            # bad data: named before anything trains
        return error(str(exc))
    except RunStateError as exc:        # --resume without a run to resume, or with another config
        return error(f"--resume: {exc}")
    except distributed.DistributedError as exc:     # --nproc beyond what the data allows: before training
        return error(str(exc))
    if ddp is not None and not ddp.is_writer:       # rank 0 alone reports, writes and publishes
        return 0
    print(f"checkpoint written to {args.out}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if args.publish is not None:
        from model_registry.cli import resolve_root

        from model_registry import RegistryError
        from training.export import ParityError

        root = resolve_root(args.registry)
        try:
            version, manifest = publish_checkpoint(root, args.publish, args.out, alias=args.alias)
        except (ParityError, RegistryError) as exc:    # nothing published; the checkpoint stays in --out
            print(f"zooserve train: error: not published: {_one_line(exc)} (checkpoint kept in {args.out})",
                  file=sys.stderr)
            return 1
        for report in manifest.parity:
            print(f"{report.format}: max abs error vs eager {report.max_abs_error:.3g} (tolerance {report.tolerance})")
        signature = ", ".join(f"{t.name} {t.datatype} {t.shape}" for t in manifest.signature.inputs)
        print(f"published {args.publish} version {version} to {root} (input {signature}; "
              f"{len(manifest.labels)} classes)")
        if args.alias is not None:
            print(f"alias {args.alias} of {args.publish} -> version {version}")
    return 0


def _rank_argv(args: argparse.Namespace) -> list[str]:
    """The `zooserve train` command line that gave `args`, less the launcher's options (LAUNCH_OPTIONS):
    what every rank runs."""
    argv = ["train"]
    for action in _TRAIN_PARSER["train"]._actions:
        if action.dest in LAUNCH_OPTIONS or action.dest == "help" or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:       # the family
            argv.append(str(value))
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            argv += [a for v in value or [] for a in (flag, str(v))]
        elif value is not None and value != action.default:
            argv += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def _launch_ranks(args: argparse.Namespace, placement: dict, error) -> int:
    """`--nproc N`: run this command in N ranks under torchrun (training/distributed.py); the exit
    status is theirs, a failure reported in one line."""
    import torch

    from training import distributed

    device = placement.get("device", torch.device("cpu"))
    if device.type == "cuda" and torch.cuda.device_count() < args.nproc:
        return error(f"--nproc {args.nproc} with --device {args.device}: one GPU per process, and torch sees "
                     f"{torch.cuda.device_count()}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = (f"{args.nproc} process(es) on each of {args.nnodes} machines, this one --node-rank {args.node_rank}"
             if args.nnodes > 1 else f"{args.nproc} processes")
    print(f"training {args.family} data-parallel with torchrun: {where} ({backend})", flush=True)
    return distributed.launch(_rank_argv(args), args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                              rdzv_endpoint=args.rdzv_endpoint, threads=args.threads)


def _export(args: argparse.Namespace) -> int:
    if args.serve_format not in args.formats:     # one line, as argparse would, not export.package's traceback
        print(f"zooserve export: error: --serve-format {args.serve_format} is not among --formats "
              f"({' '.join(args.formats)}): add it to --formats or choose one of them", file=sys.stderr)
        return 2
    import torch

    from training import export

    torch.set_num_threads(args.threads)
    manifest = export.package(args.checkpoint, args.out, tuple(args.formats), args.serve_format)
    for report in manifest.parity:
        print(f"{report.format}: max abs error vs eager {report.max_abs_error:.3g} (tolerance {report.tolerance})")
    print(f"publishable folder written to {args.out}")
    return 0


def demo(registry_root: str | Path, threads: int = 1, progress: bool = True,
         only: list[str] | None = None, missing: bool = False) -> dict[str, int]:
    """Train, export and publish the demo models one after the other in this process (alias `stable`
    on each); returns name -> version. `missing`: only those the registry has no version of. A model
    that fails does not stop the others; DemoFailed (with what did publish) is raised at the end."""
    import torch

    torch.set_num_threads(threads)
    published, failures = {}, {}
    for name in demo_names(registry_root, only, missing):
        family, preset = DEMO_FAMILIES[name]
        print(f"[demo] started    {name} ({family}, preset {preset})", flush=True)
        started = time.monotonic()
        try:
            published[name], metrics = publish_demo_model(registry_root, name, progress=progress)
        except Exception as exc:  # noqa: BLE001 - one model's failure is reported, the others go on
            failures[name] = _one_line(exc)
            print(f"[demo] failed     {name} after {time.monotonic() - started:.0f} s: {failures[name]}", flush=True)
            continue
        print(f"[demo] published  {name} version {published[name]} in {time.monotonic() - started:.0f} s: "
              f"{quality(metrics)}", flush=True)
    if failures:
        raise DemoFailed(published, failures)
    return published


class DemoFailed(RuntimeError):
    """Some demo models failed; `published` holds the others, `failures` name -> reason."""

    def __init__(self, published: dict[str, int], failures: dict[str, str]):
        super().__init__("demo models not published: " + "; ".join(f"{n}: {r}" for n, r in failures.items()))
        self.published, self.failures = published, failures


class DemoStopped(Exception):
    """A signal (SIGTERM, SIGHUP) stopped `demo_parallel`; its workers are gone."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def demo_names(registry_root: str | Path, only: list[str] | None = None, missing: bool = False) -> list[str]:
    """The demo models to train, in DEMO_MODELS order: those in `only` (all by default), less those
    the registry has already when `missing`."""
    names = [name for name, _, _ in DEMO_MODELS if only is None or name in only]
    if missing:
        from model_registry import Registry

        have = set(Registry(registry_root).models())
        names = [name for name in names if name not in have]
    return names


def publish_demo_model(registry_root: str | Path, name: str, progress: bool = False) -> tuple[int, dict[str, float]]:
    """Train, export (with parity checks) and publish one demo model, alias `stable` on the new
    version; returns (version, training metrics). Nothing reaches the registry before it all passed."""
    from training.train import train

    family, preset = DEMO_FAMILIES[name]
    with tempfile.TemporaryDirectory(prefix=f"zooserve-{name}-") as tmp:
        ckpt = Path(tmp) / "checkpoint"
        metrics = train(family, preset, ckpt, progress=progress)
        version, _ = publish_checkpoint(registry_root, name, ckpt, alias="stable")
    return version, metrics


def publish_checkpoint(registry_root: str | Path, name: str, checkpoint_dir: str | Path,
                       alias: str | None = None):
    """Export a checkpoint (ONNX and TorchScript, each checked against eager: export.package) and
    publish it as a new version of `name`, then point `alias` at it when given; returns (version,
    manifest). A failed export (ParityError) publishes nothing."""
    from model_registry import Registry
    from training import export

    registry = Registry(registry_root)
    with tempfile.TemporaryDirectory(prefix=f"zooserve-{name}-") as tmp:
        pkg = Path(tmp) / "package"
        manifest = export.package(checkpoint_dir, pkg)
        version = registry.publish(name, pkg)
    if alias is not None:
        registry.set_alias(name, alias, version)
    return version, manifest


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        return os.cpu_count() or 1


def demo_parallel(registry_root: str | Path, names: list[str], jobs: int | None = None, threads: int | None = None,
                  log_dir: str | Path | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """Train the demo models `names` side by side, each in its own worker process (`jobs` at a time,
    default one per usable core), and publish each as soon as it passes. Prints one line when a
    model starts and one when it is published (version, seconds, quality) or fails (the reason; its
    worker's whole output stays in `log_dir`). A failed model does not stop the others. Returns
    (name -> version, name -> reason). SIGTERM/SIGHUP (DemoStopped) and Ctrl-C (KeyboardInterrupt)
    stop the workers before the exception leaves.

    `threads`: torch intra-op threads per worker, default 1: parallelism comes from the workers, one
    per core. The demo models are too small for intra-op threads to pay: mlp-digits took 19 s (19 s
    CPU) with 2 threads against 6 s (6 s CPU) with 1, on 2 cores with other work running."""
    root = Path(registry_root).resolve()
    cores = usable_cores()
    jobs = max(1, min(jobs or cores, len(names))) if names else 1
    own_log_dir = log_dir is None
    log_dir = Path(tempfile.mkdtemp(prefix="zooserve-demo-")) if own_log_dir else Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    queue, running = list(names), {}
    published, failures = {}, {}
    began = time.monotonic()
    print(f"[demo] training {len(names)} model{'s' if len(names) != 1 else ''} into {root}, {jobs} at a time "
          f"({cores} usable cores); worker logs in {log_dir}", flush=True)
    restore = _trap_stop_signals()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                name = queue.pop(0)
                running[name] = _Worker.start(root, name, threads or 1, log_dir)
            time.sleep(0.2)
            for name, worker in list(running.items()):
                if worker.proc.poll() is None:
                    continue
                del running[name]
                seconds = time.monotonic() - worker.started
                result = worker.result()
                if worker.proc.returncode == 0 and "version" in result:
                    published[name] = result["version"]
                    worker.log_path.unlink(missing_ok=True)
                    cpu = f", {result['cpu_seconds']:.0f} s CPU" if "cpu_seconds" in result else ""
                    print(f"[demo] published  {name} version {result['version']} in {seconds:.0f} s{cpu}: "
                          f"{result['quality']}", flush=True)
                else:
                    failures[name] = result.get("error") or _exit_reason(worker.proc.returncode)
                    print(f"[demo] failed     {name} after {seconds:.0f} s: {failures[name]} "
                          f"(log: {worker.log_path})", flush=True)
    except BaseException as exc:
        if running:
            # stopping: a second signal (the Makefile's trap and its final kill, a second Ctrl-C)
            # must not cut the wait for the workers short and leave them behind
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                _set_handler(sig, signal.SIG_IGN)
            what = exc.args[0] if isinstance(exc, DemoStopped) else type(exc).__name__
            _stop_workers(running.values())
            for worker in running.values():          # stopped on purpose: nothing in its log to keep
                worker.log_path.unlink(missing_ok=True)
            from model_registry import Registry

            have = set(Registry(root).models())
            lost = [name for name in [*running, *queue] if name not in have]
            print(f"[demo] stopped ({what}): " + (f"{', '.join(lost)} not published" if lost else "all published"),
                  flush=True)
        raise
    finally:
        _stop_workers(running.values())
        restore()
        if own_log_dir and not any(log_dir.iterdir()):
            log_dir.rmdir()
    total = time.monotonic() - began
    print(f"[demo] done in {total // 60:.0f} min {total % 60:02.0f} s: {len(published)} published"
          + (f", {len(failures)} failed ({', '.join(failures)}; logs in {log_dir})" if failures else ""), flush=True)
    return published, failures


# the command of a worker process (tests put a stand-in here)
WORKER = [sys.executable, "-m", "training.cli"]


class _Worker:
    """One `python -m training.cli --demo-worker NAME` process: trains, exports, publishes one model."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, result_path: Path):
        self.name, self.proc = name, proc
        self.log_path, self.result_path = log_path, result_path
        self.started = time.monotonic()

    @classmethod
    def start(cls, root: Path, name: str, threads: int, log_dir: Path) -> "_Worker":
        family, preset = DEMO_FAMILIES[name]
        log_path, result_path = log_dir / f"{name}.log", log_dir / f"{name}.result.json"
        result_path.unlink(missing_ok=True)
        # OpenMP/MKL size their pools from these at import: no more threads than torch is told to use
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*WORKER, "--demo-worker", name, "--registry", str(root), "--threads", str(threads),
                 "--result", str(result_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"[demo] started    {name} ({family}, preset {preset}, {threads} torch "
              f"thread{'s' if threads > 1 else ''})", flush=True)
        return cls(name, proc, log_path, result_path)

    def result(self) -> dict:
        try:
            result = json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return {}
        self.result_path.unlink(missing_ok=True)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()     # the worker exits through its finally blocks (temporary folders)

    def wait_or_kill(self, timeout_s: float = 10.0) -> None:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.result_path.unlink(missing_ok=True)


def _stop_workers(workers) -> None:
    workers = list(workers)
    for worker in workers:
        worker.stop()
    for worker in workers:
        worker.wait_or_kill()


def _set_handler(sig: int, handler) -> None:
    try:
        signal.signal(sig, handler)
    except ValueError:           # not the main thread
        pass


def _trap_stop_signals():
    """SIGTERM and SIGHUP raise DemoStopped in the main thread (so that the workers are stopped);
    returns what puts the previous handlers (SIGINT's too) back. Elsewhere than the main thread: nothing."""
    def stop(signum, frame):
        raise DemoStopped(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, stop)
    except ValueError:           # not the main thread: the caller handles its signals
        return lambda: None
    return lambda: [_set_handler(sig, handler) for sig, handler in previous.items() if handler is not None]


def _exit_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"worker killed by {signal.Signals(-returncode).name}"
    return f"worker exited with code {returncode} and no result"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _demo_worker(argv: list[str]) -> int:
    """`python -m training.cli --demo-worker NAME ...`: one demo model, its result as JSON in --result."""
    p = argparse.ArgumentParser(prog="python -m training.cli")
    p.add_argument("--demo-worker", required=True, choices=list(DEMO_FAMILIES))
    p.add_argument("--registry", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    # exit (not die) on SIGTERM: temporary folders and a half-staged publish are removed on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import resource

    import torch

    torch.set_num_threads(args.threads)
    try:
        version, metrics = publish_demo_model(args.registry, args.demo_worker, progress=False)
        result, code = {"version": version, "quality": quality(metrics), "metrics": metrics}, 0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_seconds"] = usage.ru_utime + usage.ru_stime   # all of its threads: wall time less the waits
    except Exception as exc:  # noqa: BLE001 - reported to the parent in one line, the traceback in the log
        traceback.print_exc()
        result, code = {"error": _one_line(exc)}, 1
    tmp = Path(args.result + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.result)
    return code


def quality(metrics: dict[str, float]) -> str:
    """One line on how good a freshly trained demo model is, whatever its family measures."""
    if "test_accuracy" in metrics:
        return f"test accuracy {metrics['test_accuracy']:.3f}"
    if "test_mae" in metrics:
        return f"test MAE {metrics['test_mae']:.3f} (last-value baseline {metrics['naive_test_mae']:.3f})"
    if "val_perplexity" in metrics:
        return (f"held-out perplexity {metrics['val_perplexity']:.1f} "
                f"(unigram baseline {metrics['unigram_val_perplexity']:.1f})")
    # generative families, judged by a digits classifier (training/generative.py)
    judged = {"judge_agreement": "judge agrees with the asked digit on {:.1%} of samples",
              "judge_agreement_ddim50": "judge agrees with the asked digit on {:.1%} of DDIM-50 samples",
              "judge_entropy": "judged-label entropy {:.2f} nats (max ln 10 = 2.30)",
              "test_neg_elbo": "test -ELBO {:.2f} nats"}
    parts = [text.format(metrics[key]) for key, text in judged.items() if key in metrics]
    return "; ".join(parts) or ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _demo(args: argparse.Namespace) -> int:
    from model_registry.cli import resolve_root

    root = resolve_root(args.registry)
    names = demo_names(root, args.only, args.missing)
    if not names:
        print(f"[demo] every demo model asked for is in {root} already", flush=True)
        return 0
    try:
        _, failures = demo_parallel(root, names, jobs=args.jobs, threads=args.threads)
    except DemoStopped as exc:
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130
    return 1 if failures else 0


# what each family is, for `zooserve train --help` (FAMILIES holds the modules)
FAMILY_HELP = {
    "mlp": "digits classifier, or your own table (--data)",
    "resnet": "digits classifier, or your own image folder (--data)",
    "decoder": "Llama-style language model (tiny-moe: mixture of experts), or on your text (--data)",
    "mamba": "Mamba-1 language model, or on your text (--data)",
    "rnn_lm": "character-level RNN/GRU/LSTM language model, or on your text (--data)",
    "rnn": "RNN/GRU/LSTM CO2 forecaster, or your own series (--data)",
    "gan": "class-conditional digits sampler, or on your image folder (--data)",
    "vae": "digits sampler (unconditional), or on your image folder (--data)",
    "diffusion": "class-conditional digits sampler (UNet, DDPM/DDIM), or on your image folder (--data)",
}


def _help_formatter():
    from model_registry.cli import HelpFormatter

    class TrainHelp(HelpFormatter):
        """`zooserve train --help` lists each family's presets (read when help is asked for, not when
        the parser is built: `zooserve serve` builds it too)."""

        def _get_help_string(self, action: argparse.Action) -> str | None:
            if action.dest == "preset":
                known = "; ".join(f"{family}: {', '.join(preset_names(family))}" for family in sorted(FAMILIES))
                return f"{action.help}. Presets: {known}"
            return action.help

    return HelpFormatter, TrainHelp


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `export` and `demo` to the zooserve CLI."""
    from model_registry.cli import REGISTRY_HELP

    plain, train_help = _help_formatter()
    families = "; ".join(f"{family}: {FAMILY_HELP.get(family, '')}" for family in sorted(FAMILIES))
    p = sub.add_parser(
        "train", help="train a family preset into a checkpoint folder", formatter_class=train_help,
        description="Train one model family at a preset size on its bundled data (digits, Shakespeare, CO2) "
                    "and write a checkpoint folder (config.json, model.safetensors, meta.json), the input of "
                    "`zooserve export`; prints the held-out metrics. Tiny presets train in seconds (mlp) to a "
                    f"few minutes on a CPU. Families: {families}.\n"
                    "Your own data: --data names a table (.csv, .parquet, .jsonl: numeric feature "
                    "columns and a label column) for mlp, an image folder (one subfolder per class) for "
                    "resnet and the samplers gan, vae and diffusion (gan and diffusion are conditioned on its "
                    "classes; one class folder is enough for them), a csv series for rnn (--value-column, --time-column), text (.txt, a folder of .txt, "
                    ".jsonl with \"text\") for decoder, mamba and rnn_lm (--tokenizer); its split, sha256, rows and "
                    "class names go to the lineage. The model takes raw values: table rows as they are (standardised "
                    "inside the model with the training split's mean and std), images as 0-255 pixels at "
                    "--image-size. Bad data stops before training with one line naming the file, row or column "
                    "(exit 2). --set/--config/--print-config tune the run and --resume continues a killed one "
                    "(mlp, resnet, rnn, decoder, mamba, rnn_lm, gan, vae, diffusion; the run is kept in OUT/run). "
                    "--publish exports (parity checked, as `zooserve export`) and publishes a new version. "
                    "Examples:\n"
                    "  zooserve train mlp --preset tiny --out runs/mlp\n"
                    "  zooserve train mlp --data flowers.csv --label-column species --out runs/flowers "
                    "--publish flowers\n"
                    "  zooserve train resnet --data photos/ --image-size 32 --out runs/photos --publish photos\n"
                    "  zooserve train diffusion --data photos/ --image-size 16 --out runs/gen --set epochs=200 "
                    "--publish photos-diffusion\n"
                    "  zooserve train rnn --data sales.csv --time-column date --out runs/sales --set epochs=30\n"
                    "  zooserve train decoder --data my_texts/ --out runs/mytext\n"
                    "  zooserve train decoder --out runs/dec --set n_layer=2 --set steps=400 --set patience=3\n"
                    "  zooserve train decoder --out runs/dec2 --nproc 2   # data-parallel, 2 processes (torchrun)")
    p.add_argument("family", choices=sorted(FAMILIES), help="model family (see above)")
    p.add_argument("--preset", default=None, help="named size from the family's PRESETS (default tiny, or the "
                   "--config file's)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="checkpoint folder to write (required; created if missing; its files are overwritten). "
                        "mlp, resnet, decoder, mamba, rnn_lm, gan, vae and diffusion also keep their run there: DIR/run/metrics.jsonl "
                        "(a line per step and per validation) and run-state checkpoints for --resume")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one field of the model config or the training config (repeatable; "
                        "`model.`/`train.` prefix where a name is ambiguous), e.g. --set hidden=256 --set lr=1e-3 "
                        "(mlp, resnet, decoder, mamba, rnn_lm, gan, vae, diffusion; default: none)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a .yaml or .json file with `model:` and `train:` mappings (the --print-config format; "
                        "--set wins over it; default: none)")
    p.add_argument("--print-config", action="store_true",
                   help="print the final configuration (preset, --config, --set resolved) and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (killed, even by SIGKILL): same "
                        "weights as an uninterrupted run; refused if the config or data changed (mlp, resnet, "
                        "decoder, mamba, rnn_lm, gan, vae, diffusion)")
    p.add_argument("--threads", metavar="N", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the model trains (every family): cpu; cuda (refused where torch sees no CUDA device); "
                        "auto (cuda when torch sees one, else cpu). The checkpoint is saved from CPU tensors either "
                        "way and exports and serves on a CPU; judging and test metrics run on the CPU (default cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or bf16/fp16 autocast on CUDA (fp16 with a gradient scaler); weights, optimiser and "
                        "checkpoint stay fp32; refused on the CPU, which trains in fp32 (default fp32)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files, the scalars of DIR/run/metrics.jsonl, into "
                        "DIR/run/tensorboard (needs the tensorboard package; default off)")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="train on your own data instead of the bundled set (default: the bundled set): a table "
                        "file (.csv, .parquet, .jsonl) for mlp, an image folder (one subfolder per class) for resnet, "
                        "gan, vae and diffusion, "
                        "a csv series (one row per step) for rnn, text (.txt, a folder of .txt, .jsonl with a "
                        "\"text\" field) for decoder, mamba and rnn_lm")
    p.add_argument("--label-column", metavar="NAME", default=None,
                   help="mlp --data: the table's label column, strings or whole numbers (default: label); "
                        "every other column is a numeric feature")
    p.add_argument("--image-size", metavar="N", type=_positive, default=None,
                   help="resnet, gan, vae, diffusion --data: images are resized to N x N (default: the first "
                        "image's larger side, at most 64; for gan, vae, diffusion a multiple of 4, rounded down, "
                        "at most 32)")  # training.user_data.MAX_DEFAULT_IMAGE_SIZE, MAX_GENERATIVE_IMAGE_SIZE
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="resnet, gan, vae, diffusion --data: 1 (grey) or 3 (RGB) channels (default: 1 if every "
                        "image is greyscale, else 3)")
    p.add_argument("--value-column", metavar="NAME", default=None,
                   help="rnn --data: the csv column to forecast (default: the only numeric column)")
    p.add_argument("--time-column", metavar="NAME", default=None,
                   help="rnn --data: a column of numbers or dates to sort the rows by, each distinct "
                        "(default: none, the file's order)")
    p.add_argument("--tokenizer", metavar="FILE", default=None,
                   help="decoder/mamba --data: a local byte-level BPE tokenizer.json to use instead of training one "
                        "on the text (default: trained on the training split)")
    p.add_argument("--publish", metavar="NAME", default=None,
                   help="after training, export (parity checked) and publish the checkpoint as a new version of "
                        "NAME (default: not published)")
    p.add_argument("--alias", metavar="ALIAS", default=None,
                   help="with --publish: point the registry alias ALIAS (e.g. stable) at the new version "
                        "(default: no alias set)")
    p.add_argument("--registry", metavar="DIR", default=None, help=f"{REGISTRY_HELP}; where --publish publishes")
    p.add_argument("--nproc", metavar="N", type=_positive, default=1,
                   help="train data-parallel in N processes on this machine under torchrun (torch.distributed.run; "
                        "DistributedDataParallel, gloo on the CPU, nccl with --device cuda, one GPU per process): "
                        "each rank trains on its shard of the data, batch_size per rank; rank 0 writes --out and "
                        "publishes; --resume needs the same N (mlp, resnet, decoder, mamba, rnn_lm; default 1: "
                        "one process, no torchrun)")
    p.add_argument("--nnodes", metavar="N", type=_positive, default=1,
                   help="with several machines: how many; run the same command on each with its --node-rank "
                        "(default 1)")
    p.add_argument("--node-rank", metavar="R", type=int, default=0,
                   help="with --nnodes: this machine's place, 0..N-1; rank 0 (which writes --out) is on "
                        "--node-rank 0 (default 0)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", default=None,
                   help="with --nnodes: an address of the --node-rank 0 machine that every machine reaches "
                        "(torchrun's static rendezvous; default: none)")
    _TRAIN_PARSER["train"] = p
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX/TorchScript and check parity with eager", formatter_class=plain,
        description="Export a checkpoint to ONNX and TorchScript, check each against the eager model (max abs "
                    "error against a tolerance, printed) and write a publishable folder: the input of "
                    "`zooserve registry publish`. A format off by more than its tolerance stops the export "
                    "with an error. Example:\n"
                    "  zooserve export runs/mlp --out runs/mlp-pkg")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint folder (from `zooserve train --out`) or a registry version folder "
                        "(REGISTRY/NAME/VERSION)")
    p.add_argument("--out", metavar="DIR", required=True, help="publishable folder to write")
    p.add_argument("--formats", nargs="+", default=["onnx", "torchscript"], choices=FORMATS,
                   help="artifacts to export (default: onnx torchscript)")
    p.add_argument("--serve-format", default="onnx", choices=FORMATS,
                   help="which artifact the server runs; one of --formats (default onnx)")
    p.add_argument("--threads", metavar="N", type=int, default=1, help="torch intra-op threads (default 1)")
    p.set_defaults(func=_export)

    names = [m[0] for m in DEMO_MODELS]
    p = sub.add_parser(
        "demo", help="train, export and publish every demo model (tiny presets), side by side",
        formatter_class=plain,
        description="Train, export (parity checked) and publish the demo models into the registry, several at "
                    "once, each in its own process; each new version gets the alias `stable`. One line per model "
                    "as it starts and as it is published or fails; a failure does not stop the others (exit 1 "
                    "at the end). All 12 take about 6 minutes on 2 idle cores; mlp-digits alone a few seconds. "
                    "Without --missing, a model the registry has already is trained again and published as a "
                    "new version. A running `zooserve serve` on the same registry serves each one within a poll. "
                    f"Demo models: {', '.join(names)}. Examples:\n"
                    "  zooserve demo --only mlp-digits resnet-digits\n"
                    "  zooserve demo --missing")
    p.add_argument("--registry", metavar="DIR", default=None, help=REGISTRY_HELP)
    p.add_argument("--jobs", metavar="N", type=_positive, default=None,
                   help="models trained at once, each in its own process (default: one per usable core)")
    p.add_argument("--threads", metavar="N", type=_positive, default=1,
                   help="torch intra-op threads per model (default 1: the demo models are too small to gain from more)")
    p.add_argument("--only", metavar="NAME", nargs="+", default=None, choices=names,
                   help="publish only these demo models (names above; default: all)")
    p.add_argument("--missing", action="store_true",
                   help="skip the demo models the registry has a version of already (what `make serve` runs)")
    p.set_defaults(func=_demo)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


if __name__ == "__main__":
    sys.exit(_demo_worker(sys.argv[1:]))
