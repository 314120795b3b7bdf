"""Reference forms of BiGLA: exact, slow, and differentiable by plain autodiff.

Both directions include the current token (vig-reference.md section 2.4):

    S^f_t = diag(exp gf_t) S^f_{t-1} + k_t^T v_t        (t = 1..N)
    S^b_t = diag(exp gb_t) S^b_{t+1} + k_t^T v_t        (t = N..1)
    o_t   = scale * q_t (S^f_t + S^b_t) / 2

* :func:`bigla_quadratic` is the parallel ("attention") form. It runs in whatever dtype it is
  given, so with ``jax.config.update("jax_enable_x64", True)`` and float64 inputs it is the
  float64 reference the kernels are tested against. O(N^2 Dk) time, O(block N Dk) memory.
* :func:`bigla_associative_scan` is the recurrence evaluated with
  ``jax.lax.associative_scan``. O(N Dk Dv) memory: small shapes only.

Layout everywhere: ``q, k, gf, gb: [B, N, H, Dk]``, ``v: [B, N, H, Dv]``, output ``[B, N, H, Dv]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _default_scale(q: jax.Array, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _causal_part(q, k, v, cum, *, row_block: int, lower: bool):
    """sum_s mask(t, s) (q_t * exp(cum_t - cum_s)) . k_s  v_s, by blocks of query rows.

    Args:
      q, k, cum: [B, N, H, Dk]; cum is the inclusive cumulative log decay of the direction.
      v: [B, N, H, Dv].
      lower: True for s <= t (forward direction), False for s >= t (backward direction).

    Returns:
      [B, N, H, Dv] in the dtype of the inputs' promotion.
    """
    n = q.shape[1]
    nb = -(-n // row_block)
    pad = nb * row_block - n
    padded = [jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, cum)]
    q_blocks, cum_blocks = (
        x.reshape(x.shape[0], nb, row_block, *x.shape[2:]).swapaxes(0, 1) for x in padded
    )
    src = jnp.arange(n)

    def one_block(args):
        i, qb, cb = args  # qb, cb: [B, T, H, Dk]
        rows = i * row_block + jnp.arange(row_block)
        mask = src[None, :] <= rows[:, None] if lower else src[None, :] >= rows[:, None]
        mask &= rows[:, None] < n  # padded rows: exp(0 - cum) could overflow, NaN gradients
        diff = cb[:, :, None] - cum[:, None, :]  # [B, T, N, H, Dk]
        diff = jnp.where(mask[None, :, :, None, None], diff, -jnp.inf)
        scores = jnp.einsum("bthd,bshd,btshd->bths", qb, k, jnp.exp(diff))
        return jnp.einsum("bths,bshe->bthe", scores, v)

    out = jax.lax.map(one_block, (jnp.arange(nb), q_blocks, cum_blocks))
    out = out.swapaxes(0, 1).reshape(q.shape[0], nb * row_block, *out.shape[3:])
    return out[:, :n]


def bigla_quadratic(q, k, v, gf, gb, *, scale: float | None = None, row_block: int = 64):
    """BiGLA in the parallel form; exact in the dtype of its inputs (use float64 to test).

    Args:
      q, k: [B, N, H, Dk] queries and keys.
      v: [B, N, H, Dv] values.
      gf, gb: [B, N, H, Dk] per-step log forget gates (<= 0) of the forward and the backward
        direction.
      scale: query scale; ``Dk ** -0.5`` if None.
      row_block: query rows per block (bounds memory at B*row_block*N*H*Dk).

    Returns:
      [B, N, H, Dv]: ``(o_fwd + o_bwd) / 2``.
    """
    scale = _default_scale(q, scale)
    cum_f = jnp.cumsum(gf, axis=1)
    cum_b = jnp.flip(jnp.cumsum(jnp.flip(gb, 1), axis=1), 1)
    o_f = _causal_part(q, k, v, cum_f, row_block=row_block, lower=True)
    o_b = _causal_part(q, k, v, cum_b, row_block=row_block, lower=False)
    return (scale * 0.5 * (o_f + o_b)).astype(v.dtype)


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 + a2, jnp.exp(a2)[..., None] * b1 + b2


def bigla_associative_scan(q, k, v, gf, gb, *, scale: float | None = None):
    """BiGLA as two ``lax.associative_scan`` recurrences (memory O(B N H Dk Dv)).

    Args and returns as :func:`bigla_quadratic`.
    """
    scale = _default_scale(q, scale)
    # Low-precision inputs are scanned in float32 (the scan's carries must keep one dtype).
    dtype = jnp.promote_types(jnp.result_type(q, k, v, gf, gb), jnp.float32)
    out_dtype = v.dtype
    q, k, v, gf, gb = (jnp.asarray(x, dtype) for x in (q, k, v, gf, gb))
    kv = jnp.einsum("bnhd,bnhe->bnhde", k, v)
    _, s_f = jax.lax.associative_scan(_combine, (gf, kv), axis=1)
    _, s_b = jax.lax.associative_scan(_combine, (gb, kv), axis=1, reverse=True)
    o = jnp.einsum("bnhd,bnhde->bnhe", q, s_f + s_b)
    return (scale * 0.5 * o).astype(out_dtype)


def split_packed(qkv, gf, gb, num_heads: int):
    """Fused projections -> the op's token-major operands.

    qkv [B, N, 2K + V] = [q | k | v] and gates [B, N, K], all head-major, -> (q, k, v, gf, gb)
    as [B, N, H, D] (copies of the slices)."""
    b, n, _ = qkv.shape
    key_dim = gf.shape[-1]
    heads = lambda x: x.reshape(b, n, num_heads, -1)
    q, k, v = jnp.split(qkv, [key_dim, 2 * key_dim], axis=-1)
    return tuple(map(heads, (q, k, v, gf, gb)))
