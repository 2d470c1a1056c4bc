"""Export of the sequence kind (the `rnn` forecaster): ONNX and TorchScript of `rnn.SequenceModule`,

    forward(series (B, T, 1), lengths (B,) int64, h0 (B, L, H)[, c0]) -> forecast (B, K), hn (B, L, H)[, cn]

with dynamic B and T and the hidden state as explicit, batch-first inputs and outputs (the model
moves to torch's (L, B, H) layout inside). Rows are right-padded to the batch's longest; row b's
history is series[b, :lengths[b]] and hn/cn are the state after exactly lengths[b] steps.
Clients see only `series` -> `forecast` (the manifest signature); `lengths` and the state are
the server's (the manifest's `state`).

Parity: every artifact against eager over batches of ragged rows (T = 1 included) from random
initial states, every output compared, the final state too. Golden: the public pair (whole
histories from zero state), which every server replays through the signature, and a stateful
pair (ragged rows, random state), which the sequence engine replays at load.

Found here (torch 2.13, onnxscript 0.7): the dynamo exporter runs aten::lstm / aten::gru with a
dynamic T through while_loop decompositions that it swaps into the ops' `py_kernels` for the
export, without clearing the ops' dispatch cache; a second RNN export in one process then takes
a stale kernel and freezes T at the traced length. `fresh_rnn_dispatch` clears those caches.
The graph also keeps the traced T in intermediate shape annotations (`value_info`); they are
dropped, as a declared shape that disagrees with a run makes ONNX Runtime warn.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from training.export import ARTIFACTS, ParityError
from training.models import rnn
from training.parity import describe_error, max_abs_error

TOLERANCE = 1e-4
MAX_BATCH, MAX_TIME = 4096, 1 << 20
# row lengths of each checked batch: ragged rows, one row of a single step, a wider batch
PARITY_CASES = ((12, 12), (7, 12, 1, 3), (1,), (5, 30, 17, 2, 9, 30, 1))
TRACE_LENGTHS = (12, 7)       # B = 2, T = 12: distinct and >= 2, so the exporter keeps both dynamic

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def input_names(config) -> list[str]:
    return ["series", "lengths", *(rnn.STATE_INPUTS[n] for n in rnn.state_names(config.cell))]


def output_names(config) -> list[str]:
    return ["forecast", *(rnn.STATE_OUTPUTS[n] for n in rnn.state_names(config.cell))]


def make_inputs(config, lengths: tuple[int, ...], seed: int, zero_state: bool = False) -> dict[str, np.ndarray]:
    """Right-padded raw histories of `lengths` around the training mean, and a random (or zero) state."""
    rng = np.random.default_rng(seed)
    B, T = len(lengths), max(lengths)
    series = (config.mean + config.std * rng.standard_normal((B, T, 1))).astype(np.float32)
    series[np.arange(T)[None, :] >= np.array(lengths)[:, None]] = 0.0
    inputs = {"series": series, "lengths": np.array(lengths, np.int64)}
    for name in input_names(config)[2:]:
        shape = (B, config.layers, config.hidden)
        inputs[name] = np.zeros(shape, np.float32) if zero_state else rng.standard_normal(shape).astype(np.float32)
    return inputs


@contextlib.contextmanager
def fresh_rnn_dispatch() -> Iterator[None]:
    """Clear aten::lstm/gru dispatch caches around an export (module docstring)."""
    ops = (torch.ops.aten.lstm.input, torch.ops.aten.gru.input)
    for op in ops:
        op._dispatch_cache.clear()
    try:
        yield
    finally:
        for op in ops:
            op._dispatch_cache.clear()


def _example(config) -> tuple[torch.Tensor, ...]:
    inputs = make_inputs(config, TRACE_LENGTHS, seed=0)
    return tuple(torch.from_numpy(inputs[n]) for n in input_names(config))


def export_onnx(model: rnn.Forecaster, config, path: Path) -> None:
    """ONNX (dynamo exporter) with dynamic batch and time, stale shape annotations removed."""
    import onnx

    module = rnn.SequenceModule(model).eval()
    batch, time = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("time", min=1, max=MAX_TIME)
    names = input_names(config)
    dynamic = {"series": {0: batch, 1: time}, "lengths": {0: batch}, "h0": {0: batch}}
    if len(names) > 3:
        dynamic["c0"] = {0: batch}
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), fresh_rnn_dispatch():
            warnings.simplefilter("ignore")   # exporter noise: LeafSpec FutureWarning
            torch.onnx.export(module, _example(config), str(path), input_names=names,
                              output_names=output_names(config), dynamic_shapes=dynamic,
                              external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    graph = onnx.load(str(path))
    del graph.graph.value_info[:]       # intermediate annotations still hold the traced T
    onnx.save(graph, str(path))


def export_torchscript(model: rnn.Forecaster, config, path: Path) -> None:
    """Traced TorchScript (deprecated in torch 2.13 but working; kept behind the runtime interface)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(rnn.SequenceModule(model).eval(), _example(config))
        torch.jit.save(traced, str(path))


def onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(None, inputs)))


def torchscript_runner(path: Path, config) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))
    return _module_runner(module, config)


def eager_runner(model: rnn.Forecaster, config) -> Runner:
    return _module_runner(rnn.SequenceModule(model).eval(), config)


def _module_runner(module, config) -> Runner:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = module(*(torch.from_numpy(inputs[n]) for n in input_names(config)))
        return {n: o.numpy() for n, o in zip(output_names(config), outs)}
    return run


def check_parity(model: rnn.Forecaster, config, run: Runner, fmt: str) -> dict:
    """Max abs error of `run` against eager over PARITY_CASES, every output; a ParityReport as a dict."""
    eager = eager_runner(model, config)
    worst, shapes = 0.0, []
    for i, lengths in enumerate(PARITY_CASES):
        inputs = make_inputs(config, lengths, seed=100 + i)
        expected, got = eager(inputs), run(inputs)
        for name, e in expected.items():
            if got[name].shape != e.shape:
                raise ParityError(f"{fmt}: output {name} has shape {got[name].shape}, eager {e.shape} "
                                  f"at lengths {lengths}")
            worst = max(worst, max_abs_error(e, got[name]))
        shapes.append([len(lengths), max(lengths)])
    return {"format": fmt, "max_abs_error": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE,
            "shapes_checked": shapes}


def signature(config) -> dict:
    """What clients see: a batch of whole histories in, the next K values out."""
    return {"inputs": [{"name": "series", "datatype": "FP32", "shape": [-1, -1, 1]}],
            "outputs": [{"name": "forecast", "datatype": "FP32", "shape": [-1, config.horizon]}]}


def state_spec(config) -> dict:
    """The artifact's server-side tensors, in its argument order (model_registry.manifest.StateSpec)."""
    state = [-1, config.layers, config.hidden]
    return {"lengths": {"name": "lengths", "datatype": "INT64", "shape": [-1]},
            "inputs": [{"name": n, "datatype": "FP32", "shape": state} for n in input_names(config)[2:]],
            "outputs": [{"name": n, "datatype": "FP32", "shape": state} for n in output_names(config)[1:]]}


def golden(model: rnn.Forecaster, config) -> dict[str, np.ndarray]:
    """input./output. = the public pair (3 whole histories of 10 steps from zero state);
    state_input./state_output. = a stateful pair (ragged rows, random state, every output)."""
    eager = eager_runner(model, config)
    public = make_inputs(config, (10, 10, 10), seed=7, zero_state=True)
    stateful = make_inputs(config, (6, 1, 9), seed=8)
    return {"input.series": public["series"], "output.forecast": eager(public)["forecast"],
            **{f"state_input.{k}": v for k, v in stateful.items()},
            **{f"state_output.{k}": v for k, v in eager(stateful).items()}}


def export(model: rnn.Forecaster, config, out: Path, formats) -> tuple[list[dict], dict, dict, dict]:
    """Export `formats` into `out`, each checked against eager; (reports, signature, golden, state spec)."""
    reports = []
    for fmt in formats:
        path = out / ARTIFACTS[fmt]
        if fmt == "onnx":
            export_onnx(model, config, path)
            run = onnx_runner(path)
        else:
            export_torchscript(model, config, path)
            run = torchscript_runner(path, config)
        report = check_parity(model, config, run, fmt)
        if not report["passed"]:
            raise ParityError(f"{fmt} export differs from eager by {describe_error(report['max_abs_error'])} "
                              f"(tolerance {TOLERANCE})")
        reports.append(report)
    return reports, signature(config), golden(model, config), state_spec(config)
