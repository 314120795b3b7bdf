"""Two NNX modules with the same parameters, one scalar loss: same value and gradients."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def assert_same_value_and_grads(ref, other, loss, *, rtol_value: float, rtol: float, atol: float):
    """``nnx.value_and_grad(loss)`` of ``other`` equals that of ``ref``: the value to
    ``rtol_value``, every parameter gradient to ``rtol`` / ``atol``."""
    (value_ref, grads_ref), (value, grads) = (nnx.value_and_grad(loss)(m) for m in (ref, other))
    np.testing.assert_allclose(value, value_ref, rtol=rtol_value)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
