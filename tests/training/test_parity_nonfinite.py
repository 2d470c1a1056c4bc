"""Non-finite outputs fail every parity check: the one comparison (training/parity.py), and each
export's parity loop fed an artifact that answers NaN or Inf where eager answers a number.

Before the shared comparison, `max(worst, nan)` kept `worst`: an artifact answering NaN passed
with "max abs error 0". The artifacts here are the eager modules themselves with one output
value replaced (tiny untrained models, no export): the point is the check, not the exporter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training import export, export_generative, export_recurrent, export_sequence, export_tokens
from training.families import make_config
from training.models import decoder, rnn, rnn_lm, vae
from training.parity import describe_error, max_abs_error

torch.set_num_threads(1)
NON_FINITE = [math.nan, math.inf, -math.inf]


# ---- the comparison ------------------------------------------------------------------------------

def test_finite_values_give_the_max_abs_difference():
    expected = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)
    actual = np.array([[1.0, -2.5], [3.0, 4.25]], np.float32)
    assert max_abs_error(expected, actual) == 0.5
    assert max_abs_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


@pytest.mark.parametrize("value", NON_FINITE)
def test_a_non_finite_actual_value_where_expected_is_finite_is_an_infinite_error(value):
    expected = np.array([1.0, 2.0, 3.0], np.float32)
    actual = np.array([1.0, value, 3.0], np.float32)
    assert max_abs_error(expected, actual) == math.inf


def test_a_nan_on_either_side_or_both_is_an_infinite_error():
    finite, nan = np.array([0.0, 1.0]), np.array([0.0, math.nan])
    assert max_abs_error(nan, finite) == math.inf
    assert max_abs_error(finite, nan) == math.inf
    assert max_abs_error(nan, nan) == math.inf            # NaN never agrees, not even with NaN


def test_the_same_infinity_on_both_sides_agrees_and_opposite_ones_do_not():
    infinities = np.array([math.inf, -math.inf, 1.0])
    assert max_abs_error(infinities, infinities.copy()) == 0.0
    assert max_abs_error(infinities, -infinities) == math.inf
    assert max_abs_error(np.array([math.inf]), np.array([1e30])) == math.inf


def test_signed_zeros_agree():
    assert max_abs_error(np.array([-0.0, 0.0]), np.array([0.0, -0.0])) == 0.0


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shape"):
        max_abs_error(np.zeros((2, 1)), np.zeros(2))


def test_an_infinite_error_is_described_as_non_finite():
    assert "non-finite" in describe_error(math.inf)
    assert describe_error(1.5e-5) == "1.5e-05"


# ---- each export's parity loop ---------------------------------------------------------------------

def poisoned(run, value: float):
    """`run` (a dict runner) with the first value of its first output replaced by `value`."""
    def run_poisoned(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(run(inputs))
        first = next(iter(out))
        out[first] = out[first].copy()
        out[first].reshape(-1)[0] = value
        return out
    return run_poisoned


def assert_failed(report: dict) -> None:
    assert report["max_abs_error"] == math.inf and report["passed"] is False
    with pytest.raises(export.ParityError, match="non-finite"):
        export._check(report)


@pytest.mark.parametrize("value", NON_FINITE)
def test_stateless_export_parity_fails_on_a_non_finite_output(value):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).eval()

    def artifact(x: torch.Tensor) -> tuple[np.ndarray]:
        with torch.no_grad():
            y = model(x).numpy().copy()
        y[0, 0] = value
        return (y,)
    assert_failed(export.check_parity(model, artifact, lambda b: (torch.randn(b, 4),), "onnx"))


@pytest.mark.parametrize("value", NON_FINITE)
def test_sequence_export_parity_fails_on_a_non_finite_forecast(value):
    torch.manual_seed(0)
    config = rnn.Config(cell="gru", hidden=8, layers=1, mean=340.0, std=15.0, step_std=0.8)
    model = rnn.Model(config).eval()
    artifact = poisoned(export_sequence.eager_runner(model, config), value)
    assert_failed(export_sequence.check_parity(model, config, artifact, "onnx"))


@pytest.mark.parametrize("value", NON_FINITE)
def test_token_export_parity_fails_on_non_finite_logits(value):
    torch.manual_seed(0)
    config = decoder.Config(vocab_size=31, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=24)
    model = decoder.Model(config).eval()
    artifact = poisoned(export_tokens.eager_step_runner(decoder, model, config), value)
    assert_failed(export_tokens.check_token_parity(model, config, artifact, "onnx"))


@pytest.mark.parametrize("value", NON_FINITE)
def test_recurrent_export_parity_fails_on_non_finite_logits(value):
    torch.manual_seed(0)
    config = rnn_lm.Config(cell="gru", vocab_size=30, n_embd=8, hidden=16, layers=1)
    model = rnn_lm.Model(config).eval()
    artifact = poisoned(export_recurrent.eager_step_runner(rnn_lm, model), value)
    assert_failed(export_recurrent.check_recurrent_parity(rnn_lm, model, config, artifact, "onnx"))


@pytest.mark.parametrize("value", NON_FINITE)
def test_sampler_export_parity_fails_on_a_non_finite_image(value):
    torch.manual_seed(0)
    config = make_config("vae", "tiny")
    model = vae.Model(config).eval()

    def decoder_artifact(z: torch.Tensor) -> tuple[np.ndarray]:
        with torch.no_grad():
            image = model.decoder(z).numpy().copy()
        image.reshape(-1)[0] = value
        return (image,)
    with pytest.raises(export.ParityError, match="non-finite"):
        export_generative._sample_parity("vae", model, config, {"onnx": decoder_artifact})
