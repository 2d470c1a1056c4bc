"""Export of KV-cache token models: the one-step function with the cache as explicit inputs/outputs.

    step(ids (B, T), start (B,), cache_k_0, cache_v_0, ..., cache_v_{L-1})      each cache (B, KV, S, hd)
        -> logits (B, T, V), new_k_0, new_v_0, ..., new_v_{L-1}                each new (B, KV, T, hd)

Parity is checked the way the server runs it — a right-padded prefill of rows with different
prompt lengths, then token-by-token decode, the caller writing new K/V into its own cache —
against the eager full forward over the same tokens (the slow, obviously correct path).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.parity import max_abs_error

TOLERANCE = 1e-4
# (prompt lengths per row, tokens decoded after the prefill): rows of different lengths
PARITY_CASES = (((7, 4), 5), ((3,), 3), ((9, 2, 5), 2))

StepRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def export_step_onnx(fam, model: torch.nn.Module, config, path: Path) -> None:
    """ONNX of StepModule with dynamic batch, new-token and cache axes."""
    step = fam.StepModule(model).eval()
    example = step_inputs(config, batch=2, new=3, cached=5, seed=0)
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, _as_args(fam, config, example), str(path),
                          input_names=list(fam.step_input_names(config)),
                          output_names=list(fam.step_output_names(config)),
                          dynamic_shapes=fam.step_dynamic_shapes(config), external_data=False, verbose=False)
    quiet.setLevel(level)


def _as_args(fam, config, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(inputs[n]) for n in fam.step_input_names(config))


def export_step_torchscript(fam, model: torch.nn.Module, config, path: Path) -> None:
    step = fam.StepModule(model).eval()
    example = step_inputs(config, batch=2, new=3, cached=5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(step, _as_args(fam, config, example))
        torch.jit.save(traced, str(path))


def onnx_step_runner(path: Path) -> StepRunner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(None, inputs)))


def torchscript_step_runner(path: Path, fam, config) -> StepRunner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))
    return _torch_runner(module, fam, config)


def eager_step_runner(fam, model: torch.nn.Module, config) -> StepRunner:
    return _torch_runner(fam.StepModule(model).eval(), fam, config)


def _torch_runner(module, fam, config) -> StepRunner:
    output_names = fam.step_output_names(config)

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = module(*_as_args(fam, config, inputs))
        return {n: o.numpy() for n, o in zip(output_names, outs)}
    return run


def step_inputs(config, batch: int, new: int, cached: int, seed: int) -> dict[str, np.ndarray]:
    """Random step inputs: ids, a start per row (<= cached), and a random cache per layer."""
    rng = np.random.default_rng(seed)
    cache_shape = (batch, config.n_kv_head, cached, config.n_embd // config.n_head)
    inputs = {"ids": rng.integers(0, config.vocab_size, (batch, new), dtype=np.int64),
              "start": rng.integers(0, cached + 1, batch, dtype=np.int64)}
    for i in range(config.n_layer):
        inputs[f"cache_k_{i}"] = rng.standard_normal(cache_shape, dtype=np.float32)
        inputs[f"cache_v_{i}"] = rng.standard_normal(cache_shape, dtype=np.float32)
    return inputs


def _caches(config, batch: int, slots: int) -> dict[str, np.ndarray]:
    """Zeroed per-layer caches (batch, KV, slots, hd)."""
    shape = (batch, config.n_kv_head, slots, config.n_embd // config.n_head)
    return {f"cache_{kv}_{i}": np.zeros(shape, np.float32) for i in range(config.n_layer) for kv in "kv"}


def prefill_decode_logits(run: StepRunner, config, tokens: np.ndarray, prompt_lengths: tuple[int, ...],
                          decode_steps: int) -> list[np.ndarray]:
    """Per row: logits (prompt_len + decode_steps, V) produced through the step function.

    tokens (B, max_len) hold each row's sequence; prefill feeds each row's prompt (right-padded),
    then every row decodes its next `decode_steps` tokens one at a time."""
    b = len(prompt_lengths)
    total = max(prompt_lengths) + decode_steps
    cache = _caches(config, b, total)                                       # what the caller owns
    ids = np.zeros((b, max(prompt_lengths)), np.int64)
    for i, n in enumerate(prompt_lengths):
        ids[i, :n] = tokens[i, :n]
    out = run({"ids": ids, "start": np.zeros(b, np.int64), **_caches(config, b, 1)})   # start 0 masks the slot
    logits = [[out["logits"][i, :n]] for i, n in enumerate(prompt_lengths)]
    lengths = np.array(prompt_lengths, np.int64)
    for name, c in cache.items():
        new = out["new" + name[len("cache"):]]                              # (B, KV, T, hd)
        for i, n in enumerate(prompt_lengths):
            c[i, :, :n] = new[i, :, :n]
    for _ in range(decode_steps):
        step_ids = tokens[np.arange(b), lengths][:, None]                   # (B, 1)
        out = run({"ids": step_ids, "start": lengths.copy(), **cache})
        for name, c in cache.items():
            c[np.arange(b), :, lengths] = out["new" + name[len("cache"):]][:, :, 0]
        for i in range(b):
            logits[i].append(out["logits"][i, :1])
        lengths += 1
    return [np.concatenate(parts) for parts in logits]


def check_token_parity(model: torch.nn.Module, config, run: StepRunner, fmt: str) -> dict:
    """Max abs error of prefill + decode through `run` against the eager full forward."""
    worst, shapes = 0.0, []
    rng = np.random.default_rng(1)
    for prompt_lengths, decode_steps in PARITY_CASES:
        total = max(prompt_lengths) + decode_steps
        tokens = rng.integers(0, config.vocab_size, (len(prompt_lengths), total), dtype=np.int64)
        got = prefill_decode_logits(run, config, tokens, prompt_lengths, decode_steps)
        with torch.no_grad():
            full = model(torch.from_numpy(tokens)).numpy()                      # (B, total, V)
        for i, n in enumerate(prompt_lengths):
            expected = full[i, : n + decode_steps]
            worst = max(worst, max_abs_error(expected, got[i]))
        shapes.append([len(prompt_lengths), total])
    return {"format": fmt, "max_abs_error": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE,
            "shapes_checked": shapes}


def signature(fam, config) -> dict:
    cache = [-1, config.n_kv_head, -1, config.n_embd // config.n_head]

    def tensor(name: str) -> dict:
        if name in ("ids", "start"):
            return {"name": name, "datatype": "INT64", "shape": [-1, -1] if name == "ids" else [-1]}
        if name == "logits":
            return {"name": name, "datatype": "FP32", "shape": [-1, -1, config.vocab_size]}
        return {"name": name, "datatype": "FP32", "shape": cache}
    return {"inputs": [tensor(n) for n in fam.step_input_names(config)],
            "outputs": [tensor(n) for n in fam.step_output_names(config)]}


def golden(fam, model: torch.nn.Module, config) -> dict[str, np.ndarray]:
    """Golden step inputs/outputs (eager), replayed by the server at load."""
    inputs = step_inputs(config, batch=2, new=3, cached=6, seed=7)
    outputs = eager_step_runner(fam, model, config)(inputs)
    return {**{f"input.{k}": v for k, v in inputs.items()}, **{f"output.{k}": v for k, v in outputs.items()}}
