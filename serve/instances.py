"""How many execution instances a classify model gets, and how many threads each (Triton's
instance_group): a pure choice from model.json, the server's settings and the machine.

Measured on a ResNet-style CNN (~50 M multiply-adds an image), ONNX Runtime, batch 32, 2 idle cores:
one session run by one thread made 939 images/s, the same session run by two threads at once 1,888,
and one run with two intra-op threads 832 (session threads spin and split small convolutions
badly). So parallelism comes from instances (concurrent runs of the one session, one thread each),
not from intra-op threads.

But the event loop that reads, decodes and answers the requests needs a core of its own under
load. On 2 cores, bench/overload.py's cheap CNN (a few ms a batch of 32, JSON tensors: the loop is
the bottleneck) lost a third of its goodput under overload with two instances (1,392 -> 993 req/s,
p99 159 -> 298 ms), while bench/instances.py's heavier CNN (~50 M multiply-adds an image: the model
is the bottleneck) gained 1.4-1.6x at 128 clients. So the default leaves one core to the loop:
one instance per usable core but one (on 2 cores: one, as before); a model that is the bottleneck
on a small machine asks for more in its model.json.

The count does not shrink with the number of loaded models: an instance is a parked thread until
its model is busy, and the operating system shares the cores among the models that are; dividing
the cores among loaded models would hold the one busy model to a fraction of an idle machine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from model_registry import InstanceGroup

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")   # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask (a cpuset narrows it), further capped by the
    cgroup's CPU quota (a container given `--cpus 2` on a 64-core host may use 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True)
class Instances:
    count: int
    intra_op_threads: int
    chosen: str          # where `count` came from: "model.json", "server setting" or "auto: ..."


def choose(group: InstanceGroup, server_instances: int | None, server_threads: int, cores: int,
           workers: int = 1) -> Instances:
    """model.json's instance_group first, then the server's settings, then one instance per
    `intra_op_threads` cores of those the event loops leave (cores - one per worker), shared among
    the server's worker processes (each loads the model; at least one instance each)."""
    threads = group.intra_op_threads or server_threads
    if group.count is not None:
        return Instances(group.count, threads, "model.json")
    if server_instances is not None:
        return Instances(server_instances, threads, "server setting")
    count = max(1, (cores - workers) // (threads * workers))
    loops = "1 for the event loop" if workers == 1 else f"{workers} for the workers' event loops"
    per = "" if workers == 1 else f" / {workers} workers"
    return Instances(count, threads, f"auto: ({cores} usable cores - {loops}) / {threads} "
                                     f"intra-op thread{'s' if threads > 1 else ''}{per}")
