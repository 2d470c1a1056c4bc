"""Export a checkpoint to ONNX and TorchScript, check each against eager, and package a folder
that the registry can publish (artifacts + checkpoint + golden pair + manifest.json).

Facts this relies on (torch 2.13, shared research export-and-data.md): `torch.onnx.export` uses
the dynamo exporter; named `Dim`s keep axes readable; `external_data=False` keeps one file; the
exporter can freeze a dimension marked dynamic, so every artifact is run at a second shape.
"""

from __future__ import annotations

import inspect
import logging
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.numpy import save_file

from model_registry import Manifest
from training import checkpoint
from training.families import family_module
from training.parity import describe_error, max_abs_error

ARTIFACTS = {"onnx": "model.onnx", "torchscript": "model.ts"}
GOLDEN = "golden.safetensors"
TOKENIZER = "tokenizer.json"
MAX_BATCH = 4096
TOLERANCE = 1e-4
# batch sizes every artifact is run at; 2 is the traced shape, the others prove the axis is dynamic
PARITY_BATCHES = (2, 1, 7)

KSERVE_DTYPES = {torch.float32: "FP32", torch.float16: "FP16", torch.float64: "FP64",
                 torch.int64: "INT64", torch.int32: "INT32", torch.uint8: "UINT8", torch.bool: "BOOL"}


class ParityError(RuntimeError):
    """An exported artifact disagrees with eager beyond the tolerance."""


def input_names(model: torch.nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def _outputs(result: Any) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...], output_names: list[str], path: Path) -> None:
    """ONNX with a dynamic batch axis on every input."""
    names = input_names(model)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # exporter noise: LeafSpec FutureWarning
        torch.onnx.export(model, example, str(path), input_names=names, output_names=output_names,
                          dynamic_shapes={n: {0: batch} for n in names}, external_data=False, verbose=False)
    quiet.setLevel(level)


def export_torchscript(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """Traced TorchScript (deprecated in torch 2.13 but working; kept behind the runtime interface)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))


def onnx_runner(path: Path) -> Callable[..., tuple[np.ndarray, ...]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: tuple(session.run(None, {n: x.numpy() for n, x in zip(names, xs)}))


def torchscript_runner(path: Path) -> Callable[..., tuple[np.ndarray, ...]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))

    def run(*xs: torch.Tensor) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            return tuple(o.numpy() for o in _outputs(module(*xs)))
    return run


def check_parity(model: torch.nn.Module, run: Callable, make_inputs: Callable[[int], tuple], fmt: str) -> dict:
    """Max abs error of `run` against eager over PARITY_BATCHES; a ParityReport as a dict."""
    worst, shapes = 0.0, []
    with torch.no_grad():
        for b in PARITY_BATCHES:
            xs = make_inputs(b)
            expected = [o.numpy() for o in _outputs(model(*xs))]
            got = run(*xs)
            for e, g in zip(expected, got, strict=True):
                if e.shape != g.shape:
                    raise ParityError(f"{fmt}: output shape {g.shape} != eager {e.shape} at batch {b}")
                worst = max(worst, max_abs_error(e, g))
            shapes.append(list(xs[0].shape))
    return {"format": fmt, "max_abs_error": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE,
            "shapes_checked": shapes}


def _signature(model: torch.nn.Module, example: tuple[torch.Tensor, ...], output_names: list[str]) -> dict:
    with torch.no_grad():
        outs = _outputs(model(*example))

    def spec(name: str, t: torch.Tensor) -> dict:
        return {"name": name, "datatype": KSERVE_DTYPES[t.dtype], "shape": [-1, *t.shape[1:]]}
    return {"inputs": [spec(n, t) for n, t in zip(input_names(model), example)],
            "outputs": [spec(n, t) for n, t in zip(output_names, outs)]}


def _check(report: dict) -> dict:
    if not report["passed"]:
        raise ParityError(f"{report['format']} export differs from eager by {describe_error(report['max_abs_error'])} "
                          f"(tolerance {report['tolerance']})")
    return report


def _export_stateless(model, make_inputs, output_names, out: Path, formats) -> tuple[list, dict, dict]:
    """Classifier-style models: forward(inputs) with a dynamic batch axis."""
    example = make_inputs(PARITY_BATCHES[0])
    reports = []
    for fmt in formats:
        path = out / ARTIFACTS[fmt]
        if fmt == "onnx":
            export_onnx(model, example, output_names, path)
            run = onnx_runner(path)
        else:
            export_torchscript(model, example, path)
            run = torchscript_runner(path)
        reports.append(_check(check_parity(model, run, make_inputs, fmt)))
    golden_in = make_inputs(3)
    with torch.no_grad():
        golden_out = _outputs(model(*golden_in))
    tensors = {f"input.{n}": t.numpy() for n, t in zip(input_names(model), golden_in)}
    tensors.update({f"output.{n}": t.numpy() for n, t in zip(output_names, golden_out)})
    return reports, _signature(model, example, output_names), tensors


def _export_token_model(fam, model, config, out: Path, formats) -> tuple[list, dict, dict]:
    """Token models: the KV-cache step function, checked by prefill + decode against the full forward."""
    if hasattr(fam, "STATE_NAMES"):               # constant-size recurrent state (mamba, the RNN LM)
        return _export_recurrent_model(fam, model, config, out, formats)
    from training import export_tokens as tok

    reports = []
    for fmt in formats:
        path = out / ARTIFACTS[fmt]
        if fmt == "onnx":
            tok.export_step_onnx(fam, model, config, path)
            run = tok.onnx_step_runner(path)
        else:
            tok.export_step_torchscript(fam, model, config, path)
            run = tok.torchscript_step_runner(path, fam, config)
        reports.append(_check(tok.check_token_parity(model, config, run, fmt)))
    return reports, tok.signature(fam, config), tok.golden(fam, model, config)


def _max_model_len(fam, config) -> int:
    """Tokens a server may give one sequence: the training window for KV-cache models; a recurrent
    state does not grow, so those get export_recurrent.MAX_MODEL_LEN."""
    if hasattr(fam, "STATE_NAMES"):
        from training.export_recurrent import MAX_MODEL_LEN
        return MAX_MODEL_LEN
    return config.block_size


def _export_recurrent_model(fam, model, config, out: Path, formats) -> tuple[list, dict, dict]:
    """Recurrent token models: the step with its state as inputs/outputs, checked the same way."""
    from training import export_recurrent as rec

    reports = []
    for fmt in formats:
        path = out / ARTIFACTS[fmt]
        if fmt == "onnx":
            rec.export_step_onnx(fam, model, config, path)
            run = rec.onnx_step_runner(path)
        else:
            rec.export_step_torchscript(fam, model, config, path)
            run = rec.torchscript_step_runner(path, fam)
        reports.append(_check(rec.check_recurrent_parity(fam, model, config, run, fmt)))
    return reports, rec.signature(fam, config), rec.golden(fam, model, config)


def _export_split_prefill(fam, model, config, out: Path, formats) -> dict | None:
    """The prefill segments beside model.onnx (Mamba), checked; None where not applicable."""
    from training import split_prefill

    if "onnx" not in formats or not split_prefill.supported(fam):
        return None
    spec = split_prefill.export_and_check(fam, model, config, out, out / ARTIFACTS["onnx"])
    if spec is not None:
        _check(spec["parity"])
    return spec


def package(checkpoint_dir: str | Path, out_dir: str | Path, formats: tuple[str, ...] = ("onnx", "torchscript"),
            serve_format: str = "onnx") -> Manifest:
    """Export, check parity, and write a publishable folder; ParityError if any format fails."""
    if serve_format not in formats:
        raise ValueError(f"serve format {serve_format!r} is not among the exported {formats}")
    src, out = Path(checkpoint_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, config = checkpoint.load(src)
    family = checkpoint.read_family(src)
    fam = family_module(family)
    meta = checkpoint.read_meta(src)
    output_names = list(fam.OUTPUT_NAMES)

    def make_inputs(batch: int) -> tuple[torch.Tensor, ...]:
        return fam.example_inputs(config, batch)

    state = parts = prefill = None   # sequence kind: the artifact's server-side inputs/outputs; generative:
    if fam.KIND == "tokens":         # its parts; recurrent tokens: the split prefill
        reports, signature, tensors = _export_token_model(fam, model, config, out, formats)
        prefill = _export_split_prefill(fam, model, config, out, formats)
        extra_files = [name for name in (TOKENIZER,) if (src / name).exists()]
        generation = {"max_model_len": _max_model_len(fam, config)}
    elif fam.KIND == "sequence":
        from training import export_sequence

        reports, signature, tensors, state = export_sequence.export(model, config, out, formats)
        extra_files, generation = [], {}
    elif fam.KIND in ("sample", "denoise"):   # GAN generator, VAE decoder + encoder, UNet: parts of a sampler
        from training import export_generative

        reports, signature, tensors, parts = export_generative.export_parts(family, model, config, out, formats)
        extra_files, generation = [], fam.generation_defaults(config)
    else:
        reports, signature, tensors = _export_stateless(model, make_inputs, output_names, out, formats)
        extra_files, generation = [], {}
    # safetensors writes an array's buffer as is: a non-contiguous view (a transposed K, say)
    # would be stored scrambled, so every tensor is made C-contiguous first
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / GOLDEN))
    for name in (checkpoint.WEIGHTS, checkpoint.CONFIG, *extra_files):
        shutil.copyfile(src / name, out / name)

    manifest = Manifest(
        family=family, kind=fam.KIND, format=serve_format,
        artifacts=next(iter(parts.values()))["artifacts"] if parts else {f: ARTIFACTS[f] for f in formats},
        signature=signature,
        labels=meta.get("labels", []),
        generation=generation,
        tokenizer=TOKENIZER if TOKENIZER in extra_files else None,
        golden=GOLDEN,
        lineage=meta.get("lineage", {}),
        parity=reports,
        state=state,
        parts=parts,
        prefill=prefill,
    )
    (out / "manifest.json").write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    return manifest
