"""Strict requests on the OpenAI-compatible and image routes, against real servers (issue 14):
an unknown field or query parameter is a 400 naming it, never dropped; a field of OpenAI's that we
do not honour is a 400 saying so, except at the value that changes nothing; what the stock `openai`
client sends still works. Also: the context refusal names the largest max_tokens that fits, the
unknown-model 404 lists only the OpenAI models, error route lists name real routes, and
`GET /v1/models/{model}` (`client.models.retrieve`).
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.serve import test_openai as shared

PROMPT = shared.PROMPT
token_server, client = shared.token_server, shared.client      # the server fixture and its stock client

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "Speak."}]


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def completion(**extra) -> dict:
    return {"model": "decoder-tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, **extra}


def chat(**extra) -> dict:
    return {"model": "decoder-tiny", "messages": USER, "max_tokens": 2, "temperature": 0, **extra}


def refused(r: httpx.Response, param: str) -> str:
    """The message of an OpenAI-shaped 400 about `param`."""
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == 400, error
    assert param.rsplit(".", 1)[-1] in error["message"]
    return error["message"]


# ---- unknown fields: a 400 naming them -----------------------------------------------------------

def test_a_misspelt_field_is_a_400_naming_it_not_16_tokens(token_server):
    message = refused(post(token_server, "/v1/completions", {"model": "decoder-tiny", "prompt": PROMPT,
                                                             "max_token": 4}), "max_token")
    assert message == "Unrecognized request argument supplied: max_token (did you mean max_tokens?)"


UNKNOWN = [
    ("/v1/completions", completion(min_p=0.1), "min_p"),
    ("/v1/completions", completion(stream=True, stream_options={"include_usage": True, "usage": True}),
     "stream_options.usage"),
    ("/v1/chat/completions", chat(max_token=4), "max_token"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x", "weight": 1}]), "messages.0.weight"),
    ("/v1/chat/completions", chat(messages=[*USER, {"role": "user", "content": [{"type": "text", "text": "x",
                                                                                "lang": "en"}]}]),
     "messages.1.content.0.lang"),
    ("/v1/chat/completions", {"modle": "decoder-tiny", "messages": USER}, "modle"),   # told before `model` missing
]


@pytest.mark.parametrize("path,body,param", UNKNOWN, ids=[u[2] for u in UNKNOWN])
def test_unknown_fields_anywhere_in_the_body_are_400(token_server, path, body, param):
    assert refused(post(token_server, path, body), param).startswith("Unrecognized request argument supplied")


@pytest.mark.parametrize("path,method", [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                                         ("/v1/models", "GET"), ("/v1/models/decoder-tiny", "GET")])
def test_a_query_parameter_on_an_openai_route_is_400(token_server, path, method):
    body = completion() if "completions" in path and "chat" not in path else chat() if "chat" in path else None
    r = httpx.request(method, f"{token_server.url}{path}?max_tokens=4", json=body, timeout=60)
    assert "query parameter" in refused(r, "max_tokens")


# ---- known but not supported: a 400 that says so; the neutral value passes ----------------------------

UNSUPPORTED = [
    ("/v1/completions", completion(logit_bias={"50": 100}), "logit_bias"),
    ("/v1/completions", completion(best_of=3), "best_of"),
    ("/v1/completions", completion(suffix=" and so on"), "suffix"),
    ("/v1/completions", completion(echo=True), "echo"),
    ("/v1/completions", completion(presence_penalty=0.5), "presence_penalty"),
    ("/v1/completions", completion(stream=True, stream_options={"include_obfuscation": True}),
     "stream_options.include_obfuscation"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), "response_format"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("/v1/chat/completions", chat(tool_choice="auto"), "tool_choice"),
    ("/v1/chat/completions", chat(logit_bias={"50": -100}), "logit_bias"),
    ("/v1/chat/completions", chat(frequency_penalty=1), "frequency_penalty"),
    ("/v1/chat/completions", chat(reasoning_effort="low"), "reasoning_effort"),
    ("/v1/chat/completions", chat(store=True), "store"),
    ("/v1/chat/completions", chat(prompt_cache_key="k"), "prompt_cache_key"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x", "name": "Romeo"}]), "messages.0.name"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), "messages.0.content.0"),
]


@pytest.mark.parametrize("path,body,param", UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_known_but_unsupported_fields_are_400_saying_so(token_server, path, body, param):
    message = refused(post(token_server, path, body), param)
    assert message.startswith(f"Unsupported parameter: {param!r} is not supported: "), message


NEUTRAL = [
    ("/v1/completions", completion(logit_bias={}, echo=False, suffix=None, presence_penalty=0, frequency_penalty=0.0,
                                   best_of=2, n=2)),
    ("/v1/chat/completions", chat(tools=[], tool_choice="none", response_format={"type": "text"}, store=False,
                                  modalities=["text"], service_tier="auto", logit_bias=None)),
    # an assistant message copied whole from an OpenAI answer: its empty extras are accepted
    ("/v1/chat/completions", chat(messages=[*USER, {"role": "assistant", "content": "Aye.", "refusal": None,
                                                    "annotations": [], "audio": None, "function_call": None,
                                                    "tool_calls": None}, *USER])),
]


@pytest.mark.parametrize("path,body", NEUTRAL, ids=[n[0] for n in NEUTRAL])
def test_unsupported_fields_at_the_value_that_changes_nothing_pass(token_server, path, body):
    r = post(token_server, path, body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,param", [
    (completion(stream_options={"include_usage": True}), "stream_options"),          # without stream: true
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(top_logprobs=2), "top_logprobs"),                                            # without logprobs: true
    (chat(max_tokens=2, max_completion_tokens=3), "max_tokens"),
])
def test_fields_that_need_another_one_are_refused_alone(token_server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    refused(post(token_server, path, body), param)


def test_the_stock_client_works_and_gets_the_400s(client):
    """The client sends the caller's arguments only; a developer message and the answer's own message
    object fed back (the usual chat loop) pass; the refusals reach it as BadRequestError with param."""
    first = client.chat.completions.create(model="decoder-tiny", max_tokens=3, temperature=0,
                                           messages=[{"role": "developer", "content": "You speak verse."}, *USER])
    again = client.chat.completions.create(model="decoder-tiny", max_tokens=3, temperature=0, logprobs=True,
                                           top_logprobs=2, messages=[*USER, first.choices[0].message, *USER])
    assert again.choices[0].logprobs.content
    chunks = list(client.completions.create(model="decoder-tiny", prompt=PROMPT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}, n=2, seed=1, user="u",
                                            stop=["\n\n"], logprobs=1))
    assert chunks[-1].usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="decoder-tiny", prompt=PROMPT, max_tokens=2, extra_body={"max_token": 4})
    assert info.value.param == "max_token" and str(info.value.code) == "400"   # the client's `code` is a str
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="decoder-tiny", messages=USER, max_tokens=2,
                                       response_format={"type": "json_object"})
    assert info.value.param == "response_format" and "not supported" in info.value.message


# ---- images: the query string and the body ---------------------------------------------------------

@pytest.fixture(scope="module")
def image_server(generative_registry, start_server):
    with start_server(generative_registry) as server:
        yield server


def test_images_refuse_an_unknown_or_repeated_query_parameter_and_a_body(image_server):
    url = f"{image_server.url}/v1/images/gan-digits"
    good = httpx.get(f"{url}?label=3&n=2&seed=1", timeout=60)
    assert good.status_code == 200 and good.headers["x-seed"] == "1"
    misspelt = httpx.get(f"{url}?label=3&n=2&sed=1", timeout=60)          # was 200 with a random seed
    assert misspelt.status_code == 400, misspelt.headers.get("x-seed")
    message = misspelt.json()["error"]                                    # the route's own error shape
    assert message.startswith("unknown query parameter 'sed' (did you mean 'seed'?)") and "per_row" in message
    twice = httpx.get(f"{url}?label=3&n=2&seed=1&seed=2", timeout=60)
    assert twice.status_code == 400 and "'seed' is given more than once" in twice.json()["error"]
    body = httpx.request("GET", f"{url}?label=3&n=2&seed=1", json={"seed": 2}, timeout=60)
    assert body.status_code == 400 and "takes no body" in body.json()["error"]


# ---- the context, the unknown model, route lists ------------------------------------------------------

def test_a_prompt_too_long_for_max_tokens_says_the_largest_that_fits(client, token_server):
    max_len = client.models.retrieve("decoder-tiny").model_extra["max_model_len"]
    prompt_tokens = client.completions.create(model="decoder-tiny", prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    room = max_len - prompt_tokens
    for path, body in (("/v1/completions", completion(max_tokens=room + 1)),
                       ("/v1/chat/completions", {"model": "decoder-tiny", "max_completion_tokens": max_len,
                                                 "messages": [{"role": "user", "content": PROMPT}]})):
        r = post(token_server, path, body)
        largest = int(re.search(r"lower max_tokens to at most (\d+)", refused(r, "max_tokens"))[1])
        body = {**body, "max_completion_tokens": largest} if "messages" in body else {**body, "max_tokens": largest}
        fits = post(token_server, path, {**body, "ignore_eos": True})
        assert fits.status_code == 200, fits.text                        # it fits, and it is the largest
        assert fits.json()["usage"]["completion_tokens"] == largest
        assert fits.json()["usage"]["prompt_tokens"] + largest == max_len
    whole = refused(post(token_server, "/v1/completions", completion(prompt="word " * (2 * max_len))), "prompt")
    assert f"shorten it to at most {max_len - 1} tokens" in whole


def test_an_unknown_model_lists_only_the_openai_models(token_server):
    for path, body in (("/v1/completions", completion(model="nope")), ("/v1/chat/completions", chat(model="nope"))):
        r = post(token_server, path, body)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["param"] == "model" and error["type"] == "not_found_error"
        served = error["message"].split("serve: ")[1].split(", ")
        assert {"decoder-tiny", "decoder-moe-tiny", "mamba-tiny", "lstm-charlm"} == set(served)   # not mlp-digits


def test_a_v2_model_on_an_openai_route_names_its_real_route(token_server):
    message = post(token_server, "/v1/completions", completion(model="mlp-digits")).json()["error"]["message"]
    assert "use POST /v2/models/mlp-digits/infer)" in message and "{name}" not in message


def test_the_batch_route_list_says_what_the_images_route_accepts(token_server):
    from serve.batch import ROUTES

    r = httpx.post(f"{token_server.url}/v1/images/decoder-tiny", timeout=60)
    assert r.status_code == 405
    listed = re.search(r"(\S+) /v1/images/\{m\}", ROUTES)[1]
    assert set(listed.split("|")) == set(r.headers["allow"].split(", ")) - {"HEAD"}


# ---- GET /v1/models/{model} --------------------------------------------------------------------------

def test_models_retrieve_returns_the_model_object_and_404s_in_openai_shape(client, token_server):
    listed = {m.id: m for m in client.models.list().data}
    for model in ("decoder-tiny", "decoder-tiny:1", "mamba-tiny"):
        got = client.models.retrieve(model)
        assert got.id == model and got.object == "model" and got.owned_by == "zooserve"
        assert got.model_extra["max_model_len"] == listed[model].model_extra["max_model_len"]
    aliased = client.models.retrieve("decoder-tiny@stable")
    assert aliased.id == "decoder-tiny@stable" and aliased.model_extra["parent"] == "decoder-tiny"
    for model in ("nope", "decoder-tiny:7", "decoder-tiny@nope", "mlp-digits"):
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve(model)
        assert info.value.param == "model" and str(info.value.code) == "404"
        r = httpx.get(f"{token_server.url}/v1/models/{model}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert "mlp-digits" not in r.json()["error"]["message"].split("serve: ")[1]
