"""The Pallas depthwise 3x3 conv kernels (pallas_kernels.dwconv) against float64 references.

On a CPU the kernels run in Pallas interpret mode (the same kernel code); on a GPU they run
compiled (Triton), in float32 / bf16 against the float64 NumPy definition of test_dwconv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dwconv import numpy_conv, numpy_conv_vjp

from pallas_kernels import dwconv

ON_GPU = jax.default_backend() == "gpu"


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(shape),
        rng.standard_normal((3, 3, shape[-1])),
        rng.standard_normal(shape),
    )


def _silu_and_grad(z):
    s = 1 / (1 + np.exp(-z))
    return z * s, s * (1 + z * (1 - s))


def numpy_conv_act(x, w, dy, act):
    """(y, dx, dw) of ``act(conv(x, w))`` in float64."""
    z = numpy_conv(x, w)
    if not act:
        return (z, *numpy_conv_vjp(x, w, dy))
    y, slope = _silu_and_grad(z)
    return (y, *numpy_conv_vjp(x, w, dy * slope))


def _run(x, w, dy, act, config, dtype):
    fn = lambda a, k: dwconv.dwconv3x3(a, k, act=act, config=config)
    y, vjp = jax.vjp(fn, jnp.asarray(x, dtype), jnp.asarray(w, dtype))
    dx, dw = vjp(jnp.asarray(dy, dtype))
    return y, dx, dw


# Shapes: ragged row blocks (35 and 196 tokens), one-token images, odd widths, channel counts that
# take 64-, 16- and 1-channel blocks.
CASES = [
    ((2, 5, 7, 64), True, dwconv.Config()),
    ((2, 14, 14, 192), True, dwconv.Config()),
    ((1, 9, 3, 48), False, dwconv.Config(block_rows=16, block_channels=32)),
    ((3, 1, 1, 8), True, dwconv.Config(block_rows=16)),
    ((1, 4, 6, 3), False, dwconv.Config(block_rows=16)),
]


@pytest.mark.skipif(ON_GPU, reason="float64 runs interpreted (CPU) only")
@pytest.mark.parametrize("shape,act,config", CASES)
def test_float64_matches_numpy(x64, shape, act, config):
    x, w, dy = _inputs(shape)
    got = _run(x, w, dy, act, config, jnp.float64)
    for name, value, want in zip(
        ("y", "dx", "dw"), got, numpy_conv_act(x, w, dy, act), strict=True
    ):
        assert value.dtype == jnp.float64, name
        np.testing.assert_allclose(value, want, rtol=1e-11, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("shape,act,config", CASES[:3])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 4e-2)])
def test_low_precision_matches_numpy(shape, act, config, dtype, tol):
    """fp32 and bf16 inputs (fp32 arithmetic): errors relative to the largest reference value.

    bf16 rounds the inputs, the output, the cotangent handed to the backward kernel and (with
    SiLU) the recomputed pre-activation: 4e-2 of the largest value."""
    _assert_low_precision(_inputs(shape, seed=1), act, config, dtype, tol)


def _assert_low_precision(inputs, act, config, dtype, tol):
    """y, dx, dw of the kernels in ``dtype`` against float64 NumPy on the inputs rounded to
    ``dtype``: largest error below ``tol`` of the largest reference value."""
    x, w, dy = inputs
    ref = numpy_conv_act(
        *(np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64) for a in (x, w, dy)),
        act,
    )
    for name, value, want in zip(
        ("y", "dx", "dw"), _run(x, w, dy, act, config, dtype), ref, strict=True
    ):
        assert value.dtype == dtype, name
        err = np.max(np.abs(np.asarray(value, np.float64) - want)) / np.max(np.abs(want))
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def test_reference_is_the_definition(x64):
    x, w, dy = _inputs((2, 5, 7, 4))
    np.testing.assert_allclose(
        dwconv.reference(jnp.asarray(x), jnp.asarray(w), act=True),
        numpy_conv_act(x, w, dy, True)[0],
        rtol=1e-12,
        atol=1e-12,
    )


def test_bad_inputs_raise():
    x = jnp.zeros((2, 4, 4, 8))
    with pytest.raises(ValueError, match=r"expected \[B, H, W, C\]"):
        dwconv.dwconv3x3(x[0], jnp.zeros((3, 3, 8)))
    with pytest.raises(ValueError, match=r"expected \(3, 3, 8\)"):
        dwconv.dwconv3x3(x, jnp.zeros((3, 3, 1, 8)))
    with pytest.raises(ValueError, match="block_rows=24; expected a power of two"):
        dwconv.Config(block_rows=24)


SLOPE_CONFIGS = [
    dwconv.Config(save_slope=save, fused_slope=fused)
    for save in (False, True)
    for fused in (False, True)
]


@pytest.mark.skipif(ON_GPU, reason="float64 runs interpreted (CPU) only")
@pytest.mark.parametrize(
    "config", SLOPE_CONFIGS, ids=lambda c: f"save{c.save_slope}-fused{c.fused_slope}"
)
@pytest.mark.parametrize("shape", [(2, 14, 14, 192), (3, 1, 1, 8), (1, 5, 7, 16)])
def test_slope_options_float64_match_numpy(x64, config, shape):
    """Saving the SiLU slope and applying it in the backward kernel change no value."""
    x, w, dy = _inputs(shape, seed=2)
    got = _run(x, w, dy, True, config, jnp.float64)
    for name, value, want in zip(
        ("y", "dx", "dw"), got, numpy_conv_act(x, w, dy, True), strict=True
    ):
        np.testing.assert_allclose(value, want, rtol=1e-11, atol=1e-11, err_msg=name)


@pytest.mark.parametrize(
    "config", SLOPE_CONFIGS, ids=lambda c: f"save{c.save_slope}-fused{c.fused_slope}"
)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 4e-2)])
def test_slope_options_low_precision(config, dtype, tol):
    _assert_low_precision(_inputs((2, 14, 14, 192), seed=3), True, config, dtype, tol)


def test_slope_defaults_follow_the_module_switches(monkeypatch):
    monkeypatch.setattr(dwconv, "SAVE_SLOPE_MAX_TOKENS", 196)
    monkeypatch.setattr(dwconv, "FUSED_SLOPE_BY_DEFAULT", True)
    config = dwconv.Config()
    assert config.saves_slope(196) and not config.saves_slope(197)
    assert config.fuses_slope()
    assert not dwconv.Config(save_slope=False).saves_slope(1)
    assert not dwconv.Config(fused_slope=False).fuses_slope()
    monkeypatch.setattr(dwconv, "SAVE_SLOPE_MAX_TOKENS", 0)
    monkeypatch.setattr(dwconv, "FUSED_SLOPE_BY_DEFAULT", False)
    assert not dwconv.Config().saves_slope(1) and not dwconv.Config().fuses_slope()


@pytest.mark.parametrize(
    "config, act, calls",
    [
        (dwconv.Config(), False, 2),  # forward; backward
        (dwconv.Config(save_slope=False), True, 3),  # forward; slope again, backward
        (dwconv.Config(save_slope=False, fused_slope=True), True, 3),
        (dwconv.Config(save_slope=True), True, 2),  # forward with the slope; backward
        (dwconv.Config(save_slope=True, fused_slope=True), True, 2),
    ],
)
def test_cuda_lowering_runs_the_expected_kernels(config, act, calls):
    """Each option lowers for an H100 (Triton) and the saved slope removes the backward's
    forward kernel."""
    from lowering import TRITON_CALL, h100_lowering

    x = jnp.zeros((8, 14, 14, 192), jnp.bfloat16)
    w = jnp.zeros((3, 3, 192), jnp.bfloat16)

    def loss(a, k):
        y = dwconv.dwconv3x3(a, k, act=act, config=config, interpret=False)
        return jnp.sum(y.astype(jnp.float32))

    text = h100_lowering(jax.value_and_grad(loss, argnums=(0, 1)), x, w)
    assert text.count(TRITON_CALL) == calls
