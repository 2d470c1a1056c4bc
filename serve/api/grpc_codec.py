"""KServe v2 over gRPC, the tensors: a `ModelInferRequest` as the v2 binary body every engine's
`bind` decodes, and a call's binary answer as a `ModelInferResponse` with raw_output_contents.

Why a binary body rather than a second decoder: the engines bind bodies (classify, sequence and the
samplers each their own way), so one small JSON header (names, shapes, datatypes, parameters) plus
the raw tensor bytes goes through exactly the validation and the messages the HTTP route has; the
tensors themselves are never turned into JSON. The header costs a few microseconds, next to a
gRPC call's ~100 µs of Python. Answers likewise come from the call's own binary encoding (so
non-finite outputs are counted and sampler headers kept as over HTTP), cut into raw outputs.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from serve.errors import ServeError
from serve.v2_codec import NUMPY_DTYPES

_U32 = struct.Struct("<I")
# Triton's request parameter asking a decoupled model's stream for a flags-only final response
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
# the typed `contents` field that carries each datatype (Triton's InferTensorContents); FP16 and
# BF16 have none: they travel in raw_input_contents only
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_CONTENTS_FIELDS = tuple(sorted(set(_CONTENTS_FIELD.values())))
# HTTP's binary tensor extension; a gRPC request carries its tensors in raw_input_contents and gets
# every output in raw_output_contents, so these keys would mean nothing here: refused, not ignored
_HTTP_ONLY_PARAMETERS = ("binary_data_output", "binary_data_size", "binary_data")


def _bad(message: str) -> ServeError:
    return ServeError(400, message)


def parameter_value(name: str, where: str, parameter) -> Any:
    """The Python value of an InferParameter / ModelRepositoryParameter (whichever field is set)."""
    field = parameter.WhichOneof("parameter_choice")
    if field is None:
        raise _bad(f"{where} '{name}' has no value")
    return getattr(parameter, field)


def parameters_dict(parameters, where: str) -> dict:
    """A protobuf parameters map as the dict an HTTP body's `parameters` object would be."""
    values = {name: parameter_value(name, where, value) for name, value in parameters.items()}
    for key in _HTTP_ONLY_PARAMETERS:
        if key in values:
            raise _bad(f"{where} '{key}' is HTTP's binary tensor extension; over gRPC every input travels in "
                       f"raw_input_contents (or typed contents) and every output in raw_output_contents")
    return values


def input_data(request: pb.ModelInferRequest) -> list[tuple[Any, bytes]]:
    """(tensor, its raw little-endian bytes) of every input, from raw_input_contents or the typed
    contents (BYTES: each element a 4-byte length and the bytes, as in raw_input_contents)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs: it must "
                   "carry every input, in the order of 'inputs', or none")
    out = []
    for index, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise _bad(f"input '{tensor.name}' has both contents and raw_input_contents[{index}]")
            data = raw[index]
            _check_raw_size(tensor, index, data)
        else:
            data = _typed_contents(tensor)
        out.append((tensor, data))
    return out


def bytes_elements(name: str, data: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's raw data (each a 4-byte little-endian length, then the bytes)."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise _bad(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        (size,) = _U32.unpack_from(data, offset)
        offset += 4
        if offset + size > len(data):
            raise _bad(f"input '{name}': a BYTES element of {size} bytes runs past the data's end")
        elements.append(bytes(data[offset:offset + size]))
        offset += size
    return elements


def bytes_tensor(values: list[bytes]) -> bytes:
    """A BYTES tensor's raw data (each element a 4-byte little-endian length, then the bytes)."""
    return b"".join(_U32.pack(len(v)) + v for v in values)


def request_body(request: pb.ModelInferRequest, deadline_us: float | None) -> tuple[bytes, str]:
    """(v2 binary body, its Inference-Header-Content-Length) of a ModelInferRequest. `deadline_us`,
    the microseconds the gRPC deadline leaves, becomes the `timeout` parameter unless the request
    asks for a shorter one: a request is never queued past its caller's deadline."""
    inputs, chunks = [], []
    for tensor, data in input_data(request):
        parameters = parameters_dict(tensor.parameters, f"input '{tensor.name}': parameter")
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype,
                       "parameters": {**parameters, "binary_data_size": len(data)}})
        chunks.append(data)
    parameters = parameters_dict(request.parameters, "parameter")
    # what the stock client's async_stream_infer(enable_empty_final_response=True) sends: it concerns
    # decoupled models only (serve/api/grpc_tokens.py); a model answering once is always final, as in Triton
    parameters.pop(EMPTY_FINAL_RESPONSE, None)
    if deadline_us is not None:
        given = parameters.get("timeout")
        # a bad `timeout` (not a number, not positive) is left for the route's own check, which names it
        if given is None or (type(given) in (int, float) and given > deadline_us):
            parameters["timeout"] = max(deadline_us, 1.0)
    outputs = [{"name": o.name, "parameters": {**parameters_dict(o.parameters, f"output '{o.name}': parameter"),
                                               "binary_data": True}} for o in request.outputs]
    if not outputs:
        parameters["binary_data_output"] = True       # every output the model sends, as raw bytes
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    if parameters:
        header["parameters"] = parameters
    if outputs:
        header["outputs"] = outputs
    encoded = orjson.dumps(header)
    return b"".join([encoded, *chunks]), str(len(encoded))


def _check_raw_size(tensor, index: int, data: bytes) -> None:
    """The raw bytes against the shape and datatype the input declares (a wrong declaration against the
    model's signature is the decoder's to name, as over HTTP)."""
    dtype = NUMPY_DTYPES.get(tensor.datatype)
    if dtype is None or tensor.datatype == "BYTES" or any(d < 0 for d in tensor.shape):
        return
    count = 1
    for d in tensor.shape:
        count *= d
    if len(data) != count * dtype.itemsize:
        raise _bad(f"input '{tensor.name}': raw_input_contents[{index}] holds {len(data)} bytes, shape "
                   f"{list(tensor.shape)} of {tensor.datatype} needs {count * dtype.itemsize}")


def _typed_contents(tensor) -> bytes:
    """An input's typed `contents` as the raw little-endian bytes (BYTES: 4-byte length + bytes)."""
    name, datatype = tensor.name, tensor.datatype
    if not tensor.HasField("contents"):
        raise _bad(f"input '{name}' has no data: set raw_input_contents (the stock client does) or contents")
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise _bad(f"input '{name}': datatype {datatype} has no typed contents; send it in raw_input_contents")
    others = [f for f in _CONTENTS_FIELDS if f != field and len(getattr(tensor.contents, f))]
    if others:
        raise _bad(f"input '{name}': a {datatype} tensor's data goes in contents.{field}, not "
                   f"{', '.join('contents.' + f for f in others)}")
    values = getattr(tensor.contents, field)
    if datatype == "BYTES":
        return bytes_tensor(list(values))
    target = NUMPY_DTYPES[datatype].newbyteorder("<")
    if target.kind in "iu" and target.itemsize < 8 and len(values):
        info, array = np.iinfo(target), np.asarray(values, dtype=np.int64)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise _bad(f"input '{name}': value {bad} is out of range for {datatype} [{info.min}, {info.max}]")
    return np.asarray(values, dtype=target).tobytes()


def infer_response(request_id: str, payload: bytes, headers: dict[str, str]) -> pb.ModelInferResponse:
    """A call's binary v2 answer (`call.response` with every output binary) as a ModelInferResponse."""
    length = headers.get("Inference-Header-Content-Length")
    if length is None:          # every output was asked for as binary: an engine that answered otherwise is a bug
        raise ServeError(500, f"the engine answered {headers.get('Content-Type')!r}, not binary tensors")
    header = orjson.loads(payload[:int(length)])
    response = pb.ModelInferResponse(model_name=header["model_name"], model_version=header["model_version"],
                                     id=request_id)
    offset = int(length)
    view = memoryview(payload)
    for entry in header["outputs"]:
        size = entry["parameters"]["binary_data_size"]
        response.outputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
        response.raw_output_contents.append(bytes(view[offset:offset + size]))
        offset += size
    return response
