"""Token generation benchmark: the real server (continuous batching, ONNX Runtime) against
Hugging Face `generate` on the same weights.

One run:
  1. builds the model: the `small` decoder preset (6 layers, 256 wide, 8 heads, 2 KV heads) with a
     2048-token byte-level BPE trained on the corpus, block_size 512, RANDOM weights
     (torch.manual_seed(0)): this measures speed, not quality; exports it to ONNX with
     `training.export.package` (prefill + decode parity checked) and publishes it as
     `decoder-bench` into a temp registry;
  2. makes a fixed seeded list of mixed requests: prompts are token windows of the corpus
     (8..200 tokens) decoded to text, max_tokens uniform in 16..256, `ignore_eos` so every request
     generates exactly max_tokens;
  3. HF baseline in this process (`to_hf_llama`, fp32, eval, 1 thread, greedy `generate` with the
     KV cache): batch 1 over a subset, one request at a time, and one static left-padded batch of
     16 that runs to its longest request (useful tokens = each request's own max_tokens);
  4. in-process ONNX Runtime decode step alone at batch 1/16/64, with the 512 cache slots the server
     passes and with 128 (what the served model itself costs per step);
  5. starts `zooserve serve --threads 1` on a free loopback port and drives it with a streaming
     closed-loop client (asyncio, raw keep-alive HTTP/1.1, minimal chunked/SSE parsing) at
     concurrency 1 (the HF batch-1 subset), 16 and 64 over fixed request lists;
  6. prints the table, the ratios against HF and the targets, and stops the server (SIGTERM).

    .venv/bin/python bench/tokens.py [--requests 96] [--batch1 6] [--concurrency 1 16 64]
                                     [--level-requests 6 48 96] [--out FILE.json]

TTFT of the server = send -> first SSE event carrying a token (its `text` may be "" when the token
ends inside a UTF-8 character or is a special token); end = `data: [DONE]`; generated tokens come
from the final usage chunk. Every side runs one intra-op thread.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from classify import (  # noqa: E402  (house helpers of the classifier benchmark)
    Connection, Server, environment, event_loop_factory, http_request, machine_busy_seconds, scrape,
)

MODEL_NAME = "decoder-bench"
PRESET = "small"
VOCAB = 2048
BLOCK_SIZE = 512
PROMPT_RANGE = (8, 200)
MAX_TOKENS_RANGE = (16, 256)
STATIC_BATCH = 16
CEILING_BATCHES = (1, 16, 64)
CEILING_SLOTS = (BLOCK_SIZE, 128)
TARGETS = {"batch 1": 3.0, "16 concurrent": 4.0}


# ---- model and requests ---------------------------------------------------------------------

def build_model(work: Path, log=print):
    """Tokenizer on the corpus, random-weight `small` decoder, checkpoint, ONNX package, registry.
    Returns (model, tokenizer, corpus_text, registry_root, version, onnx_path)."""
    import torch

    from model_registry import Registry
    from training import checkpoint, export
    from training.models.decoder import PRESETS, Config, Model
    from training.text import load_corpus
    from training.tokenizer import train_tokenizer

    started = time.perf_counter()
    corpus = load_corpus()
    text = corpus.text
    tokenizer = train_tokenizer(text, vocab_size=VOCAB)
    log(f"[bench] tokenizer: {tokenizer.vocab_size} tokens, trained on {corpus.name} "
        f"({len(text):,} chars) in {time.perf_counter() - started:.1f} s")
    torch.manual_seed(0)
    config = Config(**PRESETS[PRESET], vocab_size=tokenizer.vocab_size, block_size=BLOCK_SIZE)
    model = Model(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[bench] model: preset {PRESET!r}, {n_params / 1e6:.2f} M parameters, block_size {BLOCK_SIZE}, "
        f"RANDOM weights (torch.manual_seed(0)): this measures speed, not quality")
    ckpt = work / "checkpoint"
    checkpoint.save(ckpt, model, config, {"family": "decoder"})
    tokenizer.save(ckpt)
    t0 = time.perf_counter()
    export.package(ckpt, work / "package", formats=("onnx",), serve_format="onnx")
    log(f"[bench] exported to ONNX (prefill + decode parity checked) in {time.perf_counter() - t0:.1f} s")
    registry = Registry(work / "registry")
    version = registry.publish(MODEL_NAME, work / "package")
    onnx_path = registry.version_dir(MODEL_NAME, version) / "model.onnx"
    return model, tokenizer, text, registry.root, version, onnx_path


@dataclass
class Req:
    index: int
    prompt: str
    prompt_ids: list[int]      # tokenizer.encode(prompt): what the server sees (checked against usage)
    window: int                # the corpus token window the prompt was cut from
    max_tokens: int


def make_requests(tokenizer, text: str, n: int, seed: int) -> list[Req]:
    """Seeded mixed requests: corpus token windows of 8..200 tokens decoded to text, max_tokens 16..256."""
    rng = random.Random(seed)
    ids = tokenizer.encode(text[:400_000])       # a 140k-token slice of the plays is plenty of windows
    out = []
    while len(out) < n:
        window = rng.randint(*PROMPT_RANGE)
        start = rng.randrange(len(ids) - window)
        prompt = tokenizer.decode(ids[start:start + window])
        max_tokens = rng.randint(*MAX_TOKENS_RANGE)
        prompt_ids = tokenizer.encode(prompt)
        if not prompt_ids or len(prompt_ids) + max_tokens > BLOCK_SIZE:
            continue
        out.append(Req(len(out), prompt, prompt_ids, window, max_tokens))
    return out


# ---- HF baseline ----------------------------------------------------------------------------

def hf_model(model):
    from training.models.decoder import to_hf_llama

    hf = to_hf_llama(model).float().eval()
    gc = hf.generation_config
    gc.eos_token_id = None           # random weights: generate exactly max_new_tokens
    gc.bos_token_id = None
    gc.pad_token_id = 0
    return hf


def hf_generate(hf, ids, mask, new_tokens: int):
    import torch

    with torch.inference_mode():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0, use_cache=True)


def run_hf(hf, batch1: list[Req], static: list[Req], log=print) -> dict:
    import torch

    # warm-up (first-call allocations, lazy imports inside generate)
    w = torch.tensor([batch1[0].prompt_ids])
    hf_generate(hf, w, torch.ones_like(w), 4)

    prefill_s, per_request_s, useful = [], [], 0
    t_all = time.perf_counter()
    for r in batch1:
        ids = torch.tensor([r.prompt_ids])
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        out = hf_generate(hf, ids, mask, r.max_tokens)
        per_request_s.append(time.perf_counter() - t0)
        got = out.shape[1] - ids.shape[1]
        if got != r.max_tokens:
            raise RuntimeError(f"HF generated {got} tokens for request {r.index}, expected {r.max_tokens}")
        useful += r.max_tokens
    wall1 = time.perf_counter() - t_all
    for r in batch1:                      # TTFT-like: prefill + the first token
        ids = torch.tensor([r.prompt_ids])
        t0 = time.perf_counter()
        hf_generate(hf, ids, torch.ones_like(ids), 1)
        prefill_s.append(time.perf_counter() - t0)
    b1 = {"requests": len(batch1), "generated_tokens": useful, "wall_s": wall1, "tokens_per_s": useful / wall1,
          "ttft_p50_ms": float(np.percentile(prefill_s, 50)) * 1000,
          "ttft_p99_ms": float(np.percentile(prefill_s, 99)) * 1000,
          "latency_p50_s": float(np.percentile(per_request_s, 50))}
    log(f"[bench] HF batch 1: {useful} tokens in {wall1:.1f} s = {b1['tokens_per_s']:.1f} tok/s, "
        f"prefill+1 p50 {b1['ttft_p50_ms']:.1f} ms")

    # static batch: left-padded, runs to the longest request
    width = max(len(r.prompt_ids) for r in static)
    ids = torch.zeros((len(static), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(static):
        n = len(r.prompt_ids)
        ids[i, width - n:] = torch.tensor(r.prompt_ids)
        mask[i, width - n:] = 1
    longest = max(r.max_tokens for r in static)
    t0 = time.perf_counter()
    hf_generate(hf, ids, mask, 1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = hf_generate(hf, ids, mask, longest)
    wall = time.perf_counter() - t0
    if out.shape[1] - width != longest:
        raise RuntimeError(f"HF static batch generated {out.shape[1] - width} tokens, expected {longest}")
    useful16 = sum(r.max_tokens for r in static)
    bs = {"requests": len(static), "generated_tokens": useful16, "computed_tokens": longest * len(static),
          "max_new_tokens": longest, "wall_s": wall, "tokens_per_s": useful16 / wall,
          "ttft_p50_ms": prefill * 1000, "ttft_p99_ms": prefill * 1000, "latency_p50_s": wall}
    log(f"[bench] HF static batch {len(static)}: {useful16} useful of {longest * len(static)} computed tokens "
        f"in {wall:.1f} s = {bs['tokens_per_s']:.1f} useful tok/s")
    return {"batch1": b1, "static": bs}


# ---- ONNX Runtime step alone ----------------------------------------------------------------

def measure_ort_steps(onnx_path: Path, config: dict, seconds: float = 0.6) -> dict[str, float]:
    """ms per decode step of the served model.onnx in-process, best of 3, per (batch, cache slots S).
    The server passes the positions its longest running sequence holds, rounded up to 64 (masked
    past each row's length): S = 512 is a full context, S = 128 a short one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    hd = config["n_embd"] // config["n_head"]
    out = {}
    for b in CEILING_BATCHES:
        for slots in CEILING_SLOTS:
            shape = (b, config["n_kv_head"], slots, hd)                # one cache input per layer
            feed = {"ids": rng.integers(4, config["vocab_size"], (b, 1)).astype(np.int64),
                    "start": rng.integers(slots // 4, slots - 1, b).astype(np.int64)}
            for i in range(config["n_layer"]):
                feed[f"cache_k_{i}"] = rng.standard_normal(shape, np.float32)
                feed[f"cache_v_{i}"] = rng.standard_normal(shape, np.float32)
            session.run(None, feed)
            best = None
            for _ in range(3):
                runs, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds / 3:
                    session.run(None, feed)
                    runs += 1
                per = (time.perf_counter() - t0) / runs
                best = per if best is None else min(best, per)
            out[f"{b}x{slots}"] = best * 1000
    return out


# ---- streaming client -----------------------------------------------------------------------

class StreamConnection(Connection):
    """Keep-alive HTTP/1.1 with a minimal chunked-encoding + SSE reader for streamed completions."""

    async def stream(self, raw: bytes, sent: float) -> dict:
        for attempt in (0, 1):
            if self.writer is None:
                await self.open()
            try:
                self.writer.write(raw)
                return await self._stream_response(sent)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self.close()
                if attempt:
                    raise ConnectionError(f"server closed the connection: {exc}") from exc
        raise AssertionError("unreachable")

    async def _stream_response(self, sent: float) -> dict:
        import orjson

        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                close = True
        result = {"status": status, "ttft": None, "end": None, "events": 0, "usage": None, "error": None,
                  "done": False}
        if not chunked:
            body = await self.reader.readexactly(length) if length else b""
            result["error"] = body[:500].decode(errors="replace")
            result["end"] = time.perf_counter()
            if close:
                self.close()
            return result
        buf = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")      # end of the (empty) trailer
                break
            buf += (await self.reader.readexactly(size + 2))[:-2]
            while True:
                cut = buf.find(b"\n\n")
                if cut < 0:
                    break
                event, buf = buf[:cut], buf[cut + 2:]
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    result["done"] = True
                    result["end"] = time.perf_counter()
                    continue
                if b'"choices":[{' in data:               # a token event (one token each)
                    result["events"] += 1
                    if result["ttft"] is None:
                        result["ttft"] = time.perf_counter() - sent
                elif b'"usage"' in data:
                    result["usage"] = orjson.loads(data)["usage"]
                elif b'"error"' in data:
                    result["error"] = data[:500].decode(errors="replace")
        if close:
            self.close()
        return result


def completion_body(r: Req) -> bytes:
    import orjson

    return orjson.dumps({"model": MODEL_NAME, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
                         "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_s: float
    itl_p50_ms: float                 # per request (end - first token) / (tokens - 1), median
    prompt_tokens: int                # sum of usage.prompt_tokens
    mean_seqs_per_step: float | None  # /metrics inference_count / execution_count deltas
    steps: int
    ms_per_step: float | None         # wall / steps
    server_cpu_cores: float           # server utime+stime / wall
    client_cpu_cores: float
    other_load_cores: float
    problems: list[str] = field(default_factory=list)


async def run_level(server: Server, reqs: list[Req], concurrency: int) -> LevelResult:
    """Closed loop over a fixed list: `concurrency` connections each take the next request when done."""
    host, port = server.host, server.port
    raw = {r.index: http_request("/v1/completions", host, port, completion_body(r)) for r in reqs}
    metrics_raw = http_request("/metrics", host, port)
    probe = Connection(host, port)
    todo = list(reqs)
    results: list[tuple[Req, float, dict]] = []
    problems: list[str] = []

    async def worker() -> None:
        conn = StreamConnection(host, port)
        try:
            while todo:
                r = todo.pop(0)
                sent = time.perf_counter()
                try:
                    res = await conn.stream(raw[r.index], sent)
                except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                    problems.append(f"request {r.index}: {type(exc).__name__}: {exc}")
                    conn.close()
                    continue
                results.append((r, sent, res))
        finally:
            conn.close()

    before = await scrape(probe, metrics_raw, MODEL_NAME)
    cpu0, client0, busy0, t0 = server.cpu_seconds(), time.process_time(), machine_busy_seconds(), time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=600)
    finally:
        t1, cpu1, client1, busy1 = time.perf_counter(), server.cpu_seconds(), time.process_time(), machine_busy_seconds()
    after = await scrape(probe, metrics_raw, MODEL_NAME)
    probe.close()

    wall = t1 - t0
    ttft, lat, itl = [], [], []
    generated = prompt_tokens = ok = 0
    for r, sent, res in results:
        usage = res["usage"] or {}
        if res["status"] != 200 or res["error"] or not res["done"]:
            problems.append(f"request {r.index}: status {res['status']}, done {res['done']}, error {res['error']}")
            continue
        n = usage.get("completion_tokens")
        if n != r.max_tokens or res["events"] != r.max_tokens:
            problems.append(f"request {r.index}: max_tokens {r.max_tokens}, usage.completion_tokens {n}, "
                            f"token events {res['events']}")
        if usage.get("prompt_tokens") != len(r.prompt_ids):
            problems.append(f"request {r.index}: usage.prompt_tokens {usage.get('prompt_tokens')} != "
                            f"local encode {len(r.prompt_ids)}")
        ok += 1
        generated += n or 0
        prompt_tokens += usage.get("prompt_tokens") or 0
        ttft.append(res["ttft"])
        lat.append(res["end"] - sent)
        if n and n > 1:
            itl.append((res["end"] - sent - res["ttft"]) / (n - 1))
    steps = int(after["execution"] - before["execution"])
    rows = after["inference"] - before["inference"]
    server_cpu, client_cpu = cpu1 - cpu0, client1 - client0

    def pct(xs, q, scale=1.0):
        return float(np.percentile(xs, q)) * scale if xs else float("nan")

    return LevelResult(
        concurrency=concurrency, requests=len(reqs), ok=ok, wall_s=wall, generated_tokens=generated,
        tokens_per_s=generated / wall, ttft_p50_ms=pct(ttft, 50, 1000), ttft_p99_ms=pct(ttft, 99, 1000),
        latency_p50_s=pct(lat, 50), itl_p50_ms=pct(itl, 50, 1000), prompt_tokens=prompt_tokens,
        mean_seqs_per_step=rows / steps if steps else None, steps=steps,
        ms_per_step=wall * 1000 / steps if steps else None,
        server_cpu_cores=server_cpu / wall, client_cpu_cores=client_cpu / wall,
        other_load_cores=max(0.0, (busy1 - busy0) - server_cpu - client_cpu) / wall,
        problems=problems[:10],
    )


async def drive(server: Server, plans: list[tuple[int, list[Req]]], log=print) -> list[LevelResult]:
    # warm-up: one short request (first ORT runs, lazy paths), not measured
    warm = StreamConnection(server.host, server.port)
    w = Req(-1, "To be, or not to be", [], 0, 8)
    res = await warm.stream(http_request("/v1/completions", server.host, server.port, completion_body(w)),
                            time.perf_counter())
    warm.close()
    if res["status"] != 200 or not res["done"] or (res["usage"] or {}).get("completion_tokens") != 8:
        raise RuntimeError(f"warm-up request failed: {res}\n{server.log_tail()}")
    out = []
    for concurrency, reqs in plans:
        log(f"[bench] server, {concurrency} concurrent over {len(reqs)} requests "
            f"({sum(r.max_tokens for r in reqs)} tokens) ...")
        r = await run_level(server, reqs, concurrency)
        seqs = f"{r.mean_seqs_per_step:.2f}" if r.mean_seqs_per_step else "-"
        log(f"[bench]   {r.tokens_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50_ms:.1f} ms p99 {r.ttft_p99_ms:.1f} ms, "
            f"latency p50 {r.latency_p50_s:.2f} s, seqs/step {seqs}, server CPU {r.server_cpu_cores:.2f} cores, "
            f"ok {r.ok}/{r.requests}")
        for p in r.problems:
            log(f"[bench]   PROBLEM {p}")
        out.append(r)
    return out


# ---- report ---------------------------------------------------------------------------------

def print_report(hf: dict, ort_ms: dict[str, float], levels: list[LevelResult]) -> dict[str, float]:
    b1, bs = hf["batch1"], hf["static"]
    print()
    print(f"Model: {MODEL_NAME} (preset {PRESET}, vocab {VOCAB}, block_size {BLOCK_SIZE}), RANDOM weights "
          f"(speed, not quality); all sides 1 intra-op thread, CPU")
    print("| side | setting | requests | generated tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | "
          "latency p50 s | mean seqs/step | ms/step | server CPU (cores) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| HF generate | batch 1, sequential | {b1['requests']} | {b1['generated_tokens']:,} | {b1['wall_s']:.1f} | "
          f"{b1['tokens_per_s']:.1f} | {b1['ttft_p50_ms']:.1f} | {b1['ttft_p99_ms']:.1f} | {b1['latency_p50_s']:.2f} | "
          f"1 | - | - |")
    print(f"| HF generate | static batch {bs['requests']} (runs to {bs['max_new_tokens']}; "
          f"{bs['computed_tokens']:,} computed) | {bs['requests']} | {bs['generated_tokens']:,} | {bs['wall_s']:.1f} | "
          f"{bs['tokens_per_s']:.1f} | {bs['ttft_p50_ms']:.1f} | {bs['ttft_p99_ms']:.1f} | {bs['latency_p50_s']:.2f} | "
          f"{bs['requests']} | - | - |")
    for r in levels:
        seqs = f"{r.mean_seqs_per_step:.2f}" if r.mean_seqs_per_step else "-"
        mps = f"{r.ms_per_step:.2f}" if r.ms_per_step else "-"
        print(f"| zooserve | {r.concurrency} concurrent | {r.ok}/{r.requests} | {r.generated_tokens:,} | {r.wall_s:.1f} | "
              f"{r.tokens_per_s:.1f} | {r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | {r.latency_p50_s:.2f} | {seqs} | "
              f"{mps} | {r.server_cpu_cores:.2f} |")
    print()
    print("ONNX Runtime decode step alone (in-process, 1 thread), ms per step (ms per sequence):")
    print("| cache slots S | " + " | ".join(f"batch {b}" for b in CEILING_BATCHES) + " |")
    print("|---:|" + "---:|" * len(CEILING_BATCHES))
    for slots in CEILING_SLOTS:
        note = " (full context)" if slots == BLOCK_SIZE else ""
        print(f"| {slots}{note} | " + " | ".join(
            f"{ort_ms[f'{b}x{slots}']:.2f} ({ort_ms[f'{b}x{slots}'] / b:.2f})" for b in CEILING_BATCHES) + " |")
    print("Server per level: " + "; ".join(
        f"{r.concurrency} conc: ITL p50 {r.itl_p50_ms:.1f} ms, client {r.client_cpu_cores:.2f} cores, "
        f"other load {r.other_load_cores:.2f} cores" for r in levels))
    print()
    by_c = {r.concurrency: r for r in levels}
    ratios: dict[str, float] = {}
    pairs = [("ours(1 concurrent) / HF batch 1", 1, b1, "batch 1"),
             ("ours(16 concurrent) / HF static batch 16", 16, bs, "16 concurrent"),
             ("ours(64 concurrent) / HF static batch 16", 64, bs, None)]
    for label, c, base, target in pairs:
        if c not in by_c:
            continue
        ratio = by_c[c].tokens_per_s / base["tokens_per_s"]
        ratios[label] = ratio
        line = f"{label}: {ratio:.2f}x"
        if target:
            goal = TARGETS[target]
            line += f"   target >= {goal:.0f}x: {'MET' if ratio >= goal else 'MISSED'}"
        print(line)
    for r in levels:
        for p in r.problems:
            print(f"  {r.concurrency} concurrent: PROBLEM {p}")
    return ratios


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    env = environment()
    for dist in ("transformers", "tokenizers"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = "not installed"
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=96, help="size of the seeded request list")
    p.add_argument("--batch1", type=int, default=6, help="requests in the batch-1 subset (HF batch 1 and ours at 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="server concurrency levels")
    p.add_argument("--level-requests", type=int, nargs="+", default=[6, 48, 96],
                   help="requests per level: the first N of the list (6 at level 1 = the HF batch-1 subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    p.add_argument("--keep", action="store_true", help="keep the temp registry and server log")
    args = p.parse_args(argv)
    if len(args.level_requests) != len(args.concurrency):
        raise SystemExit("--level-requests needs one number per --concurrency level")
    if args.requests < max(args.level_requests + [args.batch1, STATIC_BATCH]):
        raise SystemExit("--requests is smaller than a level, the batch-1 subset or the static batch")

    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="zooserve-bench-tokens-"))
    server: Server | None = None
    try:
        model, tokenizer, text, registry, version, onnx_path = build_model(workdir)
        reqs = make_requests(tokenizer, text, args.requests, args.seed)
        plens = [len(r.prompt_ids) for r in reqs]
        print(f"[bench] {len(reqs)} requests: prompt tokens {min(plens)}..{max(plens)} (mean {np.mean(plens):.0f}), "
              f"max_tokens {min(r.max_tokens for r in reqs)}..{max(r.max_tokens for r in reqs)} "
              f"(mean {np.mean([r.max_tokens for r in reqs]):.0f})", flush=True)

        hf = hf_model(model)
        hf_res = run_hf(hf, reqs[:args.batch1], reqs[:STATIC_BATCH])
        del hf
        config = json.loads((onnx_path.parent / "config.json").read_text())
        ort_ms = measure_ort_steps(onnx_path, config)
        print("[bench] ORT decode step alone (batch x cache slots): "
              + ", ".join(f"{k} {ms:.2f} ms" for k, ms in ort_ms.items()), flush=True)

        server = Server(registry, 1, workdir / "server.log")
        ready_s = server.wait_ready()
        print(f"[bench] server pid {server.proc.pid} ready on {server.url} after {ready_s:.1f} s", flush=True)
        plans = [(c, reqs[:n]) for c, n in zip(args.concurrency, args.level_requests)]
        loop_factory, loop_name = event_loop_factory(args.loop)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            levels = runner.run(drive(server, plans))
        ratios = print_report(hf_res, ort_ms, levels)

        code = server.stop()
        server_log = server.log_tail(2000).strip()
        server = None
        if code not in (0, None, -signal.SIGTERM):
            print(f"[bench] warning: server exited with code {code}", file=sys.stderr)
        print(f"[bench] total run {time.perf_counter() - started:.0f} s", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "environment": {**versions(), "client_loop": loop_name},
                "model": {"name": MODEL_NAME, "version": version, "preset": PRESET, "vocab_size": VOCAB,
                          "block_size": BLOCK_SIZE, "weights": "random, torch.manual_seed(0)"},
                "requests": [{"index": r.index, "prompt_tokens": len(r.prompt_ids), "window": r.window,
                              "max_tokens": r.max_tokens} for r in reqs],
                "hf": hf_res, "ort_step_ms_batch_x_slots": ort_ms,
                "levels": [asdict(r) for r in levels], "ratios": ratios,
                "server_exit_code": code, "server_log_tail": server_log,
            }, indent=2))
            print(f"[bench] wrote {args.out}")
        return 0
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"[bench] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
