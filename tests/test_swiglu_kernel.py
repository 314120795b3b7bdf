"""pallas_kernels.swiglu: the SwiGLU MLP with its elementwise parts inside the products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import TRITON_CALL, h100_lowering

from pallas_kernels import swiglu


def _inputs(rows, k, hidden, d, seed=0, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (rows, k))
    w_in = jax.random.normal(keys[1], (k, 2 * hidden)) * k**-0.5
    w_out = jax.random.normal(keys[2], (hidden, d)) * hidden**-0.5
    dy = jax.random.normal(keys[3], (rows, d))
    return [a.astype(dtype) for a in (x, w_in, w_out, dy)]


def _value_and_grads(fn, x, w_in, w_out, dy):
    y, vjp = jax.vjp(fn, x, w_in, w_out)
    return (y, *vjp(dy))


def _float64(x, w_in, w_out, dy):
    """The exact formula and its gradients in float64 (numpy), from the same inputs."""
    x, w_in, w_out, dy = (np.asarray(a, np.float64) for a in (x, w_in, w_out, dy))
    h = x @ w_in
    a, b = np.split(h, 2, axis=-1)
    s = 1 / (1 + np.exp(-a))
    z = a * s * b
    dz = dy @ w_out.T
    dh = np.concatenate([dz * b * s * (1 + a * (1 - s)), dz * a * s], axis=-1)
    return z @ w_out, dh @ w_in.T, x.T @ dh, z.T @ dy


def _rel(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize(
    ("rows", "k", "hidden", "d", "config"),
    [
        (
            75,
            192,
            64,
            192,
            swiglu.Config(),
        ),  # ViG-T's K = D = 192 (three 64-wide tiles), ragged rows
        (33, 64, 48, 32, swiglu.Config(block_rows=16, block_features=32)),  # F = 3 x 16
        (128, 32, 128, 16, swiglu.Config(block_features=128, num_warps=2)),
    ],
)
@pytest.mark.parametrize("keep", [True, False])
def test_matches_float64_and_xla_in_bf16(rows, k, hidden, d, config, keep):
    args = _inputs(rows, k, hidden, d, seed=rows)
    fn = lambda x, wi, wo: swiglu.swiglu_mlp(x, wi, wo, keep_output=keep, config=config)
    got = _value_and_grads(fn, *args)
    xla = _value_and_grads(swiglu.reference, *args)
    for name, g, want, ref in zip(
        ("y", "dx", "dw_in", "dw_out"), got, _float64(*args), xla, strict=True
    ):
        assert g.dtype == jnp.bfloat16 and g.shape == want.shape, name
        assert _rel(g, want) < 1e-2, name  # bf16 rounding of h, z, dz and the outputs
        # XLA's form rounds at the same places: the same values up to the products' order
        assert _rel(g, np.asarray(ref, np.float64)) < 4e-3, name


def test_leading_axes_are_rows():
    x, w_in, w_out, _ = _inputs(24, 32, 32, 16)
    y = swiglu.swiglu_mlp(x.reshape(2, 3, 4, 32), w_in, w_out)
    assert y.shape == (2, 3, 4, 16)
    np.testing.assert_array_equal(y.reshape(24, 16), swiglu.swiglu_mlp(x, w_in, w_out))


def test_bad_inputs_name_the_problem():
    x, w_in, w_out, _ = _inputs(8, 32, 32, 16)
    with pytest.raises(ValueError, match="float32"):
        swiglu.swiglu_mlp(x.astype(jnp.float32), w_in, w_out)
    with pytest.raises(ValueError, match=r"w_in has shape \(32, 63\)"):
        swiglu.swiglu_mlp(x, w_in[:, :63], w_out)
    with pytest.raises(ValueError, match=r"w_out has shape \(31, 16\)"):
        swiglu.swiglu_mlp(x, w_in, w_out[:31])
    with pytest.raises(ValueError, match="K=24"):
        swiglu.swiglu_mlp(x[:, :24], w_in[:24], w_out)
    assert swiglu.supports(192, 512, 192) and not swiglu.supports(192, 520, 192)


def test_lowers_to_two_triton_kernels_for_cuda():
    x, w_in, w_out, _ = _inputs(196, 192, 512, 192)
    loss = lambda *a: jnp.sum(swiglu.swiglu_mlp(*a, interpret=False).astype(jnp.float32))
    text = h100_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, w_in, w_out)
    assert text.count(TRITON_CALL) == 2


def test_keep_output_false_recomputes_the_product_input():
    """Without keeping silu(a) * b, the backward recomputes it (one more SiLU in the gradient's
    program than with it kept; the kernels' own SiLUs count in both)."""
    x, w_in, w_out, _ = _inputs(16, 32, 32, 16)

    def sigmoids(keep):
        loss = lambda *a: jnp.sum(swiglu.swiglu_mlp(*a, keep_output=keep).astype(jnp.float32))
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w_in, w_out)).count(
            "logistic"
        )

    assert sigmoids(False) == sigmoids(True) + 1
