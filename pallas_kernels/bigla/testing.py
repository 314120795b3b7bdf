"""Helpers shared by the BiGLA tests and benchmark: random inputs, the float64 reference VJP.

Kept in the package (not in ``tests/``) so that the benchmark and GPU checks can use them too.
Nothing here is needed to run the op.
"""

from __future__ import annotations

import jax
import numpy as np

from pallas_kernels.bigla import reference

GATE_SHIFTS = {
    "random": 0.0,
    "steep": -40.0,
    "flat": 40.0,
    "edge": -58.0,
    "cliff": -100.0,
    "mixed": None,
}


def random_inputs(
    seed: int,
    b: int,
    n: int,
    h: int,
    dk: int,
    dv: int,
    gates: str = "random",
) -> tuple[np.ndarray, ...]:
    """Float64 NumPy inputs ``(q, k, v, gf, gb, do)`` of BiGLA with ViG-style gates.

    Args:
      seed: NumPy seed.
      b, n, h, dk, dv: batch, tokens, heads, key and value dims.
      gates: "random" (logsigmoid(3 x) / 16 with x ~ N(0, 1)), "steep" (logits around -40:
        about -2.5 per step), "flat" (logits around +40: decays of about exp(-3e-19)),
        "edge" (logits around -58: 16-token sums of about -58, just inside the Triton
        kernels' ``SPLIT_LIMIT``), "cliff" (logits around -100: about -6.25 per step, past
        it over 16 tokens) or "mixed" ("cliff" on the first half of the tokens, "random" on
        the rest).

    Returns:
      q, k, gf, gb: [B, N, H, Dk]; v and the output cotangent do: [B, N, H, Dv].
    """
    if gates not in GATE_SHIFTS:
        raise ValueError(f"gates={gates!r}; expected one of {tuple(GATE_SHIFTS)}")
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, b, n, h, dk))
    v = rng.normal(size=(b, n, h, dv))
    shift = GATE_SHIFTS[gates]
    if shift is None:  # "mixed"
        shift = np.where(np.arange(n) < n // 2, GATE_SHIFTS["cliff"], 0.0)[:, None, None]
    logits = rng.normal(size=(2, b, n, h, dk)) * 3.0 + shift
    gf, gb = -np.logaddexp(0.0, -logits) / 16.0  # logsigmoid / 16, as ViG
    do = rng.normal(size=(b, n, h, dv))
    return q, k, v, gf, gb, do


def cast_inputs(arrays, dtype, gate_dtype=np.float32) -> list[np.ndarray]:
    """``(q, k, v, gf, gb, do)`` with q, k, v, do cast to ``dtype`` and the gates to fp32."""
    q, k, v, gf, gb, do = arrays
    return [
        np.asarray(x).astype(t)
        for x, t in zip(
            (q, k, v, gf, gb, do), (dtype,) * 3 + (gate_dtype,) * 2 + (dtype,), strict=True
        )
    ]


def reference_vjp(q, k, v, gf, gb, do, *, scale=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Output and the five input gradients of the float64 quadratic reference.

    The inputs are taken at their given values (already rounded to the tested dtype, so the
    comparison measures the implementation's error, not the rounding of its inputs).

    Returns:
      (o [B, N, H, Dv], [dq, dk, dv, dgf, dgb]) as float64 NumPy arrays.
    """
    with jax.enable_x64(True):
        args = [np.asarray(x, np.float64) for x in (q, k, v, gf, gb)]
        fn = lambda *a: reference.bigla_quadratic(*a, scale=scale)
        out, vjp = jax.vjp(fn, *args)
        grads = vjp(np.asarray(do, np.float64))
        return np.asarray(out), [np.asarray(g) for g in grads]


def relative_error(got, want) -> float:
    """max |got - want| / max |want| (the bar of the kernel tests)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
