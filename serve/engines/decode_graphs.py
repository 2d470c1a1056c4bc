"""Decode steps at a few fixed batch sizes, replayed as CUDA graphs on a GPU (issue 18, as vLLM).

A decode step of n rows runs as a step of b rows, b the smallest bucket >= n (BUCKETS, capped at
the engine's rows): rows n..b-1 are computed and dropped (the step is a pure function of its
feeds; only rows 0..n-1's outputs are written back). So the shapes a step sees are a handful, and
on CUDA each (bucket, state memory) pair is captured once into a CUDA graph and replayed: one
launch for the whole step instead of one per kernel, which at decoder-tiny's size is most of a
step's time. The prefill runs eagerly (its shapes are the prompts').

What a graph may take as given: the step's feeds that are views of the engine's state tensors
(the KV slots, the recurrent state: tensors with a `_base`) keep their memory between steps, so a
graph is keyed by their addresses and shapes, and a resize of the slots (new tensors) is a new
key; the per-step values (the fed ids, each row's start: fresh tensors) are copied into the
graph's own input tensors before each replay. The outputs are the graph's own tensors, read
before the next replay (the state writes and the sampling come first in the same step).

A step that cannot be captured (an op that waits on the device, such as data-dependent indexing)
falls back to eager steps for the engine's life, said once in the log. On the CPU (`capture`
False) the bucketed step runs eagerly, which is how the CPU tests hold the padding to the plain
step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("zooserve.engine")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
WARMUP_RUNS = 3            # before a capture: TorchScript's profiling runs, cuBLAS workspaces

Feeds = dict[str, torch.Tensor]


def bucket_for(n: int, rows: int) -> int:
    """The step size for n decode rows: the smallest bucket >= n that fits the engine's rows, else
    the rows themselves."""
    return next((b for b in BUCKETS if n <= b <= rows), rows)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: Feeds           # the graph's own copies of the per-step values
    outputs: Feeds


class DecodeGraphs:
    """The bucketed decode step of one engine (`run` is its step: feeds -> outputs, on the device)."""

    def __init__(self, run: Callable[[Feeds], Feeds], rows: int, capture: bool):
        self.run, self.rows, self.capture = run, rows, capture
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = self.replays = 0
        self.padded_rows = 0                    # rows computed and dropped to reach a bucket, so far
        self.failed: str | None = None          # why capturing was given up, if it was

    def step(self, ids: torch.Tensor, feeds_for: Callable[[int], Feeds]) -> Feeds:
        """One decode step of the n = len(ids) rows 0..n-1: `feeds_for(b)` gives the state's feeds
        for rows 0..b-1. Returns the outputs of rows 0..n-1 (views of b-row outputs)."""
        n = ids.shape[0]
        b = bucket_for(n, self.rows)
        self.padded_rows += b - n
        if b > n:
            ids = torch.cat([ids, ids.new_zeros((b - n, *ids.shape[1:]))])     # (b, 1): rows past n feed token 0
        inputs = {"ids": ids, **feeds_for(b)}
        outputs = self._replay(b, inputs) if self.capture and self.failed is None else self.run(inputs)
        return {name: t[:n] for name, t in outputs.items()}

    def _replay(self, b: int, inputs: Feeds) -> Feeds:
        key = (b, tuple((name, t.data_ptr(), tuple(t.shape)) for name, t in inputs.items() if t._base is not None))
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(key, inputs)
            except Exception as exc:            # noqa: BLE001: any failure to capture means eager steps
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("decode steps run without CUDA graphs: capturing one failed (%s)", self.failed)
                return self.run(inputs)
        for name, static in graph.inputs.items():
            static.copy_(inputs[name], non_blocking=True)
        graph.graph.replay()
        self.replays += 1
        return graph.outputs

    def _capture(self, key: tuple, inputs: Feeds) -> _Graph:
        # a resize gave the state new tensors: the graphs over the old ones can go (the pool's memory
        # returns when they are dropped)
        for old in [k for k in self._graphs if k[0] == key[0]]:
            del self._graphs[old]
        static = {name: t.clone() for name, t in inputs.items() if t._base is None}
        args = {name: static.get(name, t) for name, t in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.run(args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.run(args)
        self._graphs[key] = _Graph(graph, static, outputs)
        self.captures += 1
        return self._graphs[key]
