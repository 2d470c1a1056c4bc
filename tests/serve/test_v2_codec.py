"""KServe v2 codec: JSON and binary requests, validation messages, tritonclient round trips."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from model_registry.manifest import TensorSpec
from serve.v2_codec import (
    NUMPY_DTYPES,
    InferRequest,
    RequestedOutput,
    V2Error,
    decode_infer_request,
    encode_infer_response,
)

IMAGE = TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])
MASK = TensorSpec(name="mask", datatype="BOOL", shape=[-1, 8])
LOGITS = TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])
LABEL = TensorSpec(name="label", datatype="INT64", shape=[-1])
OUTPUTS = [LOGITS, LABEL]
DATATYPES = {"logits": "FP32", "label": "INT64"}


def image(batch: int = 1) -> np.ndarray:
    return np.arange(batch * 64, dtype=np.float32).reshape(batch, 1, 8, 8) / 7


def json_input(name: str, arr: np.ndarray, datatype: str, nested: bool = False) -> dict:
    data = arr.tolist() if nested else arr.reshape(-1).tolist()
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": data}


def tensor(name: str, datatype: str, shape: list[int], data) -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def decode(request: dict, inputs=(IMAGE,), outputs=OUTPUTS, **kw) -> InferRequest:
    body = orjson.dumps(request)
    return decode_infer_request(body, None, list(inputs), list(outputs), 32, **kw)


def refused(request: dict | bytes, *, header_length=None, inputs=(IMAGE,), max_batch_size=32):
    body = request if isinstance(request, bytes) else orjson.dumps(request)
    with pytest.raises(V2Error) as info:
        decode_infer_request(body, header_length, list(inputs), OUTPUTS, max_batch_size)
    assert info.value.status == 400
    assert str(info.value) == info.value.message
    return info.value.message


def one(**fields) -> dict:
    """A request with a single image input, its fields overridden."""
    item = json_input("image", image(), "FP32")
    item.update(fields)
    return {"inputs": [item]}


# --- JSON requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("batch", [1, 32])
def test_json_round_trip(nested, batch):
    arr = image(batch)
    req = decode({"id": "r1", "inputs": [json_input("image", arr, "FP32", nested)]})
    got = req.inputs["image"]
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, arr)
    assert req.batch_size == batch
    assert req.id == "r1"
    assert req.parameters == {}
    assert req.outputs == [RequestedOutput("logits", False), RequestedOutput("label", False)]


def test_inputs_come_back_in_signature_order_with_their_dtypes():
    mask = np.array([[True, False] * 4, [False] * 8])
    req = decode(
        {"inputs": [json_input("mask", mask, "BOOL"), json_input("image", image(2), "FP32")]},
        inputs=(IMAGE, MASK),
    )
    assert list(req.inputs) == ["image", "mask"]
    np.testing.assert_array_equal(req.inputs["mask"], mask)
    assert req.inputs["mask"].dtype == np.bool_


def test_integers_are_accepted_for_floats():
    req = decode(one(data=list(range(64))))
    np.testing.assert_array_equal(req.inputs["image"].reshape(-1), np.arange(64, dtype=np.float32))


@pytest.mark.parametrize(
    "datatype", ["UINT8", "INT8", "INT16", "INT32", "INT64", "UINT64", "FP16", "FP64"]
)
def test_every_numeric_datatype(datatype):
    spec = TensorSpec(name="x", datatype=datatype, shape=[-1, 3])
    arr = np.array([[0, 1, 2], [3, 4, 5]], dtype=NUMPY_DTYPES[datatype])
    req = decode({"inputs": [json_input("x", arr, datatype)]}, inputs=(spec,))
    assert req.inputs["x"].dtype == NUMPY_DTYPES[datatype]
    np.testing.assert_array_equal(req.inputs["x"], arr)


def test_extreme_int64_and_uint64():
    spec = TensorSpec(name="x", datatype="UINT64", shape=[-1])
    req = decode({"inputs": [tensor("x", "UINT64", [2], [0, 2**64 - 1])]}, inputs=(spec,))
    assert req.inputs["x"].tolist() == [0, 2**64 - 1]
    spec = TensorSpec(name="x", datatype="INT64", shape=[-1])
    req = decode({"inputs": [tensor("x", "INT64", [2], [-(2**63), 2**63 - 1])]}, inputs=(spec,))
    assert req.inputs["x"].tolist() == [-(2**63), 2**63 - 1]


def test_request_parameters_and_requested_outputs():
    req = decode({
        **one(),
        "parameters": {"timeout": 5000, "priority": 1, "binary_data_output": True},
        "outputs": [{"name": "label"}, {"name": "logits", "parameters": {"binary_data": False}}],
    })
    assert req.parameters["timeout"] == 5000
    assert req.outputs == [RequestedOutput("label", True), RequestedOutput("logits", False)]


def test_binary_data_output_applies_to_all_outputs_when_none_named():
    req = decode({**one(), "parameters": {"binary_data_output": True}})
    assert req.outputs == [RequestedOutput("logits", True), RequestedOutput("label", True)]
    all_json = [RequestedOutput("logits", False), RequestedOutput("label", False)]
    assert decode({**one(), "outputs": []}).outputs == all_json


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "header_length", "expected"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "malformed JSON: the request must be an object, got list"),
        (b'{"inputs": [1e400]}', None, "malformed JSON"),
        (b'{"inputs": []}', 100, "Inference-Header-Content-Length 100 exceeds body size 14"),
        (b'{"inputs": []}', -1, "Inference-Header-Content-Length must be >= 0"),
        (b'{"inputs": []}', "abc", "Inference-Header-Content-Length must be an integer"),
        (b'{"inputs": []}', 1.5, "Inference-Header-Content-Length must be an integer"),
        (b'{"inputs": []}', 0, "raw binary request"),
    ],
)
def test_malformed_body(body, header_length, expected):
    assert expected in refused(body, header_length=header_length)


def test_header_length_as_string_is_accepted():
    body = orjson.dumps(one())
    req = decode_infer_request(body, str(len(body)), [IMAGE], OUTPUTS, 32)
    np.testing.assert_array_equal(req.inputs["image"], image())


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({}, "'inputs' is missing"),
        ({"inputs": {"image": 1}}, "'inputs' must be a list, got dict"),
        ({"inputs": []}, "'inputs' is empty"),
        ({"inputs": [3]}, "inputs[0] must be an object, got int"),
        ({"inputs": [{"shape": [1]}]}, "inputs[0]: 'name' is missing"),
        ({"inputs": [{"name": None, "shape": [1]}]}, "inputs[0].name must be a string, got null"),
    ],
)
def test_bad_inputs_field(request_, expected):
    assert refused(request_) == expected


def test_unknown_duplicate_and_missing_inputs():
    msg = refused(one(name="img"), inputs=(IMAGE, MASK))
    assert msg == "unknown input 'img'; the model expects 'image', 'mask'"
    item = json_input("image", image(), "FP32")
    assert refused({"inputs": [item, item]}) == "input 'image' appears more than once"
    assert refused({"inputs": [item]}, inputs=(IMAGE, MASK)) == "missing input(s): 'mask'"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"shape": None}, "input 'image': shape must be a list of non-negative integers, got None"),
        (
            {"shape": [1, 1, 8, -8]},
            "input 'image': shape must be a list of non-negative integers, got [1, 1, 8, -8]",
        ),
        (
            {"shape": [1, 1, 8, 8.0]},
            "input 'image': shape must be a list of non-negative integers, got [1, 1, 8, 8.0]",
        ),
        (
            {"shape": [True, 1, 8, 8]},
            "input 'image': shape must be a list of non-negative integers, got [True, 1, 8, 8]",
        ),
        ({"datatype": None}, "input 'image': datatype must be a string, got null"),
        ({"datatype": "INT64"}, "input 'image': datatype INT64 does not match the model's FP32"),
        ({"datatype": "FP64"}, "input 'image': datatype FP64 does not match the model's FP32"),
        ({"datatype": "BF16"}, "input 'image': datatype BF16 is not supported"),
        ({"data": None}, "input 'image' has no 'data' (and no binary_data_size parameter)"),
        (
            {"parameters": {"binary_data_size": 256}},
            "input 'image' has both 'data' and binary_data_size",
        ),
        ({"parameters": [1]}, "input 'image': parameters must be an object, got list"),
        (
            {"parameters": {"shared_memory_region": "r"}},
            "input 'image': shared memory is not supported",
        ),
        (
            {"shape": [1, 8, 8]},
            "input 'image': shape [1, 8, 8] has rank 3, the model expects rank 4 [-1, 1, 8, 8]",
        ),
        (
            {"shape": [1, 3, 8, 8]},
            "input 'image': dim 1 is 3, the model expects 1 (shape [-1, 1, 8, 8])",
        ),
        ({"shape": [0, 1, 8, 8], "data": []}, "input 'image': empty batch (dim 0 is 0)"),
        ({"shape": [33, 1, 8, 8]}, "input 'image': batch size 33 exceeds the maximum 32"),
        (
            {"shape": [2, 1, 8, 8]},
            "input 'image': shape [2, 1, 8, 8] needs 128 elements, data has 64",
        ),
        ({"data": [[1.0] * 64, [2.0]]}, "input 'image': data is a ragged nested list"),
        ({"data": "abc"}, "input 'image': data must be a JSON list, got str"),
        ({"data": ["a"] * 64}, "input 'image': data must be numbers for FP32, got strings"),
        ({"data": [True] * 64}, "input 'image': data must be numbers for FP32, got booleans"),
        (
            {"data": [1.5] * 63 + [True]},
            "input 'image': data must be numbers for FP32, got booleans",
        ),
        (
            {"data": [[1.5] * 32, [1] * 31 + [False]]},
            "input 'image': data must be numbers for FP32, got booleans",
        ),
        (
            {"data": [None] * 64},
            "input 'image': data must be numbers for FP32, got nulls or mixed values",
        ),
        (
            {"data": [1.0] * 63 + [None]},
            "input 'image': data must be numbers for FP32, got nulls or mixed values",
        ),
        ({"data": [1.0] * 63 + [1e39]}, "input 'image': values out of range for FP32"),
    ],
)
def test_bad_input(fields, expected):
    assert refused(one(**fields)) == expected


@pytest.mark.parametrize("nested", [False, True])
def test_bool_hidden_in_a_large_numeric_list(nested):
    # large body: the numpy pre-filter runs before the text search
    arr = image(32)
    data = arr.tolist() if nested else arr.reshape(-1).tolist()
    if nested:
        data[31][0][7][7] = True
    else:
        data[-1] = True
    request = {"inputs": [tensor("image", "FP32", list(arr.shape), data)]}
    assert refused(request) == "input 'image': data must be numbers for FP32, got booleans"


def test_zeros_and_ones_next_to_bool_parameters_are_fine():
    arr = (np.arange(32 * 64) % 2).astype(np.float32).reshape(32, 1, 8, 8)
    req = decode({
        "inputs": [json_input("image", arr, "FP32")],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
    })
    np.testing.assert_array_equal(req.inputs["image"], arr)


def test_batch_sizes_must_agree():
    mask = json_input("mask", np.zeros((2, 8), bool), "BOOL")
    msg = refused({"inputs": [json_input("image", image(1), "FP32"), mask]}, inputs=(IMAGE, MASK))
    assert msg == "input 'mask': batch size 2 differs from the other inputs' 1"


def test_batch_limit_is_the_given_max():
    assert refused(one(), max_batch_size=0) == "input 'image': batch size 1 exceeds the maximum 0"


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("UINT8", [300, 1], "input 'x': value 300 is out of range for UINT8 [0, 255]"),
        ("UINT8", [-1, 1], "input 'x': value -1 is out of range for UINT8 [0, 255]"),
        ("INT8", [1, -129], "input 'x': value -129 is out of range for INT8 [-128, 127]"),
        ("INT64", [2**63, 1], "input 'x': value 9223372036854775808 is out of range for INT64"),
        # numpy reads a mix of negative and >= 2**63 ints as float64; still an integer error
        ("UINT64", [-1, 2**63], "input 'x': value -1 is out of range for UINT64"),
        ("INT32", [-1, 2**63], "input 'x': value 9223372036854775808 is out of range for INT32"),
        ("INT64", [-1, 2**63, 0.5], "input 'x': data must be integers for INT64, got floats"),
        ("INT64", [-1, 2**63, True], "input 'x': data must be integers for INT64, got booleans"),
        ("INT32", [1.0, 2.0], "input 'x': data must be integers for INT32, got floats"),
        ("INT32", [1, 2.5], "input 'x': data must be integers for INT32, got floats"),
        ("INT32", [1, True], "input 'x': data must be integers for INT32, got booleans"),
        ("BOOL", [1, 0], "input 'x': data must be booleans for BOOL, got integers"),
        ("BOOL", [True, 0], "input 'x': data must be booleans for BOOL, got integers"),
        ("FP16", [1.0, 70000.0], "input 'x': values out of range for FP16"),
    ],
)
def test_bad_values(datatype, data, expected):
    spec = TensorSpec(name="x", datatype=datatype, shape=[-1])
    msg = refused({"inputs": [tensor("x", datatype, [len(data)], data)]}, inputs=(spec,))
    assert msg.startswith(expected)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"outputs": {"name": "x"}}, "'outputs' must be a list, got dict"),
        ({"outputs": [1]}, "outputs[0] must be an object, got int"),
        ({"outputs": [{"name": 1}]}, "outputs[0].name must be a string, got int"),
        (
            {"outputs": [{"name": "probs"}]},
            "unknown output 'probs'; the model has 'logits', 'label'",
        ),
        (
            {"outputs": [{"name": "label"}, {"name": "label"}]},
            "output 'label' is requested more than once",
        ),
        (
            {"outputs": [{"name": "label", "parameters": 1}]},
            "output 'label': parameters must be an object, got int",
        ),
        (
            {"outputs": [{"name": "label", "parameters": {"binary_data": 1}}]},
            "output 'label': binary_data must be a boolean, got int",
        ),
        (
            {"outputs": [{"name": "label", "parameters": {"classification": 3}}]},
            "output 'label': the classification extension is not supported",
        ),
        (
            {"parameters": {"binary_data_output": "yes"}},
            "parameters.binary_data_output must be a boolean, got str",
        ),
        ({"parameters": [1]}, "'parameters' must be an object, got list"),
        ({"id": 7}, "'id' must be a string, got int"),
    ],
)
def test_bad_request_fields(extra, expected):
    assert refused({**one(), **extra}) == expected


# --- binary requests from the stock tritonclient ---------------------------------------------


def triton_input(name: str, arr: np.ndarray, datatype: str, binary: bool = True):
    item = triton.InferInput(name, list(arr.shape), datatype)
    item.set_data_from_numpy(arr, binary_data=binary)
    return item


def test_tritonclient_binary_request():
    arr = image(4)
    mask = np.random.default_rng(0).random((4, 8)) > 0.5
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [triton_input("image", arr, "FP32"), triton_input("mask", mask, "BOOL")],
        outputs=[triton.InferRequestedOutput("label", binary_data=True)],
        request_id="abc",
        priority=2,
        timeout=1500,
    )
    assert json_size is not None
    req = decode_infer_request(body, json_size, [IMAGE, MASK], OUTPUTS, 32)
    np.testing.assert_array_equal(req.inputs["image"], arr)
    np.testing.assert_array_equal(req.inputs["mask"], mask)
    for got in req.inputs.values():
        assert got.flags.c_contiguous and got.flags.writeable and got.flags.aligned
    assert req.id == "abc" and req.batch_size == 4
    assert req.parameters == {"priority": 2, "timeout": 1500}
    assert req.outputs == [RequestedOutput("label", True)]


def test_tritonclient_default_outputs_are_binary():
    inputs = [triton_input("image", image(), "FP32")]
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs)
    req = decode_infer_request(body, json_size, [IMAGE], OUTPUTS, 32)
    assert req.outputs == [RequestedOutput("logits", True), RequestedOutput("label", True)]


def test_tritonclient_mixed_binary_and_json_inputs():
    arr, mask = image(2), np.eye(2, 8, dtype=bool)
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [
            triton_input("mask", mask, "BOOL", binary=False),
            triton_input("image", arr, "FP32", binary=True),
        ],
        outputs=[triton.InferRequestedOutput("logits", binary_data=False)],
    )
    req = decode_infer_request(body, json_size, [IMAGE, MASK], OUTPUTS, 32)
    np.testing.assert_array_equal(req.inputs["image"], arr)
    np.testing.assert_array_equal(req.inputs["mask"], mask)
    assert req.outputs == [RequestedOutput("logits", False)]


def test_tritonclient_json_request():
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [triton_input("image", image(3), "FP32", binary=False)],
        outputs=[triton.InferRequestedOutput("logits", binary_data=False)],
    )
    assert json_size is None
    req = decode_infer_request(body, json_size, [IMAGE], OUTPUTS, 32)
    np.testing.assert_array_equal(req.inputs["image"], image(3))


def binary_request(header: dict, payload: bytes) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + payload, len(head)


def binary_item(size: int, shape=(1, 1, 8, 8), datatype="FP32", name="image") -> dict:
    item = {"name": name, "shape": list(shape), "datatype": datatype}
    return {**item, "parameters": {"binary_data_size": size}}


def test_binary_size_must_match_shape():
    body, n = binary_request({"inputs": [binary_item(200)]}, b"\0" * 200)
    assert refused(body, header_length=n) == (
        "input 'image': binary_data_size is 200 bytes, shape [1, 1, 8, 8] of FP32 needs 256"
    )


def test_binary_section_too_short_or_too_long():
    body, n = binary_request({"inputs": [binary_item(256)]}, b"\0" * 100)
    assert refused(body, header_length=n) == (
        "input 'image': binary_data_size 256 runs past the binary section (100 bytes left)"
    )
    body, n = binary_request({"inputs": [binary_item(256)]}, b"\0" * 260)
    assert refused(body, header_length=n) == (
        "binary section holds 260 bytes but the inputs' binary_data_size add up to 256"
    )


def test_binary_size_without_header_length():
    body, _ = binary_request({"inputs": [binary_item(256)]}, b"")
    assert "no Inference-Header-Content-Length header" in refused(body)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_binary_non_finite(bad):
    arr = image()
    arr[0, 0, 3, 3] = bad
    body, n = binary_request({"inputs": [binary_item(256)]}, arr.tobytes())
    assert refused(body, header_length=n) == "input 'image' contains NaN or Inf"
    req = decode_infer_request(body, n, [IMAGE], OUTPUTS, 32, allow_non_finite=True)
    np.testing.assert_array_equal(req.inputs["image"], arr)


def test_binary_bool_bytes_must_be_0_or_1():
    payload = bytes([0, 1, 2, 0, 0, 0, 0, 0])
    body, n = binary_request({"inputs": [binary_item(8, (1, 8), "BOOL", "mask")]}, payload)
    spec = [MASK]
    with pytest.raises(V2Error, match="input 'mask': BOOL bytes must be 0 or 1"):
        decode_infer_request(body, n, spec, OUTPUTS, 32)


# --- BYTES ------------------------------------------------------------------------------------

TEXT = TensorSpec(name="text", datatype="BYTES", shape=[-1, 2])


def test_bytes_binary_round_trip_through_tritonclient():
    arr = np.array([[b"hello", b""], [b"\xff\x00bin", "naïve".encode()]], dtype=object)
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [triton_input("text", arr, "BYTES")],
        outputs=[triton.InferRequestedOutput("text", binary_data=True)],
    )
    req = decode_infer_request(body, json_size, [TEXT], [TEXT], 32)
    got = req.inputs["text"]
    assert got.dtype == object and got.shape == (2, 2)
    assert got.tolist() == arr.tolist()

    out, headers = encode({"text": got}, *req.outputs, datatypes={"text": "BYTES"})
    result = triton.InferenceServerClient.parse_response_body(
        out, header_length=int(headers["Inference-Header-Content-Length"])
    )
    assert result.as_numpy("text").tolist() == arr.tolist()


def test_bytes_json_round_trip():
    request = {"inputs": [tensor("text", "BYTES", [1, 2], [["a", "naïve"]])]}
    req = decode(request, inputs=(TEXT,), outputs=(TEXT,))
    assert req.inputs["text"].tolist() == [[b"a", "naïve".encode()]]
    out, headers = encode(req.inputs, RequestedOutput("text", False), datatypes={"text": "BYTES"})
    assert headers == {"Content-Type": "application/json"}
    assert orjson.loads(out)["outputs"][0]["data"] == ["a", "naïve"]
    result = triton.InferenceServerClient.parse_response_body(out)
    assert result.as_numpy("text").tolist() == [["a", "naïve"]]


def text_item(payload: bytes) -> dict:
    return binary_item(len(payload), (1, 2), "BYTES", "text")


def test_bad_bytes():
    def bad(item):
        return refused({"inputs": [item]}, inputs=(TEXT,))

    assert bad({"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", 1]}) == (
        "input 'text': data must be strings for BYTES"
    )
    assert bad({"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a"]}) == (
        "input 'text': shape [1, 2] needs 2 elements, data has 1"
    )
    payload = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 9) + b"xy"
    body, n = binary_request({"inputs": [text_item(payload)]}, payload)
    assert refused(body, header_length=n, inputs=(TEXT,)) == (
        "input 'text': BYTES element 1 of 9 bytes runs past its data"
    )
    payload = struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"zz"
    body, n = binary_request({"inputs": [text_item(payload)]}, payload)
    assert refused(body, header_length=n, inputs=(TEXT,)) == (
        "input 'text': 2 bytes left over after 2 BYTES elements"
    )


# --- responses ---------------------------------------------------------------------------------


def encode(outs: dict, *requested: RequestedOutput, datatypes=DATATYPES) -> tuple[bytes, dict]:
    return encode_infer_response("m", "1", None, outs, list(requested), datatypes)


def model_outputs(batch: int = 2) -> dict[str, np.ndarray]:
    logits = (np.arange(batch * 10, dtype=np.float32).reshape(batch, 10) - 3.3) / 3
    return {"logits": logits, "label": logits.argmax(axis=1).astype(np.int64)}


def test_json_response():
    outs = model_outputs()
    requested = [RequestedOutput("logits", False), RequestedOutput("label", False)]
    body, headers = encode_infer_response("mnist", "3", "req-1", outs, requested, DATATYPES)
    assert headers == {"Content-Type": "application/json"}
    doc = orjson.loads(body)
    assert doc["model_name"] == "mnist" and doc["model_version"] == "3" and doc["id"] == "req-1"
    logits, label = doc["outputs"]
    assert (logits["name"], logits["datatype"], logits["shape"]) == ("logits", "FP32", [2, 10])
    # exact once read back as float32: orjson writes the shortest repr of each float32
    got = np.array(logits["data"], np.float32).reshape(2, 10)
    np.testing.assert_array_equal(got, outs["logits"])
    expected = {"name": "label", "datatype": "INT64", "shape": [2], "data": outs["label"].tolist()}
    assert label == expected
    result = triton.InferenceServerClient.parse_response_body(body)
    np.testing.assert_array_equal(result.as_numpy("logits"), outs["logits"])


def test_response_without_id_omits_it():
    body, _ = encode(model_outputs(), RequestedOutput("label", False))
    assert "id" not in orjson.loads(body)


def test_json_response_writes_non_finite_values_as_strings():
    # the protobuf JSON mapping of float (KServe v2): never null, which cannot tell NaN from Inf
    outs = {"logits": np.array([[np.nan, np.inf, -np.inf] + [0.5] * 7], np.float32)}
    body, _ = encode(outs, RequestedOutput("logits", False))
    assert orjson.loads(body)["outputs"][0]["data"][:4] == ["NaN", "Infinity", "-Infinity", 0.5]


def test_json_response_accepts_non_contiguous_and_casts_to_the_datatype():
    logits = np.arange(20, dtype=np.float64).reshape(10, 2).T  # transposed: not C-contiguous
    body, _ = encode({"logits": logits}, RequestedOutput("logits", False))
    out = orjson.loads(body)["outputs"][0]
    assert out["shape"] == [2, 10] and out["data"] == logits.reshape(-1).tolist()


@pytest.mark.parametrize("batch", [1, 5])
def test_binary_response_parsed_by_tritonclient(batch):
    outs = model_outputs(batch)
    requested = [RequestedOutput("logits", True), RequestedOutput("label", True)]
    body, headers = encode_infer_response("mnist", "1", "x", outs, requested, DATATYPES)
    assert headers["Content-Type"] == "application/octet-stream"
    n = int(headers["Inference-Header-Content-Length"])
    doc = orjson.loads(body[:n])
    assert doc["outputs"][0] == {
        "name": "logits", "datatype": "FP32", "shape": [batch, 10],
        "parameters": {"binary_data_size": batch * 40},
    }
    assert len(body) == n + batch * 40 + batch * 8
    result = triton.InferenceServerClient.parse_response_body(body, header_length=n)
    for name, arr in outs.items():
        got = result.as_numpy(name)
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)
    assert result.get_response()["id"] == "x"


def test_mixed_binary_and_json_response():
    outs = model_outputs()
    requested = [RequestedOutput("label", False), RequestedOutput("logits", True)]
    body, headers = encode_infer_response("m", "1", None, outs, requested, DATATYPES)
    result = triton.InferenceServerClient.parse_response_body(
        body, header_length=int(headers["Inference-Header-Content-Length"])
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), outs["logits"])
    np.testing.assert_array_equal(result.as_numpy("label"), outs["label"])


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT16", "UINT64", "FP16", "FP64"])
def test_binary_response_every_datatype(datatype):
    arr = (np.arange(6) % 2).astype(NUMPY_DTYPES[datatype]).reshape(2, 3)
    body, headers = encode({"y": arr}, RequestedOutput("y", True), datatypes={"y": datatype})
    result = triton.InferenceServerClient.parse_response_body(
        body, header_length=int(headers["Inference-Header-Content-Length"])
    )
    np.testing.assert_array_equal(result.as_numpy("y"), arr)


def test_full_round_trip_tritonclient_to_tritonclient():
    """tritonclient request -> decode -> 'model' -> encode -> tritonclient result."""
    arr = image(3)
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [triton_input("image", arr, "FP32")], request_id="rt"
    )
    req = decode_infer_request(body, json_size, [IMAGE], OUTPUTS, 32)
    logits = req.inputs["image"].reshape(3, 64)[:, :10]
    outs = {"logits": logits, "label": logits.argmax(1)}
    out, headers = encode_infer_response("m", "1", req.id, outs, req.outputs, DATATYPES)
    result = triton.InferenceServerClient.parse_response_body(
        out, header_length=int(headers["Inference-Header-Content-Length"])
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_array_equal(result.as_numpy("label"), logits.argmax(1))
