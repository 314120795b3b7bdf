"""The Pallas gated-output kernels (pallas_kernels.gated_norm) against float64 references.

The forward is checked against a NumPy float64 evaluation of the formula, the hand-written
backward against autodiff of ``gated_norm.reference`` in float64 and against the model's XLA
path (``vig_jax.fused.gated_norm_output``). On a CPU the kernels run in Pallas interpret mode
(the same kernel code); on a GPU they run compiled (Triton) in float32 / bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from agreement import assert_same_value_and_grads
from flax import nnx

from pallas_kernels import gated_norm as gn
from vig_jax import fused
from vig_jax.bigla import BiGLA

ON_GPU = jax.default_backend() == "gpu"
EPS = 1e-5


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    o, c, z, g = (rng.standard_normal(shape) for _ in range(4))
    wo, wc = (1 + 0.5 * rng.standard_normal(shape[-1]) for _ in range(2))
    return (o, c, 2 * z, wo, wc), g


def numpy_forward(o, c, z, wo, wc, act):
    """The formula in float64 NumPy."""

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w

    s = 1 / (1 + np.exp(-z))
    y = s * norm(o, wo) + (1 - s) * norm(c, wc)
    return y / (1 + np.exp(-y)) if act else y


def _vjp(fn, args, g, dtype):
    args = [jnp.asarray(a, dtype) for a in args]
    y, vjp = jax.vjp(fn, *args)
    return (y, *vjp(jnp.asarray(g, dtype)))


def _kernel(act, config=None):
    return lambda *a: gn.gated_norm(*a, eps=EPS, act=act, config=config)


# Rows: 2*37*3 = 222 (ragged against 64 and 16), one row, exact multiples.
CASES = [
    ((2, 37, 3, 64), True, None),
    ((2, 37, 3, 64), False, gn.Config(block_rows=16, num_warps=2)),
    ((1, 16), True, gn.Config(block_rows=32)),
    ((4, 8, 32), False, None),
]


@pytest.mark.skipif(ON_GPU, reason="float64 runs interpreted (CPU) only")
@pytest.mark.parametrize("shape,act,config", CASES)
def test_float64_forward_and_gradients(x64, shape, act, config):
    args, g = _inputs(shape)
    got = _vjp(_kernel(act, config), args, g, jnp.float64)
    want = _vjp(lambda *a: gn.reference(*a, EPS, act), args, g, jnp.float64)
    np.testing.assert_allclose(got[0], numpy_forward(*args, act), rtol=1e-12, atol=1e-12)
    names = ("y", "do", "dc", "dz", "dw_o", "dw_c")
    for name, value, ref in zip(names, got, want, strict=True):
        assert value.dtype == jnp.float64, name
        np.testing.assert_allclose(value, ref, rtol=1e-11, atol=1e-11, err_msg=name)


@pytest.mark.skipif(ON_GPU, reason="float64 runs interpreted (CPU) only")
@pytest.mark.parametrize("act", [False, True])
def test_matches_the_xla_path(x64, act):
    """Same values and gradients as vig_jax.fused.gated_norm_output (the model's default)."""
    args, g = _inputs((3, 20, 2, 32), seed=1)
    got = _vjp(_kernel(act), args, g, jnp.float64)
    xla = lambda o, c, z, wo, wc: fused.gated_norm_output(o, c, z, wo, wc, EPS, act)
    want = _vjp(xla, args, g, jnp.float64)
    for value, ref in zip(got, want, strict=True):
        np.testing.assert_allclose(value, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision(dtype, tol):
    """fp32 / bf16 inputs (fp32 arithmetic): errors relative to the largest reference value."""
    args, g = _inputs((2, 37, 3, 64), seed=2)
    # The reference sees the inputs rounded as the kernel does.
    rounded = [np.asarray(jnp.asarray(a, dtype), np.float64) for a in args]
    with jax.enable_x64(True):
        want = [
            np.asarray(x)
            for x in _vjp(
                lambda *a: gn.reference(*a, EPS, True),
                rounded,
                np.asarray(jnp.asarray(g, dtype), np.float64),
                jnp.float64,
            )
        ]
    got = _vjp(_kernel(True), args, g, dtype)
    for name, value, ref in zip(("y", "do", "dc", "dz", "dw_o", "dw_c"), got, want, strict=True):
        assert value.dtype == dtype, name
        err = np.max(np.abs(np.asarray(value, np.float64) - ref)) / np.max(np.abs(ref))
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def test_bigla_module_with_either_output_path():
    """BiGLA(output_implementation="pallas") computes what the default XLA path computes."""
    u = jax.random.normal(jax.random.key(0), (2, 4, 5, 32))
    kw = dict(conv_act=True, out_act=True, implementation="xla")
    ref = BiGLA(32, 2, **kw, rngs=nnx.Rngs(0))
    ker = BiGLA(32, 2, **kw, output_implementation="pallas", rngs=nnx.Rngs(0))
    loss = lambda m: jnp.sum(jnp.sin(m(u)))
    assert_same_value_and_grads(ref, ker, loss, rtol_value=1e-5, rtol=2e-4, atol=2e-5)


def test_bad_inputs_raise():
    args, _ = _inputs((2, 3, 64))
    o, c, z, wo, wc = (jnp.asarray(a, jnp.float32) for a in args)
    with pytest.raises(ValueError, match="expected one shape"):
        gn.gated_norm(o, c[:, :2], z, wo, wc, eps=EPS)
    with pytest.raises(ValueError, match="power of two"):
        gn.gated_norm(o[..., :48], c[..., :48], z[..., :48], wo[:48], wc[:48], eps=EPS)
    with pytest.raises(ValueError, match=r"expected \(64,\)"):
        gn.gated_norm(o, c, z, wo[:32], wc, eps=EPS)
    with pytest.raises(ValueError, match="block_rows=24"):
        gn.Config(block_rows=24)
    with pytest.raises(ValueError, match="output_implementation='triton'"):
        BiGLA(32, 2, conv_act=True, out_act=True, output_implementation="triton", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="power-of-two head width"):
        BiGLA(48, 2, conv_act=True, out_act=True, output_implementation="pallas", rngs=nnx.Rngs(0))
