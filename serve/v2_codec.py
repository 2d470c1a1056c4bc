"""KServe v2 (Open Inference Protocol) request decoder and response encoder for the hot path.

Hand-written on purpose: the server's budget is ~0.4 ms CPU per request, so the body is parsed once
(simdjson, a flat float list straight into numpy: serve/json_tensors.py; orjson for what that path
leaves), tensors are built straight from the flat data (or `np.frombuffer` for the Triton binary
tensor extension), validation is plain Python, and the response is serialized once with orjson
(which writes numpy arrays itself). No pydantic per request.

Binary requests are recognised by the `Inference-Header-Content-Length` header alone; the stock
`tritonclient.http` sends no Content-Type (see shared research, serving-anchors.md §2.4).
"""

from __future__ import annotations

import difflib
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import orjson

from model_registry.manifest import TensorSpec
from serve.json_tensors import LazyArray, flat_numbers, load_request

# KServe datatype -> numpy dtype (native byte order; wire data is little endian).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

# The same dtypes pinned to little endian, for reading and writing the binary section.
_WIRE_DTYPES: dict[str, np.dtype] = {
    k: v.newbyteorder("<") for k, v in NUMPY_DTYPES.items() if k != "BYTES"
}

# numpy kinds that `np.asarray(json_list)` may produce and each target kind accepts.
# Floats take integers too; integers refuse floats outright (1.0 included) so no value is truncated.
_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}
_KIND_NAMES = {
    "f": "floats", "i": "integers", "u": "integers", "b": "booleans",
    "U": "strings", "O": "nulls or mixed values",
}

# below this many bytes of JSON, searching the text is cheaper than a numpy pass over the data
_SMALL_HEADER = 4096

_U32 = struct.Struct("<I")
# JSON has no NaN or Inf: the protobuf JSON mapping of float and double (which KServe v2's JSON
# follows) writes them as these strings. Never null: a client could not tell NaN from +Inf
NON_FINITE_TEXT = ("NaN", "Infinity", "-Infinity")
_OPT = orjson.OPT_SERIALIZE_NUMPY

# What a request may hold (KServe v2 and the Triton extensions this server implements); anything
# else is a 400 naming it, never ignored. The stock `tritonclient.http` sends only these: the body's
# four fields, an input's five, an output's two; `binary_data_size` on a binary input, `binary_data`
# (and `classification`, refused) on a requested output. Shared memory is named so that it is refused
# as unsupported rather than as unknown. Request-level `parameters` depend on the model's kind
# (serve/api/v2.py, `check_request_parameters`).
REQUEST_FIELDS = ("id", "inputs", "outputs", "parameters")
INPUT_FIELDS = ("name", "shape", "datatype", "parameters", "data")
OUTPUT_FIELDS = ("name", "parameters")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data", "classification")
_REQUEST_FIELD_SET = frozenset(REQUEST_FIELDS)
_INPUT_FIELD_SET = frozenset(INPUT_FIELDS)
_OUTPUT_FIELD_SET = frozenset(OUTPUT_FIELDS)
_INPUT_PARAMETER_SET = frozenset(INPUT_PARAMETERS + _SHARED_MEMORY)
_OUTPUT_PARAMETER_SET = frozenset(OUTPUT_PARAMETERS + _SHARED_MEMORY)


class V2Error(Exception):
    """A client error: HTTP status (400 or 413), message naming the field and what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool  # send this output as binary (Triton binary extension)


@dataclass(slots=True)
class InferRequest:
    id: str | None
    # request-level parameters (e.g. "timeout" µs, "priority", "binary_data_output")
    parameters: dict
    # validated, in signature order, the signature's numpy dtype, C-contiguous, writable
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]  # resolved: all signature outputs when the request names none
    batch_size: int  # the shared leading dim


def _bad(message: str) -> V2Error:
    return V2Error(400, message)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def unknown_keys(where: str, what: str, given: Any, known: tuple[str, ...]) -> str:
    """The message for keys of `given` outside `known`: "<where>: unknown <what> 'x' (did you
    mean 'y'?); known: a, b"; `where` empty for the body itself."""
    unknown = [k for k in given if k not in known]
    named = ", ".join(repr(k) for k in unknown)
    hints = [close[0] for k in unknown if (close := difflib.get_close_matches(k, known, 1, 0.75))]
    hint = f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
    plural = "s" if len(unknown) > 1 else ""
    return f"{where + ': ' if where else ''}unknown {what}{plural} {named}{hint}; known: {', '.join(known)}"


# ---------------------------------------------------------------------------------------------
# decoding


def decode_infer_request(
    body: bytes,
    header_length: int | str | None,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    allow_non_finite: bool = False,
) -> InferRequest:
    """Parse and validate one v2 infer request body against a model signature."""
    if type(body) is not bytes:
        body = bytes(body)
    header, binary = _split_body(body, header_length)
    request = _load_json(header)
    arrays, batch_size = _decode_inputs(
        request, header, binary, inputs, max_batch_size, allow_non_finite
    )
    parameters = _request_parameters(request)
    requested = _resolve_outputs(request.get("outputs"), outputs, parameters)
    request_id = request.get("id")
    if request_id is not None and type(request_id) is not str:
        raise _bad(f"'id' must be a string, got {_type_name(request_id)}")
    return InferRequest(request_id, parameters, arrays, requested, batch_size)


def _split_body(body: bytes, header_length: int | str | None) -> tuple[bytes, memoryview | None]:
    if header_length is None:
        return body, None
    if type(header_length) is str:
        try:
            header_length = int(header_length)
        except ValueError:
            raise _bad(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
    if type(header_length) is not int:
        raise _bad(
            f"Inference-Header-Content-Length must be an integer, got {_type_name(header_length)}"
        )
    if header_length < 0:
        raise _bad(f"Inference-Header-Content-Length must be >= 0, got {header_length}")
    if header_length > len(body):
        raise _bad(
            f"Inference-Header-Content-Length {header_length} exceeds body size {len(body)}"
        )
    if header_length == 0:
        # Triton's "raw binary request" (single input, no JSON header) is not implemented
        raise _bad("Inference-Header-Content-Length 0 (raw binary request) is not supported")
    # a memoryview keeps the binary section zero-copy until each input takes its slice
    return body[:header_length], memoryview(body)[header_length:]


def _load_json(header: bytes) -> dict:
    # simdjson first (inputs' data left unparsed: serve/json_tensors.py); orjson for what it leaves
    request = load_request(header)
    if request is not None:
        return _check_request_fields(request)
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"malformed JSON: {exc}") from None
    return _check_request_fields(request)


def _check_request_fields(request: Any) -> dict:
    if type(request) is not dict:
        raise _bad(f"malformed JSON: the request must be an object, got {_type_name(request)}")
    if not request.keys() <= _REQUEST_FIELD_SET:
        raise _bad(unknown_keys("", "field", request, REQUEST_FIELDS) + " (an infer request's fields)")
    return request


def _decode_inputs(
    request: dict,
    header: bytes,
    binary: memoryview | None,
    specs: list[TensorSpec],
    max_batch_size: int,
    allow_non_finite: bool,
) -> tuple[dict[str, np.ndarray], int]:
    raw_inputs = request.get("inputs")
    if raw_inputs is None:
        raise _bad("'inputs' is missing")
    if type(raw_inputs) is not list:
        raise _bad(f"'inputs' must be a list, got {_type_name(raw_inputs)}")
    if not raw_inputs:
        raise _bad("'inputs' is empty")
    by_name = {s.name: s for s in specs}
    arrays: dict[str, np.ndarray] = {}
    batch_size: int | None = None
    offset = 0  # read position in the binary section; binary inputs come in request order
    for index, item in enumerate(raw_inputs):
        name, spec, shape, binary_size, data = _input_header(item, index, by_name, arrays)
        batch_size = _check_shape(name, spec, shape, batch_size, max_batch_size)
        if binary_size is None:
            arr = _from_json(name, spec.datatype, data, shape, header)
        else:
            arr, offset = _from_binary(name, spec.datatype, binary, offset, binary_size, shape)
            # JSON cannot carry NaN/Inf (orjson refuses them); binary data can
            if not allow_non_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise _bad(f"input '{name}' contains NaN or Inf")
        arrays[name] = arr
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise _bad(f"missing input(s): {', '.join(repr(m) for m in missing)}")
    if binary is not None and offset != len(binary):
        raise _bad(
            f"binary section holds {len(binary)} bytes but the inputs' binary_data_size "
            f"add up to {offset}"
        )
    # signature order, whatever order the request used
    return {s.name: arrays[s.name] for s in specs}, batch_size  # type: ignore[return-value]


def _input_header(
    item: Any, index: int, by_name: dict[str, TensorSpec], seen: dict
) -> tuple[str, TensorSpec, list[int], int | None, Any]:
    """Check one input's name, shape, datatype and parameters; return what decoding needs."""
    if type(item) is not dict:
        raise _bad(f"inputs[{index}] must be an object, got {_type_name(item)}")
    if "name" not in item:
        raise _bad(f"inputs[{index}]: 'name' is missing")
    name = item["name"]
    if type(name) is not str:
        raise _bad(f"inputs[{index}].name must be a string, got {_type_name(name)}")
    if not item.keys() <= _INPUT_FIELD_SET:
        raise _bad(unknown_keys(f"input '{name}'", "field", item, INPUT_FIELDS))
    spec = by_name.get(name)
    if spec is None:
        expected = ", ".join(repr(n) for n in by_name)
        raise _bad(f"unknown input '{name}'; the model expects {expected}")
    if name in seen:
        raise _bad(f"input '{name}' appears more than once")
    if "shape" not in item:
        raise _bad(f"input '{name}': 'shape' is missing (the model's is {spec.shape}, -1 any size)")
    shape = item["shape"]
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if "datatype" not in item:
        raise _bad(f"input '{name}': 'datatype' is missing (the model's is {spec.datatype})")
    datatype = item["datatype"]
    if type(datatype) is not str:
        raise _bad(f"input '{name}': datatype must be a string, got {_type_name(datatype)}")
    if datatype == "BF16":
        raise _bad(f"input '{name}': datatype BF16 is not supported")
    if datatype != spec.datatype:
        raise _bad(
            f"input '{name}': datatype {datatype} does not match the model's {spec.datatype}"
        )
    binary_size = _binary_size(name, item.get("parameters"))
    data = item.get("data")
    if binary_size is None and data is None:
        raise _bad(f"input '{name}' has no 'data' (and no binary_data_size parameter)")
    if binary_size is not None and "data" in item:
        raise _bad(f"input '{name}' has both 'data' and binary_data_size")
    return name, spec, shape, binary_size, data


def _binary_size(name: str, parameters: Any) -> int | None:
    if parameters is None:
        return None
    if type(parameters) is not dict:
        raise _bad(f"input '{name}': parameters must be an object, got {_type_name(parameters)}")
    if not parameters.keys() <= _INPUT_PARAMETER_SET:
        raise _bad(unknown_keys(f"input '{name}'", "parameters key", parameters, INPUT_PARAMETERS))
    if any(k in parameters for k in _SHARED_MEMORY):
        raise _bad(f"input '{name}': shared memory is not supported")
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise _bad(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
    return size


def _check_shape(
    name: str, spec: TensorSpec, shape: list[int], batch_size: int | None, max_batch_size: int
) -> int:
    """Rank, fixed dims and the batch dim against the signature; returns the batch size."""
    expected = spec.shape
    if len(shape) != len(expected):
        raise _bad(
            f"input '{name}': shape {shape} has rank {len(shape)}, the model expects "
            f"rank {len(expected)} {expected}"
        )
    for axis, (got, want) in enumerate(zip(shape, expected)):
        if want != -1 and got != want:
            raise _bad(
                f"input '{name}': dim {axis} is {got}, the model expects {want} (shape {expected})"
            )
    batch = shape[0]
    if batch < 1:
        raise _bad(f"input '{name}': empty batch (dim 0 is 0)")
    if batch > max_batch_size:
        raise _bad(f"input '{name}': batch size {batch} exceeds the maximum {max_batch_size}")
    if batch_size is not None and batch != batch_size:
        raise _bad(
            f"input '{name}': batch size {batch} differs from the other inputs' {batch_size}"
        )
    return batch


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _from_json(
    name: str, datatype: str, data: Any, shape: list[int], header: bytes
) -> np.ndarray:
    """Build the input array from a flat or nested JSON list, refusing wrong JSON types."""
    if type(data) is LazyArray:
        arr = _flat_floats(name, datatype, data, shape) if datatype in _FLOAT_TYPES else None
        if arr is not None:
            return arr
        data = data.as_list()
    if type(data) is not list:
        raise _bad(f"input '{name}': data must be a JSON list, got {_type_name(data)}")
    if datatype == "BYTES":
        return _bytes_from_json(name, data, shape)
    target = NUMPY_DTYPES[datatype]
    try:
        # no dtype here: numpy would silently parse "1.5" or cast True; inspect the kind it finds
        arr = np.asarray(data)
    except ValueError:
        raise _bad(f"input '{name}': data is a ragged nested list") from None
    count = _count(shape)
    if arr.size != count:
        raise _bad(f"input '{name}': shape {shape} needs {count} elements, data has {arr.size}")
    if count == 0:
        return np.empty(shape, dtype=target)
    kind = arr.dtype.kind
    if kind == "f" and target.kind in "iu":
        # numpy promotes int64 + uint64 to float64, so [0, 2**64 - 1] looks like floats here
        return _large_ints(name, datatype, data, target).reshape(shape)
    if kind not in _ACCEPTED_KINDS[target.kind]:
        got = _KIND_NAMES.get(kind, kind)
        raise _bad(f"input '{name}': data must be {_expects(datatype)}, got {got}")
    if kind != "b" and _hides_bool(data, arr, header):
        raise _bad(f"input '{name}': data must be {_expects(datatype)}, got booleans")
    if target.kind in "iu" and arr.dtype != target:
        _check_int_range(name, datatype, arr, target)
    if target.kind == "f" and arr.dtype != target and _may_overflow(arr.dtype, target):
        _check_float_range(name, datatype, float(arr.max()), float(arr.min()), target)
    return arr.astype(target, copy=False).reshape(shape)


def _check_float_range(name: str, datatype: str, high: float, low: float, target: np.dtype) -> None:
    # the cast would turn values past the target's range into inf (with a RuntimeWarning): refuse them
    limit = float(np.finfo(target).max)
    if high > limit or low < -limit:
        raise _bad(f"input '{name}': values out of range for {datatype}")


_FLOAT_TYPES = frozenset(("FP16", "FP32", "FP64"))
_EXACT_INTEGERS = float(2**53)     # every integer below this in magnitude is a double exactly


def _flat_floats(name: str, datatype: str, data: LazyArray, shape: list[int]) -> np.ndarray | None:
    """A float input from a flat list of numbers, in C (serve/json_tensors.py); None: read it as
    Python objects instead. The same checks and values as below: a number list can hide no boolean
    (simdjson refuses them), and integers reach the target through a double, which is exact below
    2**53 (past it, a narrower target could round twice: left to the path below)."""
    values = flat_numbers(data)
    if values is None:
        return None
    count = _count(shape)
    if values.size != count:
        raise _bad(f"input '{name}': shape {shape} needs {count} elements, data has {values.size}")
    target = NUMPY_DTYPES[datatype]
    if target.itemsize < 8:
        high, low = float(values.max()), float(values.min())
        if max(high, -low) >= _EXACT_INTEGERS:
            return None
        _check_float_range(name, datatype, high, low, target)
    return values.astype(target).reshape(shape)


def _may_overflow(source: np.dtype, target: np.dtype) -> bool:
    # JSON gives float64, int64 or uint64: all fit FP64, and integers (< 2**64) fit FP32
    return target.itemsize == 2 or (target.itemsize == 4 and source.kind == "f")


def _expects(datatype: str) -> str:
    if datatype == "BOOL":
        return "booleans for BOOL"
    if datatype.startswith(("INT", "UINT")):
        return f"integers for {datatype}"
    return f"numbers for {datatype}"


def _hides_bool(data: list, arr: np.ndarray, header: bytes) -> bool:
    """Whether a JSON bool sits among numbers: numpy reads [1.5, true] as [1.5, 1.0] silently."""
    # Checking every element's type costs ~25 ns each, so narrow it down first: the JSON text
    # must hold a bool literal (a byte search, ~1 µs/KB) and a bool became 0 or 1 (a vectorised
    # test, ~3 µs flat); the cheaper of the two for this body size goes first
    small = len(header) < _SMALL_HEADER
    if small and b"true" not in header and b"false" not in header:
        return False
    candidates = np.flatnonzero((arr == 0) | (arr == 1))
    if not candidates.size:
        return False
    if not small and b"true" not in header and b"false" not in header:
        return False
    if arr.ndim == 1:
        return any(type(data[i]) is bool for i in candidates.tolist())
    return _holds_bool(data)  # nested lists: rare enough to scan whole


def _holds_bool(data: list) -> bool:
    if data and type(data[0]) is list:
        return any(map(_holds_bool, data))
    return bool in set(map(type, data))


def _flatten(data: list) -> list:
    if data and type(data[0]) is list:
        return [x for row in data for x in _flatten(row)]
    return data


def _large_ints(name: str, datatype: str, data: list, target: np.dtype) -> np.ndarray:
    """Slow path for integer data numpy read as float64: real floats, or ints beyond int64."""
    flat = _flatten(data)
    types = set(map(type, flat))
    if not types <= {int, bool}:
        raise _bad(f"input '{name}': data must be {_expects(datatype)}, got floats")
    if bool in types:
        raise _bad(f"input '{name}': data must be {_expects(datatype)}, got booleans")
    info = np.iinfo(target)
    for value in flat:
        if value < info.min or value > info.max:
            raise _bad(_out_of_range(name, datatype, value, info))
    return np.array(flat, dtype=target)


def _check_int_range(name: str, datatype: str, arr: np.ndarray, target: np.dtype) -> None:
    info = np.iinfo(target)
    lo, hi = arr.min(), arr.max()
    if lo < info.min or hi > info.max:
        raise _bad(_out_of_range(name, datatype, int(lo if lo < info.min else hi), info))


def _out_of_range(name: str, datatype: str, value: int, info: np.iinfo) -> str:
    return f"input '{name}': value {value} is out of range for {datatype} [{info.min}, {info.max}]"


def _bytes_from_json(name: str, data: list, shape: list[int]) -> np.ndarray:
    try:
        arr = np.array(data, dtype=object)
    except ValueError:
        raise _bad(f"input '{name}': data is a ragged nested list") from None
    count = _count(shape)
    if arr.size != count:
        raise _bad(f"input '{name}': shape {shape} needs {count} elements, data has {arr.size}")
    flat = arr.reshape(-1)
    if not all(type(s) is str for s in flat):
        raise _bad(f"input '{name}': data must be strings for BYTES")
    # BYTES elements are always bytes for the engines, whichever encoding carried them
    out = np.empty(count, dtype=object)
    out[:] = [s.encode() for s in flat]
    return out.reshape(shape)


def _from_binary(
    name: str,
    datatype: str,
    binary: memoryview | None,
    offset: int,
    size: int,
    shape: list[int],
) -> tuple[np.ndarray, int]:
    """Read one input from the binary section at `offset`; returns it and the next offset."""
    if binary is None:
        raise _bad(
            f"input '{name}' has binary_data_size but the request has no "
            "Inference-Header-Content-Length header"
        )
    end = offset + size
    if end > len(binary):
        raise _bad(
            f"input '{name}': binary_data_size {size} runs past the binary section "
            f"({len(binary) - offset} bytes left)"
        )
    count = _count(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(name, binary[offset:end], count).reshape(shape), end
    wire = _WIRE_DTYPES[datatype]
    if size != count * wire.itemsize:
        raise _bad(
            f"input '{name}': binary_data_size is {size} bytes, shape {shape} of {datatype} "
            f"needs {count * wire.itemsize}"
        )
    if datatype == "BOOL" and count and np.frombuffer(binary, np.uint8, count, offset).max() > 1:
        raise _bad(f"input '{name}': BOOL bytes must be 0 or 1")
    # astype copies: the result is aligned and writable (frombuffer over `bytes` is neither),
    # which torch.from_numpy and onnxruntime want
    arr = np.frombuffer(binary, wire, count, offset).astype(NUMPY_DTYPES[datatype])
    return arr.reshape(shape), end


def _bytes_from_binary(name: str, buf: memoryview, count: int) -> np.ndarray:
    """Split `count` elements of 4-byte little-endian length + bytes."""
    items = []
    pos, n = 0, len(buf)
    for i in range(count):
        if pos + 4 > n:
            raise _bad(f"input '{name}': BYTES element {i} has no length prefix (data ends)")
        (length,) = _U32.unpack_from(buf, pos)
        pos += 4
        if pos + length > n:
            raise _bad(f"input '{name}': BYTES element {i} of {length} bytes runs past its data")
        items.append(bytes(buf[pos : pos + length]))
        pos += length
    if pos != n:
        raise _bad(f"input '{name}': {n - pos} bytes left over after {count} BYTES elements")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _request_parameters(request: dict) -> dict:
    parameters = request.get("parameters")
    if parameters is None:
        return {}
    if type(parameters) is not dict:
        raise _bad(f"'parameters' must be an object, got {_type_name(parameters)}")
    return parameters


def _resolve_outputs(
    raw: Any, specs: list[TensorSpec], parameters: dict
) -> list[RequestedOutput]:
    """The outputs to send; per-output binary_data overrides binary_data_output."""
    default = parameters.get("binary_data_output", False)
    if type(default) is not bool:
        raise _bad(f"parameters.binary_data_output must be a boolean, got {_type_name(default)}")
    # an empty list means "all outputs", as when the field is absent
    if not raw:
        if raw is not None and type(raw) is not list:
            raise _bad(f"'outputs' must be a list, got {_type_name(raw)}")
        return [RequestedOutput(s.name, default) for s in specs]
    if type(raw) is not list:
        raise _bad(f"'outputs' must be a list, got {_type_name(raw)}")
    known = {s.name for s in specs}
    requested: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if type(item) is not dict:
            raise _bad(f"outputs[{index}] must be an object, got {_type_name(item)}")
        if "name" not in item:
            raise _bad(f"outputs[{index}]: 'name' is missing")
        name = item["name"]
        if type(name) is not str:
            raise _bad(f"outputs[{index}].name must be a string, got {_type_name(name)}")
        if not item.keys() <= _OUTPUT_FIELD_SET:
            raise _bad(unknown_keys(f"output '{name}'", "field", item, OUTPUT_FIELDS))
        if name not in known:
            names = ", ".join(repr(s.name) for s in specs)
            raise _bad(f"unknown output '{name}'; the model has {names}")
        if name in seen:
            raise _bad(f"output '{name}' is requested more than once")
        seen.add(name)
        binary = _output_binary(name, item.get("parameters"), default)
        requested.append(RequestedOutput(name, binary))
    return requested


def _output_binary(name: str, parameters: Any, default: bool) -> bool:
    if parameters is None:
        return default
    if type(parameters) is not dict:
        raise _bad(f"output '{name}': parameters must be an object, got {_type_name(parameters)}")
    if not parameters.keys() <= _OUTPUT_PARAMETER_SET:
        raise _bad(unknown_keys(f"output '{name}'", "parameters key", parameters, OUTPUT_PARAMETERS))
    if parameters.get("classification"):
        raise _bad(f"output '{name}': the classification extension is not supported")
    if any(k in parameters for k in _SHARED_MEMORY):
        raise _bad(f"output '{name}': shared memory is not supported")
    binary = parameters.get("binary_data", default)
    if type(binary) is not bool:
        raise _bad(f"output '{name}': binary_data must be a boolean, got {_type_name(binary)}")
    return binary


# ---------------------------------------------------------------------------------------------
# encoding


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    requested: list[RequestedOutput],
    datatypes: dict[str, str],
    on_nonfinite: Callable[[], None] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Serialize the requested outputs as a v2 response; returns (body, extra headers).

    Non-finite float values: JSON data writes them as "NaN", "Infinity", "-Infinity"
    (`NON_FINITE_TEXT`); binary data carries the IEEE values as they are. `on_nonfinite` is called
    once for an answer with at least one of them (the zooserve_nonfinite_outputs counter)."""
    entries = []
    chunks: list[Any] = []
    all_finite = True
    for want in requested:
        arr = outputs[want.name]
        datatype = datatypes[want.name]
        entry: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": list(arr.shape)}
        if want.binary:
            raw = _binary_output(arr, datatype)
            size = len(raw) if type(raw) is bytes else raw.nbytes
            entry["parameters"] = {"binary_data_size": size}
            chunks.append(raw)
            finite = type(raw) is bytes or _finite(raw)
        else:
            entry["data"], finite = _json_output(want.name, arr, datatype)
        all_finite = all_finite and finite
        entries.append(entry)
    if not all_finite and on_nonfinite is not None:
        on_nonfinite()
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    # orjson writes C-contiguous numpy arrays itself, far faster than .tolist()
    header = orjson.dumps(doc, option=_OPT)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return b"".join([header, *chunks]), headers


def _finite(arr: np.ndarray) -> bool:
    """No NaN or Inf: one vectorised pass, on float arrays only (others cannot hold them)."""
    return arr.dtype.kind != "f" or bool(np.isfinite(arr).all())


def _json_output(name: str, arr: np.ndarray, datatype: str) -> tuple[Any, bool]:
    """The output's JSON data and whether all of it is finite."""
    if datatype == "BYTES":
        try:
            return [x.decode() if type(x) is bytes else str(x) for x in np.asarray(arr).reshape(-1)], True
        except UnicodeDecodeError:
            raise _bad(f"output '{name}' is not UTF-8; request it with binary_data") from None
    # flat and C-contiguous (orjson refuses other layouts); checked after the cast, which may
    # turn a value into Inf
    flat = _contiguous_as(arr, NUMPY_DTYPES[datatype]).reshape(-1)
    if _finite(flat):
        return flat, True
    return _with_non_finite_text(flat), False


def _with_non_finite_text(flat: np.ndarray) -> list:
    """The values as a list, NaN and +-Inf replaced by their strings (orjson would write null).
    Slow (a Python float each), and only for answers that hold a non-finite value."""
    values = flat.tolist()
    nan, positive, negative = NON_FINITE_TEXT
    for i in np.flatnonzero(~np.isfinite(flat)).tolist():
        x = values[i]
        values[i] = nan if x != x else positive if x > 0 else negative
    return values


def _binary_output(arr: np.ndarray, datatype: str) -> Any:
    """Wire bytes: a contiguous little-endian array (joined without a copy) or bytes."""
    if datatype == "BYTES":
        parts = []
        for x in np.asarray(arr).reshape(-1):
            b = x if type(x) is bytes else str(x).encode()
            parts.append(_U32.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    return _contiguous_as(arr, _WIRE_DTYPES[datatype])


def _contiguous_as(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`arr` C-contiguous in `dtype`; a no-op for the usual array. A value beyond the datatype's
    range (a float32 output declared FP16) becomes Inf, carried and counted like any other, so
    numpy's overflow warning is silenced rather than logged once per answer."""
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(arr, dtype=dtype)
