"""The simdjson reading of v2 JSON bodies (serve/json_tensors.py) against the orjson one: for every
body, the same arrays bit for bit or the same 400 message, and the fast path really taken for the
ordinary flat float request."""

from __future__ import annotations

import json

import numpy as np
import pytest

import serve.json_tensors as json_tensors
import serve.v2_codec as codec
from model_registry.manifest import TensorSpec
from serve.v2_codec import V2Error, decode_infer_request

SPECS = {
    "FP32": [TensorSpec(name="x", datatype="FP32", shape=[-1, 2, 3])],
    "FP16": [TensorSpec(name="x", datatype="FP16", shape=[-1, 2, 3])],
    "FP64": [TensorSpec(name="x", datatype="FP64", shape=[-1, 2, 3])],
    "INT64": [TensorSpec(name="x", datatype="INT64", shape=[-1, 2, 3])],
}
OUT = [TensorSpec(name="y", datatype="FP32", shape=[-1, 4])]


@pytest.fixture(autouse=True)
def simdjson_for_every_size(monkeypatch):
    """These bodies are small: without this, orjson alone would read them and fast == slow could
    not fail (the size rule has its own test below)."""
    monkeypatch.setattr(json_tensors, "SIMDJSON_FROM_BYTES", 0)


def _decode(body: bytes, datatype: str):
    try:
        request = decode_infer_request(body, None, SPECS[datatype], OUT, max_batch_size=8)
    except V2Error as exc:
        return ("error", exc.status, exc.message)
    return ("ok", {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in request.inputs.items()})


def _both(body: bytes, datatype: str, monkeypatch):
    fast = _decode(body, datatype)
    with monkeypatch.context() as m:
        m.setattr(codec, "load_request", lambda header: None)
        slow = _decode(body, datatype)
    return fast, slow


def _body(data, datatype="FP32", shape=(1, 2, 3), **extra) -> bytes:
    doc = {"inputs": [{"name": "x", "shape": list(shape), "datatype": datatype, "data": data}], **extra}
    return json.dumps(doc).encode()


EDGE_BODIES = [
    _body([0.5, 1, -2, 3.25, 1e-30, 6]),                      # ints among floats
    _body([1, 2, 3, 4, 5, 6]),                                  # all integers
    _body([[[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]]]),                # nested, rectangular
    _body([[0.5, 1.5], [2.5, 3.5, 4.5, 5.5]]),                  # nested, ragged
    _body([[0.5, 1.5, 2.5, 3.5, 4.5], []]),                     # ragged, count matching
    _body([0.5, [1.5], 2.5, 3.5, 4.5, 5.5]),                    # one nested element
    _body([0.5, True, 2.5, 3.5, 4.5, 5.5]),                     # a boolean among numbers
    _body([0.5, 1.0, 0.0, 1.0, 1.0, False]),                    # a boolean where 0/1 are
    _body([0.5, "1.5", 2.5, 3.5, 4.5, 5.5]),                    # a string
    _body([0.5, None, 2.5, 3.5, 4.5, 5.5]),                     # a null
    _body([0.5, 1.5]),                                          # too few
    _body([0.5] * 7),                                           # too many
    _body([], shape=(0, 2, 3)),                                 # empty
    _body([1e39, 0, 0, 0, 0, 0]),                               # past FP32's range
    _body([-1e39, 0, 0, 0, 0, 0]),
    _body([2**53 + 1, 0, 0, 0, 0, 0]),                          # integers past a double's exact range
    _body([2**63 + 5, 0, 0, 0, 0, 0]),                          # past int64
    _body([2**60 + 2**36 + 1, 0, 0, 0, 0, 0]),                  # through a double, FP32 would round twice
    _body([0.1, 0.2, 0.3, 1 / 3, 2 / 3, 3.141592653589793]),    # rounding
    _body([[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]], id="[["),  # nested, with '[' in a string too
    _body([0.5, [1.5], 2.5, 3.5, 4.5, 5.5], id="]"),            # a ']' in a string: counts nothing
    _body(1.5),                                                 # not a list
    _body({"a": 1}),
    _body([0.5] * 6, id="r1", parameters={"timeout": 2}),
    b'{"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5e400]}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5]}], '
    b'"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [9, 9, 9, 9, 9, 9]}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5], '
    b'"data": [7, 7, 7, 7, 7, 7]}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5]}]} x',
    b'[1, 2]',
    b'{"inputs": [7]}',
    b'{"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5], "extra": 1}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5]}], "junk": 1}',
    b'{"id": "\\u005b", "inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", '
    b'"data": [0.5, [1.5], 2.5, 3.5, 4.5, 5.5]}]}',                # an escaped '[' beside a nested list
    '{"inputs": [{"name": "x\u00e9", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5]}]}'.encode(),
    b'{"inputs": [{"name": "x\\ud800", "shape": [1, 2, 3], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5]}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": null}]}',
]


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64", "INT64"])
@pytest.mark.parametrize("index", range(len(EDGE_BODIES)))
def test_the_fast_path_answers_as_the_orjson_path(index, datatype, monkeypatch):
    body = EDGE_BODIES[index].replace(b'"FP32"', f'"{datatype}"'.encode())
    fast, slow = _both(body, datatype, monkeypatch)
    assert fast == slow


def test_random_float_bodies_decode_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(7)
    for _ in range(200):
        values = rng.standard_normal(6) * 10.0 ** rng.integers(-40, 40)
        data = [float(v) if rng.random() < 0.8 else int(v) if abs(v) < 2**62 else float(v) for v in values]
        for datatype in ("FP32", "FP16", "FP64"):
            body = _body(data, datatype)
            fast, slow = _both(body, datatype, monkeypatch)
            assert fast == slow, (data, datatype)


def test_a_flat_float_request_takes_the_fast_path(monkeypatch):
    """The ordinary request never builds its numbers as Python objects."""
    def refuse(self):
        raise AssertionError("data was read as Python objects")

    calls = []
    real = json_tensors.flat_numbers
    monkeypatch.setattr(codec, "flat_numbers", lambda data: calls.append(1) or real(data))
    body = _body([0.25, 1, 2, 3, 4, 5])
    result = _decode(body, "FP32")
    assert result[0] == "ok" and calls == [1]
    arr = np.frombuffer(result[1]["x"][2], dtype=np.float32)
    assert arr.tolist() == [0.25, 1, 2, 3, 4, 5]


def test_the_fast_path_keeps_no_parser_between_requests():
    """A fresh parser each request: arrays of one request never pin the next one's parser."""
    first = json_tensors.load_request(_body([0.5] * 6))
    second = json_tensors.load_request(_body([1.5] * 6))
    assert json_tensors.flat_numbers(first["inputs"][0]["data"]).tolist() == [0.5] * 6
    assert json_tensors.flat_numbers(second["inputs"][0]["data"]).tolist() == [1.5] * 6


def test_small_requests_and_binary_headers_are_left_to_orjson(monkeypatch):
    monkeypatch.setattr(json_tensors, "SIMDJSON_FROM_BYTES", 2048)
    small = _body([0.5] * 6)
    binary_header = json.dumps({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32",
                                            "parameters": {"binary_data_size": 24}}],
                                "parameters": {"pad": "p" * 4000}}).encode()
    large = _body([0.123456] * 600, shape=(100, 2, 3))
    assert len(small) < 2048 and len(binary_header) > 2048 and len(large) > 2048
    assert json_tensors.load_request(small) is None
    assert json_tensors.load_request(binary_header) is None        # no "data" to read lazily
    lazy = json_tensors.load_request(large)["inputs"][0]["data"]
    assert type(lazy) is json_tensors.LazyArray and json_tensors.flat_numbers(lazy).size == 600
