"""`zooserve batch`: the OpenAI Batch file format answered in process by the server's own routes.

A mixed file (v2 classify, completions, chat, and every kind of bad line) gives one record per line
with the right status; reruns, a SIGKILLed-and-resumed CLI run, and merged shards all write the same
bytes as one uninterrupted run. A disk that fills (a real small tmpfs), a file size limit and a failing
fsync end the job with one line of error, and the rerun resumes to the same bytes.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from serve.batch import (BatchError, claim, cut_torn_line, derived_seed, parse_line, parse_range, read_done,
                         record_ids, run, scan)
from serve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "ROMEO. What light through yonder window"


def line(custom_id, url, body, method="POST") -> bytes:
    doc = {"custom_id": custom_id, "method": method, "url": url}
    if body is not None:
        doc["body"] = body
    return orjson.dumps(doc) + b"\n"


def digit_body(seed: int, shape=(1, 1, 8, 8)) -> dict:
    data = np.random.default_rng(seed).uniform(0, 16, int(np.prod(shape))).round(2)
    return {"inputs": [{"name": "image", "shape": list(shape), "datatype": "FP32", "data": data.tolist()}]}


def completion(custom_id: str, **extra) -> bytes:
    return line(custom_id, "/v1/completions", {"model": "decoder-tiny", "prompt": PROMPT, "max_tokens": 8, **extra})


def records(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def by_id(path: Path) -> dict:
    return {r["custom_id"]: r for r in records(path) if r["custom_id"] is not None}


@pytest.fixture(scope="module")
def settings(token_registry) -> ServeSettings:
    return ServeSettings(registry=token_registry, log_level="warning")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Every kind of line, good and bad; line numbers matter to the sharding test."""
    path = tmp_path_factory.mktemp("batch") / "mixed.jsonl"
    v2 = "/v2/models/mlp-digits/infer"
    path.write_bytes(b"".join([
        line("digit-0", v2, digit_body(0)),                                              # 0
        completion("cmpl-seeded", temperature=0.9, seed=7),                              # 1
        line("chat-greedy", "/v1/chat/completions", {"model": "decoder-tiny", "temperature": 0, "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": "Good morrow"}]}),
        b'{"custom_id": "broken", "method": "POST", \n',                                 # 3: malformed
        line("digit-0", v2, digit_body(1)),                                              # 4: duplicate
        line("unknown-model", "/v2/models/no-such-model/infer", digit_body(2)),          # 5: 404
        line("bad-tensor", v2, digit_body(3, shape=(1, 3))),                             # 6: 400
        completion("cmpl-unseeded", temperature=1.0),                                    # 7: derived seed
        completion("streamed", stream=True),                                             # 8
        line("admin-route", "/v2/repository/index", {}),                                 # 9
        b"\n",                                                                           # 10: blank, no record
        line("digit-versioned", "/v2/models/mlp-digits/versions/1/infer", digit_body(4)),  # 11
        line("not-a-token-model", "/v1/completions", {"model": "mlp-digits", "prompt": "x"}),  # 12: 400
        line(None, v2, digit_body(5)),                                                   # 13: no custom_id
        line("put", v2, digit_body(6), method="PUT"),                                    # 14
        completion("cmpl-explicit", temperature=1.0, seed=derived_seed("cmpl-unseeded")),  # 15
        line("digit-last", v2, digit_body(7)),                                           # 16
    ]))
    return path


# ---- lines, without a model ---------------------------------------------------------------------

def test_parse_range():
    assert parse_range(None) == (0, None) and parse_range("3:9") == (3, 9)
    assert parse_range("5:") == (5, None) and parse_range(":4") == (0, 4)
    for bad in ("7", "a:b", "9:3", "-1:4"):
        with pytest.raises(BatchError):
            parse_range(bad)


@pytest.mark.parametrize("raw, code", [
    (b"{oops", "invalid_json"), (b"[1, 2]", "invalid_json"),
    (b'{"method": "POST", "url": "/v1/completions", "body": {}}', "missing_custom_id"),
    (b'{"custom_id": 5, "method": "POST", "url": "/v1/completions", "body": {}}', "invalid_custom_id"),
    (b'{"custom_id": "a", "method": "DELETE", "url": "/v1/completions", "body": {}}', "invalid_method"),
    (b'{"custom_id": "a", "method": "POST", "url": "/metrics", "body": {}}', "invalid_url"),
    (b'{"custom_id": "a", "method": "GET", "url": "/v1/completions"}', "invalid_url"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": [1]}', "invalid_body"),
    (b'{"custom_id": "a", "method": "GET", "url": "/v1/images/gan", "body": {"n": 1}}', "invalid_body"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"stream": true}}',
     "streaming_unsupported"),
])
def test_bad_lines_become_errors(raw, code):
    assert parse_line(raw, 3, {}).error[0] == code


def test_duplicate_custom_id_loses_its_id():
    seen: dict[str, int] = {}
    raw = line("a", "/v2/models/m/infer", {"inputs": []})
    assert parse_line(raw, 0, seen).custom_id == "a"
    dup = parse_line(raw, 1, seen)
    assert dup.custom_id is None and dup.error[0] == "duplicate_custom_id"
    assert dup.error[1] == "line 2: custom_id 'a' was already used on line 1"      # lines count from 1
    assert claim(raw, 2, seen) is None and claim(line("b", "/x", None), 3, seen) == "b"
    assert record_ids(dup.key) != record_ids(parse_line(line("line:1", "/x", None), 1, {}).key)


def test_messages_count_lines_from_1_as_editors_do():
    assert parse_line(b"{oops", 0, {}).error[1].startswith("line 1 is not JSON")
    assert parse_line(b"[1]", 4, {}).error[1] == "line 5 is not a JSON object"
    assert parse_line(b'{"method": "POST"}', 9, {}).error[1] == "line 10 has no custom_id"
    assert parse_line(b'{"custom_id": 5}', 2, {}).error[1].startswith("line 3: custom_id must be")
    # --lines stays 0-based (Python's slices: shards a:b and b:c meet); its message says how they map
    with pytest.raises(BatchError, match="lines 1 to 10 in an editor and in this job's messages, are 0:10"):
        parse_range("1-10")


def test_the_routes_a_line_may_name_are_those_the_server_takes():
    # GET only: the images route takes no POST (a POST line was sent on and answered 405)
    req = parse_line(line("p", "/v1/images/gan-digits", {"label": 3}), 0, {})
    assert req.error[0] == "invalid_url" and "GET /v1/images/{m}" in req.error[1] and "GET|POST" not in req.error[1]
    assert parse_line(line("g", "/v1/images/gan-digits?label=3", None, "GET"), 0, {}).error is None


def test_seeds_are_derived_only_where_a_request_samples():
    def body(raw, kinds=None):
        req = parse_line(raw, 0, {}, kinds)
        return orjson.loads(req.body) if req.body else req.query.decode()
    assert body(completion("c", temperature=0.7))["seed"] == derived_seed("c")
    assert body(completion("c"))["seed"] == derived_seed("c")                  # OpenAI's default temperature is 1
    assert body(completion("c", temperature=0.7, seed=3))["seed"] == 3
    assert "seed" not in body(completion("c", temperature=0))
    assert derived_seed("c") == int(hashlib.sha256(b"seed:c").hexdigest()[:16], 16) >> 1 < 2**63
    assert body(line("g", "/v1/images/gan-digits?label=3", None, "GET")) == f"label=3&seed={derived_seed('g')}"
    assert body(line("g", "/v1/images/gan-digits?seed=1", None, "GET")) == "seed=1"
    sampler = line("s", "/v2/models/gan-digits/infer", {"inputs": [{"name": "label", "shape": [1], "datatype": "INT64",
                                                                       "data": [3]}]})
    assert body(sampler, {"gan-digits": "sample"})["inputs"][1] == {"name": "seed", "shape": [1], "datatype": "INT64",
                                                                   "data": [derived_seed("s")]}
    assert len(body(sampler, {"gan-digits": "classify"})["inputs"]) == 1


def test_a_v2_body_is_passed_on_as_written():
    raw = b'{"custom_id": "a", "method": "POST", "url": "/v2/models/m/infer", "body": {"inputs": [1.50, 2e0]} }\n'
    assert parse_line(raw, 0, {}).body == b' {"inputs": [1.50, 2e0]} '
    tricky = b'{"custom_id": "body", "method": "POST", "url": "/v2/models/m/infer", "body": {"inputs": [1.5]}}'
    assert orjson.loads(parse_line(tricky, 0, {}).body) == {"inputs": [1.5]}


def test_read_done_skips_a_torn_last_line_and_cut_removes_it(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_id": "c", "resp')
    done, end = read_done(out)
    assert [r["custom_id"] for r in done] == ["a", "b"]
    cut_torn_line(out, end)
    assert out.read_bytes() == b'{"custom_id": "a"}\n{"custom_id": "b"}\n'
    out.write_bytes(b"not json\n")
    with pytest.raises(BatchError, match="not a batch output"):
        read_done(out)


def test_scan_counts_the_range_and_names_the_files_models(mixed):
    count, models = scan(mixed, 0, None)
    assert count == 16                                   # 17 lines, one blank
    assert models == {"mlp-digits", "decoder-tiny", "no-such-model"}
    assert scan(mixed, 4, 9)[0] == 5 and scan(mixed, 4, 9)[1] == models   # every shard loads the same models


# ---- the job, in process -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whole(mixed, settings) -> Path:
    out = mixed.parent / "whole.jsonl"
    summary = run(settings, mixed, out, progress=False)
    assert summary.records == 16 and summary.resumed == 0
    return out


def test_mixed_file_gives_one_record_per_line_with_the_right_status(whole):
    recs = records(whole)
    assert len(recs) == 16
    ids = [r["custom_id"] for r in recs if r["custom_id"] is not None]
    assert len(ids) == len(set(ids)) == 13
    got = {r["custom_id"]: (r["response"]["status_code"] if r["response"] else r["error"]["code"]) for r in recs
           if r["custom_id"] is not None}
    assert got == {"digit-0": 200, "cmpl-seeded": 200, "chat-greedy": 200, "unknown-model": 404, "bad-tensor": 400,
                   "cmpl-unseeded": 200, "streamed": "streaming_unsupported", "admin-route": "invalid_url",
                   "digit-versioned": 200, "not-a-token-model": 400, "put": "invalid_method", "cmpl-explicit": 200,
                   "digit-last": 200}
    nameless = [r["error"]["code"] for r in recs if r["custom_id"] is None]
    assert nameless == ["invalid_json", "duplicate_custom_id", "missing_custom_id"]


def test_records_follow_the_openai_batch_output_format(whole):
    recs = by_id(whole)
    ok = recs["digit-0"]
    assert list(ok) == ["id", "custom_id", "response", "error"] and ok["error"] is None
    digest = hashlib.sha256(b"custom_id:digit-0").hexdigest()
    assert (ok["id"], ok["response"]["request_id"]) == record_ids("custom_id:digit-0") == \
        (f"batch_req_{digest[:24]}", f"req_{digest[24:48]}")
    assert ok["response"]["body"]["outputs"][0]["shape"] == [1, 10]
    assert "unknown model 'no-such-model'" in recs["unknown-model"]["response"]["body"]["error"]
    assert "image" in recs["bad-tensor"]["response"]["body"]["error"]
    assert recs["streamed"]["response"] is None and recs["streamed"]["error"]["message"]
    chat = recs["chat-greedy"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    cmpl = recs["cmpl-seeded"]["response"]["body"]
    assert cmpl["id"] == "cmpl-" + hashlib.sha256(b"body:cmpl-seeded").hexdigest()[:24] and cmpl["created"] == 0
    assert cmpl["usage"]["completion_tokens"] > 0


def test_an_unseeded_sampling_request_gets_the_documented_seed(whole):
    recs = by_id(whole)
    texts = [recs[k]["response"]["body"]["choices"][0]["text"] for k in ("cmpl-unseeded", "cmpl-explicit")]
    assert texts[0] == texts[1] and texts[0]


def test_a_rerun_writes_the_same_bytes_whatever_the_window(mixed, whole, settings, tmp_path):
    out = tmp_path / "again.jsonl"
    run(settings, mixed, out, window=1, progress=False)
    assert out.read_bytes() == whole.read_bytes()


def test_shards_by_line_range_concatenate_to_the_whole(mixed, whole, settings, tmp_path):
    parts = []
    for i, lines in enumerate([(0, 4), (4, 11), (11, None)]):     # the duplicate of line 0 sits in shard 2
        parts.append(tmp_path / f"shard-{i}.jsonl")
        run(settings, mixed, parts[-1], lines=lines, progress=False)
    assert b"".join(p.read_bytes() for p in parts) == whole.read_bytes()
    merged = {r["custom_id"]: r for p in parts for r in records(p) if r["custom_id"] is not None}
    assert merged == by_id(whole)
    empty = tmp_path / "empty.jsonl"                            # line 10 is blank: a shard with no records
    assert run(settings, mixed, empty, lines=(10, 11), progress=False).records == 0 and empty.read_bytes() == b""


def test_a_finished_output_is_left_alone_and_a_foreign_one_refused(mixed, whole, settings, tmp_path):
    out = tmp_path / "done.jsonl"
    out.write_bytes(whole.read_bytes())
    summary = run(settings, mixed, out, progress=False)
    assert summary.resumed == 16 and out.read_bytes() == whole.read_bytes()
    foreign = tmp_path / "foreign.jsonl"
    content = whole.read_bytes().splitlines(keepends=True)[1] + b'{"torn'
    foreign.write_bytes(content)
    with pytest.raises(BatchError, match="another input"):
        run(settings, mixed, foreign, progress=False)
    assert foreign.read_bytes() == content                # refused before anything was touched


def test_a_foreign_output_names_its_record_and_line_from_1(mixed, whole, settings, tmp_path):
    foreign = tmp_path / "foreign-first.jsonl"
    foreign.write_bytes(whole.read_bytes().splitlines(keepends=True)[1])
    with pytest.raises(BatchError, match="record 1 has custom_id 'cmpl-seeded' but line 1 has 'digit-0'"):
        run(settings, mixed, foreign, progress=False)


def test_a_line_naming_an_unknown_model_lists_the_registrys_models(whole):
    # the job loads only the models its file names: the answer lists the registry's, not those
    message = by_id(whole)["unknown-model"]["response"]["body"]["error"]
    assert "unknown model 'no-such-model'" in message
    assert "the registry's models: decoder-moe-tiny, decoder-tiny, lstm-charlm, mamba-tiny, mlp-digits" in message


def test_samplers_without_a_seed_repeat_through_their_derived_seed(generative_registry, tmp_path):
    def gan(custom_id, seed=None):
        inputs = [{"name": "label", "shape": [3], "datatype": "INT64", "data": [1, 4, 7]}]
        if seed is not None:
            inputs.append({"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]})
        return line(custom_id, "/v2/models/gan-digits/infer", {"inputs": inputs})
    inp = tmp_path / "samplers.jsonl"
    inp.write_bytes(b"".join([
        gan("gan-unseeded"), gan("gan-explicit", derived_seed("gan-unseeded")),
        line("png-unseeded", "/v1/images/diffusion-digits?label=3&n=2&steps=4", None, "GET"),
        line("png-explicit", f"/v1/images/diffusion-digits?label=3&n=2&steps=4&seed={derived_seed('png-unseeded')}",
             None, "GET"),
    ]))
    settings = ServeSettings(registry=generative_registry, log_level="warning")
    outs = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    run(settings, inp, outs[0], progress=False)
    run(settings, inp, outs[1], window=1, progress=False)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    recs = by_id(outs[0])
    assert {r["response"]["status_code"] for r in recs.values()} == {200}
    image = [recs[k]["response"]["body"]["outputs"] for k in ("gan-unseeded", "gan-explicit")]
    assert image[0] == image[1] and image[0][0]["name"] == "image"
    png = [recs[k]["response"]["body"] for k in ("png-unseeded", "png-explicit")]
    assert png[0] == png[1] and png[0]["content_type"] == "image/png"
    assert base64.b64decode(png[0]["base64"]).startswith(b"\x89PNG")


# ---- the CLI, killed and resumed -----------------------------------------------------------------

def cli(registry: Path, inp: Path, out: Path, log: Path, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serve.cli", "batch", "--registry", str(registry), "-i", str(inp), "-o", str(out),
           "--threads", "1", "--log-level", "warning", *extra]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, **popen)


def test_cli_killed_with_sigkill_resumes_to_the_same_output(token_registry, settings, tmp_path):
    inp = tmp_path / "big.jsonl"
    with open(inp, "wb") as f:
        for i in range(1200):
            if i % 40 == 7:     # samplers without a seed: their text must still repeat after the kill
                f.write(completion(f"c{i}", temperature=0.8, max_tokens=12, ignore_eos=True))
            else:
                f.write(line(f"d{i}", "/v2/models/mlp-digits/infer", digit_body(i)))
    reference = tmp_path / "reference.jsonl"
    run(settings, inp, reference, progress=False)
    out = tmp_path / "killed.jsonl"
    proc = cli(token_registry, inp, out, tmp_path / "killed.log", "--window", "8")
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 200) and proc.poll() is None:
        assert time.monotonic() < deadline, "the job wrote nothing in 60 s"
        time.sleep(0.005)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = out.read_bytes()
    assert 200 <= written.count(b"\n") < 1200
    torn = written[:written.rstrip(b"\n").rfind(b"\n") + 1] + written[written.rstrip(b"\n").rfind(b"\n") + 1:][:40]
    out.write_bytes(torn)         # as if the kill had landed in the middle of a write
    proc = cli(token_registry, inp, out, tmp_path / "resumed.log", "--no-progress")
    proc.wait(timeout=120)
    log = (tmp_path / "resumed.log").read_text()
    assert proc.returncode == 0, log
    assert "from an earlier run" in log
    assert out.read_bytes() == reference.read_bytes()
    ids = [r["custom_id"] for r in records(out)]
    assert len(ids) == len(set(ids)) == 1200


# ---- a disk that fills, a write that fails -------------------------------------------------------

DIGITS = 600     # ~370 bytes a record: ~220 KB of output


@pytest.fixture(scope="module")
def digits_job(demo_registry, tmp_path_factory) -> tuple[Path, bytes]:
    """(input of DIGITS classifier lines, its output written on an ordinary disk)."""
    work = tmp_path_factory.mktemp("digits")
    inp = work / "digits.jsonl"
    inp.write_bytes(b"".join(line(f"d{i}", "/v2/models/mlp-digits/infer", digit_body(i)) for i in range(DIGITS)))
    run(ServeSettings(registry=demo_registry, log_level="warning"), inp, work / "reference.jsonl", progress=False)
    return inp, (work / "reference.jsonl").read_bytes()


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 128 KiB tmpfs (needs root: CI runs as root); unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_a_file_size_limit_* covers the path unprivileged")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def assert_failed_cleanly(proc, log: Path, out: Path, reference: bytes, reason: str) -> int:
    """The job exited 2 with one line naming the file, the reason and the records kept, and left a prefix
    of the reference (perhaps with a torn last line); returns the records kept."""
    proc.wait(timeout=60)
    text = log.read_text()
    written = out.read_bytes()
    kept = written.count(b"\n")
    assert proc.returncode == 2, text
    assert "Traceback" not in text and text.endswith("\n")
    assert [x for x in text.splitlines() if x.startswith("zooserve batch:")] == [text.splitlines()[-1]]
    assert text.splitlines()[-1] == (f"zooserve batch: cannot write {out}: {reason}; {kept} of {DIGITS} records are "
                                     "in it, and once that is fixed, rerunning the same command resumes after them")
    assert 0 < kept < DIGITS and written == reference[:len(written)]
    return kept


def assert_resumed(proc, log: Path, out: Path, reference: bytes, kept: int) -> None:
    proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert f"{DIGITS} records in {out} ({kept} from an earlier run" in text
    assert out.read_bytes() == reference


def test_a_full_disk_ends_the_cli_job_cleanly_and_the_rerun_resumes(demo_registry, digits_job, small_disk, tmp_path):
    inp, reference = digits_job
    out = small_disk / "out.jsonl"
    proc = cli(demo_registry, inp, out, tmp_path / "full.log", "--no-progress")
    kept = assert_failed_cleanly(proc, tmp_path / "full.log", out, reference, "No space left on device (ENOSPC)")
    assert out.stat().st_size > 100_000                          # it stopped because the disk was full
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)     # make room
    proc = cli(demo_registry, inp, out, tmp_path / "rerun.log", "--no-progress")
    assert_resumed(proc, tmp_path / "rerun.log", out, reference, kept)


def test_a_file_size_limit_ends_the_job_cleanly_too(demo_registry, digits_job, tmp_path):
    """Unprivileged: RLIMIT_FSIZE makes the write that crosses 64 KiB fail with EFBIG (Python ignores SIGXFSZ)."""
    inp, reference = digits_job
    out = tmp_path / "out.jsonl"
    limit = (64 * 1024, 64 * 1024)
    proc = cli(demo_registry, inp, out, tmp_path / "limited.log", "--no-progress",
               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit))
    kept = assert_failed_cleanly(proc, tmp_path / "limited.log", out, reference, "File too large (EFBIG)")
    assert out.stat().st_size == 64 * 1024
    proc = cli(demo_registry, inp, out, tmp_path / "rerun.log", "--no-progress")
    assert_resumed(proc, tmp_path / "rerun.log", out, reference, kept)


def test_an_output_that_cannot_be_created_is_one_line_and_exit_2(demo_registry, digits_job, tmp_path):
    inp, _ = digits_job
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "out.jsonl"          # its folder is a file
    proc = cli(demo_registry, inp, out, tmp_path / "cannot.log", "--no-progress")
    assert proc.wait(60) == 2
    text = (tmp_path / "cannot.log").read_text()
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith(f"zooserve batch: cannot prepare the job: {tmp_path / 'a-file'}")


@pytest.mark.parametrize("failing", ["fsync thread", "close"])
def test_a_failing_fsync_ends_the_job_and_the_rerun_resumes(demo_registry, digits_job, tmp_path, monkeypatch,
                                                            failing):
    """The OS's fsync fails (EIO) in the job's fsync thread, or in close()'s final fsync on the loop's thread."""
    inp, reference = digits_job
    settings = ServeSettings(registry=demo_registry, log_level="warning")
    out = tmp_path / "out.jsonl"
    real_fsync = os.fsync

    def fsync(fd):
        if (threading.current_thread() is threading.main_thread()) == (failing == "close"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(BatchError) as failed:
        run(settings, inp, out, progress=False)
    monkeypatch.undo()
    written = out.read_bytes()
    kept = written.count(b"\n")
    assert str(failed.value) == (f"cannot write {out}: Input/output error (EIO); {kept} of {DIGITS} records are in "
                                 "it, and once that is fixed, rerunning the same command resumes after them")
    assert written == reference[:len(written)] and written.endswith(b"\n")
    assert kept == DIGITS if failing == "close" else 0 < kept < DIGITS     # the thread's failure stops the workers
    summary = run(settings, inp, out, progress=False)
    assert (summary.records, summary.resumed) == (DIGITS, kept) and out.read_bytes() == reference
