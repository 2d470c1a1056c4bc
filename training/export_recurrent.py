"""Export of recurrent token models: the one-step function with a constant-size state.

    step(ids (B, T), n_new (B,), *states (B, ...)) -> logits (B, 1, V), *new_states (B, ...)

Any family with `StepModule`, `state_shapes(config)` (per-row shapes, float32, in input order)
and `step_dynamic_shapes([config], ...)` exports through here (Mamba's conv/SSM states, one pair
per layer; the character RNN's hidden state). The state inputs are `state_names(config)` where
the family defines it (their number follows the config), else its `STATE_NAMES`; the step's
inputs are ("ids", "n_new", *states) and its outputs ("logits", "new_<state>" for each state, in
the same order). Row b's real tokens are ids[b, :n_new[b]] (right-padded), its logits are those
at its last real token (all a server samples from: the head over every prompt position was ~6 %
of Mamba's 512-token prefill) and the returned states are those after exactly n_new[b] tokens.

Parity is checked the way a server runs it — a right-padded prefill of rows with different
prompt lengths from zero state, then token-by-token decode feeding the returned states back —
against the eager full forward over the same tokens (the slow, obviously correct path), at every
position whose logits the step returns: each prompt's last token and every decoded one.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.export import ParityError
from training.export_sequence import fresh_rnn_dispatch
from training.export_tokens import onnx_step_runner  # noqa: F401  (the same one-thread ONNX Runtime runner)
from training.parity import max_abs_error

TOLERANCE = 1e-4
# the context a recurrent model is published with: its state does not grow, so this only bounds
# what a server accepts (and the exported step's dynamic T)
MAX_MODEL_LEN = 65536
# (prompt lengths per row, tokens decoded after the prefill): rows of different lengths, a prompt
# shorter than the conv window, and one longer than a scan chunk
PARITY_CASES = (((7, 4), 5), ((3,), 3), ((9, 1, 5), 2), ((40, 17, 2), 3))

StepRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
NON_STATE_INPUTS = ("ids", "n_new")


def state_names(fam, config) -> tuple[str, ...]:
    """The step's state inputs, in order: `fam.state_names(config)` where the family has it."""
    return tuple(fam.state_names(config)) if hasattr(fam, "state_names") else tuple(fam.STATE_NAMES)


def input_names(fam, config) -> tuple[str, ...]:
    return (*NON_STATE_INPUTS, *state_names(fam, config))


def output_names(fam, config) -> tuple[str, ...]:
    return ("logits", *(new_state_name(n) for n in state_names(fam, config)))


def new_state_name(state: str) -> str:
    """The step output that carries a state input's new value."""
    return f"new_{state}"


def step_inputs(fam, config, batch: int, new: int, seed: int) -> dict[str, np.ndarray]:
    """Random step inputs: ids (batch, new), n_new in 1..new (the first row full), random states."""
    rng = np.random.default_rng(seed)
    n_new = rng.integers(1, new + 1, batch, dtype=np.int64)
    n_new[0] = new
    inputs = {"ids": rng.integers(0, config.vocab_size, (batch, new), dtype=np.int64), "n_new": n_new}
    for name, shape in fam.state_shapes(config).items():
        inputs[name] = rng.standard_normal((batch, *shape), dtype=np.float32)
    return inputs


def _example(fam, config) -> tuple[torch.Tensor, ...]:
    # B = 2 and T = 3 unless the family asks for more: distinct and >= 2, so the exporter keeps both dynamic
    inputs = step_inputs(fam, config, batch=2, new=getattr(fam, "EXPORT_EXAMPLE_NEW", 3), seed=0)
    return tuple(torch.from_numpy(inputs[n]) for n in input_names(fam, config))


def _dynamic_shapes(fam, config) -> dict:
    """The family's step_dynamic_shapes, given the config where it takes one (per-layer states)."""
    if "config" in inspect.signature(fam.step_dynamic_shapes).parameters:
        return fam.step_dynamic_shapes(config, max_len=MAX_MODEL_LEN)
    return fam.step_dynamic_shapes(max_len=MAX_MODEL_LEN)


def export_step_onnx(fam, model: torch.nn.Module, config, path: Path) -> None:
    """ONNX (dynamo exporter) of StepModule with dynamic batch and new-token axes."""
    step = fam.StepModule(model).eval()
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # no_grad: with autograd on, tracing a scan nested in a cond (Mamba's prefill) fails
        with warnings.catch_warnings(), torch.no_grad(), fresh_rnn_dispatch():
            warnings.simplefilter("ignore")   # exporter noise: LeafSpec FutureWarning, unused axis names
            torch.onnx.export(step, _example(fam, config), str(path), input_names=list(input_names(fam, config)),
                              output_names=list(output_names(fam, config)),
                              dynamic_shapes=_dynamic_shapes(fam, config), external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    _drop_stale_shapes(path)


def _drop_stale_shapes(path: Path) -> None:
    """A graph with LSTM/GRU/RNN nodes keeps the traced T in its shape annotations (the output
    `logits` declared (batch, 3, V)); ONNX Runtime then warns on every run whose T differs.
    Intermediate annotations go, and every output axis after the batch that is not a fixed size
    of the state is declared symbolic again. Other graphs are left untouched."""
    import onnx

    graph = onnx.load(str(path))
    if not {"LSTM", "GRU", "RNN"} & {node.op_type for node in graph.graph.node}:
        return
    del graph.graph.value_info[:]
    onnx.save(graph, str(path))


def export_step_torchscript(fam, model: torch.nn.Module, config, path: Path) -> None:
    """Traced TorchScript of StepModule (a family keeps T dynamic by calling scripted loops)."""
    step = fam.StepModule(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(step, _example(fam, config), check_trace=False)
        torch.jit.save(traced, str(path))


def _torch_runner(module: Callable, fam) -> StepRunner:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # inputs hold ids, n_new and the states in input order (as step_inputs and the parity loop build them)
        names = [*NON_STATE_INPUTS, *(n for n in inputs if n not in NON_STATE_INPUTS)]
        with torch.no_grad():
            outs = module(*(torch.from_numpy(inputs[n]) for n in names))
        return {n: o.numpy() for n, o in zip(("logits", *map(new_state_name, names[2:])), outs, strict=True)}
    return run


def torchscript_step_runner(path: Path, fam) -> StepRunner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))
    return _torch_runner(module, fam)


def eager_step_runner(fam, model: torch.nn.Module) -> StepRunner:
    return _torch_runner(fam.StepModule(model).eval(), fam)


def prefill_decode_logits(run: StepRunner, fam, config, tokens: np.ndarray, prompt_lengths: tuple[int, ...],
                          decode_steps: int) -> list[np.ndarray]:
    """Per row: logits (1 + decode_steps, V) produced through the step function, at positions
    prompt_len - 1 .. prompt_len + decode_steps - 1.

    tokens (B, max_len) hold each row's sequence. Prefill feeds every row's prompt at once,
    right-padded, from zero state; then every row decodes its next `decode_steps` tokens one at a
    time, the returned states fed back in. Every returned state must keep its per-row shape.
    """
    b = len(prompt_lengths)
    shapes = fam.state_shapes(config)
    state_outputs = {name: new_state_name(name) for name in state_names(fam, config)}
    ids = np.zeros((b, max(prompt_lengths)), np.int64)
    for i, n in enumerate(prompt_lengths):
        ids[i, :n] = tokens[i, :n]
    lengths = np.array(prompt_lengths, np.int64)
    inputs = {"ids": ids, "n_new": lengths.copy(),
              **{name: np.zeros((b, *shape), np.float32) for name, shape in shapes.items()}}
    logits: list[list[np.ndarray]] = [[] for _ in prompt_lengths]
    for step in range(decode_steps + 1):
        out = run(inputs)
        if out["logits"].shape != (b, 1, config.vocab_size):
            raise ParityError(f"logits shape {out['logits'].shape} != {(b, 1, config.vocab_size)}")
        for i in range(b):
            logits[i].append(out["logits"][i])
        for name, shape in shapes.items():
            if out[state_outputs[name]].shape != (b, *shape):
                raise ParityError(f"{state_outputs[name]} shape {out[state_outputs[name]].shape} != {(b, *shape)}")
            inputs[name] = out[state_outputs[name]]
        if step < decode_steps:
            inputs["ids"] = tokens[np.arange(b), lengths][:, None]                  # (B, 1)
            inputs["n_new"] = np.ones(b, np.int64)
            lengths += 1
    return [np.concatenate(parts) for parts in logits]


def check_recurrent_parity(fam, model: torch.nn.Module, config, run: StepRunner, fmt: str) -> dict:
    """Max abs error of prefill + decode through `run` against the eager full forward."""
    worst, shapes = 0.0, []
    rng = np.random.default_rng(1)
    for prompt_lengths, decode_steps in PARITY_CASES:
        total = max(prompt_lengths) + decode_steps
        tokens = rng.integers(0, config.vocab_size, (len(prompt_lengths), total), dtype=np.int64)
        got = prefill_decode_logits(run, fam, config, tokens, prompt_lengths, decode_steps)
        with torch.no_grad():
            full = model(torch.from_numpy(tokens)).numpy()                      # (B, total, V)
        for i, n in enumerate(prompt_lengths):
            expected = full[i, n - 1 : n + decode_steps]
            if got[i].shape != expected.shape:
                raise ParityError(f"{fmt}: row {i} logits {got[i].shape} != eager {expected.shape}")
            worst = max(worst, max_abs_error(expected, got[i]))
        shapes.append([len(prompt_lengths), total])
    return {"format": fmt, "max_abs_error": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE,
            "shapes_checked": shapes}


def signature(fam, config) -> dict:
    """KServe-style tensor specs of the step: -1 marks the dynamic batch and new-token axes."""
    spec = {"ids": ("INT64", [-1, -1]), "n_new": ("INT64", [-1]), "logits": ("FP32", [-1, 1, config.vocab_size])}
    for name in state_names(fam, config):
        spec[name] = spec[new_state_name(name)] = ("FP32", [-1, *fam.state_shapes(config)[name]])

    def tensor(name: str) -> dict:
        return {"name": name, "datatype": spec[name][0], "shape": spec[name][1]}
    return {"inputs": [tensor(n) for n in input_names(fam, config)],
            "outputs": [tensor(n) for n in output_names(fam, config)]}


def golden(fam, model: torch.nn.Module, config) -> dict[str, np.ndarray]:
    """Golden step inputs/outputs (eager) with padded rows and nonzero states, replayed by the server at load."""
    inputs = step_inputs(fam, config, batch=2, new=3, seed=7)
    outputs = eager_step_runner(fam, model)(inputs)
    return {**{f"input.{k}": v for k, v in inputs.items()}, **{f"output.{k}": v for k, v in outputs.items()}}
