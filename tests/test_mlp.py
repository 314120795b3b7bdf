"""SwiGLU / GatedMlp: keeping swiglu(h) for the backward pass or recomputing it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vig_jax import layers


def _sigmoids_in_grad(mlp, x) -> int:
    """``logistic`` ops in the jaxpr of the MLP's gradient: the SiLU's forward (once more when
    swiglu(h) is recomputed for the backward pass) and its derivative."""
    graphdef, state = nnx.split(mlp)
    loss = lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(x)))
    return str(jax.make_jaxpr(jax.grad(loss))(state)).count("= logistic")


@pytest.mark.parametrize("cls", [layers.SwiGLU, layers.GatedMlp])
def test_keep_limit_picks_remat_by_tokens_and_keeps_values(monkeypatch, cls):
    mlp = cls(32, 64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 32))  # 12 tokens per image
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    seen = {}
    for limit in (0, 11, 12):
        monkeypatch.setattr(layers, "SWIGLU_KEEP_MAX_TOKENS", limit)
        seen[limit] = _sigmoids_in_grad(mlp, x)
        if limit == 12:
            kept = nnx.value_and_grad(loss)(mlp)
    assert seen[0] == seen[11] == seen[12] + 1, seen  # recomputed below 12 tokens, kept at 12
    monkeypatch.setattr(layers, "SWIGLU_KEEP_MAX_TOKENS", 0)
    recomputed = nnx.value_and_grad(loss)(mlp)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(recomputed), strict=True):
        assert jnp.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("cls", "keep_limit"), [(layers.SwiGLU, 0), (layers.GatedMlp, 35)])
def test_pallas_form_keeps_values_and_gradients(monkeypatch, cls, keep_limit):
    """The Pallas kernels (interpret mode here) against the XLA form, bf16 compute, with
    swiglu(h) recomputed (limit 0) or kept (35 tokens an image)."""
    monkeypatch.setattr(layers, "SWIGLU_KEEP_MAX_TOKENS", keep_limit)
    mlp = cls(64, 96, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 64))
    loss = lambda m: jnp.sum(jnp.sin(m(x).astype(jnp.float32)))
    results = {}
    for implementation in ("xla", "pallas"):
        monkeypatch.setattr(layers, "default_swiglu_implementation", lambda *a, i=implementation: i)
        results[implementation] = nnx.value_and_grad(loss)(mlp)
    (v_xla, g_xla), (v_pallas, g_pallas) = results["xla"], results["pallas"]
    np.testing.assert_allclose(v_pallas, v_xla, rtol=2e-3)
    for a, b in zip(jax.tree.leaves(g_pallas), jax.tree.leaves(g_xla), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        assert np.linalg.norm(a - b) <= 5e-3 * np.linalg.norm(b)


def test_pallas_form_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(layers, "PALLAS_SWIGLU_BY_DEFAULT", True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    pick = lambda dtype, hidden=96: layers.default_swiglu_implementation(
        *(lambda m: (m.gate_proj, m.down_proj))(
            layers.SwiGLU(64, hidden, dtype=dtype, rngs=nnx.Rngs(0))
        )
    )
    assert pick(jnp.bfloat16) == "pallas"
    assert pick(jnp.float32) == "xla"  # fp32 products stay XLA's
    assert pick(jnp.bfloat16, hidden=100) == "xla"  # F = 100 does not tile
    monkeypatch.setattr(layers, "PALLAS_SWIGLU_BY_DEFAULT", False)
    assert pick(jnp.bfloat16) == "xla"
