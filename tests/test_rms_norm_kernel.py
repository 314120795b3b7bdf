"""The Pallas RMSNorm kernels (pallas_kernels.rms_norm) against float64 references.

The forward is checked against NumPy float64, the hand-written backward against autodiff of
``rms_norm.reference`` in float64 and against the model's XLA path (``vig_jax.fused.rms_norm``).
On a CPU the kernels run in Pallas interpret mode (the same kernel code); on a GPU they run
compiled (Triton) in float32 / bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lowering import TRITON_CALL, h100_lowering

from pallas_kernels import rms_norm as rn
from vig_jax import fused, layers

ON_GPU = jax.default_backend() == "gpu"
EPS = 1e-6


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x, g = rng.standard_normal(shape), rng.standard_normal(shape)
    return (3 * x, 1 + 0.5 * rng.standard_normal(shape[-1])), g


def numpy_forward(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def _vjp(fn, args, g, dtype):
    args = [jnp.asarray(a, dtype) for a in args]
    y, vjp = jax.vjp(fn, *args)
    return (y, *vjp(jnp.asarray(g, dtype)))


def _kernel(config=None):
    return lambda x, w: rn.rms_norm(x, w, eps=EPS, config=config)


# Rows ragged against the row blocks; widths of one tile (16, 64), ViG-T's three 64-wide tiles
# (192) and ViG-S's three 128-wide ones (384).
CASES = [
    ((2, 37, 192), None),
    ((1, 16), rn.Config(block_rows=16, num_warps=2)),
    ((3, 70, 384), rn.Config(block_rows=64)),
    ((5, 64), None),
]


@pytest.mark.skipif(ON_GPU, reason="float64 runs interpreted (CPU) only")
@pytest.mark.parametrize("shape,config", CASES)
def test_float64_forward_and_gradients(x64, shape, config):
    args, g = _inputs(shape)
    got = _vjp(_kernel(config), args, g, jnp.float64)
    want = _vjp(lambda x, w: rn.reference(x, w, EPS, jnp.float64), args, g, jnp.float64)
    np.testing.assert_allclose(got[0], numpy_forward(*args), rtol=1e-13, atol=1e-13)
    for name, value, ref in zip(("y", "dx", "dw"), got, want, strict=True):
        assert value.dtype == jnp.float64, name
        np.testing.assert_allclose(value, ref, rtol=1e-11, atol=1e-11, err_msg=name)


@pytest.mark.skipif(ON_GPU, reason="float64 runs interpreted (CPU) only")
def test_matches_the_xla_path(x64):
    args, g = _inputs((4, 9, 192), seed=1)
    got = _vjp(_kernel(), args, g, jnp.float64)
    want = _vjp(lambda x, w: fused.rms_norm(x, w, EPS, jnp.float64), args, g, jnp.float64)
    for value, ref in zip(got, want, strict=True):
        np.testing.assert_allclose(value, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_low_precision(dtype, tol):
    """fp32 / bf16 inputs (fp32 arithmetic, fp32 weight): errors relative to the largest
    reference value, the reference seeing the inputs rounded as the kernel does."""
    (x, w), g = _inputs((3, 70, 192), seed=2)
    xr, gr = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, g))
    with jax.enable_x64(True):
        want = _vjp(lambda x, w: rn.reference(x, w, EPS, jnp.float64), (xr, w), gr, jnp.float64)
        want = [np.asarray(v) for v in want]
    xd, wd = jnp.asarray(x, dtype), jnp.asarray(w, jnp.float32)
    y, vjp = jax.vjp(lambda x, w: rn.rms_norm(x, w, eps=EPS, out_dtype=dtype), xd, wd)
    got = (y, *vjp(jnp.asarray(g, dtype)))
    for name, value, ref in zip(("y", "dx", "dw"), got, want, strict=True):
        assert value.dtype == (jnp.float32 if name == "dw" else dtype), name
        err = np.max(np.abs(np.asarray(value, np.float64) - ref)) / np.max(np.abs(ref))
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def test_norm_module_with_either_implementation():
    x = jax.random.normal(jax.random.key(0), (2, 7, 192))
    out = []
    for impl in ("xla", "pallas"):
        norm = layers.rms_norm(192, dtype=jnp.bfloat16, implementation=impl, rngs=nnx.Rngs(0))
        loss = lambda m, x: jnp.sum(jnp.sin(m(x).astype(jnp.float32)))
        out.append(nnx.value_and_grad(loss, argnums=(0, 1))(norm, x))
    (l0, (m0, x0)), (l1, (m1, x1)) = out
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(x1, x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m1.scale[...], m0.scale[...], rtol=1e-4, atol=1e-4)


def test_cuda_lowering_has_two_triton_calls():
    x, w = jnp.zeros((2 * 197, 192), jnp.bfloat16), jnp.ones(192, jnp.float32)

    def loss(x, w):
        return jnp.sum(rn.rms_norm(x, w, eps=EPS, interpret=False).astype(jnp.float32))

    text = h100_lowering(jax.value_and_grad(loss, argnums=(0, 1)), x, w)
    assert text.count(TRITON_CALL) == 2


def test_defaults_and_bad_inputs(monkeypatch):
    monkeypatch.setattr(layers, "PALLAS_NORM_BY_DEFAULT", True)
    assert layers.default_norm_implementation(192, backend="gpu") == "pallas"
    assert layers.default_norm_implementation(192, backend="cpu") == "xla"
    assert layers.default_norm_implementation(40, backend="gpu") == "xla"
    monkeypatch.setattr(layers, "PALLAS_NORM_BY_DEFAULT", False)
    assert layers.default_norm_implementation(192, backend="gpu") == "xla"
    assert rn.tile_width(192) == 64 and rn.tile_width(768) == 128 and rn.tile_width(24) is None
    x, w = jnp.ones((3, 64)), jnp.ones(64)
    with pytest.raises(ValueError, match=r"expected \(64,\)"):
        rn.rms_norm(x, w[:32], eps=EPS)
    with pytest.raises(ValueError, match="divisible by 16"):
        rn.rms_norm(x[:, :40], w[:40], eps=EPS)
    with pytest.raises(ValueError, match="block_rows=24"):
        rn.Config(block_rows=24)
    with pytest.raises(ValueError, match="implementation='triton'"):
        layers.rms_norm(64, implementation="triton", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dim = 40"):
        layers.rms_norm(40, implementation="pallas", rngs=nnx.Rngs(0))
