"""Token generation benchmark: the real server (continuous batching, ONNX Runtime) against
Hugging Face `generate` on the same weights, for the decoder (default) or Mamba (`--family mamba`).

One run (decoder; the Mamba run is listed after it):
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

    .venv/bin/python bench/tokens.py [--family decoder|mamba] [--requests 96] [--batch1 6]
                                     [--concurrency 1 16 64] [--level-requests 6 48 96] [--out FILE.json]

`--family mamba` runs the same steps on the `bench` Mamba preset (6 layers, d_model 256, d_state 16,
d_conv 4, expand 2), same tokenizer, RANDOM weights (torch.manual_seed(0)), published as `mamba-bench`,
against `MambaForCausalLM.generate` (`to_hf_mamba`), with these in place of step 4 and beside 3 and 5:
  3'. the prefill of one 512-token corpus prompt, in-process: our split prefill (ONNX segments and
      the native selective scan, as the server runs prompts) and our whole ONNX step, HF's forward
      with its cache and HF `generate(max_new_tokens=1)`, taking turns, best of 5 each; then the
      same prompt 8 times in one batch, HF's forward against our split prefill, best of 3;
  4'. the ONNX decode step alone at batch 1/16/64 (its state has one size whatever the context), and
      the per-token decode latency at contexts 32, 512 and 2048 (a decode step from the state a
      prompt of that length left), median of 1,000 calls, the contexts taking turns call by call;
  5'. through the server, after the levels: requests with prompts of 32/512/2048 corpus tokens (as
      token ids, 128 new tokens each; 3 rounds, best of 3): TTFT and per-token latency (ITL), the
      TTFT of the 512-token prompt against HF `generate(max_new_tokens=1)`; the state bytes per
      sequence; targets: batch 1 and 16 concurrent >= 3x HF, prefill >= 5x, ITL at 2048 within 10 %
      of ITL at 32.

TTFT of the server = send -> first SSE event carrying a token (its `text` may be "" when the token
ends inside a UTF-8 character or is a special token); end = `data: [DONE]`; generated tokens come
from the final usage chunk. Every side runs one intra-op thread.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
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
    HelpFormatter,
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

# --family mamba
MAMBA_MODEL_NAME = "mamba-bench"
MAMBA_PRESET = "bench"
MAMBA_TARGETS = {"batch 1": 3.0, "16 concurrent": 3.0}
PREFILL_TOKENS = 512
PREFILL_TARGET = 5.0             # ours at least this many times faster than HF on a 512-token prompt
PREFILL_BATCH = 8                # the batched prefill the issue quotes HF at (8 x 512 tokens, ~3.3 s)
CONTEXTS = (32, 512, 2048)       # per-token decode latency at these contexts ...
CONTEXT_TOLERANCE = 0.10         # ... the longest within 10 % of the shortest (the state has one size)
CONTEXT_NEW_TOKENS = 128


# ---- model and requests ---------------------------------------------------------------------

def build_model(work: Path, log=print, family: str = "decoder"):
    """Tokenizer on the corpus, random-weight `small` decoder (or `bench` mamba), checkpoint, ONNX
    package, registry. Returns (model, tokenizer, corpus_text, registry_root, version, onnx_path)."""
    import torch

    from model_registry import Registry
    from training import checkpoint, export
    from training.text import load_corpus
    from training.tokenizer import train_tokenizer

    if family == "mamba":
        from training.models.mamba import PRESETS, Config, Model
        name, preset, extra = MAMBA_MODEL_NAME, MAMBA_PRESET, {}
    else:
        from training.models.decoder import PRESETS, Config, Model
        name, preset, extra = MODEL_NAME, PRESET, {"block_size": BLOCK_SIZE}

    started = time.perf_counter()
    corpus = load_corpus()
    text = corpus.text
    tokenizer = train_tokenizer(text, vocab_size=VOCAB)
    log(f"[bench] tokenizer: {tokenizer.vocab_size} tokens, trained on {corpus.name} "
        f"({len(text):,} chars) in {time.perf_counter() - started:.1f} s")
    torch.manual_seed(0)
    config = Config(**PRESETS[preset], vocab_size=tokenizer.vocab_size, **extra)
    model = Model(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    label, window = ((f"preset {preset!r}", f"block_size {BLOCK_SIZE}") if family == "decoder"
                     else (f"mamba preset {preset!r}", "constant-size state"))
    log(f"[bench] model: {label}, {n_params / 1e6:.2f} M parameters, {window}, "
        f"RANDOM weights (torch.manual_seed(0)): this measures speed, not quality")
    ckpt = work / "checkpoint"
    checkpoint.save(ckpt, model, config, {"family": family})
    tokenizer.save(ckpt)
    t0 = time.perf_counter()
    export.package(ckpt, work / "package", formats=("onnx",), serve_format="onnx")
    log(f"[bench] exported to ONNX (prefill + decode parity checked) in {time.perf_counter() - t0:.1f} s")
    registry = Registry(work / "registry")
    version = registry.publish(name, work / "package")
    onnx_path = registry.version_dir(name, version) / "model.onnx"
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

def hf_model(model, family: str = "decoder"):
    if family == "mamba":
        from training.models.mamba import to_hf_mamba as to_hf
    else:
        from training.models.decoder import to_hf_llama as to_hf

    hf = to_hf(model).float().eval()
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


# ---- Mamba: the recurrent step alone, prefill, contexts ----------------------------------------

def _ort_session(onnx_path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _best_ms(fns: dict, seconds: float, min_runs: int = 3, slices: int = 3) -> dict:
    """ms per call of each fn: best of `slices` slices of `seconds` / slices (at least `min_runs`
    calls each), the fns taking turns slice by slice so that the machine's noise falls on all alike."""
    for fn in fns.values():
        fn()
    best: dict = {}
    for _ in range(slices):
        for key, fn in fns.items():
            runs, t0 = 0, time.perf_counter()
            while runs < min_runs or time.perf_counter() - t0 < seconds / slices:
                fn()
                runs += 1
            per = (time.perf_counter() - t0) / runs * 1000
            best[key] = min(best.get(key, per), per)
    return best


def _interleaved_median_ms(fns: dict, calls: int) -> dict:
    """ms per call of each fn: the median of `calls` single calls, the fns taking turns call by call,
    so that a burst of other load falls on every fn alike (a slice of many calls per fn let one
    burst decide a context's best slice: the 2048 / 32 ratio moved between 0.83 and 1.17)."""
    for fn in fns.values():
        fn()
    times: dict = {key: [] for key in fns}
    for _ in range(calls):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {key: float(np.median(t)) * 1000 for key, t in times.items()}


def context_windows(tokenizer, text: str, lengths: tuple[int, ...], seed: int) -> dict[int, list[int]]:
    """One corpus token window per length (seeded), as token ids."""
    rng = random.Random(seed + 1)
    ids = tokenizer.encode(text[:400_000])
    out = {}
    for n in lengths:
        start = rng.randrange(len(ids) - n)
        out[n] = ids[start:start + n]
    return out


def measure_recurrent_steps(onnx_path: Path, windows: dict[int, list[int]], seconds: float = 1.2) -> dict:
    """The served model.onnx in-process (1 thread): ms per decode step at batch 1/16/64 from random
    states, and per-token decode latency from the state each context window's prefill left."""
    session = _ort_session(onnx_path)
    states = [(i.name, [d if isinstance(d, int) else 1 for d in i.shape[1:]]) for i in session.get_inputs()[2:]]
    rng = np.random.default_rng(0)
    vocab = session.get_outputs()[0].shape[-1]
    decode = {}
    for b in CEILING_BATCHES:
        feed = {"ids": rng.integers(4, vocab, (b, 1)).astype(np.int64), "n_new": np.ones(b, np.int64),
                **{n: 0.1 * rng.standard_normal((b, *shape), np.float32) for n, shape in states}}
        decode[b] = functools.partial(session.run, None, feed)

    contexts = {}
    for n, ids in windows.items():
        prefilled = session.run(None, zero_state_feed(session, ids))[1:]        # the state after n tokens
        feed = {"ids": np.array([[ids[-1]]], np.int64), "n_new": np.ones(1, np.int64),
                **{name: s for (name, _), s in zip(states, prefilled, strict=True)}}
        contexts[n] = functools.partial(session.run, None, feed)
    busy0, own0, t0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    out = {"decode_ms": _best_ms(decode, seconds, slices=9), "context_ms": _interleaved_median_ms(contexts, 1000),
           "state_bytes": int(sum(np.prod(shape) for _, shape in states) * 4)}
    other = (machine_busy_seconds() - busy0) - (time.process_time() - own0)
    return {**out, "other_load_cores": max(0.0, other) / (time.perf_counter() - t0)}


def zero_state_feed(session, ids: list[int]) -> dict[str, np.ndarray]:
    """One prompt (B = 1) from the zero state, for the recurrent step."""
    return {"ids": np.array([ids], np.int64), "n_new": np.array([len(ids)], np.int64),
            **{i.name: np.zeros((1, *i.shape[1:]), np.float32) for i in session.get_inputs()[2:]}}


def compare_prefill(hf, onnx_path: Path, ids: list[int], rounds: int = 5) -> dict[str, float]:
    """One prompt (B = 1), taking turns, best of `rounds`: HF's forward with its cache (the prefill
    alone), HF generate(max_new_tokens=1) (prefill + the first token), our split prefill (ONNX
    segments + the native scan: what the server runs) and our whole ONNX step."""
    import torch

    from training.split_prefill import SplitPrefill

    x = torch.tensor([ids])
    session = _ort_session(onnx_path)
    feed = zero_state_feed(session, ids)
    spec = json.loads((onnx_path.parent / "manifest.json").read_text())["prefill"]
    split = SplitPrefill(onnx_path.parent, spec["segments"])

    def forward():
        with torch.inference_mode():
            hf(x, use_cache=True)

    busy0, own0, t0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    best = _best_ms({"forward_ms": forward, "generate1_ms": lambda: hf_generate(hf, x, torch.ones_like(x), 1),
                     "ours_ms": functools.partial(split.run, feed),
                     "whole_step_ms": functools.partial(session.run, None, feed)}, 0.0, min_runs=1, slices=rounds)
    # the batch: 8 prompts of 512 tokens (the same window 8 times: the work does not depend
    # on the tokens), HF's forward against our split prefill, best of 3
    x8 = x.repeat(PREFILL_BATCH, 1)
    feed8 = {k: np.repeat(v, PREFILL_BATCH, axis=0) for k, v in feed.items()}

    def forward8():
        with torch.inference_mode():
            hf(x8, use_cache=True)

    best |= {f"{k}_b{PREFILL_BATCH}": v for k, v in _best_ms(
        {"forward_ms": forward8, "ours_ms": functools.partial(split.run, feed8)}, 0.0, min_runs=1, slices=3).items()}
    other = (machine_busy_seconds() - busy0) - (time.process_time() - own0)
    return {**best, "other_load_cores": max(0.0, other) / (time.perf_counter() - t0)}


async def context_latency(server: Server, windows: dict[int, list[int]], model: str,
                          rounds: int = 3) -> dict[int, dict]:
    """Through the server, requests of each context in turn (`rounds` rounds, so the machine's noise
    falls on every context alike): the window as token ids, CONTEXT_NEW_TOKENS new tokens. Best
    TTFT (send -> first token) and best ITL ((end - first token) / (tokens - 1)) per context."""
    raw = {n: http_request("/v1/completions", server.host, server.port,
                           completion_body(Req(-1, "", ids, n, CONTEXT_NEW_TOKENS), model, prompt=ids))
           for n, ids in windows.items()}
    out: dict[int, dict] = {}
    for _ in range(rounds):
        for n in windows:
            conn = StreamConnection(server.host, server.port)
            sent = time.perf_counter()
            res = await conn.stream(raw[n], sent)
            conn.close()
            usage = res["usage"] or {}
            if res["status"] != 200 or not res["done"] or usage.get("completion_tokens") != CONTEXT_NEW_TOKENS:
                raise RuntimeError(f"context {n}: request failed: {res}\n{server.log_tail()}")
            ttft_ms, itl_ms = res["ttft"] * 1000, (res["end"] - sent - res["ttft"]) / (CONTEXT_NEW_TOKENS - 1) * 1000
            best = out.setdefault(n, {"prompt_tokens": usage.get("prompt_tokens"), "ttft_ms": ttft_ms,
                                      "itl_ms": itl_ms})
            best["ttft_ms"], best["itl_ms"] = min(best["ttft_ms"], ttft_ms), min(best["itl_ms"], itl_ms)
    return out


def print_mamba_report(hf: dict, rec: dict, contexts: dict[int, dict], levels: list[LevelResult],
                       hf_prompt: dict[str, float]) -> dict[str, float]:
    """The decoder's table and ratios (via print_report), then the recurrent step's own sections."""
    ratios = print_report(hf, {}, levels, model=MAMBA_MODEL_NAME, preset=MAMBA_PRESET, targets=MAMBA_TARGETS)
    print()
    print(f"ONNX Runtime decode step alone (in-process, 1 thread, random states; best of 9 interleaved slices; "
          f"other load meanwhile {rec['other_load_cores']:.2f} cores), ms per step (ms per sequence):")
    print("| " + " | ".join(f"batch {b}" for b in CEILING_BATCHES) + " |")
    print("|" + "---:|" * len(CEILING_BATCHES))
    print("| " + " | ".join(f"{rec['decode_ms'][b]:.2f} ({rec['decode_ms'][b] / b:.3f})" for b in CEILING_BATCHES)
          + " |")
    print()
    print(f"Per-token decode latency by context (batch 1; in-process: a decode step from the state the "
          f"prompt left, median of 1,000 calls, the contexts taking turns call by call; server: best of 3 requests generating "
          f"{CONTEXT_NEW_TOKENS} tokens):")
    print("| context (prompt tokens) | in-process step ms | server ITL ms | server TTFT ms |")
    print("|---:|---:|---:|---:|")
    for n in CONTEXTS:
        print(f"| {n} | {rec['context_ms'][n]:.3f} | {contexts[n]['itl_ms']:.3f} | {contexts[n]['ttft_ms']:.1f} |")
    print()
    first, last = CONTEXTS[0], CONTEXTS[-1]
    print(f"Prefill of one {PREFILL_TOKENS}-token prompt (batch 1; the in-process three took turns, best of 5; "
          f"other load meanwhile {hf_prompt['other_load_cores']:.2f} cores):")
    print("| side | what | ms |")
    print("|---|---|---:|")
    print(f"| HF | forward with cache (the prefill) | {hf_prompt['forward_ms']:.1f} |")
    print(f"| HF | generate(max_new_tokens=1) | {hf_prompt['generate1_ms']:.1f} |")
    print(f"| zooserve | split prefill (ONNX segments + native scan, as served), in-process | {hf_prompt['ours_ms']:.1f} |")
    print(f"| zooserve | whole ONNX step (standard ops only), in-process | {hf_prompt['whole_step_ms']:.1f} |")
    print(f"| zooserve | server TTFT (prompt as token ids, streamed) | {contexts[PREFILL_TOKENS]['ttft_ms']:.1f} |")
    print(f"| HF | forward with cache, {PREFILL_BATCH} prompts at once (best of 3) | "
          f"{hf_prompt[f'forward_ms_b{PREFILL_BATCH}']:.1f} |")
    print(f"| zooserve | split prefill, {PREFILL_BATCH} prompts at once, in-process (best of 3) | "
          f"{hf_prompt[f'ours_ms_b{PREFILL_BATCH}']:.1f} |")
    print()
    print(f"State bytes per sequence: {rec['state_bytes']:,} (float32, every context; the decoder's KV cache "
          f"grows with it)")
    print()
    checks = [
        (f"prefill {PREFILL_TOKENS}: HF forward / ours (split prefill)", hf_prompt["forward_ms"] / hf_prompt["ours_ms"],
         f">= {PREFILL_TARGET:.0f}x", lambda r: r >= PREFILL_TARGET),
        (f"prefill {PREFILL_BATCH} x {PREFILL_TOKENS}: HF forward / ours (split prefill)",
         hf_prompt[f"forward_ms_b{PREFILL_BATCH}"] / hf_prompt[f"ours_ms_b{PREFILL_BATCH}"],
         f">= {PREFILL_TARGET:.0f}x", lambda r: r >= PREFILL_TARGET),
        (f"prefill {PREFILL_TOKENS}: HF generate(1) / ours (server TTFT)",
         hf_prompt["generate1_ms"] / contexts[PREFILL_TOKENS]["ttft_ms"], f">= {PREFILL_TARGET:.0f}x",
         lambda r: r >= PREFILL_TARGET),
        (f"decode latency, context {last} / {first} (in-process step)",
         rec["context_ms"][last] / rec["context_ms"][first], f"<= {1 + CONTEXT_TOLERANCE:.2f}",
         lambda r: r <= 1 + CONTEXT_TOLERANCE),
        (f"decode latency, context {last} / {first} (server ITL)",
         contexts[last]["itl_ms"] / contexts[first]["itl_ms"], f"<= {1 + CONTEXT_TOLERANCE:.2f}",
         lambda r: r <= 1 + CONTEXT_TOLERANCE),
    ]
    for label, ratio, goal, met in checks:
        ratios[label] = ratio
        print(f"{label}: {ratio:.2f}{'x' if 'prefill' in label else ''}   target {goal}: "
              f"{'MET' if met(ratio) else 'MISSED'}")
    return ratios


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


def completion_body(r: Req, model: str = MODEL_NAME, prompt: str | list[int] | None = None) -> bytes:
    import orjson

    return orjson.dumps({"model": model, "prompt": r.prompt if prompt is None else prompt,
                         "max_tokens": r.max_tokens, "temperature": 0,
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


async def run_level(server: Server, reqs: list[Req], concurrency: int, model: str = MODEL_NAME) -> LevelResult:
    """Closed loop over a fixed list: `concurrency` connections each take the next request when done."""
    host, port = server.host, server.port
    raw = {r.index: http_request("/v1/completions", host, port, completion_body(r, model)) for r in reqs}
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

    before = await scrape(probe, metrics_raw, model)
    cpu0, client0, busy0, t0 = server.cpu_seconds(), time.process_time(), machine_busy_seconds(), time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=600)
    finally:
        t1, cpu1, client1, busy1 = time.perf_counter(), server.cpu_seconds(), time.process_time(), machine_busy_seconds()
    after = await scrape(probe, metrics_raw, model)
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


async def drive(server: Server, plans: list[tuple[int, list[Req]]], log=print,
                model: str = MODEL_NAME) -> list[LevelResult]:
    # warm-up: one short request (first ORT runs, lazy paths), not measured
    warm = StreamConnection(server.host, server.port)
    w = Req(-1, "To be, or not to be", [], 0, 8)
    res = await warm.stream(http_request("/v1/completions", server.host, server.port, completion_body(w, model)),
                            time.perf_counter())
    warm.close()
    if res["status"] != 200 or not res["done"] or (res["usage"] or {}).get("completion_tokens") != 8:
        raise RuntimeError(f"warm-up request failed: {res}\n{server.log_tail()}")
    out = []
    for concurrency, reqs in plans:
        log(f"[bench] server, {concurrency} concurrent over {len(reqs)} requests "
            f"({sum(r.max_tokens for r in reqs)} tokens) ...")
        r = await run_level(server, reqs, concurrency, model)
        seqs = f"{r.mean_seqs_per_step:.2f}" if r.mean_seqs_per_step else "-"
        log(f"[bench]   {r.tokens_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50_ms:.1f} ms p99 {r.ttft_p99_ms:.1f} ms, "
            f"latency p50 {r.latency_p50_s:.2f} s, seqs/step {seqs}, server CPU {r.server_cpu_cores:.2f} cores, "
            f"ok {r.ok}/{r.requests}")
        for p in r.problems:
            log(f"[bench]   PROBLEM {p}")
        out.append(r)
    return out


# ---- report ---------------------------------------------------------------------------------

def print_report(hf: dict, ort_ms: dict[str, float], levels: list[LevelResult], model: str = MODEL_NAME,
                 preset: str = PRESET, targets: dict[str, float] = TARGETS) -> dict[str, float]:
    """The table, the decoder's step table (when `ort_ms` has it) and the throughput ratios."""
    b1, bs = hf["batch1"], hf["static"]
    window = f"block_size {BLOCK_SIZE}" if model == MODEL_NAME else "constant-size state"
    print()
    print(f"Model: {model} (preset {preset}, vocab {VOCAB}, {window}), RANDOM weights "
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
    if ort_ms:
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
            goal = targets[target]
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
                                formatter_class=HelpFormatter)
    p.add_argument("--family", choices=["decoder", "mamba"], default="decoder",
                   help="decoder: the `small` Llama-style preset; mamba: the `bench` Mamba-1 preset")
    p.add_argument("--requests", type=int, default=96, help="size of the seeded request list")
    p.add_argument("--batch1", type=int, default=6, help="requests in the batch-1 subset (HF batch 1 and ours at 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="server concurrency levels")
    p.add_argument("--level-requests", type=int, nargs="+", default=[6, 48, 96],
                   help="requests per level: the first N of the list (6 at level 1 = the HF batch-1 subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request list (prompts, max_tokens) and "
                   "of the Mamba context prompts")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="load generator event loop (auto: uvloop when installed)")
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
        mamba = args.family == "mamba"
        model_name, preset = (MAMBA_MODEL_NAME, MAMBA_PRESET) if mamba else (MODEL_NAME, PRESET)
        model, tokenizer, text, registry, version, onnx_path = build_model(workdir, family=args.family)
        reqs = make_requests(tokenizer, text, args.requests, args.seed)
        plens = [len(r.prompt_ids) for r in reqs]
        print(f"[bench] {len(reqs)} requests: prompt tokens {min(plens)}..{max(plens)} (mean {np.mean(plens):.0f}), "
              f"max_tokens {min(r.max_tokens for r in reqs)}..{max(r.max_tokens for r in reqs)} "
              f"(mean {np.mean([r.max_tokens for r in reqs]):.0f})", flush=True)
        windows = context_windows(tokenizer, text, CONTEXTS, args.seed) if mamba else {}

        hf = hf_model(model, args.family)
        hf_res = run_hf(hf, reqs[:args.batch1], reqs[:STATIC_BATCH])
        if mamba:
            hf_prompt = compare_prefill(hf, onnx_path, windows[PREFILL_TOKENS])
            print(f"[bench] prefill of {PREFILL_TOKENS} tokens: HF forward {hf_prompt['forward_ms']:.1f} ms, "
                  f"HF generate(max_new_tokens=1) {hf_prompt['generate1_ms']:.1f} ms, "
                  f"our split prefill {hf_prompt['ours_ms']:.1f} ms, our whole ONNX step {hf_prompt['whole_step_ms']:.1f} ms "
                  f"(other load {hf_prompt['other_load_cores']:.2f} cores)",
                  flush=True)
        del hf
        config = json.loads((onnx_path.parent / "config.json").read_text())
        if mamba:
            ort_ms = {}
            rec = measure_recurrent_steps(onnx_path, windows)
            print("[bench] ORT step alone: decode " + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in
                                                               rec["decode_ms"].items())
                  + "; decode at context " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in rec["context_ms"].items()),
                  flush=True)
        else:
            ort_ms = measure_ort_steps(onnx_path, config)
            print("[bench] ORT decode step alone (batch x cache slots): "
                  + ", ".join(f"{k} {ms:.2f} ms" for k, ms in ort_ms.items()), flush=True)

        server = Server(registry, 1, workdir / "server.log")
        ready_s = server.wait_ready()
        print(f"[bench] server pid {server.proc.pid} ready on {server.url} after {ready_s:.1f} s", flush=True)
        plans = [(c, reqs[:n]) for c, n in zip(args.concurrency, args.level_requests)]
        loop_factory, loop_name = event_loop_factory(args.loop)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            levels = runner.run(drive(server, plans, model=model_name))
            if mamba:
                contexts = runner.run(context_latency(server, windows, model_name))
        if mamba:
            ratios = print_mamba_report(hf_res, rec, contexts, levels, hf_prompt)
        else:
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
                "model": {"name": model_name, "version": version, "preset": preset, "vocab_size": VOCAB,
                          **({"family": "mamba"} if mamba else {"block_size": BLOCK_SIZE}),
                          "weights": "random, torch.manual_seed(0)"},
                "requests": [{"index": r.index, "prompt_tokens": len(r.prompt_ids), "window": r.window,
                              "max_tokens": r.max_tokens} for r in reqs],
                "hf": hf_res, "ort_step_ms_batch_x_slots": ort_ms,
                **({"hf_prefill": hf_prompt, "ort_recurrent": rec, "server_contexts": contexts} if mamba else {}),
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
