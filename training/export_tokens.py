"""Export of token models: the one-step function with the KV cache as explicit inputs/outputs.

    step(ids (B, T), start (B,), cache_k (B, L, KV, S, hd), cache_v) -> logits (B, T, V), new_k, new_v (B, L, KV, T, hd)

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
        torch.onnx.export(step, tuple(torch.from_numpy(example[n]) for n in fam.STEP_INPUT_NAMES), str(path),
                          input_names=list(fam.STEP_INPUT_NAMES), output_names=list(fam.STEP_OUTPUT_NAMES),
                          dynamic_shapes=fam.step_dynamic_shapes(), external_data=False, verbose=False)
    quiet.setLevel(level)


def export_step_torchscript(fam, model: torch.nn.Module, config, path: Path) -> None:
    step = fam.StepModule(model).eval()
    example = step_inputs(config, batch=2, new=3, cached=5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(step, tuple(torch.from_numpy(example[n]) for n in fam.STEP_INPUT_NAMES))
        torch.jit.save(traced, str(path))


def onnx_step_runner(path: Path) -> StepRunner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(None, inputs)))


def torchscript_step_runner(path: Path, fam) -> StepRunner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = module(*(torch.from_numpy(inputs[n]) for n in fam.STEP_INPUT_NAMES))
        return {n: o.numpy() for n, o in zip(fam.STEP_OUTPUT_NAMES, outs)}
    return run


def eager_step_runner(fam, model: torch.nn.Module) -> StepRunner:
    step = fam.StepModule(model).eval()

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = step(*(torch.from_numpy(inputs[n]) for n in fam.STEP_INPUT_NAMES))
        return {n: o.numpy() for n, o in zip(fam.STEP_OUTPUT_NAMES, outs)}
    return run


def step_inputs(config, batch: int, new: int, cached: int, seed: int) -> dict[str, np.ndarray]:
    """Random step inputs: ids, a start per row (<= cached), and a random cache."""
    rng = np.random.default_rng(seed)
    hd = config.n_embd // config.n_head
    cache_shape = (batch, config.n_layer, config.n_kv_head, cached, hd)
    return {"ids": rng.integers(0, config.vocab_size, (batch, new), dtype=np.int64),
            "start": rng.integers(0, cached + 1, batch, dtype=np.int64),
            "cache_k": rng.standard_normal(cache_shape, dtype=np.float32),
            "cache_v": rng.standard_normal(cache_shape, dtype=np.float32)}


def prefill_decode_logits(run: StepRunner, config, tokens: np.ndarray, prompt_lengths: tuple[int, ...],
                          decode_steps: int) -> list[np.ndarray]:
    """Per row: logits (prompt_len + decode_steps, V) produced through the step function.

    tokens (B, max_len) hold each row's sequence; prefill feeds each row's prompt (right-padded),
    then every row decodes its next `decode_steps` tokens one at a time."""
    b = len(prompt_lengths)
    hd = config.n_embd // config.n_head
    total = max(prompt_lengths) + decode_steps
    cache_k = np.zeros((b, config.n_layer, config.n_kv_head, total, hd), np.float32)
    cache_v = np.zeros_like(cache_k)
    ids = np.zeros((b, max(prompt_lengths)), np.int64)
    for i, n in enumerate(prompt_lengths):
        ids[i, :n] = tokens[i, :n]
    empty = np.zeros((b, config.n_layer, config.n_kv_head, 1, hd), np.float32)
    out = run({"ids": ids, "start": np.zeros(b, np.int64), "cache_k": empty, "cache_v": empty})
    logits = [[out["logits"][i, :n]] for i, n in enumerate(prompt_lengths)]
    lengths = np.array(prompt_lengths, np.int64)
    for i, n in enumerate(prompt_lengths):
        cache_k[i, :, :, :n], cache_v[i, :, :, :n] = out["new_k"][i, :, :, :n], out["new_v"][i, :, :, :n]
    for _ in range(decode_steps):
        step_ids = tokens[np.arange(b), lengths][:, None]                       # (B, 1)
        out = run({"ids": step_ids, "start": lengths.copy(), "cache_k": cache_k, "cache_v": cache_v})
        for i in range(b):
            cache_k[i, :, :, lengths[i]] = out["new_k"][i, :, :, 0]
            cache_v[i, :, :, lengths[i]] = out["new_v"][i, :, :, 0]
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
            worst = max(worst, float(np.max(np.abs(expected.astype(np.float64) - got[i]))))
        shapes.append([len(prompt_lengths), total])
    return {"format": fmt, "max_abs_error": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE,
            "shapes_checked": shapes}


def signature(fam, config) -> dict:
    hd = config.n_embd // config.n_head
    cache = [-1, config.n_layer, config.n_kv_head, -1, hd]
    spec = {"ids": ("INT64", [-1, -1]), "start": ("INT64", [-1]), "cache_k": ("FP32", cache),
            "cache_v": ("FP32", cache), "logits": ("FP32", [-1, -1, config.vocab_size]),
            "new_k": ("FP32", cache), "new_v": ("FP32", cache)}

    def tensor(name: str) -> dict:
        return {"name": name, "datatype": spec[name][0], "shape": spec[name][1]}
    return {"inputs": [tensor(n) for n in fam.STEP_INPUT_NAMES], "outputs": [tensor(n) for n in fam.STEP_OUTPUT_NAMES]}


def golden(fam, model: torch.nn.Module, config) -> dict[str, np.ndarray]:
    """Golden step inputs/outputs (eager), replayed by the server at load."""
    inputs = step_inputs(config, batch=2, new=3, cached=6, seed=7)
    outputs = eager_step_runner(fam, model)(inputs)
    return {**{f"input.{k}": v for k, v in inputs.items()}, **{f"output.{k}": v for k, v in outputs.items()}}
