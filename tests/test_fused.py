"""vig_jax.fused: values and hand-written gradients against autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vig_jax import fused
from vig_jax.layers import RMS_EPS, RMSNorm

pytestmark = pytest.mark.usefixtures("x64")


def _plain_rms(x, w, eps=RMS_EPS):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _plain_gated(o, c, z, wo, wc, out_act, eps=RMS_EPS):
    s = jax.nn.sigmoid(z)
    y = s * _plain_rms(o, wo, eps) + (1 - s) * _plain_rms(c, wc, eps)
    return jax.nn.silu(y) if out_act else y


def _plain_swiglu(h):
    a, b = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(a) * b


def _random(shape, seed, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def _check_vjp(fn, plain, args, dtype, tol):
    """fn(args in dtype) vs plain(args in float64): value and the gradient of <out, ct>."""
    args64 = [a.astype(jnp.float64) for a in args]
    ct = _random(plain(*args64).shape, 99)
    want, want_vjp = jax.vjp(plain, *args64)
    got, got_vjp = jax.vjp(fn, *[a.astype(dtype) for a in args])
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(jnp.float64), want, rtol=tol, atol=tol)
    for g, w in zip(got_vjp(ct.astype(dtype)), want_vjp(ct), strict=True):
        assert g.dtype == dtype
        err = jnp.max(jnp.abs(g.astype(jnp.float64) - w)) / jnp.max(jnp.abs(w))
        assert err < tol, float(err)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_rms_norm_matches_autodiff(dtype, tol):
    x, w = _random((4, 7, 48), 0, 3.0), 1 + _random((48,), 1, 0.3)
    _check_vjp(
        lambda x, w: fused.rms_norm(x, w, RMS_EPS, jnp.dtype(dtype)), _plain_rms, [x, w], dtype, tol
    )


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_swiglu_matches_autodiff(dtype, tol):
    _check_vjp(fused.swiglu, _plain_swiglu, [_random((3, 5, 64), 2, 2.0)], dtype, tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_log_gate_matches_autodiff(dtype, tol):
    """Logits from -40 to 40: the gradient from the output alone holds where sigmoid(-x) is
    tiny (x = 40: ~4e-18) and where it is ~1."""
    x = jnp.concatenate([_random((150,), 4, 6.0), jnp.linspace(-40.0, 40.0, 81)])

    def plain(x):
        return jax.nn.log_sigmoid(x) / 16.0

    _check_vjp(lambda x: fused.log_gate(x, 16.0), plain, [x], dtype, tol)
    g = jax.grad(lambda x: jnp.sum(fused.log_gate(x, 16.0)))(jnp.array([40.0, -40.0], dtype))
    want = np.array([np.exp(-40.0), 1 / (1 + np.exp(-40.0))]) / 16
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=100 * tol)


@pytest.mark.parametrize("out_act", [True, False])
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_gated_norm_output_matches_autodiff(dtype, tol, out_act):
    shape = (2, 9, 3, 32)
    args = [
        _random(shape, 3, 2.0),
        _random(shape, 4, 0.5),
        _random(shape, 5, 3.0),
        1 + _random((32,), 6, 0.3),
        1 + _random((32,), 7, 0.3),
    ]

    def fn(o, c, z, wo, wc):
        return fused.gated_norm_output(o, c, z, wo, wc, RMS_EPS, out_act)

    def plain(o, c, z, wo, wc):
        return _plain_gated(o, c, z, wo, wc, out_act)

    _check_vjp(fn, plain, args, dtype, tol)


def test_bf16_inputs_give_bf16_outputs_close_to_fp32():
    o, c, z = (_random((2, 16, 3, 64), s).astype(jnp.bfloat16) for s in (8, 9, 10))
    w = jnp.ones((64,), jnp.float32)
    got = fused.gated_norm_output(o, c, z, w, w, RMS_EPS, True)
    want = _plain_gated(*(a.astype(jnp.float64) for a in (o, c, z, w, w)), True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float64), want, rtol=1e-2, atol=1e-2)


def test_rms_norm_module_matches_flax_and_keeps_its_parameter():
    x = _random((2, 5, 24), 11, 2.0).astype(jnp.float32)
    ours = RMSNorm(24, epsilon=RMS_EPS, rngs=nnx.Rngs(0))
    ours.scale[...] = 1 + _random((24,), 12, 0.2).astype(jnp.float32)
    flax_norm = nnx.RMSNorm(24, epsilon=RMS_EPS, rngs=nnx.Rngs(0))
    flax_norm.scale[...] = ours.scale[...]
    paths = lambda m: {path for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert paths(ours) == paths(flax_norm) == {("scale",)}
    np.testing.assert_allclose(ours(x), flax_norm(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        ours(x, mask=jnp.ones(x.shape, bool))


def _residual_bytes(block, x) -> int:
    """Bytes of activations (batch-leading arrays) that reverse-mode autodiff keeps from the
    forward pass of ``block(x)``, without the BiGLA op's own residuals (those of its kernels)."""
    from jax._src.ad_checkpoint import saved_residuals

    graph, params = nnx.split(block)

    def loss(params, x):
        return nnx.merge(graph, params)(x).astype(jnp.float32).sum()

    return sum(
        int(np.prod(aval.shape)) * aval.dtype.itemsize
        for aval, source in saved_residuals(loss, params, x)
        if aval.shape and aval.shape[0] == x.shape[0] and "pallas_kernels" not in source
    )


def test_vig_block_keeps_few_activations_for_the_backward_pass():
    """bf16 ViG-T block: the residuals outside the BiGLA op (x, the two norm outputs, c, the
    gates' low-rank product, o, the gate logits, the SwiGLU hidden state) take ~27 bytes per
    token and channel; plain autodiff of the same block kept ~123 at ee96861 (fp32 norm
    intermediates, gate logits, SwiGLU products), and keeping the fp32 log gates beside BiGLA's
    copy of them took 31 (006b448: +426 MiB at 1024 px, batch 8, on the H100)."""
    from vig_jax import create_model

    model = create_model("vig_t", dtype=jnp.bfloat16, implementation="xla", rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 8, 8, 192), jnp.bfloat16)
    per_token_channel = _residual_bytes(model.blocks[0], x) / x.size
    assert per_token_channel < 28, per_token_channel
