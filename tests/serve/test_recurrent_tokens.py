"""Mamba through the real server's token engine: HF `MambaForCausalLM` as the oracle for the whole
path, prompts far beyond a decoder's context, a continuous batch that changes nothing."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from training import checkpoint
from training.models.mamba import to_hf_mamba
from training.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPT = "JULIET. O Romeo, Romeo, wherefore art thou"


def metric(text: str, name: str, **labels) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def server(token_registry, start_server):
    with start_server(token_registry) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tokenizer(token_registry) -> Tokenizer:
    return Tokenizer.from_file(token_registry / "mamba-tiny" / "1" / "tokenizer.json")


def hf_greedy(token_registry, ids: list[int], new_tokens: int) -> list[int]:
    model, _ = checkpoint.load(token_registry / "mamba-tiny" / "1")
    hf = to_hf_mamba(model)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_prompts_run_through_the_split_prefill(server):
    """mamba-tiny's prompts go through the ONNX segments and the native scan (the tests below
    check what they compute); the character LSTM has no split prefill."""
    config = httpx.get(f"{server.url}/v2/models/mamba-tiny/config", timeout=30).json()
    assert config["parameters"]["prefill"]["string_value"].startswith("split: ONNX segments and the native selective_scan")
    assert "prefill" not in httpx.get(f"{server.url}/v2/models/lstm-charlm/config", timeout=30).json()["parameters"]


def test_greedy_text_matches_hf_mamba_generate_on_converted_weights(client, token_registry, tokenizer):
    """Tokenizer, split prefill (ONNX segments + native scan), O(1) decode step, state slots and
    sampler against transformers."""
    ids = tokenizer.encode(PROMPT)
    expected = hf_greedy(token_registry, ids, 24)
    out = client.completions.create(model="mamba-tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                    logprobs=0, extra_body={"ignore_eos": True})
    assert out.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 24


def test_a_prompt_of_2048_tokens_runs_on_mamba_and_is_refused_by_the_decoder(client, token_registry, tokenizer):
    ids = (tokenizer.encode(PROMPT + " " + "and the night is long, " * 400))[:2100]
    assert len(ids) == 2100
    prompt = tokenizer.decode(ids)
    ids = tokenizer.encode(prompt)
    assert len(ids) >= 2048
    expected = hf_greedy(token_registry, ids, 6)
    out = client.completions.create(model="mamba-tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="decoder-tiny", prompt=ids[:200], max_tokens=6)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="mamba-tiny", prompt=[5, 10**6], max_tokens=6)


def test_concurrent_sequences_of_different_lengths_share_steps_and_change_nothing(client, server, tokenizer):
    prompts = [f"{PROMPT} {'and ' * (3 * i)}" for i in range(10)]
    alone = [client.completions.create(model="mamba-tiny", prompt=p, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    labels = {"model": "mamba-tiny", "version": "1"}
    before = httpx.get(f"{server.url}/metrics").text

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as c:
            return await asyncio.gather(*(c.completions.create(model="mamba-tiny", prompt=p, max_tokens=12,
                                                               temperature=0, extra_body={"ignore_eos": True})
                                          for p in prompts))
    crowd = asyncio.run(together())
    assert [r.choices[0].text for r in crowd] == alone
    after = httpx.get(f"{server.url}/metrics").text
    rows = metric(after, "zooserve_inference_count_total", **labels) - metric(before, "zooserve_inference_count_total", **labels)
    steps = metric(after, "zooserve_execution_count_total", **labels) - metric(before, "zooserve_execution_count_total", **labels)
    assert rows == 10 * 12                      # every sampled token came from one row of one step
    assert steps < rows / 2                     # sequences shared steps


def eager_greedy(registry, model_name: str, ids: list[int], new_tokens: int) -> list[int]:
    """The slow, obviously correct path: the eager full forward (torch.nn.LSTM layers) over the
    whole sequence for every token, argmax of the last position."""
    model, _ = checkpoint.load(registry / model_name / "1")
    model.eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def test_character_lstm_serves_greedy_text_equal_to_its_eager_forward(client, token_registry):
    """lstm-charlm: byte-level tokens, the LSTM's (h, c) in recurrent state slots; prompts of
    different lengths (one far past the 128-token training window) decoded together."""
    tokenizer = Tokenizer.from_file(token_registry / "lstm-charlm" / "1" / "tokenizer.json")
    assert tokenizer.vocab_size == 260
    prompts = [PROMPT, "ROMEO. " + "But soft, what light through yonder window breaks? " * 12]
    ids = [tokenizer.encode(p) for p in prompts]
    assert len(ids[0]) == len(PROMPT) and len(ids[1]) > 600          # one token per character
    expected = [eager_greedy(token_registry, "lstm-charlm", i, 16) for i in ids]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{client.base_url}", api_key="unused", max_retries=0,
                                      timeout=120) as c:
            return await asyncio.gather(*(c.completions.create(model="lstm-charlm", prompt=p, max_tokens=16,
                                                               temperature=0, logprobs=0,
                                                               extra_body={"ignore_eos": True})
                                          for p in prompts))
    for out, want in zip(asyncio.run(together()), expected, strict=True):
        assert out.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in want]
    chat = client.chat.completions.create(model="lstm-charlm", messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=8, temperature=0.8, seed=3)
    assert chat.usage.completion_tokens <= 8 and chat.choices[0].message.role == "assistant"
