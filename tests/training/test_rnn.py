"""The rnn family: the co2 split, right-padded batches and carried state against the per-row
reference path, the character LM's step contract, training that beats the last-value baseline,
and ONNX (in ONNX Runtime) and TorchScript exports checked at several batches and lengths."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training import checkpoint, export, export_sequence, loop, series
from training.families import config_from_dict, family_module, make_config
from training.models import rnn, rnn_lm

torch.set_num_threads(1)
CELLS = ["rnn", "gru", "lstm"]


def small_forecaster(cell: str, seed: int = 0, **overrides) -> rnn.Forecaster:
    """An untrained forecaster scaled like co2 (values around 340)."""
    torch.manual_seed(seed)
    config = rnn.Config(**{"cell": cell, "hidden": 8, "layers": 2, "mean": 340.0, "std": 15.0, "step_std": 0.8,
                           **overrides})
    return rnn.Model(config).eval()


def random_state(config, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in rnn.init_state(config, batch).items()}


# ---- contract and data ---------------------------------------------------------------------------

def test_family_contract():
    assert family_module("rnn").KIND == "sequence" and family_module("rnn_lm").KIND == "tokens"
    for preset, cell in (("tiny", "lstm"), ("tiny-gru", "gru"), ("tiny-rnn", "rnn")):
        config = make_config("rnn", preset)
        assert config.cell == cell
        stored = json.loads(json.dumps(dataclasses.asdict(config)))
        assert config_from_dict("rnn", stored) == config
    with pytest.raises(ValueError, match="cell must be one of"):
        rnn.Config(cell="transformer")
    model = small_forecaster("lstm")
    series_, lengths = rnn.example_inputs(model.config, 5)
    assert series_.shape == (5, 12, 1) and lengths.shape == (5,) and int(lengths.min()) >= 1
    forecast, state = model(series_, lengths)
    assert forecast.shape == (5, 4) and set(state) == {"h", "c"} and state["h"].shape == (5, 2, 8)
    loss = rnn.loss(model, (series_, lengths, torch.full((5, 4), 340.0)))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_co2_split_is_chronological_seeded_and_scaled_on_train_only():
    values = series.load_co2()
    assert values.shape == (2284,) and np.isfinite(values).all()
    split = series.make_split(values, horizon=4, seed=0)
    ends, K = split.ends, 4
    # targets of one split never reach into the next one
    assert ends["train"].max() + K < ends["val"].min() + 1
    assert ends["val"].max() + K < ends["test"].min() + 1
    assert ends["test"].max() + K == len(values) - 1
    for part in ("train", "val", "test"):
        hist, lengths, targets = getattr(split, part)
        assert len(lengths) == len(ends[part]) > 200
        assert int(lengths.min()) >= series.MIN_LEN and int(lengths.max()) <= series.MAX_LEN
        for i in (0, len(lengths) // 2, len(lengths) - 1):            # every example is the series itself
            e, n = int(ends[part][i]), int(lengths[i])
            np.testing.assert_array_equal(hist[i, :n, 0].numpy(), values[e - n + 1 : e + 1])
            assert (hist[i, n:] == 0).all()
            np.testing.assert_array_equal(targets[i].numpy(), values[e + 1 : e + 1 + K])
    # history lengths vary with the seed; the scaling comes from the training weeks only
    assert not torch.equal(split.train[1], series.make_split(values, horizon=4, seed=1).train[1])
    first_val_target = int(ends["val"].min()) + 1
    assert split.scaling["mean"] == pytest.approx(float(values[:first_val_target].mean()), rel=1e-6)
    assert split.scaling["mean"] < float(values.mean())            # co2 rises: the later weeks are left out


def test_naive_baseline_and_errors():
    hist = torch.tensor([[[1.0], [2.0], [0.0]], [[5.0], [6.0], [7.0]]])   # row 0 has 2 real steps
    naive = series.naive_forecast(hist, torch.tensor([2, 3]), horizon=2)
    assert naive.tolist() == [[2.0, 2.0], [7.0, 7.0]]
    errs = series.errors(naive, torch.tensor([[3.0, 4.0], [7.0, 7.0]]))
    assert errs["mae"] == pytest.approx(0.75) and errs["rmse"] == pytest.approx(np.sqrt(5 / 4))


# ---- padded batches and carried state against the slow path ---------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_padded_rows_equal_the_per_row_reference(cell):
    """Rows of different lengths (0 = no step) from a random state: outputs at real steps and the
    state after exactly each row's steps equal torch.nn run on that row alone."""
    core = rnn.RNNCore(cell, 3, 8, 2).eval()
    lengths = torch.tensor([7, 1, 4, 0, 7])
    x = torch.randn(5, 7, 3)
    config = dataclasses.replace(rnn.Config(cell=cell), hidden=8, layers=2)
    state = random_state(config, 5, seed=1)
    with torch.no_grad():
        out, new = core(x, lengths, state)
        for b, n in enumerate(lengths.tolist()):
            if n == 0:                                                  # no step: the state stays
                for name in state:
                    torch.testing.assert_close(new[name][b], state[name][b], rtol=0, atol=0)
                continue
            ref_out, ref_state = rnn.reference_forward(core, x[b, :n], {k: v[b] for k, v in state.items()})
            torch.testing.assert_close(out[b, :n], ref_out, rtol=0, atol=1e-5)
            for name in state:
                torch.testing.assert_close(new[name][b], ref_state[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_a_series_streamed_in_chunks_gives_the_whole_series_forecast(cell):
    model = small_forecaster(cell)
    whole = 340 + 5 * torch.randn(1, 30, 1)
    with torch.no_grad():
        expected, _ = model(whole)
        state = None
        for a, b in ((0, 11), (11, 12), (12, 30)):                     # a chunk of one step too
            got, state = model(whole[:, a:b], state=state)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        # the same chunks, each batched with a longer unrelated row: the padding changes nothing
        state = None
        for a, b in ((0, 11), (11, 12), (12, 30)):
            other = 340 + 5 * torch.randn(1, 25, 1)
            batch = torch.zeros(2, 25, 1)
            batch[0, : b - a], batch[1] = whole[0, a:b], other[0]
            state = state or rnn.init_state(model.config, 1)
            full_state = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in state.items()}
            out, full_state = model(batch, torch.tensor([b - a, 25]), full_state)
            state = {k: v[:1] for k, v in full_state.items()}
        torch.testing.assert_close(out[:1], expected, rtol=0, atol=1e-4)


# ---- the character LM's serving step --------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_lm_step_with_right_padding_equals_per_row_runs_and_the_full_forward(cell):
    config = rnn_lm.Config(cell=cell, vocab_size=30, n_embd=8, hidden=16, layers=2)
    torch.manual_seed(0)
    model = rnn_lm.Model(config).eval()
    step = rnn_lm.StepModule(model)
    shapes = rnn_lm.state_shapes(config)
    assert rnn_lm.STEP_INPUT_NAMES == ("ids", "n_new", "h", "c")
    assert rnn_lm.STEP_OUTPUT_NAMES == ("logits", "new_h", "new_c")
    assert shapes == {"h": (2, 16), "c": (2, 16 if cell == "lstm" else 0)}
    tokens = torch.randint(0, 30, (3, 9))
    prompt = torch.tensor([6, 2, 1])
    ids = torch.where(torch.arange(6)[None, :] < prompt[:, None], tokens[:, :6], 0)   # right-padded
    zeros = [torch.zeros(3, *shapes[n]) for n in rnn_lm.STATE_NAMES]
    with torch.no_grad():
        logits, h, c = step(ids, prompt, *zeros)
        assert logits.shape == (3, 1, 30) and h.shape == (3, 2, 16) and c.shape == zeros[1].shape
        for b, n in enumerate(prompt.tolist()):                       # == each row run alone, unpadded
            alone, state = model.step(tokens[b : b + 1, :n], rnn.init_state(config, 1))
            torch.testing.assert_close(logits[b, 0], alone[0, n - 1], rtol=0, atol=1e-5)   # its last token
            torch.testing.assert_close(h[b], state["h"][0], rtol=0, atol=1e-5)
            if cell == "lstm":
                torch.testing.assert_close(c[b], state["c"][0], rtol=0, atol=1e-5)
        # then decode one token at a time from the returned state: == the full forward over all tokens
        full = model(tokens)
        steps = [[logits[b]] for b in range(3)]
        pos = prompt.clone()
        for _ in range(3):
            out, h, c = step(tokens[torch.arange(3), pos][:, None], torch.ones(3, dtype=torch.int64), h, c)
            for b in range(3):
                steps[b].append(out[b])
            pos += 1
        for b, n in enumerate(prompt.tolist()):
            torch.testing.assert_close(torch.cat(steps[b]), full[b, n - 1 : n + 3], rtol=0, atol=1e-5)
        # a row with no new tokens keeps its state
        _, h2, c2 = step(ids, torch.tensor([0, 2, 0]), h, c)
        torch.testing.assert_close(h2[[0, 2]], h[[0, 2]], rtol=0, atol=0)
        torch.testing.assert_close(c2[[0, 2]], c[[0, 2]], rtol=0, atol=0)
        assert not torch.equal(h2[1], h[1])


# ---- training and export ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_lstm(tmp_path_factory):
    """tiny (2-layer LSTM) trained for 12 epochs (~8 s): (checkpoint folder, metrics)."""
    out = tmp_path_factory.mktemp("rnn") / "checkpoint"
    cfg = loop.TrainConfig(**{**series.TRAIN, "epochs": 12})
    return out, series.train_forecaster("rnn", "tiny", out, train_cfg=cfg, progress=False)


@pytest.mark.slow
def test_training_beats_the_last_value_baseline(trained_lstm):
    out, metrics = trained_lstm
    assert metrics["naive_test_mae"] == pytest.approx(0.756, abs=0.01)     # the baseline is fixed by the split
    assert metrics["test_mae"] < 0.85 * metrics["naive_test_mae"]
    assert metrics["test_rmse"] < 0.9 * metrics["naive_test_rmse"]
    meta = checkpoint.read_meta(out)
    assert meta["family"] == "rnn" and meta["lineage"]["dataset"] == series.CO2
    assert meta["lineage"]["metrics"]["test_mae"] == metrics["test_mae"]
    model, config = checkpoint.load(out)
    assert config.mean == pytest.approx(meta["lineage"]["training_config"]["model"]["mean"]) and 300 < config.mean < 350


def _ort_run(path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 2          # warnings on: a stale declared shape would print here
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_export_matches_eager_at_several_batches_and_lengths(cell, trained_lstm, tmp_path, capfd):
    if cell == "lstm":
        ckpt = trained_lstm[0]
    else:                                  # layers as in the cell's tiny preset
        model = small_forecaster(cell, layers=make_config("rnn", f"tiny-{cell}").layers)
        ckpt = checkpoint.save(tmp_path / "checkpoint", model, model.config, {"family": "rnn"})
    manifest = export.package(ckpt, tmp_path / "package")
    model, config = checkpoint.load(ckpt)
    reports = {r.format: r for r in manifest.parity}
    assert set(reports) == {"onnx", "torchscript"}
    for r in reports.values():
        assert r.passed and r.max_abs_error <= r.tolerance == 1e-4
        assert r.shapes_checked == [[len(c), max(c)] for c in export_sequence.PARITY_CASES]   # T = 1 included
    assert manifest.kind == "sequence" and manifest.signature.model_dump() == {
        "inputs": [{"name": "series", "datatype": "FP32", "shape": [-1, -1, 1]}],
        "outputs": [{"name": "forecast", "datatype": "FP32", "shape": [-1, 4]}]}
    states = ["h0", "c0"] if cell == "lstm" else ["h0"]
    assert manifest.state.lengths.name == "lengths"
    assert [s.name for s in manifest.state.inputs] == states
    assert [s.name for s in manifest.state.outputs] == [s.replace("0", "n") for s in states]
    # the file itself, in ONNX Runtime, at lengths and a batch the exporter never saw
    onnx_path = tmp_path / "package" / "model.onnx"
    assert not onnx.load(str(onnx_path)).graph.value_info      # no stale traced-T annotations
    inputs = export_sequence.make_inputs(config, (9, 1, 23), seed=3)
    expected = export_sequence.eager_runner(model, config)(inputs)
    capfd.readouterr()
    got = _ort_run(onnx_path, inputs)
    assert "VerifyOutputSizes" not in capfd.readouterr().err
    ts = export_sequence.torchscript_runner(tmp_path / "package" / "model.ts", config)(inputs)
    for name, e in expected.items():
        np.testing.assert_allclose(got[name], e, rtol=0, atol=1e-4)
        np.testing.assert_allclose(ts[name], e, rtol=0, atol=1e-4)
    # whole histories from zero state (the public signature) agree with the plain forward
    with torch.no_grad():
        plain, _ = model(torch.from_numpy(inputs["series"][:1, :9]))
    zero = export_sequence.make_inputs(config, (9,), seed=3, zero_state=True)
    zero["series"] = inputs["series"][:1, :9]
    np.testing.assert_allclose(_ort_run(onnx_path, zero)["forecast"], plain.numpy(), rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_step_export_runs_at_new_lengths_without_stale_shapes(cell, trained_lstm, tmp_path, capfd):
    """The character LM's step through export.package (after a forecaster was exported in this
    process, which left cached aten::lstm kernels): parity stored, and the ONNX file at a T
    the exporter never saw neither warns nor differs from eager."""
    export.package(trained_lstm[0], tmp_path / "forecaster")        # an LSTM exported first, at another T
    config = rnn_lm.Config(cell=cell, vocab_size=30, n_embd=8, hidden=16, layers=2)
    torch.manual_seed(0)
    model = rnn_lm.Model(config).eval()
    ckpt = checkpoint.save(tmp_path / "checkpoint", model, config, {"family": "rnn_lm"})
    manifest = export.package(ckpt, tmp_path / "package")
    assert manifest.kind == "tokens" and {r.format for r in manifest.parity} == {"onnx", "torchscript"}
    assert all(r.passed and r.max_abs_error <= 1e-4 for r in manifest.parity)
    path = tmp_path / "package" / "model.onnx"
    graph = onnx.load(str(path)).graph
    assert not graph.value_info
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 1, 30]
    from training import export_recurrent

    inputs = export_recurrent.step_inputs(rnn_lm, config, batch=3, new=11, seed=5)
    expected = export_recurrent.eager_step_runner(rnn_lm, model)(inputs)
    capfd.readouterr()
    got = _ort_run(path, inputs)
    assert "VerifyOutputSizes" not in capfd.readouterr().err
    for name, e in expected.items():
        np.testing.assert_allclose(got[name], e, rtol=0, atol=1e-4)
