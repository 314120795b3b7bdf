"""The Pallas forget-gate kernels (pallas_kernels.gates) against float64 references.

The forward is checked against NumPy float64 (``logsigmoid(low @ W + b) / n``), the
hand-written backward against autodiff of ``gates.reference`` in float64, and the BiGLA module
with either gate implementation against the other. On a CPU the kernels run in Pallas interpret
mode (the same kernel code); on a GPU they run compiled (Triton) in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from agreement import assert_same_value_and_grads
from flax import nnx
from lowering import TRITON_CALL, h100_lowering

from pallas_kernels import gates
from vig_jax import bigla as vig_bigla
from vig_jax.bigla import BiGLA, default_gate_implementation

ON_GPU = jax.default_backend() == "gpu"
NORMALIZER = 16.0


def _inputs(lead, rank, key_dim, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((*lead, rank))
    kernel = rng.standard_normal((rank, 2 * key_dim))
    bias = rng.standard_normal(2 * key_dim)
    cotangents = tuple(rng.standard_normal((*lead, key_dim)) for _ in range(2))
    return (low, kernel, bias), cotangents


def numpy_forward(low, kernel, bias):
    """(gf, gb) in float64 NumPy."""
    x = low @ kernel + bias
    y = (np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))) / NORMALIZER
    half = kernel.shape[1] // 2
    return y[..., :half], y[..., half:]


def _vjp(fn, args, cotangents, dtype):
    args = [jnp.asarray(a, dtype) for a in args]
    y, vjp = jax.vjp(fn, *args)
    return (*y, *vjp(tuple(jnp.asarray(g, dtype) for g in cotangents)))


def _kernel(config=None):
    return lambda *a: gates.log_gates(*a, normalizer=NORMALIZER, config=config)


def _reference(*args):
    return gates.reference(*args, NORMALIZER)


NAMES = ("gf", "gb", "dlow", "dkernel", "dbias")
# Rows: 2*37 = 74 (ragged against 64 and 16), one row, exact multiples; gate widths 96 (ViG-T's
# three 32-wide tiles), 16, 256 (two 128-wide tiles), rank 32.
CASES = [
    ((2, 37), 16, 96, None),
    ((1,), 16, 16, gates.Config(block_rows=16, num_warps=2)),
    ((4, 32), 16, 256, gates.Config(block_rows=32)),
    ((3, 5), 32, 48, None),
]


@pytest.mark.skipif(ON_GPU, reason="float64 runs interpreted (CPU) only")
@pytest.mark.parametrize("lead,rank,key_dim,config", CASES)
def test_float64_forward_and_gradients(x64, lead, rank, key_dim, config):
    args, cotangents = _inputs(lead, rank, key_dim)
    got = _vjp(_kernel(config), args, cotangents, jnp.float64)
    want = _vjp(_reference, args, cotangents, jnp.float64)
    for value, ref in zip(got[:2], numpy_forward(*args), strict=True):
        np.testing.assert_allclose(value, ref, rtol=1e-13, atol=1e-14)
    for name, value, ref in zip(NAMES, got, want, strict=True):
        assert value.dtype == jnp.float64, name
        assert value.shape == ref.shape, name
        np.testing.assert_allclose(value, ref, rtol=1e-11, atol=1e-12, err_msg=name)


def test_steep_logits_stay_finite():
    """Logits of +-200 (sigmoid saturated): the gates are 0 or x/16, the gradients 1/16 or 0."""
    low = jnp.zeros((4, 16), jnp.float32).at[:, 0].set(jnp.array([1.0, -1.0, 0.5, -0.5]))
    kernel = jnp.zeros((16, 32), jnp.float32).at[0].set(400.0)
    bias = jnp.zeros(32, jnp.float32)
    (gf, gb), vjp = jax.vjp(_kernel(), low, kernel, bias)
    x = np.asarray(low[:, :1] * 400.0)
    np.testing.assert_allclose(gf, np.broadcast_to(np.minimum(x, 0) / NORMALIZER, gf.shape))
    dlow, dkernel, dbias = vjp((jnp.ones_like(gf), jnp.zeros_like(gb)))
    for value in (dlow, dkernel, dbias):
        assert np.all(np.isfinite(value))
    # d gf / d x = sigmoid(-x) / 16: 1/16 for the negative logits, 0 for the positive ones.
    np.testing.assert_allclose(dbias[:16], np.full(16, 2 / NORMALIZER), rtol=1e-6)


def test_float32_against_float64():
    """fp32 inputs (HIGHEST-precision products): relative errors of every output below 1e-5."""
    args, cotangents = _inputs((3, 70), 16, 96, seed=2)
    got = _vjp(_kernel(), args, cotangents, jnp.float32)
    rounded = [np.asarray(np.float32(a), np.float64) for a in args]
    with jax.enable_x64(True):
        want = [
            np.asarray(x)
            for x in _vjp(_reference, rounded, [np.float32(g) for g in cotangents], jnp.float64)
        ]
    for name, value, ref in zip(NAMES, got, want, strict=True):
        assert value.dtype == jnp.float32, name
        err = np.max(np.abs(np.asarray(value, np.float64) - ref)) / np.max(np.abs(ref))
        assert err < 1e-5, f"{name}: relative error {err:.3g}"


def test_bf16_inputs_give_fp32_gates():
    args, _ = _inputs((2, 9), 16, 32, seed=3)
    gf, gb = _kernel()(*(jnp.asarray(a, jnp.bfloat16) for a in args))
    assert gf.dtype == gb.dtype == jnp.float32
    want = numpy_forward(*(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in args))
    np.testing.assert_allclose(gf, want[0], rtol=1e-5, atol=1e-6)


def test_bigla_module_with_either_gate_path():
    """BiGLA(gate_implementation="pallas") computes what the XLA gate path computes."""
    u = jax.random.normal(jax.random.key(0), (2, 4, 5, 64))
    kw = dict(conv_act=True, out_act=True, implementation="xla", output_implementation="xla")
    ref = BiGLA(64, 2, **kw, gate_implementation="xla", rngs=nnx.Rngs(0))
    ker = BiGLA(64, 2, **kw, gate_implementation="pallas", rngs=nnx.Rngs(0))
    loss = lambda m: jnp.sum(jnp.sin(m(u)))
    assert_same_value_and_grads(ref, ker, loss, rtol_value=1e-5, rtol=2e-4, atol=2e-5)


def test_default_gate_implementation(monkeypatch):
    monkeypatch.setattr(vig_bigla, "PALLAS_GATES_BY_DEFAULT", True)
    assert default_gate_implementation(96, backend="gpu") == "pallas"
    assert default_gate_implementation(96, backend="cpu") == "xla"
    assert default_gate_implementation(24, backend="gpu") == "xla"  # no 16-wide tile
    monkeypatch.setattr(vig_bigla, "PALLAS_GATES_BY_DEFAULT", False)
    assert default_gate_implementation(96, backend="gpu") == "xla"
    assert gates.tile_width(96) == 32 and gates.tile_width(512) == 128
    assert gates.tile_width(24) is None


def test_cuda_lowering_has_two_triton_calls():
    """Forward and backward lower for the H100 (Triton) as exactly two kernels."""
    low = jnp.zeros((2 * 197, 16), jnp.float32)
    kernel, bias = jnp.zeros((16, 192), jnp.float32), jnp.zeros(192, jnp.float32)

    def loss(*args):
        gf, gb = gates.log_gates(*args, normalizer=NORMALIZER, interpret=False)
        return jnp.sum(gf * gb)

    text = h100_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2)), low, kernel, bias)
    assert text.count(TRITON_CALL) == 2


def test_bad_inputs_raise():
    (low, kernel, bias), _ = _inputs((2, 3), 16, 32)
    low, kernel, bias = (jnp.asarray(a, jnp.float32) for a in (low, kernel, bias))
    with pytest.raises(ValueError, match=r"expected low \[..., r\]"):
        gates.log_gates(low[:, :, :8], kernel, bias, normalizer=NORMALIZER)
    with pytest.raises(ValueError, match=r"expected \(64,\)"):
        gates.log_gates(low, kernel, bias[:32], normalizer=NORMALIZER)
    with pytest.raises(ValueError, match="gate width 12"):
        gates.log_gates(low, kernel[:, :24], bias[:24], normalizer=NORMALIZER)
    with pytest.raises(ValueError, match="block_rows=8"):
        gates.Config(block_rows=8)
    with pytest.raises(ValueError, match="gate_implementation='triton'"):
        BiGLA(32, 2, conv_act=True, out_act=True, gate_implementation="triton", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dim = 40"):
        BiGLA(40, 2, conv_act=True, out_act=True, gate_implementation="pallas", rngs=nnx.Rngs(0))
