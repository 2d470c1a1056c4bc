"""A v2 JSON request read with simdjson, each input's `data` left unparsed until its tensor is built.

Why: a CNN request carries ~3,000 numbers in JSON. orjson turns them into Python floats (~70 µs)
and `np.asarray` walks that list again (~85 µs): together more than half of the event loop's work
on such a request (py-spy, bench/instances.py). simdjson parses the whole body in C and hands a
flat list of numbers to numpy as one buffer of doubles (~30 µs for parse and copy).

The fast path only ever accepts what the orjson path accepts, with the same values; anything it is
not sure of goes back to that path, which gives the answer or the error:
- a body simdjson refuses (it is stricter on numbers past 64-bit integers), a top level that is
  not an object, a key given twice (orjson keeps the last, simdjson's lookup the first);
- a body with an input's data nested (its rectangularity is the orjson path's check; found by
  counting '[' in the text against the arrays read, so a body with `\\u` escapes, which could
  spell a '[' the count would miss, goes to orjson too);
- data holding anything but numbers (booleans, strings, nulls: `as_buffer` refuses them), or none.
Both parsers round decimal text to the nearest double, so the arrays are equal bit for bit.

Below `SIMDJSON_FROM_BYTES`, or with no `"data"` key at all (the binary extension's ~200-byte
header), orjson reads the request at once: simdjson's parse and the checks above cost a fixed
~15 µs that only a few hundred numbers repay (orjson reads such a header in ~1.5 µs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simdjson

LazyArray = simdjson.Array
_Object = simdjson.Object

# the size from which simdjson reads a request faster than orjson and numpy do (measured:
# docs/benchmarks.md, "Every core busy")
SIMDJSON_FROM_BYTES = 2048


def _plain(value: Any) -> Any:
    """A parsed value as Python objects (small ones: ids, shapes, parameters, outputs)."""
    if type(value) is _Object:
        return value.as_dict()
    if type(value) is LazyArray:
        return value.as_list()
    return value


def _brackets(value: Any) -> int:
    """How many '[' the JSON text of a plain value holds (arrays, and '[' inside strings)."""
    if type(value) is list:
        return 1 + sum(map(_brackets, value))
    if type(value) is dict:
        return sum(k.count("[") + _brackets(v) for k, v in value.items())
    if type(value) is str:
        return value.count("[")
    return 0


def _count_brackets(text: bytes) -> int:
    """How many '[' `text` holds. `text.count(b"[")` tests byte by byte (~25 µs for 59 KB); a
    replace finds each '[' with memchr (~2 µs, and a request holds few)."""
    return len(text) - len(text.replace(b"[", b""))


def _unique_keys(obj: Any) -> list[str] | None:
    keys = list(obj.keys())
    return keys if len(set(keys)) == len(keys) else None


def load_request(header: bytes) -> dict | None:
    """The request as a dict whose inputs' `data` lists are still simdjson arrays (LazyArray);
    None: let orjson read this body (see the module's docstring)."""
    if len(header) < SIMDJSON_FROM_BYTES or header.find(b'"data"') < 0:
        return None
    # a byte search for the one-byte b"\\" runs as memchr (~1 µs for 59 KB), where `b"\\u" in header`
    # reads byte by byte (~55 µs: as long as simdjson's whole parse)
    if header.find(b"\\") >= 0 and b"\\u" in header:
        return None
    try:
        doc = simdjson.Parser().parse(header)
    except (ValueError, RuntimeError, TypeError):
        return None
    if type(doc) is not _Object:
        return None
    keys = _unique_keys(doc)
    if keys is None:
        return None
    request: dict[str, Any] = {}
    lazy = 0        # data arrays left unparsed: one '[' each in the text when none is nested
    for key in keys:
        value = doc[key]
        if key == "inputs" and type(value) is LazyArray:
            items = []
            for item in value:
                if type(item) is not _Object:
                    items.append(_plain(item))
                    continue
                item_keys = _unique_keys(item)
                if item_keys is None:
                    return None
                fields = {k: item[k] for k in item_keys}
                if type(fields.get("data")) is LazyArray:
                    lazy += 1
                items.append({k: (v if k == "data" and type(v) is LazyArray else _plain(v))
                              for k, v in fields.items()})
            request[key] = items
        else:
            request[key] = _plain(value)
    # every '[' in the text is an array or sits in a string; the lazy arrays count 0 in _brackets
    if _count_brackets(header) != _brackets(request) + lazy:
        return None     # some input's data holds a nested list
    return request


def flat_numbers(data: LazyArray) -> np.ndarray | None:
    """A flat JSON list of numbers (one `load_request` left lazy) as float64, integers converted;
    None: empty, or not all numbers (the caller reads `data.as_list()` the usual way)."""
    try:
        values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        return None
    # as_buffer would flatten nested lists (ragged ones too): load_request leaves only flat ones lazy
    return values if values.size else None
