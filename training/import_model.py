"""Import a model trained elsewhere (`zooserve registry import`): one ONNX or TorchScript file
becomes the next version of a `classify` model (stateless tensors in, tensors out, served by the
dynamic batcher) with a signature, a golden pair and a lineage that names the file.

Steps, top to bottom (`import_model`):
1. open the artifact: ONNX reads its signature from the graph; TorchScript records no names or
   shapes, so they come from the flags (--input-shape required) and one run of the example;
2. record the golden pair by running the artifact itself on seeded inputs, checking that the
   outputs are finite and that each row answers the same in a batch of 3 as in a batch of 2
   (the batcher joins unrelated requests into one batch);
3. write artifact + golden.safetensors + manifest.json into a temporary folder and publish it.

Anything that would make the version unservable is refused before anything is published, as an
ImportRefused (a RegistryError: the CLI prints `error: ...` and exits 2).

onnx, onnxruntime and torch are imported inside the functions of their format: importing an ONNX
file does not pay for torch.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from model_registry import (MANIFEST, Lineage, Manifest, Registry, RegistryError, Signature, TensorSpec,
                            dump_json, sha256_file, validate_name)

FAMILY = "imported"
KIND = "classify"
GOLDEN = "golden.safetensors"
ARTIFACTS = {"onnx": "model.onnx", "torchscript": "model.ts"}
FORMAT_OF_SUFFIX = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}
# rows of the golden batch where the model batches
GOLDEN_ROWS = 2
# golden inputs are integers in [0, GOLDEN_HIGH): a valid pixel, token id or class index alike
GOLDEN_HIGH = 10
# the server's golden replay and export parity use the same bound (serve/golden.py)
TOLERANCE = 1e-4

# KServe v2 datatype -> numpy dtype of every datatype an import can carry. BYTES cannot: the golden
# pair is stored in safetensors, which holds no strings.
NUMPY_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
                "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
DATATYPE_OF_NUMPY = {np.dtype(t): name for name, t in NUMPY_DTYPES.items()}
# ONNX TensorProto type name -> KServe v2 datatype (complex, bfloat16, float8, int4 ... have none)
ONNX_DATATYPES = {"BOOL": "BOOL", "UINT8": "UINT8", "UINT16": "UINT16", "UINT32": "UINT32", "UINT64": "UINT64",
                  "INT8": "INT8", "INT16": "INT16", "INT32": "INT32", "INT64": "INT64",
                  "FLOAT16": "FP16", "FLOAT": "FP32", "DOUBLE": "FP64", "STRING": "BYTES"}
# KServe v2 datatype -> torch dtype name, for TorchScript inputs (torch's uint16/32/64 have few CPU ops)
TORCH_DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
                   "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ImportRefused(RegistryError):
    """A file that cannot be imported as a servable version; nothing was published."""


@dataclass
class Artifact:
    """An opened model file, runnable on numpy inputs keyed by signature name."""

    format: str                                # "onnx" or "torchscript"
    path: Path
    # the public inputs: dim 0 is -1 where the model batches, -1 marks other variable dims too
    inputs: list[TensorSpec]
    # input name -> the concrete shape of its golden input (GOLDEN_ROWS rows where the model batches)
    golden_shapes: dict[str, list[int]]
    run: Run
    # output name -> the shape the graph declares (-1: variable; None: none declared); empty for
    # TorchScript, whose output shapes are read from a run
    declared_output_shapes: dict[str, list[int] | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Imported:
    """What an import published."""

    name: str
    version: int
    manifest: Manifest
    # things the import changed beyond the new version (the batcher's cap of a --no-batch model)
    notes: list[str] = field(default_factory=list)


# ---- the import, top to bottom --------------------------------------------------------------------

def import_model(registry: Registry, name: str, source: str | Path, *, labels: str | Path | None = None,
                 input_shape: str | list[int] | None = None, input_name: str | None = None,
                 output_name: str | None = None, datatype: str | None = None, batch: bool = True,
                 seed: int = 0, force: bool = False) -> Imported:
    """Publish `source` (.onnx, or TorchScript .pt/.ts) as the next version of `name`; ImportRefused
    (nothing published) if it cannot be served. `input_shape` is the example input's shape, batch
    dim first ("1,1,8,8"); `datatype` (KServe v2) and the names default to FP32, input, output for
    TorchScript and must match the graph for ONNX. Into a model whose versions are of another
    family, only with `force` (Registry.publish)."""
    validate_name(name)
    source = Path(source)
    fmt = format_of(source)
    label_list = read_labels(Path(labels)) if labels is not None else []
    example = parse_shape(input_shape) if input_shape is not None else None
    if datatype is not None and datatype not in NUMPY_DTYPES:
        raise ImportRefused(f"--datatype {datatype} is not a KServe v2 datatype an import can carry: use one of "
                            f"{', '.join(NUMPY_DTYPES)}")
    if fmt == "onnx":
        artifact = open_onnx(source, example, input_name, output_name, datatype, batch)
    else:
        artifact = open_torchscript(source, example, input_name or "input", output_name or "output",
                                    datatype or "FP32", batch)
    golden_in = golden_inputs(artifact.inputs, artifact.golden_shapes, seed)
    golden_out = record_golden(artifact, golden_in, batch)
    signature = Signature(inputs=artifact.inputs,
                          outputs=[output_spec(n, y, artifact.declared_output_shapes.get(n), batch)
                                   for n, y in golden_out.items()])
    check_labels(label_list, signature.outputs)
    options = {"format": fmt, "input_shape": example, "batch": batch, "golden_seed": seed,
               "golden_shapes": artifact.golden_shapes}
    with tempfile.TemporaryDirectory(prefix="zooserve-import-") as tmp:
        folder = Path(tmp)
        write_package(folder, artifact, signature, label_list, golden_in, golden_out, options)
        version = registry.publish(name, folder, force=force)
    notes = [] if batch else fit_batcher_to_fixed_rows(registry, name, artifact.inputs[0].shape[0])
    return Imported(name, version, registry.manifest(name, version), notes)


# ---- arguments ----------------------------------------------------------------------------------

def format_of(path: Path) -> str:
    """"onnx" or "torchscript", by the file's suffix; the file must exist."""
    if not path.is_file():
        raise ImportRefused(f"{path} does not exist or is not a file: give the path of an .onnx or .pt file")
    fmt = FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise ImportRefused(f"cannot tell the format of {path} from its suffix {path.suffix!r}: name an ONNX "
                            f"file *.onnx and a TorchScript file *.pt or *.ts")
    return fmt


def parse_shape(shape: str | list[int]) -> list[int]:
    """"1,1,8,8" (or a list) -> [1, 1, 8, 8]; every dim a positive integer."""
    try:
        dims = [int(part) for part in (shape.split(",") if isinstance(shape, str) else shape)]
    except (TypeError, ValueError):
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise ImportRefused(f"bad --input-shape {shape!r}: give positive integers separated by commas, batch "
                            f"dim first, e.g. 1,1,8,8")
    return dims


def read_labels(path: Path) -> list[str]:
    """Class names, one a line (trailing blank lines dropped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"cannot read --labels {path}: {exc}; give a UTF-8 text file, one label a line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ImportRefused(f"--labels {path} is empty: give one class name a line")
    return [line.strip() for line in lines]


def require_servable(what: str, name: str, datatype: str) -> None:
    """Refuse a datatype outside the KServe v2 set this import carries."""
    if datatype not in NUMPY_DTYPES:
        why = (" (a golden pair cannot store strings)" if datatype == "BYTES" else "")
        raise ImportRefused(f"{what} '{name}' has datatype {datatype}, which an import cannot serve{why}: "
                            f"supported are {', '.join(NUMPY_DTYPES)}; cast it in the model before exporting")


# ---- ONNX -----------------------------------------------------------------------------------------

def open_onnx(path: Path, example: list[int] | None, input_name: str | None, output_name: str | None,
              datatype: str | None, batch: bool) -> Artifact:
    """The graph's signature, checked for servable datatypes and a batch axis, and an ONNX Runtime session."""
    graph = load_onnx_graph(path)
    initializers = {t.name for t in graph.initializer}   # old exporters list weights as graph inputs too
    input_values = [v for v in graph.input if v.name not in initializers]
    if not input_values:
        raise ImportRefused(f"{path} takes no inputs (every graph input is a weight): nothing to serve")
    check_flag_matches("--input-name", input_name, [v.name for v in input_values])
    check_flag_matches("--output-name", output_name, [v.name for v in graph.output])
    inputs = [TensorSpec(name=v.name, datatype=onnx_datatype(v, "input"), shape=onnx_shape(v, "input"))
              for v in input_values]
    for value in graph.output:
        onnx_datatype(value, "output")     # refuses an output no client could read
    declared_output_shapes = {v.name: onnx_shape(v, "output") for v in graph.output}
    if datatype is not None and any(s.datatype != datatype for s in inputs):
        raise ImportRefused(f"--datatype {datatype} does not match the graph's inputs "
                            f"{[(s.name, s.datatype) for s in inputs]}: an ONNX graph types its own tensors; "
                            f"drop --datatype")
    if example is not None and len(inputs) != 1:
        raise ImportRefused(f"--input-shape describes one input, but {path} has {len(inputs)}: "
                            f"{[s.name for s in inputs]}")
    check_batch_axis(path, inputs, batch)
    return Artifact("onnx", path, inputs, {s.name: golden_shape(s, example, batch) for s in inputs},
                    onnx_runner(path), declared_output_shapes)


def load_onnx_graph(path: Path):
    """The GraphProto of a one-file ONNX model with at least one input, output and node."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises many kinds on bytes that are not a model
        raise ImportRefused(f"{path} is not an ONNX model ({type(exc).__name__}: {exc}); give a file saved by "
                            f"onnx.save or torch.onnx.export") from None
    graph = model.graph
    if not graph.input or not graph.output or not graph.node:
        raise ImportRefused(f"{path} is not an ONNX model that takes and returns tensors: its graph has "
                            f"{len(graph.input)} inputs, "
                            f"{len(graph.output)} outputs and {len(graph.node)} nodes; give a file saved by "
                            f"onnx.save or torch.onnx.export")
    if any(uses_external_data(t) for t in graph.initializer):
        raise ImportRefused(f"{path} keeps its weights in external data files, which the registry would not "
                            f"copy: save it as one file (onnx.save(model, path, save_as_external_data=False))")
    return graph


def check_flag_matches(flag: str, value: str | None, graph_names: list[str]) -> None:
    if value is not None and [value] != graph_names:
        raise ImportRefused(f"{flag} {value!r} does not match the graph's {graph_names}: an ONNX graph names "
                            f"its own tensors; drop {flag}")


def onnx_datatype(value, role: str) -> str:
    """The KServe v2 datatype of a graph input or output; refused unless a servable tensor."""
    from onnx import TensorProto

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ImportRefused(f"{role} '{value.name}' is an ONNX {kind}, not a tensor: import serves tensors only")
    onnx_type = TensorProto.DataType.Name(value.type.tensor_type.elem_type)
    datatype = ONNX_DATATYPES.get(onnx_type, f"{onnx_type} (ONNX)")
    require_servable(role, value.name, datatype)
    return datatype


def onnx_shape(value, role: str) -> list[int] | None:
    """A graph input's or output's dims, -1 where variable (named or unknown); None where the graph
    records no shape at all (refused for an input; an output's is then read from a run)."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        if role == "input":
            raise ImportRefused(f"input '{value.name}' has no shape in the graph: re-export it with its rank and "
                                f"dims (variable ones named)")
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]


def onnx_runner(path: Path) -> Run:
    """ONNX Runtime on the CPU, one thread (the server may pick CUDA; the golden check allows for it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise ImportRefused(f"ONNX Runtime cannot open {path}: {exc}") from None
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(names, inputs)))


# ---- TorchScript ----------------------------------------------------------------------------------

def open_torchscript(path: Path, example: list[int] | None, input_name: str, output_name: str, datatype: str,
                     batch: bool) -> Artifact:
    """One input of the example's shape and `datatype`; outputs named `output_name` (or
    `output_name`_<i> when the module returns a tuple), typed and shaped by a run."""
    if example is None:
        raise ImportRefused(f"{path} is TorchScript, which records no input shapes: give --input-shape with "
                            f"the example input's shape, batch dim first (e.g. --input-shape 1,1,8,8)")
    if datatype not in TORCH_DATATYPES:
        raise ImportRefused(f"--datatype {datatype} has no torch dtype to feed a TorchScript model: use one of "
                            f"{', '.join(TORCH_DATATYPES)}")
    for flag, value in (("--input-name", input_name), ("--output-name", output_name)):
        if not value:
            raise ImportRefused(f"{flag} must not be empty")
    spec = TensorSpec(name=input_name, datatype=datatype, shape=[-1, *example[1:]] if batch else list(example))
    check_batch_axis(path, [spec], batch)
    return Artifact("torchscript", path, [spec], {input_name: golden_shape(spec, example, batch)},
                    torchscript_runner(path, input_name, output_name))


def torchscript_runner(path: Path, input_name: str, output_name: str) -> Run:
    import torch

    torch.set_num_threads(1)      # like the ONNX session here and the server's default (--threads 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit is deprecated in torch 2.13
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, ValueError, zipfile errors ...
        first_sentence = str(exc).strip().split(". ")[0]   # torch adds a paragraph on corrupted checkpoints
        raise ImportRefused(f"{path} is not a TorchScript model ({type(exc).__name__}: {first_sentence}); save one "
                            f"with torch.jit.save(torch.jit.script(model), path) or torch.jit.trace") from None
    torch_dtypes = {getattr(torch, t): name for name, t in TORCH_DATATYPES.items()}

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            result = module(torch.from_numpy(inputs[input_name]))
        outs = result if isinstance(result, tuple) else (result,)
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise ImportRefused(f"{path} returns {type(result).__name__}: import serves models that return a "
                                f"tensor or a tuple of tensors")
        names = [output_name] if len(outs) == 1 else [f"{output_name}_{i}" for i in range(len(outs))]
        for name, out in zip(names, outs):
            require_servable("output", name, torch_dtypes.get(out.dtype, str(out.dtype)))
        return {name: out.numpy() for name, out in zip(names, outs)}
    return run


# ---- shapes -------------------------------------------------------------------------------------

def check_batch_axis(path: Path, inputs: list[TensorSpec], batch: bool) -> None:
    """Batching: every input's dim 0 is variable (the batcher joins requests along it). --no-batch:
    every input's dim 0 is fixed, the same for all (the server reads dim 0 as the request's rows)."""
    for spec in inputs:
        if not spec.shape:
            raise ImportRefused(f"input '{spec.name}' of {path} is a scalar (rank 0): serving needs a first "
                                f"dimension; re-export it with one")
        if batch and spec.shape[0] != -1:
            raise ImportRefused(
                f"input '{spec.name}' of {path} has no batch axis: its first dimension is fixed at "
                f"{spec.shape[0]} (shape {spec.shape}). Re-export it with a dynamic first dimension, or import "
                f"with --no-batch to serve it as it is, one request at a time")
        if not batch and spec.shape[0] == -1:
            raise ImportRefused(f"--no-batch needs a fixed first dimension, but input '{spec.name}' of {path} has "
                                f"a dynamic one (shape {spec.shape}): the model batches; import it without --no-batch")
    if not batch and len({s.shape[0] for s in inputs}) > 1:
        raise ImportRefused(f"--no-batch: the inputs of {path} differ in their first dimension "
                            f"{[(s.name, s.shape) for s in inputs]}; the server reads it as the request's rows")


def golden_shape(spec: TensorSpec, example: list[int] | None, batch: bool) -> list[int]:
    """The concrete shape of an input's golden tensor: GOLDEN_ROWS rows where the model batches, the
    example's (--input-shape) dims where the signature's are variable."""
    dims = list(spec.shape)
    if example is not None:
        if len(example) != len(dims):
            raise ImportRefused(f"--input-shape {example} has rank {len(example)}, but input '{spec.name}' has "
                                f"rank {len(dims)} (shape {dims})")
        for axis, (want, got) in enumerate(zip(dims, example)):
            if want != -1 and got != want and not (batch and axis == 0):
                raise ImportRefused(f"--input-shape {example}: dim {axis} is {got}, but input '{spec.name}' fixes "
                                    f"it at {want} (shape {dims})")
        dims = [got if want == -1 else want for want, got in zip(dims, example)]
    if batch:
        dims[0] = GOLDEN_ROWS
    variable = [axis for axis, d in enumerate(dims) if d == -1]
    if variable:
        raise ImportRefused(f"input '{spec.name}' has variable dims {variable} beyond the batch (shape "
                            f"{spec.shape}): give --input-shape with an example input's shape, batch dim first, "
                            f"so that a golden input can be made")
    return dims


def output_spec(name: str, array: np.ndarray, declared: list[int] | None, batch: bool) -> TensorSpec:
    """An output's signature from its golden value: the run's dims, -1 where the graph declares a
    variable dim, and dim 0 variable where the model batches."""
    datatype = DATATYPE_OF_NUMPY.get(array.dtype, str(array.dtype))
    require_servable("output", name, datatype)
    shape = list(array.shape)
    if declared is not None and len(declared) == len(shape):
        shape = [-1 if d == -1 else s for d, s in zip(declared, shape)]
    if batch:
        shape[0] = -1
    return TensorSpec(name=name, datatype=datatype, shape=shape)


# ---- the golden pair -----------------------------------------------------------------------------

def golden_inputs(inputs: list[TensorSpec], shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """Seeded, integer-valued golden inputs in [0, GOLDEN_HIGH) (0/1 for BOOL), one per input, of
    `shapes[name]`. Public: a test model that must pass its golden check computes them here."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        high = 2 if spec.datatype == "BOOL" else GOLDEN_HIGH
        arrays[spec.name] = rng.integers(0, high, size=shapes[spec.name]).astype(NUMPY_DTYPES[spec.datatype])
    return arrays


def record_golden(artifact: Artifact, inputs: dict[str, np.ndarray], batch: bool) -> dict[str, np.ndarray]:
    """The artifact's outputs on the golden inputs, refused unless finite and reproducible: where
    the model batches, rows [0, 1, 0] run as one batch of 3 must answer as rows [0, 1] did in a batch
    of 2 (the batcher joins unrelated requests); otherwise a second run must answer as the first."""
    outputs = run_artifact(artifact, inputs)
    if batch:
        check_follows_batch(artifact, outputs, GOLDEN_ROWS)
    for name, y in outputs.items():
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ImportRefused(f"output '{name}' of {artifact.path} is not finite (NaN or inf) on the seeded golden "
                                f"inputs (integers in [0, {GOLDEN_HIGH})); the server's load check could not pass")
    if batch:
        again = run_artifact(artifact, {n: np.concatenate([x, x[:1]]) for n, x in inputs.items()})
        check_follows_batch(artifact, again, GOLDEN_ROWS + 1)
        expected = {n: np.concatenate([y, y[:1]]) for n, y in outputs.items()}
        how = "in a batch of 3 rows instead of 2"
    else:
        again, expected, how = run_artifact(artifact, inputs), outputs, "a second time"
    for name, want in expected.items():
        error = relative_error(want, again[name])
        if not error <= TOLERANCE:
            raise ImportRefused(f"output '{name}' of {artifact.path} changes by {error:.3g} (relative, tolerance "
                                f"{TOLERANCE}) when the same inputs run {how}: its answer depends on chance or on "
                                f"the rest of the batch (dropout or batch norm left in training mode? call "
                                f"model.eval() before exporting)")
    return outputs


def check_follows_batch(artifact: Artifact, outputs: dict[str, np.ndarray], rows: int) -> None:
    """Every output has `rows` rows for inputs of `rows` rows: the server slices a joined batch's
    outputs back into requests along dim 0."""
    for name, y in outputs.items():
        if y.ndim == 0 or y.shape[0] != rows:
            raise ImportRefused(f"output '{name}' of {artifact.path} has shape {list(y.shape)} for inputs of {rows} "
                                f"rows: its first dimension does not follow the batch; import with --no-batch if "
                                f"the model takes a fixed batch")


def run_artifact(artifact: Artifact, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        return artifact.run(inputs)
    except ImportRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the model itself
        shapes = {n: [*x.shape] for n, x in inputs.items()}
        raise ImportRefused(f"running {artifact.path} on seeded inputs of shapes {shapes} failed "
                            f"({error_summary(exc)}); check --input-shape and --datatype") from None


def error_summary(exc: Exception) -> str:
    """One line of a model's error, "Type: message". TorchScript puts the error itself (already as
    "Type: message") last, under its traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if "Traceback of TorchScript" in str(exc):
        return lines[-1]
    return f"{type(exc).__name__}: {' '.join(lines)[:500]}"


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    """Max abs difference, scaled down by the outputs' magnitude where it exceeds 1 (another batch
    size may take another kernel: float results move in their last bits)."""
    if expected.size == 0:
        return 0.0
    want = expected.astype(np.float64)
    return float(np.max(np.abs(want - got.astype(np.float64))) / max(1.0, float(np.max(np.abs(want)))))


def check_labels(labels: list[str], outputs: list[TensorSpec]) -> None:
    """A classifier's labels name the classes of its first output's last dimension."""
    if not labels:
        return
    first = outputs[0]
    if len(first.shape) < 2 or first.shape[-1] != len(labels):
        raise ImportRefused(f"--labels has {len(labels)} labels, but output '{first.name}' has shape {first.shape}: "
                            f"give one label a line, one per class of its last dimension")


# ---- the package ----------------------------------------------------------------------------------

def write_package(folder: Path, artifact: Artifact, signature: Signature, labels: list[str],
                  golden_in: dict[str, np.ndarray], golden_out: dict[str, np.ndarray], options: dict) -> None:
    """artifact + golden.safetensors + manifest.json, as training/export.py packages our own models."""
    target = folder / ARTIFACTS[artifact.format]
    shutil.copyfile(artifact.path, target)
    tensors = {f"input.{n}": x for n, x in golden_in.items()} | {f"output.{n}": y for n, y in golden_out.items()}
    # safetensors writes a buffer as it is: a non-contiguous view would be stored scrambled
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / GOLDEN))
    lineage = Lineage(created_at=datetime.now(timezone.utc).isoformat(),
                      imported_from=str(artifact.path.resolve()), imported_sha256=sha256_file(target),
                      import_options=options)
    manifest = Manifest(family=FAMILY, kind=KIND, format=artifact.format,
                        artifacts={artifact.format: target.name}, signature=signature, labels=labels,
                        golden=GOLDEN, lineage=lineage)
    (folder / MANIFEST).write_text(dump_json(manifest))


def fit_batcher_to_fixed_rows(registry: Registry, name: str, rows: int) -> list[str]:
    """A --no-batch model takes exactly `rows` rows: cap the model's batcher there, so that it never
    joins two requests into one batch. Returns a note when it changed model.json."""
    before = registry.model_config(name).batching.max_batch_size
    if before == rows:
        return []

    def cap(cfg) -> None:
        cfg.batching.max_batch_size = rows
    registry.update_model_config(name, cap)      # read, change and write under the model's lock
    return [f"set {name}'s batching.max_batch_size from {before} to {rows}: a --no-batch version takes exactly "
            f"{rows} rows, so requests are not joined into batches"]
