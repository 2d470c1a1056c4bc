"""`zooserve batch --ray`: a batch file answered in shards by a real two-node Ray cluster on this machine.

The cluster: `ray start --head` and a second node joining it with `ray start --address`, each `--block`
in its own process group (so that stopping a node is a SIGTERM to the process we started: `ray stop`
would stop every Ray process on the machine). Ray rewrites 127.0.0.1 to the machine's network address
(`resolve_ip_for_localhost`), which would take node-to-node traffic off loopback; the processes that
start nodes and the driver (`zooserve batch`, run as a subprocess) replace that resolver with one
that returns the address unchanged, and nodes take `--node-ip-address 127.0.0.1`. GCS health checks
every 0.5 s notice a dead node in ~2 s instead of ~15.

The second node runs in a mount namespace of its own (root only: `unshare --mount`) where HIDDEN is an
empty tmpfs, so a registry under HIDDEN is one the head node sees and the second node does not.

Order matters: the last test kills the second node.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from serve.batch import run
from serve.settings import ServeSettings

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEEP_LOOPBACK = "import ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
START_NODE = KEEP_LOOPBACK + "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
DRIVER = KEEP_LOOPBACK + "import sys; from serve.cli import main; sys.argv[0] = 'zooserve'; sys.exit(main())"
# a dead node is noticed after 4 missed checks 0.5 s apart, not Ray's default 5 x 3 s
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_hide_folders() -> bool:
    """Whether this process may start one in a mount namespace of its own (root, unshare present)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


class Node:
    """One `ray start --block` on 127.0.0.1: its Ray processes are this process's children."""

    def __init__(self, args: list[str], log: Path, env: dict, hide: Path | None = None):
        self.log = log
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
                str(hide)] if hide else []
        cmd = [*wrap, sys.executable, "-c", START_NODE, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus",
               "1", "--object-store-memory", str(80 << 20), "--dashboard-agent-listen-port", "0", "--block"]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_started(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in self.log.read_bytes():
            assert self.proc.poll() is None, f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start took over {timeout} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def processes(self, pid: int | None = None) -> list[int]:
        """The node's processes: `ray start` and its descendants (the raylet's task workers among them)."""
        pid = pid or self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:               # it has just exited
            return []
        return [pid, *(p for child in children for p in self.processes(int(child)))]

    def open_files(self, folder: Path) -> set[Path]:
        """Files in `folder` that a process of the node holds open (a task writing its part)."""
        found = set()
        for pid in self.processes():
            try:
                fds = list(Path(f"/proc/{pid}/fd").iterdir())
            except (FileNotFoundError, PermissionError):
                continue
            for fd in fds:
                try:
                    target = Path(os.readlink(fd))
                except OSError:
                    continue
                if target.parent == folder:
                    found.add(target)
        return found

    def kill(self) -> None:
        """SIGKILL every process of the node at once, its task workers included: a machine that dies."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM: `ray start --block` stops the processes it started, then exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)     # its own group: only this node's processes
                self.proc.wait()


class Cluster:
    def __init__(self, work: Path, hidden: Path | None):
        # Ray's unix sockets live under RAY_TMPDIR and must stay under ~107 bytes: a short folder
        self.tmp = Path(tempfile.mkdtemp(prefix="zr-", dir="/tmp"))
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(self.tmp), **FAST_HEALTH_CHECKS}
        self.address = f"127.0.0.1:{free_port()}"
        self.hidden = hidden
        self.head = Node(["--head", "--port", self.address.split(":")[1], "--include-dashboard", "false",
                          "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())],
                         work / "head.log", self.env)
        self.head.wait_started()
        self.second = Node(["--address", self.address], work / "second.log", self.env, hide=hidden)
        self.second.wait_started()

    def stop(self) -> None:
        self.second.stop()
        self.head.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def cluster(work) -> Cluster:
    hidden = work / "hidden"
    hidden.mkdir()
    c = Cluster(work, hidden if can_hide_folders() else None)
    try:
        yield c
    finally:
        c.stop()


def zooserve(cluster_env: dict, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=cluster_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def batch_args(registry: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", "--registry", str(registry), "-i", str(inp), "-o", str(out), "--no-progress", "--log-level",
            "warning", *extra]


def line(custom_id, model: str, seed: int) -> bytes:
    data = np.random.default_rng(seed).uniform(0, 16, 64).round(2).tolist()
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": f"/v2/models/{model}/infer",
                         "body": {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                              "data": data}]}}) + b"\n"


def digits_file(path: Path, n: int) -> Path:
    """n lines to mlp-digits, and the odd ones a shard must treat as the whole run does: a malformed
    line, a blank line, an unknown model, and the first line's custom_id again near the end (a
    duplicate across shards); no newline after the last line."""
    lines = [line(f"d{i}", "mlp-digits", i) for i in range(n)]
    lines[5] = b'{"custom_id": "torn", "method": \n'
    lines[9] = b"\n"
    lines[n // 2] = line("nowhere", "no-such-model", 1)
    lines[-3] = line("d0", "mlp-digits", 7)
    path.write_bytes(b"".join(lines).rstrip(b"\n"))
    return path


def ids(path: Path) -> list[str]:
    return [orjson.loads(x)["custom_id"] for x in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def job(work, demo_registry) -> tuple[Path, bytes]:
    """(input, the bytes a plain `zooserve batch` writes for it)."""
    inp = digits_file(work / "digits.jsonl", 1600)
    run(ServeSettings(registry=demo_registry, log_level="warning"), inp, work / "plain.jsonl", progress=False)
    return inp, (work / "plain.jsonl").read_bytes()


# ---- the plan, without a cluster ----------------------------------------------------------------------

@pytest.mark.parametrize("lines, shards, final_newline, given", [
    (10, 4, True, (0, None)), (10, 4, False, (0, None)), (3, 8, True, (0, None)), (1000, 7, True, (100, 900)),
    (5, 2, True, (5, None)), (0, 3, True, (0, None))])
def test_the_plan_cuts_the_lines_end_to_end(tmp_path, lines, shards, final_newline, given):
    from serve.batch_ray import count_lines, make_plan

    data = "".join(f'{{"custom_id": "{i}"}}\n' for i in range(lines))
    path = tmp_path / "in.jsonl"
    path.write_text(data if final_newline else data.removesuffix("\n"))
    assert count_lines(path) == len(path.read_bytes().splitlines())
    plan = make_plan(path, given, shards, created=0)
    start, stop = given[0], lines if given[1] is None else given[1]
    covered = [n for a, b in plan.shards for n in range(a, b)]
    assert covered == list(range(start, stop))                          # in order, each line once
    assert len(plan.shards) == max(1, min(shards, stop - start))        # no empty shard but for an empty range
    # the Indexed Job's arithmetic (deploy/k8s/batch/job.yaml) on a whole file
    if given == (0, None) and lines >= shards:
        assert [a for a, _ in plan.shards] == [i * lines // shards for i in range(shards)]


# ---- bad input: one line, exit 2, before any work -----------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--ray", "127.0.0.1:{dead}", "--shards", "2"],
     "--ray 127.0.0.1:{dead}: no Ray cluster answers at 127.0.0.1:{dead} (Connection refused); start one with "
     "`ray start --head`, or give the head's HOST:PORT"),
    (["--ray", "auto", "--shards", "2"],
     "--ray auto: no Ray cluster found ($RAY_ADDRESS is not set and none was started on this machine); start one "
     "with `ray start --head`, or give the head's HOST:PORT"),
    (["--ray", "127.0.0.1:{dead}", "--shards", "0"], "--shards must be at least 1, got 0"),
    (["--ray", "127.0.0.1:{dead}", "--shards", "2", "--lines", "10:99"],
     "--lines 10:99 reaches past the end of {inp}, which has 40 lines (0:40)"),
    (["--shards", "2"], "--ray ADDRESS and --shards N go together (the cluster, and how many ranges to cut the "
                        "input into); without them the job runs in this process"),
])
def test_bad_input_is_one_line_and_exit_2(work, extra, message):
    dead = free_port()                     # nothing listens there
    inp = digits_file(work / "small.jsonl", 40)
    out = work / "never.jsonl"
    no_cluster = tempfile.mkdtemp(prefix="zr-none-", dir="/tmp")     # where `auto` finds no cluster either
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = zooserve({**env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": no_cluster},
                    *batch_args(work / "no-registry-needed", inp, out, *[a.format(dead=dead) for a in extra]))
    code, text = finish(proc, 60)
    shutil.rmtree(no_cluster)
    assert (code, text.splitlines()) == (2, [f"zooserve batch: {message.format(dead=dead, inp=inp)}"]), text
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


def test_an_unfinished_output_of_a_run_without_ray_is_left_to_it(work):
    inp = digits_file(work / "small.jsonl", 40)
    out = work / "stopped.jsonl"
    out.write_bytes(b"".join(orjson.dumps({"custom_id": f"d{i}"}) + b"\n" for i in range(3)))
    code, text = finish(zooserve({**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                                 *batch_args(work / "no-registry-needed", inp, out, "--ray", f"127.0.0.1:{free_port()}",
                                             "--shards", "2")), 60)
    assert (code, text.splitlines()) == (2, [f"zooserve batch: {out} exists with 3 of the 39 records of lines 0:40 of "
                                             f"{inp}: finish it with `zooserve batch` without --ray (it resumes), or "
                                             "delete it"]), text


def test_a_node_that_cannot_read_the_registry_is_named_before_any_work(cluster, demo_registry, job, work):
    if cluster.hidden is None:
        pytest.skip("needs root and `unshare --mount` to hide a folder from one node")
    registry = cluster.hidden / "registry"          # the head (and this process) see it, the second node does not
    if not registry.exists():
        registry.symlink_to(demo_registry)
    out = work / "no-registry.jsonl"
    code, text = finish(zooserve(cluster.env, *batch_args(registry, job[0], out, "--ray", cluster.address,
                                                          "--shards", "4")))
    assert code == 2, text
    last = text.splitlines()[-1]
    assert last.startswith("zooserve batch: node ") and "(127.0.0.1, node " in last, text
    assert last.endswith(f"cannot read the registry {registry}: no such folder; every node must see it at this path "
                         "(a shared volume)"), text
    assert "Traceback" not in text
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


# ---- the job -------------------------------------------------------------------------------------------

def test_two_nodes_write_the_bytes_of_a_plain_run(cluster, demo_registry, job, work):
    inp, plain = job
    out = work / "two-nodes.jsonl"
    code, text = finish(zooserve(cluster.env, *batch_args(demo_registry, inp, out, "--ray", cluster.address,
                                                          "--shards", "5")))
    assert code == 0, text
    assert out.read_bytes() == plain
    assert not out.with_name(out.name + ".parts").exists()          # merged, then removed
    assert f"1599 records in {out} (0 from an earlier run; 200: 1596, 404: 1, error: 2); 5 shards on 2 nodes, " \
           "0 finished by an earlier run" in text
    # a finished output is left alone
    code, text = finish(zooserve(cluster.env, *batch_args(demo_registry, inp, out, "--ray", cluster.address,
                                                          "--shards", "5")))
    assert code == 0 and "(1599 from an earlier run" in text and out.read_bytes() == plain, text


def test_a_rerun_skips_finished_shards_and_resumes_the_rest(cluster, demo_registry, job, work):
    inp, plain = job
    out = work / "rerun.jsonl"
    parts = out.with_name(out.name + ".parts")
    shards = 12
    proc = zooserve(cluster.env, *batch_args(demo_registry, inp, out, "--ray", cluster.address, "--shards",
                                             str(shards)))
    deadline = time.monotonic() + 90
    while not list(parts.glob("part-*[0-9].jsonl")):                # a shard is finished
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no shard finished in 90 s"
        time.sleep(0.005)
    proc.kill()                                                      # the driver: Ray ends the job's tasks
    proc.communicate()
    finished = len(list(parts.glob("part-*[0-9].jsonl")))
    assert 1 <= finished < shards and not out.exists()
    # a different plan is refused, and touches nothing
    code, text = finish(zooserve(cluster.env, *batch_args(demo_registry, inp, out, "--ray", cluster.address,
                                                          "--shards", str(shards + 1))))
    assert code == 2 and f"{parts} holds the parts of another job" in text.splitlines()[-1], text
    code, text = finish(zooserve(cluster.env, *batch_args(demo_registry, inp, out, "--ray", cluster.address,
                                                          "--shards", str(shards))))
    assert code == 0, text
    summary = text.splitlines()[-1]
    skipped = int(summary.split(" finished by an earlier run")[0].rsplit(", ", 1)[1])
    assert skipped >= finished, summary
    assert out.read_bytes() == plain


def test_a_node_killed_mid_job_leaves_every_record_once(cluster, demo_registry, job, work):
    """Last: the second node stays dead. Its shard's task runs again on the head and resumes its part."""
    inp, plain = job
    out = work / "killed.jsonl"
    parts = out.with_name(out.name + ".parts")
    proc = zooserve(cluster.env, *batch_args(demo_registry, inp, out, "--ray", cluster.address, "--shards", "2"))
    deadline = time.monotonic() + 90

    def second_node_wrote() -> bool:       # the part the second node is writing holds records
        for part in cluster.second.open_files(parts):
            try:
                if part.name.endswith(".partial.jsonl") and part.read_bytes().count(b"\n") >= 20:
                    return True
            except FileNotFoundError:      # finished (renamed) meanwhile
                pass
        return False

    while not second_node_wrote():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the second node wrote no part in 90 s"
        time.sleep(0.005)
    cluster.second.kill()
    code, text = finish(proc)
    assert code == 0, text
    assert out.read_bytes() == plain
    named = [i for i in ids(out) if i is not None]
    assert len(named) == len(set(named)) == 1597
    resumed = int(text.splitlines()[-1].split(" from an earlier run")[0].rsplit("(", 1)[1])
    assert resumed > 0, text            # the retried shard kept what the dead node had written
