"""The chunked pure-JAX form (``implementation="xla"``) against the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bigla
from pallas_kernels.bigla import api, xla
from pallas_kernels.bigla.testing import cast_inputs, random_inputs, reference_vjp, relative_error

SHAPES = [  # (B, N, H, Dk, Dv): N below, at and not a multiple of the chunk; B*H odd
    (1, 5, 3, 16, 32),
    (3, 61, 1, 64, 32),
    (1, 197, 3, 32, 64),
]


def _output_and_grads(fn, q, k, v, gf, gb, do):
    out, vjp = jax.vjp(jax.jit(fn), q, k, v, gf, gb)
    return out, vjp(jnp.asarray(do, out.dtype))


@pytest.mark.parametrize("gates", ["random", "steep", "flat"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_forward_and_gradients_match_float64_reference(shape, gates):
    arrays = cast_inputs(random_inputs(sum(shape), *shape, gates=gates), np.float32)
    want, want_grads = reference_vjp(*arrays)
    out, grads = _output_and_grads(xla.bigla_xla, *arrays)
    assert out.dtype == jnp.float32
    assert relative_error(out, want) < 1e-5
    for name, got, ref in zip(("dq", "dk", "dv", "dgf", "dgb"), grads, want_grads, strict=True):
        assert got.dtype == jnp.float32, name
        assert relative_error(got, ref) < 1e-5, name


@pytest.mark.parametrize("shape", [(1, 197, 3, 32, 64)])
def test_bf16_forward_and_gradients_match_float64_reference(shape):
    arrays = cast_inputs(random_inputs(7, *shape), jnp.bfloat16)
    want, want_grads = reference_vjp(*arrays)
    out, grads = _output_and_grads(xla.bigla_xla, *arrays)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, want) < 1e-2
    for name, got, ref in zip(("dq", "dk", "dv", "dgf", "dgb"), grads, want_grads, strict=True):
        assert relative_error(got, ref) < 1e-2, name


@pytest.mark.parametrize("chunk_size", [16, 128])
def test_chunk_size_does_not_change_the_result(chunk_size):
    arrays = cast_inputs(random_inputs(3, 3, 61, 1, 64, 32, gates="steep"), np.float32)
    want, want_grads = reference_vjp(*arrays)
    fn = lambda *a: xla.bigla_xla(*a, chunk_size=chunk_size)
    out, grads = _output_and_grads(fn, *arrays)
    assert relative_error(out, want) < 1e-5
    for got, ref in zip(grads, want_grads, strict=True):
        assert relative_error(got, ref) < 1e-5


def test_explicit_scale_matches_reference():
    q, k, v, gf, gb, do = random_inputs(4, 1, 5, 3, 16, 32)
    want, _ = reference_vjp(q, k, v, gf, gb, do, scale=0.3)
    got = xla.bigla_xla(*(x.astype(np.float32) for x in (q, k, v, gf, gb)), scale=0.3)
    assert relative_error(got, want) < 1e-5


def test_extreme_gates_stay_finite():
    """Gates of -1e4 per step would overflow any exp(+cumsum) factorisation.

    The float64 reference itself is compared at gates clipped to -50 (exp(-50) ~ 2e-22, so the
    output and all gradients agree to far below the tolerance). Exponents are sums of the gates
    of at most one 16-token sub-chunk, accurate to ~eps * sum|g| there: exact here (gates of 0
    and -1e4), ~40 eps for ViG's steepest gates.
    """
    q, k, v, gf, gb, do = cast_inputs(random_inputs(5, 3, 61, 1, 64, 32), np.float32)
    gf = np.full_like(gf, -1e4)
    gb = np.where(np.arange(61)[None, :, None, None] % 2 == 0, -1e4, 0.0) + np.zeros_like(gb)
    gb = gb.astype(np.float32)
    want, want_grads = reference_vjp(q, k, v, np.maximum(gf, -50), np.maximum(gb, -50), do)
    out, grads = _output_and_grads(xla.bigla_xla, q, k, v, gf, gb, do)
    assert relative_error(out, want) < 1e-5
    for got, ref in zip(grads, want_grads, strict=True):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max() + 1e-20)


def test_is_the_default_on_cpu_and_reachable_through_the_api():
    assert api.default_implementation("cpu") == "xla"
    arrays = cast_inputs(random_inputs(6, 1, 20, 1, 16, 32), np.float32)[:5]
    np.testing.assert_array_equal(bigla(*arrays), xla.bigla_xla(*arrays))


def test_bad_chunk_size_raises():
    q = np.zeros((1, 8, 1, 16), np.float32)
    v = np.zeros((1, 8, 1, 32), np.float32)
    with pytest.raises(ValueError, match="chunk_size=24"):
        xla.bigla_xla(q, q, v, q, q, chunk_size=24)
