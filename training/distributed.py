"""`zooserve train FAMILY ... --nproc N`: data-parallel training under torch's elastic launcher
(torchrun, `torch.distributed.run`), one process per rank, DistributedDataParallel.

The command that was given is run again in every rank (less the launcher's own flags): the parent
process validates the command line, then starts torchrun in-process (`--standalone` on one
machine; `--nnodes/--node-rank/--rdzv-endpoint` for several, torchrun's static rendezvous, so the
machine with `--node-rank 0` holds rank 0). Each rank finds torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), joins the process group (gloo on the CPU, nccl with
`--device cuda`: rank r on cuda:LOCAL_RANK) and trains with a `Rank`:

- data: the shared loop (training/loop.py) draws the epoch's permutation from its seeded generator
  exactly as one process does (so the generator, and resuming, behave the same), pads it to a
  multiple of the world size with its first indices, and rank r takes every world-th index from r
  (torch's DistributedSampler, with the loop's own order); `batch_size` is per rank. The token
  loop (training/lm.py) draws world x batch_size window starts from its seeded generator each step
  and rank r takes the r-th batch of them. Every rank's generator therefore stays identical.
- gradients: the model runs wrapped in DistributedDataParallel (averaged in backward); clipping,
  AdamW and the schedule then see the same gradients on every rank, so the weights stay identical.
  BatchNorm buffers follow rank 0 (DDP's broadcast_buffers, and once more before each evaluation).
- evaluation: every rank scores the whole held-out set with the same weights; rank 0's value is
  broadcast so early stopping decides alike everywhere. The logged train loss is the ranks' mean.
- files: rank 0 alone writes the run folder (metrics.jsonl, run-state checkpoints), the
  checkpoint and publishes; the lineage records training_config.distributed (world size, backend,
  nodes, effective batch) beside the seed. A world size of 1 is no distributed run at all: nothing here
  runs and training is bit-identical to the plain command.
- resume: `--resume --nproc N` is supported with the same N (the world size is part of the run's
  recorded configuration): every rank loads rank 0's run state. On several machines --out must be
  a folder they share.
- failures: a rank that raises records its one-line message and traceback (ZOOSERVE_RANK_ERRORS, a
  folder the parent makes) and ends at once (os._exit: no slow interpreter teardown); torchrun
  ends the other ranks (no restarts; about 0.2 s) and the parent prints the earliest failure (its
  traceback when it was an exception, then one line `zooserve train: error: rank R of N failed:
  ...`) and exits non-zero (2 for a refusal such as too little data, printed once, else 1). A rank
  killed without a word (SIGKILL, out of memory) is named with its signal or exit code.

Test and debug hooks (environment variables, read in the ranks):
- ZOOSERVE_DDP_CHECK=DIR: after every optimiser step each rank appends `step param_sha256
  batch_sha256` to DIR/rank-R.txt (its parameters' bytes; the batch it trained on).
- ZOOSERVE_DDP_FAIL_AT=R:K: rank R raises RuntimeError after its step K.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

# the families whose recipe trains data-parallel (the shared loop: mlp, resnet; the token loop:
# decoder, mamba, rnn_lm); the others refuse --nproc above 1
FAMILIES = ("mlp", "resnet", "decoder", "mamba", "rnn_lm")
ENV_ERRORS = "ZOOSERVE_RANK_ERRORS"
ENV_CHECK = "ZOOSERVE_DDP_CHECK"
ENV_FAIL = "ZOOSERVE_DDP_FAIL_AT"
# torchrun's variables that make a process a rank
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


class DistributedError(ValueError):
    """A distributed run that cannot start as asked (too little data for the ranks, ...); one line."""


def in_rank() -> bool:
    """Whether this process is a rank that torchrun started."""
    return all(name in os.environ for name in RANK_VARIABLES)


def launch_flags_error(args: argparse.Namespace) -> str | None:
    """What is wrong with --nproc/--nnodes/--node-rank/--rdzv-endpoint for this family (no torch), or None."""
    distributed = args.nproc > 1 or args.nnodes > 1
    if distributed and args.family not in FAMILIES:
        return (f"--nproc/--nnodes (torchrun) are for {', '.join(FAMILIES)}, not {args.family} "
                "(its recipe trains in one process)")
    if args.nnodes > 1 and args.rdzv_endpoint is None:
        return (f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (an address of the machine with "
                "--node-rank 0 that every machine reaches)")
    if args.nnodes == 1 and (args.node_rank != 0 or args.rdzv_endpoint is not None):
        return "--node-rank and --rdzv-endpoint are for several machines: give --nnodes too"
    if not 0 <= args.node_rank < args.nnodes:
        return f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1} (--nnodes {args.nnodes})"
    if args.rdzv_endpoint is not None and ":" not in args.rdzv_endpoint:
        return f"--rdzv-endpoint {args.rdzv_endpoint!r}: expected HOST:PORT"
    return None


def torchrun_argv(nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> list[str]:
    """torchrun's own flags for this launch: --standalone on one machine, static rendezvous on several."""
    argv = ["--nproc-per-node", str(nproc), "--max-restarts", "0"]
    if nnodes == 1:
        return ["--standalone", *argv]
    return [*argv, "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
            "--rdzv-endpoint", rdzv_endpoint]


def launch(rank_argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str | None = None, threads: int = 1, prog: str = "zooserve train") -> int:
    """Run `python -m serve.cli *rank_argv` in `nproc` ranks on this machine under torchrun (in this
    process, torch.distributed.run); returns the exit status: 0, or the earliest failure's (2 for
    bad input, else 1) after printing it as one line."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))   # else torchrun sets 1 and says so at length
    # the agent's own log (rendezvous details, "sending SIGTERM", "failed (exitcode: 1) local_rank: 1"):
    # the failure is reported below, in one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    world = nproc * nnodes
    with tempfile.TemporaryDirectory(prefix="zooserve-ranks-") as errors:
        os.environ[ENV_ERRORS] = errors
        try:
            args = torchrun.parse_args([*torchrun_argv(nproc, nnodes, node_rank, rdzv_endpoint),
                                        "--module", "serve.cli", *rank_argv])
            torchrun.run(args)
            return 0
        except ChildFailedError as exc:
            failed_rank, failure = exc.get_first_failure()
            record = _first_record(Path(errors))
            if record is not None:
                if record.get("traceback"):     # an exception, not a refusal: where it came from
                    print(f"rank {record['rank']}: {record['traceback'].rstrip()}", file=sys.stderr)
                print(f"{prog}: error: rank {record['rank']} of {world} failed: {record['message']} "
                      f"(torchrun stopped the other ranks)", file=sys.stderr)
                return 2 if record.get("code") == 2 else 1
            code = failure.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            print(f"{prog}: error: rank {failed_rank} of {world} died ({how}) without a message "
                  f"(torchrun stopped the other ranks)", file=sys.stderr)
            return 1
        except SignalException as exc:     # SIGINT/SIGTERM to the launcher: torchrun has ended the ranks
            print(f"{prog}: stopped by {exc.sigval.name}; torchrun ended the ranks", file=sys.stderr)
            return 128 + int(exc.sigval)
        except Exception as exc:  # noqa: BLE001 - rendezvous or launch failures: one line
            print(f"{prog}: error: torchrun could not run the ranks: {type(exc).__name__}: "
                  f"{_one_line(str(exc))}", file=sys.stderr)
            return 1
        finally:
            os.environ.pop(ENV_ERRORS, None)


def _first_record(errors: Path) -> dict | None:
    records = []
    for path in errors.glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(records, key=lambda r: r["time"]) if records else None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines) if lines else ""


class _LastLine:
    """sys.stderr that remembers the last line written through it (the rank's one-line error); with
    `hold`, a `zooserve train: error:` line is kept back (the launcher prints it, once for all ranks)."""

    PREFIX = "zooserve train: error: "

    def __init__(self, stream, hold: bool = False):
        self.stream, self.last, self.hold, self._held = stream, "", hold, False

    def write(self, text: str) -> int:
        if self._held and text == "\n":    # print()'s line end after a held line
            self._held = False
            return len(text)
        self._held = False
        if text.strip():
            self.last = text.strip().splitlines()[-1]
            if self.hold and text.startswith(self.PREFIX):
                self._held = True
                return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def run_rank(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run the train command `body(args)` as this rank; a failure (an exception, or a non-zero
    status with its one-line error) is recorded for the launcher (ENV_ERRORS). The process group
    is left when it ends."""
    rank = int(os.environ.get("RANK", "0"))
    stderr, sys.stderr = sys.stderr, _LastLine(sys.stderr, hold=bool(os.environ.get(ENV_ERRORS)))
    try:
        code = body(args)
    except Exception as exc:
        sys.stderr = stderr
        _record(rank, f"{type(exc).__name__}: {_one_line(str(exc))}", 1, traceback.format_exc())
        # end now, as a crash would: its sockets close and torchrun ends the other ranks at once
        # (a normal interpreter exit, tearing down every module, takes seconds). The launcher, when
        # there is one, prints the first failing rank's traceback (not the others' "connection closed")
        if not os.environ.get(ENV_ERRORS):
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    finally:
        captured, sys.stderr = sys.stderr, stderr
    if code:
        prefix = _LastLine.PREFIX
        message = captured.last[len(prefix):] if captured.last.startswith(prefix) else captured.last
        _record(rank, message or f"exit status {code}", code, None)
    _leave()
    return code


def _record(rank: int, message: str, code: int, trace: str | None) -> None:
    folder = os.environ.get(ENV_ERRORS)
    if not folder:
        return
    record = {"rank": rank, "message": message, "code": code, "time": time.time(), "traceback": trace}
    try:
        tmp = Path(folder) / f".rank-{rank}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, Path(folder) / f"rank-{rank}.json")
    except OSError:
        pass


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init(device: torch.device) -> Rank:
    """Join torchrun's process group as this rank: gloo for the CPU, nccl for CUDA (the rank then
    uses cuda:LOCAL_RANK)."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                                   "use --nproc at most the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    world = dist.get_world_size()
    return Rank(rank=dist.get_rank(), world_size=world, local_rank=local_rank, backend=backend, device=device,
                nnodes=max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))


@dataclass
class Rank:
    """This process's place in a data-parallel run and the loops' helpers for it."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: Any              # torch.device of this rank
    nnodes: int = 1
    net: Any = None          # the DistributedDataParallel wrapper (wrap)

    @property
    def is_writer(self) -> bool:
        """Rank 0: it alone writes the run folder and the checkpoint, and publishes."""
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def lineage(self, batch_size: int) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend, "nnodes": self.nnodes,
                "batch_size_per_rank": batch_size, "effective_batch_size": batch_size * self.world_size,
                "launcher": "torchrun (torch.distributed.run)"}

    def run_config(self) -> dict[str, Any]:
        """What a run folder records (a resumed run must have the same world size: the data shards)."""
        return {"world_size": self.world_size}

    # --- data

    def shard_size(self, n: int) -> int:
        return math.ceil(n / self.world_size)

    def check_batches(self, n: int, batch_size: int) -> None:
        """DistributedError unless the `n` training rows make at least one batch per rank."""
        batches = math.ceil(n / batch_size)
        if batches < self.world_size:
            raise DistributedError(
                f"--nproc: {self.world_size} ranks need at least {self.world_size} training batches, and the "
                f"training split has {n} rows, {batches} batch(es) of batch_size {batch_size}: use at most "
                f"{batches} process(es), or a smaller batch_size (--set batch_size=...)")

    def shard_batches(self, data: tuple, batch_size: int, generator: torch.Generator) -> list[tuple]:
        """This rank's batches of the epoch: the loop's seeded permutation (drawn as one process draws
        it), padded to a multiple of the world size with its first indices, every world-th from this rank."""
        import torch

        n = data[0].shape[0]
        order = torch.randperm(n, generator=generator)
        per_rank = self.shard_size(n)
        padded = torch.cat([order, order[: per_rank * self.world_size - n]])
        mine = padded[self.rank :: self.world_size]
        return [tuple(t[mine[i : i + batch_size]] for t in data) for i in range(0, per_rank, batch_size)]

    def check_token_batches(self, n_ids: int, block_size: int, batch_size: int) -> None:
        """DistributedError unless the training ids hold a batch of distinct windows per rank."""
        windows = max(0, n_ids - 1) // block_size
        batches = windows // batch_size
        if batches < self.world_size:
            raise DistributedError(
                f"--nproc: {self.world_size} ranks need at least {self.world_size} training batches, and the "
                f"training text holds {windows} windows of block_size {block_size} tokens, {batches} batch(es) of "
                f"batch_size {batch_size}: use at most {max(1, batches)} process(es), a smaller batch_size or "
                "block_size, or more text")

    def token_batch(self, ids: torch.Tensor, block_size: int, batch_size: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's windows of the step: world x batch_size starts drawn from the shared generator,
        the rank-th batch of them."""
        from training.lm import make_token_batches

        x, y = make_token_batches(ids, block_size, batch_size * self.world_size, generator)
        part = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return x[part], y[part]

    # --- model and collectives

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in DistributedDataParallel (it broadcasts rank 0's weights and buffers first)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        self.net = DistributedDataParallel(model, device_ids=ids)
        return self.net

    def _scalar(self, value: float):
        import torch

        return torch.tensor([value], dtype=torch.float64,
                            device=self.device if self.backend == "nccl" else "cpu")

    def mean(self, value: float) -> float:
        """The ranks' mean of `value`."""
        import torch.distributed as dist

        t = self._scalar(value)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def broadcast_float(self, value: float) -> float:
        """Rank 0's `value` on every rank."""
        import torch.distributed as dist

        t = self._scalar(value)
        dist.broadcast(t, src=0)
        return float(t)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank."""
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    # --- test and debug hooks

    def after_step(self, step: int, model: torch.nn.Module, batch: tuple) -> None:
        """ENV_CHECK: this rank's parameter and batch fingerprints; ENV_FAIL: raise at the asked step."""
        check = os.environ.get(ENV_CHECK)
        if check:
            with open(Path(check) / f"rank-{self.rank}.txt", "a") as f:
                f.write(f"{step} {parameters_sha256(model)} {tensors_sha256(batch)}\n")
        fail = os.environ.get(ENV_FAIL)
        if fail:
            rank, _, at = fail.partition(":")
            if int(rank) == self.rank and int(at) == step:
                raise RuntimeError(f"injected failure ({ENV_FAIL}={fail}) on rank {self.rank} after step {step}")


def tensors_sha256(tensors) -> str:
    import torch

    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update((flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)).numpy().tobytes())
    return h.hexdigest()


def parameters_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in order."""
    return tensors_sha256(p for p in model.parameters())
