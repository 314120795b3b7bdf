"""Our Flax models against the independent float64 NumPy forward pass (`numpy_vig.py`).

Random weights with the official key names go through `vig_jax.convert` into our model; the
float32 logits must agree with float64 NumPy to 1e-5 relative error (max-abs error over the
max-abs reference), the bar of issue 2.
"""

import numpy as np
import pytest
from flax import nnx
from numpy_vig import vig_forward, vig_h_forward
from official_state_dict import official_state_dict

from vig_jax import create_model
from vig_jax.convert import convert_state_dict

NUM_CLASSES = 10
TOLERANCE = 1e-5


def relative_error(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def converted_model(name, state_dict, **kwargs):
    model = create_model(name, num_classes=NUM_CLASSES, **kwargs)
    nnx.update(model, convert_state_dict(state_dict, name, num_classes=NUM_CLASSES, **kwargs))
    model.eval()
    return model


@nnx.jit
def logits_of(model, images):
    return model(images)


@nnx.jit
def logits_and_stages_of(model, images):
    return model(images), model.forward_features(images, return_stages=True)


def float64(state_dict):
    return {k: v.astype(np.float64) for k, v in state_dict.items()}


@pytest.mark.parametrize("image_size", [224, 160])
def test_vig_t_logits_match_float64_numpy(image_size):
    rng = np.random.default_rng(0)
    sd = official_state_dict("vig_t", rng, num_classes=NUM_CLASSES)
    images = rng.standard_normal((2, image_size, image_size, 3)).astype(np.float32)
    want = vig_forward(float64(sd), images.astype(np.float64), name="vig_t")
    got = logits_of(converted_model("vig_t", sd), images)
    assert got.shape == (2, NUM_CLASSES)
    assert relative_error(got, want) < TOLERANCE


def test_vig_s_tokens_match_float64_numpy():
    """ViG-S differs from ViG-T in its quirks (no SiLU after the conv or before o_proj)."""
    rng = np.random.default_rng(1)
    sd = official_state_dict("vig_s", rng, num_classes=NUM_CLASSES)
    images = rng.standard_normal((1, 96, 96, 3)).astype(np.float32)
    want = vig_forward(float64(sd), images.astype(np.float64), name="vig_s")
    got = logits_of(converted_model("vig_s", sd), images)
    assert relative_error(got, want) < TOLERANCE


def test_vig_h_t_logits_and_stages_match_float64_numpy():
    rng = np.random.default_rng(2)
    sd = official_state_dict("vig_h_t", rng, num_classes=NUM_CLASSES)
    images = rng.standard_normal((1, 128, 128, 3)).astype(np.float32)
    sd64 = float64(sd)
    model = converted_model("vig_h_t", sd)
    want = vig_h_forward(sd64, images.astype(np.float64), name="vig_h_t")
    want_stages = vig_h_forward(sd64, images.astype(np.float64), name="vig_h_t", return_stages=True)
    got, got_stages = logits_and_stages_of(model, images)
    assert relative_error(got, want) < TOLERANCE
    assert [s.shape for s in got_stages] == [s.shape for s in want_stages]
    for got, want in zip(got_stages, want_stages, strict=True):
        assert relative_error(got, want) < TOLERANCE
