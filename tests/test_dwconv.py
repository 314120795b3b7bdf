"""The mixer's depthwise 3x3 convolution (vig_jax.dwconv) against a float64 NumPy loop.

The NumPy reference is the definition (zero padding 1, stride 1, one 3x3 filter per channel)
and its adjoints written out term by term; XLA's own ``lax.conv`` is the second reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from train import trainer
from vig_jax import create_model
from vig_jax.bigla import BiGLA
from vig_jax.dwconv import IMPLEMENTATIONS, depthwise_conv3x3


def numpy_conv(x, w):
    """y[n, i, j, c] = sum_{a, b} xpad[n, i + a, j + b, c] w[a, b, c].

    x [B, H, W, C], w [3, 3, C] -> [B, H, W, C]."""
    b, h, wd, c = x.shape
    xp = np.zeros((b, h + 2, wd + 2, c))
    xp[:, 1:-1, 1:-1] = x
    y = np.zeros(x.shape)
    for i in range(h):
        for j in range(wd):
            y[:, i, j] = np.einsum("nabc,abc->nc", xp[:, i : i + 3, j : j + 3], w)
    return y


def numpy_conv_vjp(x, w, dy):
    """(dx, dw) of ``numpy_conv`` for the cotangent dy, term by term."""
    b, h, wd, c = x.shape
    xp = np.zeros((b, h + 2, wd + 2, c))
    xp[:, 1:-1, 1:-1] = x
    dxp = np.zeros(xp.shape)
    dw = np.zeros(w.shape)
    for i in range(h):
        for j in range(wd):
            dxp[:, i : i + 3, j : j + 3] += dy[:, i, j][:, None, None, :] * w[None]
            dw += np.einsum("nabc,nc->abc", xp[:, i : i + 3, j : j + 3], dy[:, i, j])
    return dxp[:, 1:-1, 1:-1], dw


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((3, 3, shape[-1]))
    dy = rng.standard_normal(shape)
    return x, w, dy


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 1, 4), (3, 2, 9, 1)])
def test_float64_forward_and_gradients_match_numpy(implementation, shape):
    if implementation in ("cudnn", "hybrid") and jax.default_backend() == "gpu":
        pytest.skip("cuDNN has no float64 depthwise convolution (H100: no supported config)")
    x, w, dy = _inputs(shape)
    fn = lambda a, k: depthwise_conv3x3(a, k, implementation=implementation)
    y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w[:, :, None, :]))
    dx, dk = vjp(jnp.asarray(dy))
    want_dx, want_dw = numpy_conv_vjp(x, w, dy)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, numpy_conv(x, w), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk[:, :, 0, :], want_dw, rtol=1e-12, atol=1e-12)


def test_bf16_output_dtype_and_accuracy():
    x, w, _ = _inputs((2, 6, 6, 8), seed=1)
    y = depthwise_conv3x3(
        jnp.asarray(x, jnp.bfloat16),
        jnp.asarray(w[:, :, None, :], jnp.float32),
        dtype=jnp.bfloat16,
    )
    assert y.dtype == jnp.bfloat16
    want = numpy_conv(
        np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64),
        np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64),
    )
    err = np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max()
    assert err < 1e-2


def test_bad_inputs_name_what_was_expected():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"expected \(3, 3, 1, 3\)"):
        depthwise_conv3x3(x, jnp.zeros((3, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"expected \[B, H, W, C\]"):
        depthwise_conv3x3(x[0], jnp.zeros((3, 3, 1, 3)))
    with pytest.raises(ValueError, match="implementation='winograd'"):
        depthwise_conv3x3(x, jnp.zeros((3, 3, 1, 3)), implementation="winograd")
    with pytest.raises(ValueError, match="conv_implementation='fft'"):
        BiGLA(8, 2, conv_act=True, out_act=True, conv_implementation="fft", rngs=nnx.Rngs(0))


def _logits_and_grad(model, images):
    def loss(m):
        return jnp.sum(m(images) ** 2)

    return loss(model), nnx.grad(loss)(model)


def test_vig_gives_the_same_logits_and_gradients_with_either_conv():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    kw = dict(num_classes=10, img_size=32, patch_size=4)
    shifted = create_model("vig_t", rngs=nnx.Rngs(3), **kw)
    cudnn = create_model("vig_t", conv_implementation="cudnn", rngs=nnx.Rngs(3), **kw)
    shifted.eval(), cudnn.eval()
    (v1, g1), (v2, g2) = _logits_and_grad(shifted, images), _logits_and_grad(cudnn, images)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    k1 = g1.blocks[0].attn.in_proj.kernel[...]
    k2 = g2.blocks[0].attn.in_proj.kernel[...]
    np.testing.assert_allclose(k1, k2, rtol=1e-4, atol=1e-6 * float(jnp.abs(k2).max()))


def test_trainer_config_selects_the_conv():
    c = default.get_config("quick")
    c.model.conv_implementation = "cudnn"
    model = trainer.model_builder(c, num_classes=10)()
    assert {b.attn.conv_implementation for b in model.blocks} == {"cudnn"}
