"""Two NNX modules (or one module under two settings of a switch) with the same parameters, one
scalar loss: same value and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def assert_same_value_and_grads(ref, other, loss, *, rtol_value: float, rtol: float, atol: float):
    """``nnx.value_and_grad(loss)`` of ``other`` equals that of ``ref``: the value to
    ``rtol_value``, every parameter gradient to ``rtol`` / ``atol``."""
    (value_ref, grads_ref), (value, grads) = (nnx.value_and_grad(loss)(m) for m in (ref, other))
    np.testing.assert_allclose(value, value_ref, rtol=rtol_value)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def assert_switch_changes_no_value(
    monkeypatch, module, name: str, model, x, *, convs: tuple[int, int], rtol: float, atol: float
):
    """Setting ``module.name`` to False, then True, gives ``model`` the same loss and parameter
    gradients at ``x``, while the number of ``lax.conv`` ops in its forward jaxpr goes from
    ``convs[0]`` to ``convs[1]`` (so the switch does change what runs)."""
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    results, counted = [], []
    for value in (False, True):
        monkeypatch.setattr(module, name, value)
        results.append(nnx.value_and_grad(loss)(model))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, g=graphdef: nnx.merge(g, s)(x))(state)
        counted.append(str(jaxpr).count("conv_general_dilated"))
    assert tuple(counted) == convs, f"lax.conv ops with {name} False / True: {counted}"
    (value_off, grads_off), (value_on, grads_on) = results
    np.testing.assert_allclose(value_on, value_off, rtol=rtol)
    for a, b in zip(jax.tree.leaves(grads_on), jax.tree.leaves(grads_off), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
