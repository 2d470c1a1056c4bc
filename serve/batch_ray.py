"""`zooserve batch --ray ADDRESS|auto --shards N`: one batch file answered by a Ray cluster.

    zooserve batch --ray auto --shards 64 -i requests.jsonl -o results.jsonl

This process (the driver) cuts lines [START, STOP) of the input (`--lines`, default the whole file) into
N ranges that meet end to end: the `--lines` shards of serve/batch.py ("Sharding"). Each range is one
Ray task that runs `serve.batch.run`, what `zooserve batch` runs (the server's own routes and engines,
in process), into a part file of OUT.parts/, beside OUT. Once every part is finished the driver
concatenates them in range order into OUT (written whole, then renamed into place) and removes
OUT.parts. Concatenated shards are byte for byte one run's output, so OUT is what `zooserve batch`
writes without --ray.

Shared paths: every node reads the input and the registry, and writes OUT.parts, at the paths the
driver gives (made absolute: a worker's working folder is not the driver's), so they must be on a
volume every node mounts at the same place. Before any work a probe on each node that can run a shard
checks that it reads the registry and the input and writes OUT.parts, that the driver sees the file it
wrote there, and that it sees the same versions of the file's models as the other nodes; the first
node that fails is named (host, address, Ray node id) with the path, and nothing runs.

Resume: OUT.parts/plan.json holds the ranges, the input's size and `--created`. A rerun of the same
command skips the finished parts (part-NNNNN.jsonl), resumes a partial one (part-NNNNN.partial.jsonl:
serve/batch.py appends to what an earlier run wrote), and needs no cluster when only the merge is
left; one with other arguments is refused before anything is touched. A finished OUT is left alone.

Faults: a node that dies takes its running shards with it; Ray runs those tasks again on the nodes
left (TASK_RETRIES), and each resumes its partial part. A lock per part (flock) keeps a task that Ray
retried while the first attempt's process still lives (a partitioned node) from writing the same part:
the second waits, then finds the part finished or resumes it. An error of the job itself (a full disk,
a node without the registry) is not retried: it ends the job with its message.

Tasks, not one actor per node that keeps its models loaded. Measured here (2 cores, two 1-CPU nodes on
loopback, mlp-digits + decoder-tiny + gan-digits, 4,520 lines; an actor variant with the same plan,
parts and merge, that opened the app once and answered every shard it was given through it): with 32
shards of ~140 lines (0.1-0.2 s of work each) the actors took 5.6-6.3 s against the tasks' 7.6-8.6 s,
with 8 shards they were even (5.3-6.0 s against 6.2-7.0 s). What a task pays again per shard is the
app and the model loads: 0.12 s a shard (median) for those three models, the worker process being
Ray's, reused with its imports. That is 1 % of a shard of 10 s, and shards are made far larger than
that (a 10-million-line file in 64 shards). For it, tasks keep what actors would need a scheduler in the
driver for: Ray's own retry when a node dies, one shard per CPU on every node, nodes that join
mid-job used as they come. With models that load slowly (GBs, on a GPU), fewer and larger shards keep
that cost small.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from model_registry.store import fsync_dir
from serve.batch import BatchError, BatchSummary, read_done, requests, scan
from serve.settings import ServeSettings

log = logging.getLogger("zooserve.batch")

TASK_RETRIES = 5             # runs of a shard's task that dead nodes or workers may cost (Ray's max_retries)
PROBE_TIMEOUT_S = 300.0      # a node's probe starts a worker process there: imports, perhaps a cold disk
CONNECT_TIMEOUT_S = 5.0      # the TCP check before ray.init, which waits a minute for an address that is silent
SHARED = "every node must see it at this path (a shared volume)"


# ---- the plan: ranges of lines, parts beside OUT --------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a job's parts are written for; a rerun must make the same plan to use them."""

    input: str                           # absolute path
    input_bytes: int                     # a grown or cut input makes other ranges
    lines: tuple[int, int]               # [start, stop) of the input, physical lines, 0-based
    shards: tuple[tuple[int, int], ...]  # the ranges, end to end
    created: int                         # `created` of /v1 answers: part of the bytes


@dataclass
class RaySummary(BatchSummary):
    """BatchSummary of the whole job, and how its shards went."""

    shards: int = 0
    finished_before: int = 0             # shards an earlier run had finished: not run again
    nodes: int = 0                       # nodes that could run a shard (0: the cluster was not needed)

    def shards_line(self) -> str:
        where = f" on {self.nodes} node{'s' * (self.nodes != 1)}" if self.nodes else ""
        return f"{self.shards} shards{where}, {self.finished_before} finished by an earlier run"


def count_lines(path: Path) -> int:
    """Physical lines, as `enumerate(open(path, "rb"))` counts them (a last line without "\\n" counts)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def make_plan(input_path: Path, lines: tuple[int, int | None], shards: int, created: int) -> Plan:
    """N ranges [start, stop) meeting end to end, as the Indexed Job's (deploy/k8s/batch): range i of a
    span of L lines from `start` is [start + i*L//N, start + (i+1)*L//N). N is capped at L: no empty shard."""
    if shards < 1:
        raise BatchError(f"--shards must be at least 1, got {shards}")
    total = count_lines(input_path)
    start, stop = lines[0], total if lines[1] is None else lines[1]
    if start > total or stop > total:
        raise BatchError(f"--lines {start}:{'' if lines[1] is None else stop} reaches past the end of {input_path}, "
                         f"which has {total} line{'s' * (total != 1)} (0:{total})")
    span = stop - start
    n = max(1, min(shards, span))
    bounds = [start + i * span // n for i in range(n + 1)]
    return Plan(str(input_path), input_path.stat().st_size, (start, stop), tuple(zip(bounds[:-1], bounds[1:])),
                created)


def parts_dir(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".parts")


def part_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:05d}.jsonl"


def partial_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:05d}.partial.jsonl"


def summary_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:05d}.json"


def check_plan(parts: Path, plan: Plan) -> bool:
    """Whether OUT.parts holds this plan's parts (False: no plan yet); another plan's are refused."""
    path = parts / "plan.json"
    if not path.exists():
        return False
    theirs, mine = json.loads(path.read_text()), json.loads(json.dumps(asdict(plan)))
    if theirs != mine:
        raise BatchError(f"{parts} holds the parts of another job ({_describe(theirs)}; this one: {_describe(mine)}): "
                         f"rerun that job's command to finish it, or delete {parts} to start over")
    return True


def write_plan(parts: Path, plan: Plan) -> None:
    tmp = parts / "plan.json.tmp"
    tmp.write_text(json.dumps(asdict(plan), indent=1))
    os.replace(tmp, parts / "plan.json")


def _describe(plan: dict) -> str:
    start, stop = plan["lines"]
    return (f"lines {start}:{stop} of {plan['input']} ({plan['input_bytes']} bytes) in {len(plan['shards'])} shards, "
            f"--created {plan['created']}")


def finished_output(output_path: Path, input_path: Path, lines: tuple[int, int], records: int) -> Counter | None:
    """The statuses of OUT when it is this job's finished output; None when there is no OUT. One with
    fewer records (a `zooserve batch` without --ray that was stopped) or another input's is refused."""
    if not output_path.exists():
        return None
    done, _ = read_done(output_path)
    if len(done) != records:
        raise BatchError(f"{output_path} exists with {len(done)} of the {records} records of lines "
                         f"{lines[0]}:{lines[1]} of {input_path}: finish it with `zooserve batch` without --ray (it "
                         "resumes), or delete it")
    next(requests(input_path, *lines, [r.get("custom_id") for r in done], {}), None)   # raises for another input
    return Counter("error" if r.get("response") is None else r["response"]["status_code"] for r in done)


def merge(output_path: Path, parts: Path, plan: Plan) -> None:
    """The parts in range order into OUT (whole and fsynced, then renamed into place); OUT.parts removed."""
    merged = parts / "merged.jsonl"
    with open(merged, "wb") as out:
        for index in range(len(plan.shards)):
            with open(part_path(parts, index), "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    os.replace(merged, output_path)
    fsync_dir(output_path.parent)
    shutil.rmtree(parts)


def read_part_summary(parts: Path, index: int) -> dict:
    doc = json.loads(summary_path(parts, index).read_text())
    doc["statuses"] = Counter({int(k) if k.isdigit() else k: v for k, v in doc["statuses"].items()})
    return doc


# ---- on a node ------------------------------------------------------------------------------------

def node_name() -> str:
    """This node as messages name it: host name (a pod's name on Kubernetes), address and Ray node id."""
    import ray

    return (f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, node "
            f"{ray.get_runtime_context().get_node_id()[:12]})")


def registry_view(registry: Path, names: set[str]) -> dict[str, list[str]]:
    """model -> its version folders, for the registry's models among `names`; OSError when it cannot be read."""
    if not registry.is_dir():
        raise FileNotFoundError(errno.ENOENT, "not a folder" if registry.exists() else "no such folder", str(registry))
    view = {}
    for entry in sorted(os.listdir(registry)):
        if entry in names and (registry / entry / "model.json").is_file():
            view[entry] = sorted(p for p in os.listdir(registry / entry) if p.isdigit())
    return view


def probe_node(registry: Path, input_path: Path, parts: Path, names: set[str]) -> dict:
    """Run on each node before the job: what it sees of the registry, or why it cannot run a shard."""
    where = node_name()
    probe = parts / f".probe-{socket.gethostname()}-{os.getpid()}"
    step = ("read the registry", registry)
    try:
        view = registry_view(registry, names)
        step = ("read the input", input_path)
        open(input_path, "rb").close()
        step = ("write the parts folder", parts)
        probe.write_bytes(b"")
    except OSError as exc:
        return {"node": where, "view": None, "probe": None,
                "error": f"node {where} cannot {step[0]} {step[1]}: {exc.strerror or exc}; {SHARED}"}
    return {"node": where, "view": view, "probe": str(probe), "error": None}


@contextmanager
def part_lock(parts: Path, index: int) -> Iterator[None]:
    """One writer per part, even when Ray has retried a task whose first process still runs."""
    with open(parts / f"part-{index:05d}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_shard(settings: ServeSettings, input_path: Path, parts: Path, index: int, lines: tuple[int, int],
              window: int | None, created: int) -> dict:
    """One shard's Ray task: its lines into its partial part (resumed if there is one), then that made the part."""
    from serve import logs
    from serve.batch import run

    logs.configure(settings.log_level, settings.log_format)
    try:
        registry_view(settings.registry, set())
    except OSError as exc:                 # a node that joined after the probe
        raise BatchError(f"node {node_name()} cannot read the registry {settings.registry}: {exc.strerror or exc}; "
                         f"{SHARED}") from None
    with part_lock(parts, index):
        if not part_path(parts, index).exists():
            summary = run(settings, input_path, partial_path(parts, index), lines, window, created, progress=False)
            summary_path(parts, index).write_text(json.dumps({
                "records": summary.records, "resumed": summary.resumed, "startup_s": summary.startup_s,
                "run_s": summary.run_s, "node": node_name(),
                "statuses": {str(k): v for k, v in summary.statuses.items()}}))
            os.replace(partial_path(parts, index), part_path(parts, index))
            fsync_dir(parts)
    return read_part_summary(parts, index)


# ---- the driver -----------------------------------------------------------------------------------

def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto": $RAY_ADDRESS, else the cluster started last on this
    machine). Something must listen there first: ray.init alone waits a minute on a silent address."""
    try:
        import ray
        from ray._private import services     # the resolution ray.init makes, made before it waits
    except ImportError:
        raise BatchError("--ray needs Ray here and on every node, one version: pip install ray==2.60.0") from None
    try:
        canonical = services.canonicalize_bootstrap_address(address)
    except ConnectionError:
        raise BatchError(f"--ray {address}: no Ray cluster found ($RAY_ADDRESS is not set and none was started on "
                         "this machine); start one with `ray start --head`, or give the head's HOST:PORT") from None
    except ValueError as exc:
        raise BatchError(f"--ray {address}: {exc}; give the head's HOST:PORT, or auto") from None
    if canonical is None:                     # "local": Ray would start a cluster of its own
        raise BatchError(f"--ray {address}: give a running cluster's HOST:PORT, or auto")
    host, _, port = canonical.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else getattr(exc, "strerror", None) or exc
        raise BatchError(f"--ray {address}: no Ray cluster answers at {canonical} ({reason}); start one with "
                         "`ray start --head`, or give the head's HOST:PORT") from None
    try:
        ray.init(address=canonical, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - not a Ray head, another Ray version ...: one line
        raise BatchError(f"--ray {address}: cannot join the Ray cluster at {canonical}: {exc}") from None


def shard_resources(settings: ServeSettings) -> dict:
    """What one shard's task asks Ray for: a CPU per intra-op thread (--threads), and a GPU with --device cuda."""
    return {"num_cpus": settings.intra_op_threads, "num_gpus": 1 if settings.device == "cuda" else 0}


def capable_nodes(resources: dict) -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= resources["num_cpus"]
            and n["Resources"].get("GPU", 0) >= resources["num_gpus"]]


def probe_cluster(settings: ServeSettings, input_path: Path, parts: Path, names: set[str], nodes: list[dict]) -> None:
    """probe_node on every node that can run a shard; a BatchError naming the first one that cannot."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(probe_node)
    refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(settings.registry, input_path, parts, names) for n in nodes]
    found = []
    for ref, node in zip(refs, nodes):
        try:
            found.append(ray.get(ref, timeout=PROBE_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            raise BatchError(f"node {node['NodeManagerAddress']} (node {node['NodeID'][:12]}) ran no probe in "
                             f"{PROBE_TIMEOUT_S:.0f} s") from None
        except ray.exceptions.RayError as exc:   # it died meanwhile: its shards run elsewhere
            log.warning("node %s left during the probe: %s", node["NodeID"][:12], exc)
    unseen = []
    for f in found:
        if f["probe"] is not None:
            if not Path(f["probe"]).exists():
                unseen.append(f)
            Path(f["probe"]).unlink(missing_ok=True)
    for f in found:
        if f["error"] is not None:
            raise BatchError(f["error"])
    for f in unseen:
        raise BatchError(f"node {f['node']} wrote {f['probe']} but the driver does not see it: the output's folder "
                         f"{parts.parent} must be on a volume every node shares, at the same path")
    views = Counter(json.dumps(f["view"], sort_keys=True) for f in found)
    if len(views) > 1:
        common = json.loads(views.most_common(1)[0][0])
        odd = next(f for f in found if f["view"] != common)
        raise BatchError(f"node {odd['node']} sees {_models(odd['view'])} in the registry {settings.registry}, the "
                         f"other nodes {_models(common)}: every node must see the same registry (a shared volume)")


def _models(view: dict[str, list[str]]) -> str:
    return ", ".join(f"{m} versions {'/'.join(v) or 'none'}" for m, v in view.items()) or "none of the job's models"


def run_shards(settings: ServeSettings, input_path: Path, parts: Path, plan: Plan, todo: list[int],
               resources: dict, window: int | None, progress: bool) -> None:
    """A task per unfinished shard, all submitted at once (Ray runs one per free slot); waits for them
    all. The first error of the job itself ends it, and the tasks still running are cancelled."""
    import ray
    from tqdm import tqdm

    # max_calls=0: keep the worker process between shards, which Ray does not do for GPU tasks by default
    task = ray.remote(max_calls=0)(run_shard).options(**resources, max_retries=TASK_RETRIES, name="zooserve-shard")
    pending = {task.remote(settings, input_path, parts, i, plan.shards[i], window, plan.created): i for i in todo}
    bar = tqdm(total=len(plan.shards), initial=len(plan.shards) - len(todo), unit="shard", disable=not progress,
               desc=parts.name)
    try:
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready)
            start, stop = plan.shards[index]
            try:
                ray.get(ready)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                message = str(cause) if isinstance(cause, BatchError) else f"{type(cause).__name__}: {cause}"
                raise BatchError(f"shard {index} (lines {start}:{stop}): {message}") from None
            except ray.exceptions.RayError as exc:   # its retries spent: workers or nodes kept dying
                raise BatchError(f"shard {index} (lines {start}:{stop}) failed {TASK_RETRIES + 1} times, the last: "
                                 f"{exc}; rerunning the same command resumes it") from None
            bar.update(1)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        bar.close()


def run_on_ray(settings: ServeSettings, input_path: Path, output_path: Path, address: str, shards: int,
               lines: tuple[int, int | None] = (0, None), window: int | None = None, created: int = 0,
               progress: bool = True) -> RaySummary:
    """Answer lines [start, stop) of `input_path` into `output_path` in `shards` tasks on the Ray cluster at
    `address`, resuming what an earlier run of the same job left; every refusal comes before any work."""
    began = time.perf_counter()
    input_path, output_path = input_path.absolute(), output_path.absolute()
    settings = settings.model_copy(update={"registry": settings.registry.absolute()})
    if window is not None and window < 1:
        raise BatchError(f"window must be at least 1, got {window}")
    if not input_path.is_file():
        raise BatchError(f"input {input_path} is not a file")
    plan = make_plan(input_path, lines, shards, created)
    records, names = scan(input_path, *plan.lines)
    summary = RaySummary(records=records, shards=len(plan.shards))
    parts = parts_dir(output_path)
    done = finished_output(output_path, input_path, plan.lines, records)
    if done is not None:                       # finished earlier (a crash may have left the parts behind)
        shutil.rmtree(parts, ignore_errors=True)
        summary.resumed, summary.statuses, summary.finished_before = records, done, len(plan.shards)
        return summary
    planned, fresh = check_plan(parts, plan), not parts.exists()
    todo = [i for i in range(len(plan.shards)) if not part_path(parts, i).exists()]
    summary.finished_before = len(plan.shards) - len(todo)
    try:
        if todo:
            _on_cluster(settings, input_path, parts, plan, todo, address, names, window, progress, summary, planned,
                        began)
            planned = True
    finally:
        if fresh and not planned:             # refused before any work: leave no trace
            shutil.rmtree(parts, ignore_errors=True)
    summary.startup_s = summary.startup_s or time.perf_counter() - began
    for index in range(len(plan.shards)):
        part = read_part_summary(parts, index)
        summary.statuses.update(part["statuses"])
        summary.resumed += part["resumed"] if index in todo else part["records"]
    if sum(summary.statuses.values()) != records:
        raise BatchError(f"the parts in {parts} hold {sum(summary.statuses.values())} records, not the {records} of "
                         f"lines {plan.lines[0]}:{plan.lines[1]}: delete {parts} and run the job again")
    merge(output_path, parts, plan)
    summary.run_s = time.perf_counter() - began - summary.startup_s
    return summary


def _on_cluster(settings: ServeSettings, input_path: Path, parts: Path, plan: Plan, todo: list[int], address: str,
                names: set[str], window: int | None, progress: bool, summary: RaySummary, planned: bool,
                began: float) -> None:
    """Connect, probe every node, write the plan (the first time), run the shards left; then leave the cluster."""
    import ray

    try:
        parts.mkdir(parents=True, exist_ok=True)      # the probes write into it
    except OSError as exc:
        raise BatchError(f"cannot prepare the job: {exc.filename or parts}: {exc.strerror or exc}; nothing was "
                         "written") from None
    connect(address)
    try:
        resources = shard_resources(settings)
        nodes = capable_nodes(resources)
        if not nodes:
            raise BatchError(f"--ray {address}: no node has {resources['num_cpus']} CPU(s)"
                             f"{' and a GPU' if resources['num_gpus'] else ''} for a shard (--threads, --device)")
        summary.nodes = len(nodes)
        probe_cluster(settings, input_path, parts, names, nodes)
        if not planned:
            write_plan(parts, plan)
        summary.startup_s = time.perf_counter() - began
        run_shards(settings, input_path, parts, plan, todo, resources, window, progress)
    finally:
        ray.shutdown()


__all__ = ["Plan", "RaySummary", "check_plan", "count_lines", "finished_output", "make_plan", "merge", "parts_dir",
           "part_path", "probe_node", "run_on_ray", "run_shard", "write_plan"]
