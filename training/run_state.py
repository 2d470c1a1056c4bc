"""The run folder of a resumable training run: its run-state checkpoint and its metrics log.

A run folder holds:

- `run_state.json`: the commit point. Scalars and structure: position (epoch, batches done in
  it, optimiser steps), early-stopping counters, the LR scheduler's state, the optimiser's
  param groups and non-tensor state, which parameter index is which named parameter, the
  recorded configuration, how many bytes of metrics.jsonl the state covers, and the name and
  sha256 of its tensors file.
- `run_state.<seq>.safetensors`: the tensors: model weights, AdamW moments and step counts,
  the best weights so far, and the RNG states (uint8 tensors; the CUDA generator's too when the
  run is on a GPU). Always CPU tensors, whatever device the run is on: a run saved on a GPU
  resumes on a CPU-only machine.
- `metrics.jsonl`: one JSON object a line, flushed as written (MetricsLog).
- `tensorboard/` (optional): the same scalars as TensorBoard event files (MetricsLog's
  `tensorboard_dir`); rewritten from metrics.jsonl when a run resumes, so they never disagree.

RunFolder binds such a folder to the live objects of one training call (the shared loop's, the
token families', the GAN's): it starts or resumes the run, logs metrics and writes checkpoints.

Nothing here is pickled and nothing is unpickled: tensors go through safetensors, the rest
through JSON (Python's json, so a non-finite float is written as Infinity / NaN).

Atomicity: each file is written under a temporary name in the same folder, fsynced and then
`os.replace`d into place. The tensors file gets a fresh name for every save (`seq` counts
saves), and only then is `run_state.json` replaced to name it; superseded tensors files are
removed after that. A process killed at any moment therefore leaves `run_state.json` naming a
complete tensors file: the previous checkpoint, or the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from model_registry.store import fsync_dir

STATE = "run_state.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"   # the run folder's TensorBoard event files, when asked for
FORMAT = "zooserve.run_state/1"
# configuration keys that may change between a run and its resumption (they do not change results)
MAY_DIFFER = frozenset({"checkpoint_every"})


class RunStateError(ValueError):
    """A run folder cannot be resumed: missing or damaged state, or a different configuration."""


def _tensors_name(seq: int) -> str:
    return f"run_state.{seq:06d}.safetensors"


def _replace_atomically(tmp: Path, final: Path) -> None:
    """fsync the finished temporary file `tmp`, then rename it over `final` (same folder)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_ready(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists, other objects their str), as recorded."""
    return json.loads(json.dumps(value, default=str))


def config_differences(recorded: Any, current: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like configurations differ (keys in MAY_DIFFER are skipped)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(recorded) | set(current), key=str):
            if key in MAY_DIFFER:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in current:
                out.append(f"{where}: recorded {recorded[key]!r}, now absent")
            elif key not in recorded:
                out.append(f"{where}: not recorded, now {current[key]!r}")
            else:
                out += config_differences(recorded[key], current[key], where)
        return out
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        return [d for i, (r, c) in enumerate(zip(recorded, current)) for d in config_differences(r, c, f"{path}[{i}]")]
    return [] if recorded == current else [f"{path or '(config)'}: recorded {recorded!r}, now {current!r}"]


def tensor_fingerprint(tensors: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    """Shape, dtype and sha256 of each tensor (a training set's identity, recorded in the config)."""
    out = []
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
        out.append({"shape": list(t.shape), "dtype": str(t.dtype),
                    "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest()})
    return out


def _state_tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies where needed (safetensors refuses tensors sharing memory)."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[f"{prefix}{name}"] = t
    return out


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclasses.dataclass
class RunState:
    """Everything a run needs to continue exactly where a checkpoint left it.

    Position: `epoch` is the epoch in progress (or the next to start) and `batches_done` how many
    of its batches are done; `shuffle_state` is the shuffling generator's state at the start of
    `epoch`, so replaying the epoch's permutation and skipping `batches_done` batches restores
    the data order. `torch_rng_state` is the global CPU generator (dropout, noise) at the moment
    of the checkpoint."""

    config: dict[str, Any]                  # what the run was started with (compared on resume)
    model: dict[str, torch.Tensor]          # model.state_dict()
    optimizer: dict[str, Any]               # optimizer.state_dict()
    scheduler: dict[str, Any]               # lr_scheduler.state_dict() (JSON-ready: no closures)
    param_names: list[str]                  # optimizer parameter index -> model parameter name
    epoch: int
    batches_done: int
    step: int
    shuffle_state: torch.Tensor             # uint8
    torch_rng_state: torch.Tensor           # uint8
    best_loss: float
    best_weights: dict[str, torch.Tensor] | None
    bad_epochs: int
    last_loss: float
    metrics_offset: int                     # bytes of metrics.jsonl this state covers
    finished: bool = False
    result: dict[str, Any] | None = None    # the finished run's return value
    seq: int = 0                            # saves so far; names the tensors file
    # a recipe's own JSON-able counters beyond the fields above (training/lm.py: the recent train
    # losses behind its reported train_loss, the last validation loss, the best evaluation's step;
    # training/models/gan.py: its smoothed losses)
    extra: dict[str, Any] | None = None
    cuda_rng_state: torch.Tensor | None = None   # uint8; the CUDA generator of a run on a GPU (dropout)
    scaler: dict[str, Any] | None = None    # GradScaler.state_dict() of an fp16 run

    @staticmethod
    def exists(run_dir: str | os.PathLike) -> bool:
        return (Path(run_dir) / STATE).exists()

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write this state into `run_dir` atomically (see the module doc); returns run_state.json."""
        d = Path(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.seq += 1
        tensors, optimizer_json = self._split_tensors()
        name = _tensors_name(self.seq)
        tmp = d / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        _replace_atomically(tmp, d / name)
        record = {
            "format": FORMAT, "seq": self.seq, "tensors": name, "tensors_sha256": _sha256(d / name),
            "config": self.config,
            "position": {"epoch": self.epoch, "batches_done": self.batches_done, "step": self.step},
            "early_stopping": {"best_loss": self.best_loss, "bad_epochs": self.bad_epochs,
                               "has_best_weights": self.best_weights is not None},
            "last_loss": self.last_loss, "metrics_offset": self.metrics_offset,
            "optimizer": optimizer_json, "param_names": self.param_names, "scheduler": self.scheduler,
            "finished": self.finished, "result": self.result, "extra": self.extra, "scaler": self.scaler,
        }
        tmp_json = d / f".{STATE}.tmp"
        tmp_json.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        _replace_atomically(tmp_json, d / STATE)   # the commit point
        fsync_dir(d)
        for old in d.glob("run_state.*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return d / STATE

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunState:
        """Read the committed state of `run_dir` (RunStateError when there is none or it is damaged)."""
        d = Path(run_dir)
        if not (d / STATE).exists():
            raise RunStateError(f"{d} has no {STATE}: no run-state checkpoint to resume from")
        record = json.loads((d / STATE).read_text())
        if record.get("format") != FORMAT:
            raise RunStateError(f"{d / STATE}: format {record.get('format')!r}, expected {FORMAT!r}")
        path = d / record["tensors"]
        if not path.exists() or _sha256(path) != record["tensors_sha256"]:
            raise RunStateError(f"{path}: missing, or not the tensors {STATE} recorded (sha256 differs)")
        tensors = load_file(str(path))
        position, stopping = record["position"], record["early_stopping"]
        return cls(
            config=record["config"], model=_with_prefix(tensors, "model."),
            optimizer=cls._join_optimizer(record["optimizer"], _with_prefix(tensors, "optimizer.")),
            scheduler=record["scheduler"], param_names=record["param_names"],
            epoch=position["epoch"], batches_done=position["batches_done"], step=position["step"],
            shuffle_state=tensors["rng.shuffle"], torch_rng_state=tensors["rng.torch"],
            best_loss=stopping["best_loss"], bad_epochs=stopping["bad_epochs"],
            best_weights=_with_prefix(tensors, "best.") if stopping["has_best_weights"] else None,
            last_loss=record["last_loss"], metrics_offset=record["metrics_offset"],
            finished=record["finished"], result=record["result"], seq=record["seq"],
            extra=record.get("extra"),   # absent from states written before the field existed
            # both absent from states saved before device and precision were configurable
            cuda_rng_state=tensors.get("rng.cuda"), scaler=record.get("scaler"),
        )

    def check_config(self, current: dict[str, Any], run_dir: str | os.PathLike = "the run folder") -> None:
        """Refuse (RunStateError naming each difference) when `current` is not the recorded config."""
        diffs = config_differences(self.config, json_ready(current))
        if diffs:
            raise RunStateError(f"cannot resume {run_dir}: the configuration differs from the recorded one: "
                                + "; ".join(diffs) + ". Resume with the same configuration, or start a new run folder.")

    def check_parameters(self, model: torch.nn.Module) -> None:
        names = [name for name, _ in model.named_parameters()]
        if names != self.param_names:
            first = next((i for i, (a, b) in enumerate(zip(names, self.param_names)) if a != b),
                         min(len(names), len(self.param_names)))
            raise RunStateError(f"the model's parameters differ from the recorded ones: {len(names)} now, "
                                f"{len(self.param_names)} recorded, first difference at index {first}")

    def _split_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the tensors for safetensors, the optimizer's non-tensor rest for JSON)."""
        tensors = _state_tensors("model.", self.model)
        if self.best_weights is not None:
            tensors.update(_state_tensors("best.", self.best_weights))
        tensors["rng.shuffle"] = self.shuffle_state.detach().cpu().contiguous()
        tensors["rng.torch"] = self.torch_rng_state.detach().cpu().contiguous()
        if self.cuda_rng_state is not None:
            tensors["rng.cuda"] = self.cuda_rng_state.detach().cpu().contiguous()
        state_json: dict[str, dict[str, Any]] = {}
        for index, per_param in self.optimizer["state"].items():
            state_json[str(index)] = {}
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    state_json[str(index)][key] = value
        return tensors, {"param_groups": self.optimizer["param_groups"], "state": state_json}

    @staticmethod
    def _join_optimizer(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in record["state"].items()}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in record["param_groups"]]
        return {"state": state, "param_groups": groups}


class MetricsLog:
    """`run_dir/metrics.jsonl`, appended one flushed JSON line a record.

    `commit()` fsyncs the log and returns the byte offset a run-state checkpoint records; a
    resumed run opens the log with that offset and everything after it (lines written after the
    checkpoint, by the run that was killed) is cut off, so no step appears twice.

    `tensorboard_dir` (optional; the run folder's TENSORBOARD): every numeric field of every
    record also goes to TensorBoard event files there (TensorBoardLog), so one `write` feeds both."""

    def __init__(self, run_dir: str | os.PathLike, keep_bytes: int = 0, *,
                 tensorboard_dir: str | os.PathLike | None = None):
        path = Path(run_dir) / METRICS
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        if size < keep_bytes:
            raise RunStateError(f"{path} has {size} bytes but its run-state checkpoint covers {keep_bytes}")
        self._file = open(path, "r+b" if path.exists() else "w+b")
        kept = self._file.read(keep_bytes) if tensorboard_dir is not None else b""
        self._file.truncate(keep_bytes)
        self._file.seek(keep_bytes)
        self._tensorboard = None
        if tensorboard_dir is not None:
            try:
                records = [json.loads(line) for line in kept.decode().splitlines() if line.strip()]
                self._tensorboard = TensorBoardLog(tensorboard_dir, records)
            except BaseException:
                self._file.close()
                raise

    def write(self, **record: Any) -> None:
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()
        if self._tensorboard is not None:
            self._tensorboard.write(record)

    def commit(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tensorboard is not None:
            self._tensorboard.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class TensorBoardLog:
    """metrics.jsonl's scalars as TensorBoard event files in `directory` (torch.utils.tensorboard,
    which needs the `tensorboard` package): each numeric field of a record (bools and strings are
    not scalars) becomes the scalar of that name at the record's `step` (its index in the log
    when it has no integer `step`).

    Opening replaces the event files already there with `records` (the metrics.jsonl lines a run
    keeps): a resumed run cut the lines its killed predecessor wrote after its checkpoint, and
    TensorBoard would otherwise show those steps twice."""

    FLUSH_SECS = 5   # events reach the files at least this often, for someone watching the run live

    def __init__(self, directory: str | os.PathLike, records: list[dict[str, Any]] = ()):
        from torch.utils.tensorboard import SummaryWriter

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("events.out.tfevents.*"):
            old.unlink()
        self._writer = SummaryWriter(log_dir=str(d), flush_secs=self.FLUSH_SECS)
        self._index = 0
        for record in records:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            step = self._index
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)
        self._index += 1

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RunFolder:
    """A run folder bound to the live objects of one training call: starts or resumes the run, logs
    metrics, writes run-state checkpoints.

    `optimizer`: anything with state_dict() and load_state_dict() (the GAN passes its two optimisers
    as one); `scheduler`: None for a recipe without one (its state is saved as {}). `shuffle`: the
    CPU generator behind the data order, whose state a checkpoint records. `writer=False`: a
    distributed rank other than 0, which only reads the folder (to resume): its start, log and save
    write nothing."""

    def __init__(self, run_dir: str | os.PathLike, config: dict[str, Any], model: torch.nn.Module,
                 optimizer: Any, scheduler: Any, shuffle: torch.Generator,
                 scaler: torch.amp.GradScaler | None = None, device: torch.device = torch.device("cpu"),
                 tensorboard: bool = False, writer: bool = True):
        self.run_dir, self.config = Path(run_dir), json_ready(config)
        self.model, self.optimizer, self.scheduler, self.shuffle = model, optimizer, scheduler, shuffle
        self.scaler, self.device, self.writer = scaler, device, writer
        self.tensorboard_dir = self.run_dir / TENSORBOARD if tensorboard else None
        self.param_names = [name for name, _ in model.named_parameters()]
        self.metrics: MetricsLog | None = None
        self.seq = 0

    def start(self) -> None:
        """Begin a new run (RunStateError when the folder already holds one)."""
        if not self.writer:
            return
        if RunState.exists(self.run_dir):
            raise RunStateError(f"{self.run_dir} already holds a run ({STATE}): resume it, "
                                "or start the run in a new folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.run_dir)
        self.metrics = MetricsLog(self.run_dir, tensorboard_dir=self.tensorboard_dir)

    def resume(self) -> RunState:
        """Load the last checkpoint into the model and, unless the run finished, into the optimiser,
        scheduler, scaler, shuffling generator and torch's RNGs. Returns the state, from which the
        caller restores its own counters (position, early stopping, `extra`)."""
        state = RunState.load(self.run_dir)
        state.config.setdefault("precision", "fp32")   # a run recorded before precision was configurable
        state.check_config(self.config, self.run_dir)
        state.check_parameters(self.model)
        if self.writer:
            clean_temporaries(self.run_dir)
            self.metrics = MetricsLog(self.run_dir, keep_bytes=state.metrics_offset,
                                      tensorboard_dir=self.tensorboard_dir)
        self.seq = state.seq
        self.model.load_state_dict(state.model)   # the saved CPU tensors are copied onto the model's device
        if state.finished:
            self.model.eval()
            return state
        self.optimizer.load_state_dict(state.optimizer)   # casts the moments onto each parameter's device
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        self.shuffle.set_state(state.shuffle_state)
        torch.set_rng_state(state.torch_rng_state)
        if self.device.type == "cuda" and state.cuda_rng_state is not None:   # dropout on the GPU draws from it
            torch.cuda.set_rng_state(state.cuda_rng_state, self.device)
        return state

    def log(self, **record: Any) -> None:
        if self.writer:
            self.metrics.write(**record)

    def save(self, *, step: int, epoch: int = 0, batches_done: int | None = None,
             shuffle_state: torch.Tensor | None = None, best_loss: float = math.inf,
             best_weights: dict[str, torch.Tensor] | None = None, bad_epochs: int = 0, last_loss: float = math.nan,
             extra: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> None:
        """Checkpoint the run as it stands after `step` optimiser steps: `batches_done` (default
        `step`, for a recipe without epochs) batches into `epoch`, whose data order `shuffle_state`
        gives (default: the shuffling generator as it stands, i.e. the next draw); `result` marks the
        run finished. The model, optimiser, scheduler, scaler and torch's RNGs are read live."""
        if not self.writer:
            return
        state = RunState(
            config=self.config, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else {},
            param_names=self.param_names, epoch=epoch, batches_done=step if batches_done is None else batches_done,
            step=step, shuffle_state=self.shuffle.get_state() if shuffle_state is None else shuffle_state,
            torch_rng_state=torch.get_rng_state(),
            cuda_rng_state=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            best_loss=best_loss, best_weights=best_weights, bad_epochs=bad_epochs, last_loss=last_loss,
            metrics_offset=self.metrics.commit(), finished=result is not None, result=result, seq=self.seq,
            extra=extra)
        state.save(self.run_dir)
        self.seq = state.seq

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Create or replace `path` atomically: `write(tmp)` writes the whole file under a temporary
    name in the same folder (`.<name>.tmp`, which clean_temporaries removes), then it is fsynced and
    renamed into place, so a reader sees the previous file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    write(tmp)
    _replace_atomically(tmp, path)
    fsync_dir(path.parent)
    return path


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, in order."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def clean_temporaries(run_dir: str | os.PathLike) -> None:
    """Remove what a killed save left behind: temporary files and uncommitted tensors files."""
    d = Path(run_dir)
    committed = json.loads((d / STATE).read_text())["tensors"] if (d / STATE).exists() else None
    for path in list(d.glob(".*.tmp")) + list(d.glob("run_state.*.safetensors")):
        if path.name != committed:
            path.unlink(missing_ok=True)

