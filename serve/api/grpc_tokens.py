"""Token models over KServe v2 gRPC, the way Triton serves LLMs over its gRPC protocol: text in,
text out, and a decoupled `ModelStreamInfer` that answers one request with many responses.

The tensor interface is the one of Triton's vLLM backend (triton-inference-server/vllm_backend,
`src/utils/request.py` `GenerateRequest`, and its `samples/client.py`), followed as documented:

- `text_input` (BYTES, one element): the prompt, UTF-8;
- `stream` (BOOL, one element, optional, default false): a BOOL *input*, as there (not a parameter);
- `sampling_parameters` (BYTES, one element, optional): a JSON object of sampling settings; without
  it the request's own `parameters` carry them (vLLM reads the tensor, else the parameters; its
  sample client sends both, equal, and both are accepted here when they agree);
- `exclude_input_in_output` (BOOL, optional): vLLM's default is kept, the prompt is prepended to a
  non-streamed answer unless it is true; a stream never repeats the prompt (false with stream is refused);
- the answer: `text_output` (BYTES, one element).

Sampling settings read: max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, with the
ranges and messages of /v1/completions (the same pydantic envelope, serve/openai_protocol.py);
values may be numbers or numeric strings (vLLM's sample client sends strings), top_k -1 is vLLM's
"off" (0 here). Anything else is INVALID_ARGUMENT naming it.

`ModelInfer` answers the whole completion (Triton refuses a decoupled model there; this server
does not need to). `ModelStreamInfer` with `stream` true sends one response per engine step that
produced text (`text_output` = the new text); every response carries the `triton_final_response`
parameter, true on the last, as Triton's gRPC frontend writes it for a decoupled model. As in
Triton, a flags-only empty final response is sent when the request asks for it (the stock client's
`async_stream_infer(..., enable_empty_final_response=True)`): the text then all goes in non-final
responses and an empty response says the end; without it, the engine's last step's text (possibly
empty) carries the final flag, as vLLM's backend sends it.

Everything else is /v1/completions' path: routing (split, sticky key from the metadata), the
engine's admission (429 -> UNAVAILABLE with retry-after), the context check, the engine's metrics,
shadow copies; Triton's `timeout` parameter (µs) bounds the whole completion (DEADLINE_EXCEEDED),
and a cancelled call or stream (or one past its gRPC deadline) aborts its sequence, freeing its row
at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from serve.api import openai
from serve.api.grpc_codec import (EMPTY_FINAL_RESPONSE, bytes_elements, bytes_tensor, input_data,
                                  parameters_dict)
from serve.batching import Closed, QueueFull
from serve.engines.tokens import TokenEngine
from serve.errors import ServeError
from serve.openai_protocol import CompletionRequest

FINAL = "triton_final_response"
# name, datatype, dims, optional (the inputs of Triton's vLLM backend that mean something here)
TEXT_INPUTS = (("text_input", "BYTES", [1], False), ("stream", "BOOL", [1], True),
               ("sampling_parameters", "BYTES", [1], True), ("exclude_input_in_output", "BOOL", [1], True))
TEXT_OUTPUTS = (("text_output", "BYTES", [-1]),)
SAMPLING_KEYS = ("ignore_eos", "max_tokens", "seed", "stop", "temperature", "top_k", "top_p")
# request parameters every call may carry besides the sampling settings (what the stock client writes)
CALL_KEYS = ("priority", "timeout", EMPTY_FINAL_RESPONSE)
_INPUT_NAMES = tuple(name for name, *_ in TEXT_INPUTS)


def is_token_model(repo, name: str) -> bool:
    """Whether `name` is a token model (any loaded version: a model's versions are of one kind)."""
    table = repo.tables.get(name)
    return bool(table) and any(lv.engine is not None and lv.engine.api == "openai" for lv in table.values())


def metadata(meta: dict) -> dict:
    """ModelMetadata of a token model over gRPC: the text interface, not the exported step's tensors."""
    return {**meta, "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s, _ in TEXT_INPUTS],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in TEXT_OUTPUTS]}


def config(config: dict) -> dict:
    """ModelConfig of a token model over gRPC: the text tensors (no batch dimension: max_batch_size 0,
    as Triton's vLLM backend sets it; the engine batches sequences itself) and decoupled."""
    def type_of(datatype: str) -> str:
        return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return {**config, "max_batch_size": 0,
            "input": [{"name": n, "data_type": type_of(d), "dims": s, **({"optional": True} if o else {})}
                      for n, d, s, o in TEXT_INPUTS],
            "output": [{"name": n, "data_type": type_of(d), "dims": s} for n, d, s in TEXT_OUTPUTS],
            "model_transaction_policy": {"decoupled": True}}


def _bad(message: str) -> ServeError:
    return ServeError(400, message)


def _served(exc: openai.OpenAIError) -> ServeError:
    return ServeError(exc.status, exc.message, dict(exc.headers))


@dataclass
class TextRequest:
    """What a ModelInferRequest to a token model asks."""

    prompt: str
    stream: bool
    prepend: bool               # the prompt goes before the completion in text_output
    sampling: dict[str, Any]
    empty_final: bool           # Triton's triton_enable_empty_final_response
    timeout_s: float | None     # Triton's `timeout` parameter


def _one(name: str, tensor, data: bytes) -> bytes | bool:
    """The single element of an input (any shape of one element: [1], or [1, 1] with a batch dim)."""
    count = int(np.prod(list(tensor.shape))) if len(tensor.shape) else 1
    expected = dict((n, d) for n, d, *_ in TEXT_INPUTS)[name]
    if tensor.datatype != expected:
        raise _bad(f"input '{name}' is {expected}, not {tensor.datatype}")
    if count != 1:
        raise _bad(f"input '{name}' holds one element (shape [1]), not shape {list(tensor.shape)}: one "
                   "prompt per request (send several requests, they run in the same continuous batch)")
    if expected == "BOOL":
        if len(data) != 1:
            raise _bad(f"input '{name}': a BOOL element is 1 byte, got {len(data)}")
        return data != b"\x00"
    elements = bytes_elements(name, data)
    if len(elements) != 1:
        raise _bad(f"input '{name}' holds {len(elements)} elements for shape {list(tensor.shape)}")
    return elements[0]


def parse(request: pb.ModelInferRequest) -> TextRequest:
    """The text request of a ModelInferRequest, or a 400 naming what is wrong."""
    given: dict[str, Any] = {}
    for tensor, data in input_data(request):
        if tensor.name not in _INPUT_NAMES:
            raise _bad(f"input '{tensor.name}' is not read by token models; their inputs are "
                       f"{', '.join(_INPUT_NAMES)} (Triton's vLLM backend's)")
        if tensor.name in given:
            raise _bad(f"input '{tensor.name}' is given twice")
        for key in tensor.parameters:
            raise _bad(f"input '{tensor.name}': parameter '{key}' is not read (token models' inputs take none)")
        given[tensor.name] = _one(tensor.name, tensor, data)
    for output in request.outputs:
        if output.name != "text_output":
            raise _bad(f"output '{output.name}': token models answer 'text_output' only")
    if "text_input" not in given:
        raise _bad("input 'text_input' (BYTES, the prompt) is missing")
    try:
        prompt = given["text_input"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"input 'text_input' is not UTF-8 text: {exc}") from None
    if not prompt:
        raise _bad("input 'text_input' is empty: the prompt needs at least one character")
    stream = bool(given.get("stream", False))
    exclude = given.get("exclude_input_in_output")
    if stream and exclude is False:
        raise _bad("input 'exclude_input_in_output' false needs 'stream' false: a stream never repeats the "
                   "prompt (as in Triton's vLLM backend)")

    parameters = parameters_dict(request.parameters, "parameter")
    sampling = {key: value for key, value in parameters.items() if key not in CALL_KEYS}
    for key in sampling:
        if key not in SAMPLING_KEYS:
            raise _bad(f"parameter '{key}' is not read by token models: they take the sampling settings "
                       f"{', '.join(SAMPLING_KEYS)} (as parameters or in 'sampling_parameters') and "
                       f"{', '.join(CALL_KEYS)}")
    if "sampling_parameters" in given:
        try:
            tensor_sampling = orjson.loads(given["sampling_parameters"])
        except orjson.JSONDecodeError as exc:
            raise _bad(f"input 'sampling_parameters' is not JSON: {exc}") from None
        if not isinstance(tensor_sampling, dict):
            raise _bad("input 'sampling_parameters' must be a JSON object of sampling settings")
        for key, value in tensor_sampling.items():
            if key not in SAMPLING_KEYS:
                raise _bad(f"sampling_parameters key '{key}' is not read by token models: they take "
                           f"{', '.join(SAMPLING_KEYS)}")
            if key in sampling and sampling[key] != value:
                raise _bad(f"parameter '{key}' ({sampling[key]!r}) and sampling_parameters' '{key}' ({value!r}) "
                           "disagree: send one of them")
            sampling[key] = value
    if sampling.get("top_k") in (-1, "-1"):
        sampling["top_k"] = 0          # vLLM's "off"
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]

    empty_final = parameters.get(EMPTY_FINAL_RESPONSE, False)
    if type(empty_final) is not bool:
        raise _bad(f"parameter '{EMPTY_FINAL_RESPONSE}' must be a bool")
    timeout_s = None
    if "timeout" in parameters:
        timeout_us = parameters["timeout"]
        if type(timeout_us) not in (int, float) or not timeout_us > 0:
            raise _bad(f"parameter 'timeout' must be a positive number of microseconds, got {timeout_us!r}")
        timeout_s = timeout_us / 1e6
    priority = parameters.get("priority", 0)
    if type(priority) is not int or priority < 0:
        raise _bad(f"parameter 'priority' must be a non-negative integer (Triton's; this server has one "
                   f"priority level), got {priority!r}")
    return TextRequest(prompt, stream, prepend=not stream and exclude is not True, sampling=sampling,
                       empty_final=empty_final, timeout_s=timeout_s)


class TokenCall:
    """One ModelInferRequest to a token model, routed, admitted and checked (`open`), then run
    (`responses`)."""

    def __init__(self, state, request: pb.ModelInferRequest, header, streamed: bool):
        self.state, self.request, self.streamed = state, request, streamed
        self.started = time.perf_counter()
        repo = state.repository
        name = request.model_name
        lv, alias = repo.route(name, request.model_version or None, header)
        self.lv, self.alias = lv, alias
        engine: TokenEngine = lv.engine
        if engine is None or engine.api != "openai":        # a version of another kind (not expected)
            raise _bad(f"model {name!r} version {lv.version} is not a token model")
        self.engine = engine
        try:
            self._open(engine)
        except ServeError as exc:
            exc.headers = {"x-model-version": str(lv.version), **exc.headers}
            raise

    def _open(self, engine: TokenEngine) -> None:
        # shed first, as the OpenAI routes do before validating and tokenizing (token_admission.py)
        try:
            engine.admit(self.started + self.state.settings.request_timeout_s)
        except (QueueFull, Closed) as exc:
            if isinstance(exc, QueueFull):
                engine.metrics.request_done(429, time.perf_counter() - self.started)
            raise _served(openai._engine_error(exc)) from None
        text = parse(self.request)
        if text.stream and not self.streamed:
            raise _bad("input 'stream' true needs ModelStreamInfer (the model is decoupled: one response per "
                       "chunk); ModelInfer answers the whole completion")
        self.text = text
        try:
            body = openai.validated({"model": self.request.model_name, "prompt": text.prompt, **text.sampling},
                                    CompletionRequest)
            self.prompt_ids, self.jobs = openai.completion_jobs(engine, body)
        except openai.OpenAIError as exc:
            raise _served(exc) from None
        self.routed = openai.Routed(engine, self.lv.version, self.alias)

    @property
    def trailing(self) -> list[tuple[str, str]]:
        return [("x-model-version", str(self.lv.version)), *((("x-model-alias", self.alias),) if self.alias else ())]

    def _response(self, text: str | None, final: bool | None) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=self.request.model_name, model_version=str(self.lv.version),
                                         id=self.request.id)
        if text is not None:
            response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
            response.raw_output_contents.append(bytes_tensor([text.encode("utf-8")]))
        if final is not None:
            response.parameters[FINAL].bool_param = final
        return response

    async def _events(self) -> AsyncIterator[tuple[str, bool, list[int]]]:
        """(new text, last, new tokens) per engine step, within the request's `timeout`; the
        sequence is aborted when this stops early (cancelled, timed out, or its consumer gone)."""
        steps = self.engine.generate(self.jobs[0]).__aiter__()
        deadline = None if self.text.timeout_s is None else time.monotonic() + self.text.timeout_s
        try:
            while True:
                try:
                    if deadline is None:
                        events = await steps.__anext__()
                    else:
                        events = await asyncio.wait_for(steps.__anext__(), max(deadline - time.monotonic(), 0))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise ServeError(504, f"deadline exceeded: the completion did not end within the request's "
                                          f"timeout of {self.text.timeout_s * 1e6:.0f} microseconds") from None
                except (asyncio.CancelledError, ServeError):
                    raise
                except Exception as exc:   # noqa: BLE001 - the engine's refusal or failure, as /v1 answers it
                    raise _served(openai._engine_error(exc)) from None
                last = events[-1].finish_reason is not None
                yield "".join(e.text for e in events), last, [e.token for e in events if e.token is not None]
                if last:
                    return
        finally:
            await steps.aclose()             # an unfinished sequence is aborted (TokenEngine.generate)

    async def complete(self) -> pb.ModelInferResponse:
        """ModelInfer's answer: the whole completion (after the prompt unless excluded)."""
        text, tokens = [], []
        async for new, _, ids in self._events():
            text.append(new)
            tokens.extend(ids)
        self._shadow(tokens)
        return self._response((self.text.prompt if self.text.prepend else "") + "".join(text), None)

    async def responses(self) -> AsyncIterator[pb.ModelInferResponse]:
        """ModelStreamInfer's answers (decoupled): see the module's docstring."""
        empty_final, tokens = self.text.empty_final, []
        if not self.text.stream:
            whole = await self.complete()
            if empty_final:
                whole.parameters[FINAL].bool_param = False
                yield whole
                yield self._response(None, True)
            else:
                whole.parameters[FINAL].bool_param = True
                yield whole
            return
        async for new, last, ids in self._events():
            tokens.extend(ids)
            if not last:
                if new:
                    yield self._response(new, False)
                continue
            self._shadow(tokens)
            if empty_final:
                if new:
                    yield self._response(new, False)
                yield self._response(None, True)
            else:
                yield self._response(new, True)

    def _shadow(self, tokens: list[int]) -> None:
        openai.shadow_tokens(self.state.repository, self.state.shadow, self.routed, self.jobs, [tokens])

