"""Chunked pure-JAX (XLA) form of BiGLA: differentiable by autodiff, the fallback off the GPU.

The sequence is cut into chunks of ``C`` tokens (FLA's ``chunk_gla`` algorithm, run for both
directions at once):

* inside a chunk, the attention-like matrix ``A_ij = sum_d q_id k_jd exp(G_id - G_jd)`` is built
  from sub-chunks of ``BC = 16`` rows. Off-diagonal sub-blocks are matrix products of
  ``q * exp(G - G_ref)`` and ``k * exp(G_ref - G)`` around a reference row chosen so that both
  exponents are <= 0; diagonal sub-blocks are computed elementwise with the exponent masked
  before ``exp``. No exponent is ever positive, so any gate (however steep) is safe;
* between chunks, the fp32 states ``[Dk, Dv]`` of both directions are carried by ``lax.scan``
  (the backward direction with ``reverse=True``: nothing is flipped);
* all cumulative gates are chunk-local fp32 sums (global cumulative sums lose precision at
  long N).

The forward and the backward direction share one matrix ``A = A_fwd + A_bwd`` per sub-chunk
(their supports only overlap on the diagonal, where both count the current token), so ``A v``
is one product for both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

SUB_CHUNK = 16


def _chunk_size(n: int, chunk_size: int) -> int:
    """FLA's rule: at most ``chunk_size``, at least 16, a power of two covering short sequences."""
    if chunk_size < SUB_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size}; expected a power of two >= {SUB_CHUNK}")
    return min(chunk_size, max(SUB_CHUNK, 1 << max(n - 1, 0).bit_length()))


def _to_chunks(x: jax.Array, chunk: int, dtype) -> jax.Array:
    """[B, N, H, D] -> [B, H, NC, C, D] in ``dtype``, zero-padded at the end of the sequence."""
    b, n, h, d = x.shape
    nc = -(-n // chunk)
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, nc * chunk - n), (0, 0), (0, 0)))
    return x.reshape(b, nc, chunk, h, d).transpose(0, 3, 1, 2, 4)


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """exp(x) where mask, else 0; the masked exponent never reaches exp (no inf * 0 = NaN)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def _intra_chunk_scores(q, k, gf, gb, precision):
    """The intra-chunk score matrices of both directions, by sub-chunks of 16 rows.

    Args:
      q, k: [..., C, Dk] (``...`` = B, H, NC) in the compute dtype.
      gf, gb: [..., C, Dk] fp32 gates of the forward and the backward direction.

    Returns:
      off: [..., S, BC, C] scores of the rows of sub-chunk i against the rows of all OTHER
        sub-chunks (earlier ones: forward direction; later ones: backward direction).
      diag: [..., S, BC, BC] scores inside sub-chunk i (both directions; the diagonal twice).
    """
    *lead, c, dk = q.shape
    bc = min(SUB_CHUNK, c)
    s = c // bc
    sub = lambda x: x.reshape(*lead, s, bc, dk)
    qs, ks, gfs, gbs = sub(q), sub(k), sub(gf), sub(gb)

    # Gate sums within each sub-chunk (<= 16 gates, so differences of them keep their digits).
    pf = jnp.cumsum(gfs, axis=-2)  # inclusive prefix of gf
    pb = jnp.cumsum(gbs, axis=-2)
    tf, tb = pf[..., -1:, :], pb[..., -1:, :]  # totals [..., S, 1, Dk], exact copies
    xf = tf - pf  # exclusive suffix of gf (exactly 0 on the last row)
    xb = pb - gbs  # exclusive prefix of gb (exactly 0 on the first row)
    sb = tb - pb + gbs  # inclusive suffix of gb

    # Query row r of sub-chunk i and key row j of sub-chunk m meet at i's boundary: the
    # forward exponent (m < i) is [sum over i's rows up to r] + [sum over m's rows after j]
    # + [totals of the sub-chunks between], the backward one (m > i) mirrored. All <= 0.
    ids = jnp.arange(s)
    i_, m_, u_ = ids[:, None, None], ids[None, :, None], ids[None, None, :]
    between = lambda sel, t: jnp.einsum(
        "imu,...ud->...imd", sel.astype(t.dtype), t[..., 0, :], precision=lax.Precision.HIGHEST
    )
    btw_f = between((m_ < u_) & (u_ < i_), tf)  # [..., S(i), S(m), Dk]
    btw_b = between((i_ < u_) & (u_ < m_), tb)
    earlier = (m_ < i_)[..., None]  # [S(i), S(m), 1, 1]
    later = (m_ > i_)[..., None]
    key_exp = jnp.where(
        earlier,
        xf[..., None, :, :, :] + btw_f[..., :, :, None, :],
        xb[..., None, :, :, :] + btw_b[..., :, :, None, :],
    )  # [..., S(i), S(m), BC, Dk]
    k_decayed = (ks[..., None, :, :, :] * jnp.exp(key_exp)).reshape(*lead, s, c, dk)
    col = lambda mask: jnp.broadcast_to(mask, (s, s, bc, 1)).reshape(s, c, 1)
    q_f = qs * jnp.exp(pf)  # [..., S, BC, Dk]
    q_b = qs * jnp.exp(sb)
    dot = functools.partial(jnp.einsum, precision=precision, preferred_element_type=gf.dtype)
    cast = lambda x: x.astype(q.dtype)
    off = dot("...srd,...sjd->...srj", cast(q_f), cast(k_decayed * col(earlier)))
    off += dot("...srd,...sjd->...srj", cast(q_b), cast(k_decayed * col(later)))

    # Inside a sub-chunk, exact elementwise weights: the forward exponent below the diagonal,
    # the backward one above it, and the constant 2 on the diagonal (the current token, weight
    # 1 in both directions; as exp(0) it would only add rounding to the gate gradients).
    r, j = jnp.arange(bc)[:, None, None], jnp.arange(bc)[None, :, None]
    fwd = pf[..., :, None, :] - pf[..., None, :, :]  # [..., S, BC(r), BC(j), Dk]
    bwd = xb[..., None, :, :] - xb[..., :, None, :]
    decay = jnp.exp(jnp.where(r > j, fwd, jnp.where(r < j, bwd, 0.0))) * (r != j) + 2.0 * (r == j)
    qk = qs[..., :, None, :].astype(gf.dtype) * ks[..., None, :, :].astype(gf.dtype)
    diag = jnp.sum(qk * decay, axis=-1)
    return off, diag


def _shift_rows(x: jax.Array, step: int) -> jax.Array:
    """Rows of [..., C, D] moved by ``step`` (row t takes row t + step), zero-filled."""
    pad = [(0, 0)] * (x.ndim - 2) + [(max(-step, 0), max(step, 0)), (0, 0)]
    c = x.shape[-2]
    return jnp.pad(x, pad)[..., max(step, 0) : max(step, 0) + c, :]


def _chunk_states(k, v, gf_chunks, gb_chunks, gcf, gcb, precision):
    """Per-chunk state increments and decays of both directions.

    Args:
      k: [B, H, NC, C, Dk]; v: [B, H, NC, C, Dv].
      gf_chunks, gb_chunks: [B, H, NC, C, Dk] fp32 gates; gcf, gcb: their chunk-local inclusive
        prefix (forward) and suffix (backward) sums.

    Returns:
      (dec_f, ds_f, dec_b, ds_b): decays [B, H, NC, Dk] and increments [B, H, NC, Dk, Dv] fp32;
      the forward state leaving chunk c is ``dec_f[c] * h + ds_f[c]``, the backward state
      leaving chunk c towards the start is ``dec_b[c] * h + ds_b[c]``.
    """
    tot_f = gcf[..., -1, :]  # [B, H, NC, Dk]
    tot_b = gcb[..., 0, :]
    # tot - G as sums over the rows after (forward) / before (backward) each row, not as a
    # difference: the difference sends a large gradient to every row that then cancels.
    after_f = lax.cumsum(_shift_rows(gf_chunks, 1), axis=3, reverse=True)
    before_b = jnp.cumsum(_shift_rows(gb_chunks, -1), axis=3)
    dot = functools.partial(jnp.einsum, precision=precision, preferred_element_type=gcf.dtype)
    kf = (k * jnp.exp(after_f)).astype(v.dtype)
    kb = (k * jnp.exp(before_b)).astype(v.dtype)
    ds_f = dot("...cd,...ce->...de", kf, v)
    ds_b = dot("...cd,...ce->...de", kb, v)
    return jnp.exp(tot_f), ds_f, jnp.exp(tot_b), ds_b


def _carry_states(decay, increment, reverse: bool):
    """Exclusive scan over chunks: the state ENTERING each chunk from the scan's direction.

    Args:
      decay: [B, H, NC, Dk]; increment: [B, H, NC, Dk, Dv] (fp32).

    Returns:
      [B, H, NC, Dk, Dv]: the state carried into chunk c (zeros for the first chunk visited).
    """

    def step(h, xs):
        dec, inc = xs
        return dec[..., None] * h + inc, h

    init = jnp.zeros_like(increment[:, :, 0])
    xs = (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(increment, 2, 0))
    _, entering = lax.scan(step, init, xs, reverse=reverse)
    return jnp.moveaxis(entering, 0, 2)


def bigla_xla(q, k, v, gf, gb, *, scale: float | None = None, chunk_size: int = 64) -> jax.Array:
    """BiGLA in the chunked form (pure JAX; differentiable by autodiff).

    Args:
      q, k: [B, N, H, Dk] queries and keys.
      v: [B, N, H, Dv] values.
      gf, gb: [B, N, H, Dk] per-step log forget gates (<= 0) of the forward and the backward
        direction.
      scale: query scale; ``Dk ** -0.5`` if None.
      chunk_size: tokens per chunk, a power of two >= 16 (shorter sequences use a smaller one).

    Returns:
      [B, N, H, Dv] in v's dtype: ``(o_fwd + o_bwd) / 2``.
    """
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    chunk = _chunk_size(n, chunk_size)
    # fp32 inputs: exact fp32 products (XLA on GPU would otherwise use TF32). Low-precision
    # inputs: their own dtype on the tensor cores, fp32 accumulation (as FLA does).
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if jnp.finfo(dtype).bits >= 32:
        dtype, precision = jnp.promote_types(dtype, jnp.float32), lax.Precision.HIGHEST
    else:
        precision = lax.Precision.DEFAULT
    gate_dtype = jnp.promote_types(jnp.result_type(gf.dtype, gb.dtype, dtype), jnp.float32)

    qc, kc, vc = (_to_chunks(x, chunk, dtype) for x in (q, k, v))
    gf_chunks = _to_chunks(gf, chunk, gate_dtype)
    gb_chunks = _to_chunks(gb, chunk, gate_dtype)
    gcf = jnp.cumsum(gf_chunks, axis=3)
    gcb = lax.cumsum(gb_chunks, axis=3, reverse=True)

    off, diag = _intra_chunk_scores(qc, kc, gf_chunks, gb_chunks, precision)
    dec_f, ds_f, dec_b, ds_b = _chunk_states(kc, vc, gf_chunks, gb_chunks, gcf, gcb, precision)
    h_f = _carry_states(dec_f, ds_f, reverse=False)
    h_b = _carry_states(dec_b, ds_b, reverse=True)

    dot = functools.partial(jnp.einsum, precision=precision, preferred_element_type=gate_dtype)
    lead = qc.shape[:3]
    s = off.shape[3]
    v_sub = vc.reshape(*lead, s, -1, dv)
    o = dot("...srj,...je->...sre", off.astype(dtype), vc).reshape(*lead, chunk, dv)
    o += dot("...srj,...sje->...sre", diag.astype(dtype), v_sub).reshape(*lead, chunk, dv)
    o += dot("...cd,...de->...ce", (qc * jnp.exp(gcf)).astype(dtype), h_f.astype(dtype))
    o += dot("...cd,...de->...ce", (qc * jnp.exp(gcb)).astype(dtype), h_b.astype(dtype))

    o = (0.5 * scale) * o  # [B, H, NC, C, Dv]
    o = o.transpose(0, 2, 3, 1, 4).reshape(b, -1, h, dv)[:, :n]
    return o.astype(v.dtype)
