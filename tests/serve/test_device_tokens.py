"""Device-resident token state (issue 18) checked on the CPU against today's engines: the torch
slots against the numpy slots verb by verb, the torch step against ONNX Runtime, the engines
over real exported models (decoder-tiny, mamba-tiny) token by token, and a real server started
with ZOOSERVE_TOKEN_STATE=device against the default one. A GPU run only adds figures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model_registry import Registry
from serve.engines.decode_graphs import DecodeGraphs, bucket_for
from serve.engines.device_runtime import open_step
from serve.engines.device_slots import TorchKVSlots, TorchStateSlots
from serve.engines.factory import make_token_engine
from serve.engines.kv_slots import KVSlots
from serve.engines.sequence import artifact_names
from serve.engines.state_slots import StateSlots
from serve.engines.tokens import GenerationRequest, TokenEngine
from serve.metrics import Metrics
from serve.runtimes import open_runtime, with_split_prefill
from serve.scheduler import TokenRequest, TokenScheduler
from serve.settings import ServeSettings
from training.sampling import SamplingParams

CPU = torch.device("cpu")
LOGITS_TOLERANCE = 1e-5


# ---- the slots, verb by verb, against the numpy slots --------------------------------------------

def as_torch(outputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in outputs.items()}


class KVPair:
    """KVSlots and TorchKVSlots driven with the same verbs and outputs, compared after each."""

    L, KV, HD = 2, 2, 4

    def __init__(self, rows: int, max_len: int, bucket: int):
        dims = dict(rows=rows, layers=self.L, kv_heads=self.KV, max_len=max_len, head_dim=self.HD, bucket=bucket)
        self.host, self.dev = KVSlots(**dims), TorchKVSlots(**dims, device=CPU)
        self.rng = np.random.default_rng(0)
        self.capacities = [self.host.capacity]

    def outputs(self, n: int, t: int) -> dict[str, np.ndarray]:
        shape = (n, self.KV, t, self.HD)
        return {f"new_{kv}_{i}": self.rng.standard_normal(shape, dtype=np.float32)
                for i in range(self.L) for kv in "kv"}

    def check(self) -> None:
        host, dev = self.host, self.dev
        assert (dev.capacity, dev.resizes) == (host.capacity, host.resizes)
        assert dev.lengths.tolist() == host.lengths.tolist() == dev._lengths.tolist()
        for a, b in zip(host.k + host.v, dev.k + dev.v, strict=True):
            assert tuple(b.shape) == a.shape
            for row, n in enumerate(host.lengths):
                np.testing.assert_array_equal(b[row, :, :n].numpy(), a[row, :, :n])
        if self.capacities[-1] != host.capacity:
            self.capacities.append(host.capacity)

    def feeds_match(self, fh: dict, fd: dict, n: int) -> None:
        assert fd.keys() == fh.keys()
        assert fd["start"].tolist() == fh["start"].tolist()
        for key in fh:
            assert tuple(fd[key].shape) == fh[key].shape, key
            if key.startswith("cache"):
                for row in range(n):
                    held = int(fh["start"][row])
                    np.testing.assert_array_equal(fd[key][row, :, :held].numpy(), fh[key][row, :, :held])

    def prefill(self, first: int, lengths: list[int]) -> None:
        self.feeds_match(self.host.prefill_feeds(first, lengths), self.dev.prefill_feeds(first, lengths), 0)
        out = self.outputs(len(lengths), max(lengths))
        self.host.prefill_done(first, out, lengths)
        self.dev.prefill_done(first, as_torch(out), lengths)
        self.check()

    def decode(self, n: int, times: int = 1) -> None:
        for _ in range(times):
            fh, fd = self.host.decode_feeds(n), self.dev.decode_feeds(n)
            self.feeds_match(fh, fd, n)
            out = self.outputs(n, 1)
            self.host.decode_done(n, out)
            self.dev.decode_done(n, as_torch(out))
            self.check()

    def move(self, src: int, dst: int) -> None:
        self.host.move(src, dst)
        self.dev.move(src, dst)
        self.check()

    def reset(self, rows: list[int]) -> None:
        self.host.reset_rows(rows)
        self.dev.reset_rows(rows)
        self.check()


def test_torch_kv_slots_follow_the_numpy_slots_through_growth_compaction_and_shrink():
    pair = KVPair(rows=4, max_len=300, bucket=16)
    pair.prefill(0, [3, 40])            # 40 positions: three buckets
    pair.decode(2, times=10)            # the long row reaches 50: four
    pair.prefill(2, [5, 1])
    pair.decode(4, times=2)             # lengths 15, 52, 7, 3
    pair.move(3, 1)                     # the long row leaves; the last row fills its hole (stale data beyond 3)
    pair.reset([3])
    pair.decode(3)                      # longest 15: shrinks to one bucket, then grows at 17
    pair.decode(3, times=3)
    pair.reset([0, 1, 2])
    pair.prefill(0, [7, 2, 9])          # fresh rows over stale data
    pair.decode(3, times=2)
    assert pair.capacities == [16, 48, 64, 16, 32]
    assert pair.dev.k[0].dtype == torch.float32 and pair.dev.k[0].device == CPU


def test_torch_kv_slots_refuse_a_row_beyond_the_context():
    slots = TorchKVSlots(rows=1, layers=1, kv_heads=1, max_len=100, head_dim=2, device=CPU, bucket=64)
    new = {"new_k_0": torch.zeros(1, 1, 101, 2), "new_v_0": torch.zeros(1, 1, 101, 2)}
    with pytest.raises(ValueError, match="holds 100"):
        slots.prefill_done(0, new, [101])
    slots.prefill_done(0, {k: v[:, :, :100] for k, v in new.items()}, [100])
    assert slots.capacity == 100
    with pytest.raises(ValueError):
        slots.decode_feeds(1)


def test_torch_state_slots_follow_the_numpy_slots():
    shapes = {"conv_state_0": (3, 4), "ssm_state_0": (2, 4)}
    names = {"conv_state_0": "new_conv_state_0", "ssm_state_0": "new_ssm_state_0"}
    host = StateSlots(4, shapes, names, max_len=1000)
    dev = TorchStateSlots(4, shapes, names, max_len=1000, device=CPU)
    rng = np.random.default_rng(0)
    assert dev.rows == host.rows == 4

    def outputs(n: int) -> dict[str, np.ndarray]:
        return {names[s]: rng.standard_normal((n, *shape), dtype=np.float32) for s, shape in shapes.items()}

    def check(fh=None, fd=None) -> None:
        for name in shapes:
            np.testing.assert_array_equal(dev.states[name].numpy(), host.states[name])
        if fh is not None:
            assert fd.keys() == fh.keys()
            for key in fh:
                np.testing.assert_array_equal(fd[key].numpy(), fh[key])

    for first, lengths in ((0, [5, 2]), (2, [1])):
        check(host.prefill_feeds(first, lengths), dev.prefill_feeds(first, lengths))
        out = outputs(len(lengths))
        host.prefill_done(first, out, lengths)
        dev.prefill_done(first, as_torch(out), lengths)
        check()
    for _ in range(2):
        check(host.decode_feeds(3), dev.decode_feeds(3))
        out = outputs(3)
        host.decode_done(3, out)
        dev.decode_done(3, as_torch(out))
        check()
    for slots in (host, dev):
        slots.move(2, 0)
        slots.reset_rows([1, 2])
    check(host.decode_feeds(1), dev.decode_feeds(1))


# ---- real exported models: the torch step, the runner, the engine ---------------------------------

SETTINGS = ServeSettings(max_num_seqs=8, intra_op_threads=1)
TEXTS = ("ROMEO.", "JULIET. O Romeo, Romeo, wherefore art thou Romeo?",
         "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
         "that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with "
         "victorious wreaths, our bruised arms hung up for monuments",
         "KING. What say you?", "First Citizen. Before we proceed any further, hear me speak.")


def version(registry: Path, name: str):
    reg = Registry(registry)
    return reg.manifest(name, 1), reg.version_dir(name, 1)


def host_engine(registry: Path, name: str) -> TokenEngine:
    """Today's engine: ONNX Runtime on the CPU (Mamba's prompts through its split prefill) over numpy slots."""
    manifest, vdir = version(registry, name)
    runtime = open_runtime(vdir, "onnx", manifest.artifacts["onnx"], *artifact_names(manifest), 1, "cpu")
    runtime = with_split_prefill(runtime, manifest, vdir, 1)
    return make_token_engine(name, 1, manifest, runtime, vdir, SETTINGS, Metrics().for_token_model(name, 1))


def device_engine(registry: Path, name: str, kind: str = "auto", device: torch.device = CPU) -> TokenEngine:
    """The device-resident engine with torch tensors on `device` (the CPU unless a test asks for CUDA)."""
    manifest, vdir = version(registry, name)
    runtime = open_step(vdir, manifest, *artifact_names(manifest), device, 1, kind)
    return make_token_engine(name, 1, manifest, runtime, vdir, SETTINGS, Metrics().for_token_model(name, 1),
                             device=device)


def prompts(engine: TokenEngine) -> list[list[int]]:
    """Prompts of different lengths; the longest 60 tokens, so that a decoder's slots grow past a bucket."""
    ids = [engine.tokenizer.encode(t) for t in TEXTS]
    ids[2] = (ids[2] * 3)[:60]
    return ids


def greedy(engine: TokenEngine, prompt_ids: list[list[int]], max_tokens: list[int], late: int = 2):
    """Drive the engine's scheduler and runner by hand, greedily: all but the last `late` prompts
    at once, those two steps later (prefill beside decode); requests of different lengths leave at
    different steps (compaction moves). Returns per request its tokens and its logits per step."""
    runner = engine.runner
    scheduler = TokenScheduler(max_rows=engine.scheduler.max_rows, max_len=engine.max_len)
    requests = [TokenRequest(f"r{i}", ids, m) for i, (ids, m) in enumerate(zip(prompt_ids, max_tokens))]
    for r in requests[:-late]:
        scheduler.add_request(r)
    logits: dict[str, list[np.ndarray]] = {r.request_id: [] for r in requests}
    steps = moves = 0
    while scheduler.has_requests() or steps <= 2:
        if steps == 2:
            for r in requests[-late:]:
                scheduler.add_request(r)
        plan = scheduler.schedule()
        moves += len(plan.moves)
        runner.apply_moves(plan)
        steps += 1
        if plan.empty:
            continue
        out = runner.execute(plan)
        for rid, row in out.items():
            logits[rid].append(np.array(row))
        scheduler.update_from_output(plan, {rid: int(np.argmax(row)) for rid, row in out.items()})
    return [r.output_ids for r in requests], [np.stack(logits[r.request_id]) for r in requests], moves


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decoder-tiny", "mamba-tiny"])
def test_torch_step_matches_onnx_on_the_golden_inputs(token_registry, name, one_torch_thread):
    from safetensors.numpy import load_file

    manifest, vdir = version(token_registry, name)
    golden = load_file(str(vdir / manifest.golden))
    inputs = {s.name: golden[f"input.{s.name}"] for s in manifest.signature.inputs}
    onnx = open_runtime(vdir, "onnx", manifest.artifacts["onnx"], *artifact_names(manifest), 1, "cpu").run(inputs)
    for kind in ("torchscript", "eager"):
        got = open_step(vdir, manifest, *artifact_names(manifest), CPU, 1, kind).run(inputs)
        for key, value in onnx.items():
            np.testing.assert_allclose(got[key], value, rtol=0, atol=LOGITS_TOLERANCE, err_msg=f"{kind} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("decoder-tiny", "torchscript"), ("mamba-tiny", "torchscript"),
                                        ("decoder-tiny", "eager"), ("mamba-tiny", "eager"),
                                        ("decoder-moe-tiny", "auto"), ("lstm-charlm", "auto")])
def test_device_engine_gives_todays_greedy_tokens_and_logits_in_one_batch(token_registry, name, kind,
                                                                          one_torch_thread):
    host, dev = host_engine(token_registry, name), device_engine(token_registry, name, kind)
    assert dev.runner.runtime.format == ("torchscript" if kind == "auto" else kind)
    ids = prompts(host)
    max_tokens = [12, 6, 10, 3, 8]
    want_tokens, want_logits, moves = greedy(host, ids, max_tokens)
    got_tokens, got_logits, dev_moves = greedy(dev, ids, max_tokens)
    assert moves == dev_moves > 0
    assert got_tokens == want_tokens
    for want, got in zip(want_logits, got_logits, strict=True):
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= LOGITS_TOLERANCE
    if name == "decoder-tiny":
        assert dev.runner.state.resizes >= 1 and dev.runner.state.capacity == host.runner.state.capacity


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decoder-tiny", "mamba-tiny", "decoder-moe-tiny"])
def test_decode_at_bucketed_batch_sizes_gives_the_same_tokens_and_logits(token_registry, name, one_torch_thread):
    """The static-shape decode the CUDA graphs replay, run eagerly on the CPU: rows padded up to a
    bucket are computed and dropped, and nothing of them reaches the state or the answers."""
    host, dev = host_engine(token_registry, name), device_engine(token_registry, name)
    dev.runner.decode_graphs = DecodeGraphs(dev.runner.runtime.run_tensors, dev.scheduler.max_rows, capture=False)
    ids = prompts(host)
    want_tokens, want_logits, _ = greedy(host, ids, [12, 6, 10, 3, 8])
    got_tokens, got_logits, _ = greedy(dev, ids, [12, 6, 10, 3, 8])
    assert dev.runner.decode_graphs.padded_rows > 0          # 3 decode rows ran as 4, 5 as 8, ...
    assert got_tokens == want_tokens
    for want, got in zip(want_logits, got_logits, strict=True):
        assert float(np.abs(got - want).max()) <= LOGITS_TOLERANCE


def test_a_decode_bucket_is_the_smallest_that_holds_the_rows():
    assert [bucket_for(n, rows=64) for n in (1, 2, 3, 5, 17, 33, 64)] == [1, 2, 4, 8, 24, 48, 64]
    assert bucket_for(5, rows=6) == 6 and bucket_for(300, rows=300) == 300


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name, kind", [("decoder-tiny", "torchscript"), ("mamba-tiny", "torchscript"),
                                        ("decoder-tiny", "eager"), ("mamba-tiny", "eager")])
def test_on_cuda_the_device_engine_gives_todays_greedy_tokens(token_registry, name, kind, graphs, one_torch_thread):
    """The same comparison with the state and the step on the GPU (across devices: 1e-4), with the
    decode steps launched eagerly and replayed as CUDA graphs."""
    host, dev = host_engine(token_registry, name), device_engine(token_registry, name, kind, torch.device("cuda"))
    assert dev.runner.state.device.type == "cuda" and dev.runner.runtime.device == "cuda"
    if graphs:
        dev.runner.decode_graphs = DecodeGraphs(dev.runner.runtime.run_tensors, dev.scheduler.max_rows, capture=True)
    ids = prompts(host)
    want_tokens, want_logits, _ = greedy(host, ids, [12, 6, 10, 3, 8])
    got_tokens, got_logits, _ = greedy(dev, ids, [12, 6, 10, 3, 8])
    assert got_tokens == want_tokens
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got_logits, want_logits, strict=True))
    print(f"\n[device-tokens] {name} {kind} on cuda, graphs {graphs}: max |logit - ONNX CPU| {worst:.2e}")
    assert worst <= 1e-4
    if graphs:
        g = dev.runner.decode_graphs
        assert g.failed is None and g.captures >= 1 and g.replays > g.captures


def serve_requests(engine: TokenEngine, batches: list[list[GenerationRequest]]) -> list[list[tuple]]:
    """Run each batch through the engine's own thread (requests of a batch at once); per request
    (token ids, their logprobs)."""
    async def collect(req: GenerationRequest):
        tokens, logprobs = [], []
        async for events in engine.generate(req):
            for e in events:
                if e.token is not None:
                    tokens.append(e.token)
                    logprobs.append(e.logprob)
        return tokens, logprobs

    async def main():
        engine.start()
        try:
            return [await asyncio.gather(*(collect(r) for r in batch)) for batch in batches]
        finally:
            await engine.close(5)
    return asyncio.run(main())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decoder-tiny", "mamba-tiny"])
def test_a_seeded_request_samples_the_same_alone_in_a_batch_and_on_the_host(token_registry, name, one_torch_thread):
    dev = device_engine(token_registry, name)
    ids = prompts(dev)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234, logprobs=1)
    seeded = GenerationRequest(ids[1], 10, params, ignore_eos=True)
    others = [GenerationRequest(p, 10, SamplingParams(temperature=1.0, seed=s), ignore_eos=True)
              for s, p in enumerate((ids[0], ids[2], ids[3]))]
    alone, batch = serve_requests(dev, [[seeded], [others[0], seeded, *others[1:]]])
    (on_host,), = serve_requests(host_engine(token_registry, name), [[seeded]])
    assert len(alone[0][0]) == 10
    assert alone[0][0] == batch[1][0] == on_host[0]
    np.testing.assert_allclose(alone[0][1], on_host[1], atol=2 * LOGITS_TOLERANCE)   # logp = l - logsumexp(l)


# ---- a real server -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_server_with_device_state_answers_as_the_default_one(token_registry, start_server):
    models = {"ZOOSERVE_MODELS": '["decoder-tiny", "mamba-tiny"]'}
    bodies = [{"model": m, "prompt": [TEXTS[1], TEXTS[3]], "max_tokens": 12, "temperature": 0, "logprobs": 1}
              for m in ("decoder-tiny", "mamba-tiny")]
    bodies.append({"model": "decoder-tiny", "prompt": TEXTS[4], "max_tokens": 12, "temperature": 0.8, "seed": 7})
    answers = []
    for env in (models, {**models, "ZOOSERVE_TOKEN_STATE": "device"}):
        with start_server(token_registry, env=env) as server:
            answers.append([httpx.post(f"{server.url}/v1/completions", json=b, timeout=60).json() for b in bodies])
            config = httpx.get(f"{server.url}/v2/models/mamba-tiny/config", timeout=30).json()
            prefill = config["parameters"]["prefill"]["string_value"]
            if "ZOOSERVE_TOKEN_STATE" in env:
                assert prefill == "whole step: torchscript on cpu (device-resident state)"
                assert "token state on cpu, step torchscript" in server.logs()
            else:
                assert prefill.startswith("split: ")
    default, device = answers
    for want, got in zip(default, device, strict=True):
        assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
        for w, g in zip(want["choices"], got["choices"]):
            if w.get("logprobs"):
                assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
                np.testing.assert_allclose(g["logprobs"]["token_logprobs"], w["logprobs"]["token_logprobs"], atol=1e-4)
