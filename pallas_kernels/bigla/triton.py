"""BiGLA as Pallas kernels with the Triton lowering: forward and backward, behind custom_vjp.

Both scan directions run in the same programs; nothing is flipped or stacked in device memory.
One program owns one (batch, head, sequence segment) and walks its chunks of ``BT`` tokens:

* **forward** (one launch): sweep 1 walks the chunks right to left and keeps only the backward
  direction's fp32 state ``[Dk, Dv]``, storing the state that enters each chunk; sweep 2 walks
  left to right with the forward state in registers and writes each output row once
  (intra-chunk part of both directions + both inter-chunk parts).
* **backward** (one launch): sweep 1 (right to left) stores, per chunk, the backward-direction
  state and the gradient of the forward-direction state; sweep 2 (left to right) carries the
  other two (forward state, gradient of the backward state) and writes dq, dk, dv and both gate
  gradients of each chunk once. States are recomputed, never saved by the forward.
* **long sequences**: with ``NS > 1`` segments per sequence, a first launch computes each
  segment's state summaries (decay and increment of every carried quantity); each program then
  folds its neighbours' summaries into its incoming carries.

Inside a chunk, sub-chunks of ``BC = 16`` rows: off-diagonal sub-blocks are tensor-core products
of gate-rescaled operands around the sub-chunk boundary, diagonal sub-blocks exact elementwise
``[BC, BC, Dk]`` products. Every exponent is <= 0 (masked before ``exp``), and every exponent is
built from sums of gates over at most one sub-chunk plus whole sub-chunk totals, so that fp32
keeps the digits the gate gradients need even for steep gates (chunk sums of -160).

Gate gradients follow FLA's chunk decomposition (no sequence-long cumulative sum): per chunk,
cumulative sums of ``q*dq - k*dk`` over the rows of the chunk (without the token's own pair,
whose two terms would cancel), plus the pairs that cross the chunk, ``exp(T) sum(S * dS)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

SUB = 16  # rows per sub-chunk (BC)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tuning knobs of the kernels.

    Attributes:
      chunk: tokens per chunk (BT), a power of two multiple of 16; shorter sequences use less.
      num_warps: warps per program (Triton).
      num_stages: software-pipelining stages of the chunk loops (Triton).
      segments: sequence segments per (batch, head) (NS); None picks enough programs to fill
        ``target_programs``.
      target_programs: programs wanted for the automatic ``segments``.
      min_chunks_per_segment: lower bound on a segment's length for the automatic choice.
    """

    chunk: int = 64
    num_warps: int = 4
    num_stages: int = 1
    segments: int | None = None
    target_programs: int = 264
    min_chunks_per_segment: int = 4

    def __post_init__(self):
        if self.chunk < SUB or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk={self.chunk}; expected a power of two >= {SUB}")
        if self.segments is not None and self.segments < 1:
            raise ValueError(f"segments={self.segments}; expected None or >= 1")


@dataclasses.dataclass(frozen=True)
class _Dims:
    """Static sizes of one call."""

    n: int  # tokens
    dk: int
    dv: int
    bt: int  # chunk
    nc: int  # chunks
    ns: int  # segments
    cps: int  # chunks per segment
    scale: float
    dot_dtype: jnp.dtype
    precision: lax.Precision

    @property
    def subs(self) -> int:
        return self.bt // SUB

    @property
    def n_pad(self) -> int:
        return _next_pow2(self.nc * self.bt)


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _dims(q, v, scale, config: Config, batch_heads: int) -> _Dims:
    _, n, _, dk = q.shape
    dv = v.shape[-1]
    bt = min(config.chunk, max(SUB, _next_pow2(n)))
    nc = -(-n // bt)
    if config.segments is not None:
        ns = min(config.segments, nc)
    else:
        ns = max(
            1, min(-(-config.target_programs // batch_heads), nc // config.min_chunks_per_segment)
        )
    cps = -(-nc // ns)
    ns = -(-nc // cps)
    low = jnp.finfo(jnp.result_type(q.dtype, v.dtype)).bits < 32
    return _Dims(
        n=n,
        dk=dk,
        dv=dv,
        bt=bt,
        nc=nc,
        ns=ns,
        cps=cps,
        scale=dk**-0.5 if scale is None else float(scale),
        dot_dtype=jnp.dtype(jnp.bfloat16 if low else jnp.float32),
        precision=lax.Precision.DEFAULT if low else lax.Precision.HIGHEST,
    )


# ----------------------------------------------------------------------------------------------
# In-kernel building blocks (values are 2-D tiles; refs are [N_pad, D] views of one (b, h)).
# ----------------------------------------------------------------------------------------------


def _dot(a, b, contract, dims: _Dims):
    """fp32-accumulated 2-D product; ``contract`` = ((a_axis,), (b_axis,))."""
    return lax.dot_general(
        a.astype(dims.dot_dtype),
        b.astype(dims.dot_dtype),
        (contract, ((), ())),
        precision=dims.precision,
        preferred_element_type=jnp.float32,
    )


def _mm(a, b, dims):  # a [M, K] @ b [K, N]
    return _dot(a, b, ((1,), (0,)), dims)


def _mm_nt(a, b, dims):  # a [M, K] @ b[N, K]^T
    return _dot(a, b, ((1,), (1,)), dims)


def _mm_tn(a, b, dims):  # a[K, M]^T @ b [K, N]
    return _dot(a, b, ((0,), (0,)), dims)


def _load_rows(ref, row0, n: int, dtype=None):
    """Rows ``row0 .. row0 + SUB`` of a [N_pad, D] ref; rows >= n read as 0."""
    rows = row0 + lax.broadcasted_iota(jnp.int32, (SUB, ref.shape[-1]), 0)
    x = plt.load(ref.at[pl.ds(row0, SUB), :], mask=rows < n, other=0)
    return x if dtype is None else x.astype(dtype)


def _store_rows(ref, row0, n: int, x):
    rows = row0 + lax.broadcasted_iota(jnp.int32, (SUB, ref.shape[-1]), 0)
    plt.store(ref.at[pl.ds(row0, SUB), :], x.astype(ref.dtype), mask=rows < n)


@dataclasses.dataclass
class _Sub:
    """One sub-chunk of SUB rows: tiles and the gate sums of both directions.

    Gate sums are over the sub-chunk only (<= 16 gates, so fp32 differences of them keep their
    digits): pf/pb inclusive prefix sums, tf/tb totals, xf the exclusive suffix sum of gf,
    xb the exclusive prefix sum of gb, sb the inclusive suffix sum of gb.
    """

    q: jax.Array | None
    k: jax.Array | None
    v: jax.Array | None
    do: jax.Array | None
    pf: jax.Array
    xf: jax.Array
    tf: jax.Array
    xb: jax.Array
    sb: jax.Array
    tb: jax.Array


def _load_sub(refs, row0, dims: _Dims, *, q=True, k=True, v=True, do=False) -> _Sub:
    """Loads the tiles of one sub-chunk and computes its local gate sums."""
    q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref = refs
    gf = _load_rows(gf_ref, row0, dims.n, jnp.float32)
    gb = _load_rows(gb_ref, row0, dims.n, jnp.float32)
    pf, tf = jnp.cumsum(gf, axis=0), jnp.sum(gf, axis=0)
    pb, tb = jnp.cumsum(gb, axis=0), jnp.sum(gb, axis=0)
    load = lambda ref, want: _load_rows(ref, row0, dims.n) if want else None
    scaled_do = None
    if do:
        scaled_do = _load_rows(do_ref, row0, dims.n, jnp.float32) * (0.5 * dims.scale)
    return _Sub(
        q=load(q_ref, q),
        k=load(k_ref, k),
        v=load(v_ref, v),
        do=scaled_do,
        pf=pf,
        xf=tf[None, :] - pf,
        tf=tf,
        xb=pb - gb,
        sb=tb[None, :] - pb + gb,
        tb=tb,
    )


def _load_chunk(refs, c, dims: _Dims, **want) -> list[_Sub]:
    return [_load_sub(refs, c * dims.bt + m * SUB, dims, **want) for m in range(dims.subs)]


def _partial_sums(vectors):
    """(before, after): sums of the vectors strictly before / after each index (zeros at ends)."""
    zero = jnp.zeros_like(vectors[0])
    before, after = [zero], [zero]
    for x in vectors[:-1]:
        before.append(before[-1] + x)
    for x in vectors[:0:-1]:
        after.append(after[-1] + x)
    return before, after[::-1]


def _between(vectors, lo, hi):
    """Sum of vectors[lo + 1 .. hi - 1] (None when empty)."""
    inner = vectors[lo + 1 : hi]
    return functools.reduce(lambda a, b: a + b, inner) if inner else None


@dataclasses.dataclass
class _ChunkGates:
    """Chunk-level gate exponents per sub-chunk m (all <= 0)."""

    q_f: list  # forward query: sum of gf from the chunk start to the row (inclusive)
    k_f: list  # forward key: sum of gf after the row to the chunk end
    q_b: list  # backward query: sum of gb from the row to the chunk end (inclusive)
    k_b: list  # backward key: sum of gb from the chunk start to before the row
    tf: jax.Array  # chunk totals [Dk]
    tb: jax.Array


def _chunk_gates(subs: list[_Sub]) -> _ChunkGates:
    bf, af = _partial_sums([s.tf for s in subs])
    bb, ab = _partial_sums([s.tb for s in subs])
    return _ChunkGates(
        q_f=[s.pf + bf[m][None, :] for m, s in enumerate(subs)],
        k_f=[s.xf + af[m][None, :] for m, s in enumerate(subs)],
        q_b=[s.sb + ab[m][None, :] for m, s in enumerate(subs)],
        k_b=[s.xb + bb[m][None, :] for m, s in enumerate(subs)],
        tf=bf[-1] + subs[-1].tf,
        tb=bb[-1] + subs[-1].tb,
    )


def _pair_index():
    r = lax.broadcasted_iota(jnp.int32, (SUB, SUB, 1), 0)
    s = lax.broadcasted_iota(jnp.int32, (SUB, SUB, 1), 1)
    return r, s


def _diag_decay(sub: _Sub):
    """exp of the pair exponents inside a sub-chunk: [r, s, Dk].

    Forward (s < r): sum_{s<u<=r} gf_u; backward (s > r): sum_{r<=u<s} gb_u; 0 on the diagonal
    (so the diagonal holds 1). Returns (decay, r, s) with r, s the [BC, BC, 1] row/column ids.
    """
    r, s = _pair_index()
    fwd = sub.pf[:, None, :] - sub.pf[None, :, :]
    bwd = sub.xb[None, :, :] - sub.xb[:, None, :]
    return jnp.exp(jnp.where(r > s, fwd, jnp.where(r < s, bwd, 0.0))), r, s


def _inter_key_increment(k_tiles, v_tiles, key_exps, dims):
    """sum_m (k_m * exp(key_exp_m))^T v_m: [Dk, Dv] fp32."""
    out = None
    for k, v, e in zip(k_tiles, v_tiles, key_exps, strict=True):
        term = _mm_tn(k.astype(jnp.float32) * jnp.exp(e), v, dims)
        out = term if out is None else out + term
    return out


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def _chunk_output(subs: list[_Sub], gates: _ChunkGates, s_f, s_b, dims: _Dims):
    """Output rows of one chunk (both directions), per sub-chunk: [BC, Dv] fp32."""
    n_sub = len(subs)
    q32 = [s.q.astype(jnp.float32) for s in subs]
    qf = [q * jnp.exp(s.pf) for q, s in zip(q32, subs, strict=True)]
    qb = [q * jnp.exp(s.sb) for q, s in zip(q32, subs, strict=True)]
    kf = [s.k.astype(jnp.float32) * jnp.exp(s.xf) for s in subs]
    kb = [s.k.astype(jnp.float32) * jnp.exp(s.xb) for s in subs]
    tf, tb = [s.tf for s in subs], [s.tb for s in subs]
    outs = []
    for i in range(n_sub):
        acc = _mm(q32[i] * jnp.exp(gates.q_f[i]), s_f, dims)
        acc += _mm(q32[i] * jnp.exp(gates.q_b[i]), s_b, dims)
        for j in range(i):
            between = _between(tf, j, i)
            key = kf[j] if between is None else kf[j] * jnp.exp(between)[None, :]
            acc += _mm(_mm_nt(qf[i], key, dims), subs[j].v, dims)
        for j in range(i + 1, n_sub):
            between = _between(tb, i, j)
            key = kb[j] if between is None else kb[j] * jnp.exp(between)[None, :]
            acc += _mm(_mm_nt(qb[i], key, dims), subs[j].v, dims)
        decay, r, s = _diag_decay(subs[i])
        weight = decay + (r == s).astype(jnp.float32)  # the token itself: once per direction
        a_ii = jnp.sum(q32[i][:, None, :] * subs[i].k.astype(jnp.float32)[None, :, :] * weight, 2)
        acc += _mm(a_ii, subs[i].v, dims)
        outs.append(acc * (0.5 * dims.scale))
    return outs


def _segment_bounds(dims: _Dims):
    seg = pl.program_id(2)
    first = seg * dims.cps
    last = jnp.minimum(first + dims.cps, dims.nc)
    return seg, first, last


def _fold_summaries(dec_ref, inc_ref, seg, dims: _Dims, from_left: bool):
    """The carry entering segment ``seg`` from its left (right) neighbours' summaries."""

    def body(i, h):
        src = i if from_left else dims.ns - 1 - i
        return jnp.exp(dec_ref[src, :])[:, None] * h + inc_ref[src, :, :]

    count = seg if from_left else dims.ns - 1 - seg
    return lax.fori_loop(0, count, body, jnp.zeros((dims.dk, dims.dv), jnp.float32))


def _forward_kernel(q_ref, k_ref, v_ref, gf_ref, gb_ref, *rest, dims: _Dims, barrier: bool):
    if dims.ns > 1:
        dec_f_ref, dec_b_ref, sum_f_ref, sum_b_ref, o_ref, hb_ref = rest
    else:
        o_ref, hb_ref = rest
    refs = (q_ref, k_ref, v_ref, gf_ref, gb_ref, None)
    seg, first, last = _segment_bounds(dims)
    zero = jnp.zeros((dims.dk, dims.dv), jnp.float32)
    if dims.ns > 1:
        s_b0 = _fold_summaries(dec_b_ref, sum_b_ref, seg, dims, from_left=False)
        s_f0 = _fold_summaries(dec_f_ref, sum_f_ref, seg, dims, from_left=True)
    else:
        s_b0 = s_f0 = zero

    def right_to_left(i, s_b):
        c = last - 1 - i
        hb_ref[c, :, :] = s_b
        subs = _load_chunk(refs, c, dims, q=False)
        gates = _chunk_gates(subs)
        inc = _inter_key_increment([s.k for s in subs], [s.v for s in subs], gates.k_b, dims)
        return jnp.exp(gates.tb)[:, None] * s_b + inc

    lax.fori_loop(0, last - first, right_to_left, s_b0)
    if barrier:  # sweep 2 reads states that other threads stored (no-op when interpreted)
        plt.debug_barrier()

    def left_to_right(c, s_f):
        subs = _load_chunk(refs, c, dims)
        gates = _chunk_gates(subs)
        outs = _chunk_output(subs, gates, s_f, hb_ref[c, :, :], dims)
        for m, o in enumerate(outs):
            _store_rows(o_ref, c * dims.bt + m * SUB, dims.n, o)
        inc = _inter_key_increment([s.k for s in subs], [s.v for s in subs], gates.k_f, dims)
        return jnp.exp(gates.tf)[:, None] * s_f + inc

    lax.fori_loop(first, last, left_to_right, s_f0)


# ----------------------------------------------------------------------------------------------
# Segment summaries (NS > 1)
# ----------------------------------------------------------------------------------------------


def _summary_kernel(q_ref, k_ref, v_ref, gf_ref, gb_ref, *rest, dims: _Dims, grads: bool):
    """Per segment: log decays (sum of gates) and carried increments of every carry.

    Outputs (one row per segment): dec_f, dec_b [Dk]; sum_f, sum_b [Dk, Dv] (states leaving the
    segment to the right / to the left); with grads also dsum_f (gradient of the forward state
    carried to the left) and dsum_b (gradient of the backward state carried to the right).
    """
    if grads:
        do_ref, dec_f_ref, dec_b_ref, sum_f_ref, sum_b_ref, dsum_f_ref, dsum_b_ref = rest
    else:
        do_ref = None
        dec_f_ref, dec_b_ref, sum_f_ref, sum_b_ref = rest
    refs = (q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref)
    seg, first, last = _segment_bounds(dims)
    zero_s = jnp.zeros((dims.dk, dims.dv), jnp.float32)
    zero_d = jnp.zeros((dims.dk,), jnp.float32)

    def body(c, carry):
        log_f, log_b, s_f, s_b, ds_f, ds_b = carry
        subs = _load_chunk(refs, c, dims, q=grads, do=grads)
        gates = _chunk_gates(subs)
        k_tiles, v_tiles = [s.k for s in subs], [s.v for s in subs]
        s_f = jnp.exp(gates.tf)[:, None] * s_f + _inter_key_increment(
            k_tiles, v_tiles, gates.k_f, dims
        )
        s_b = s_b + jnp.exp(log_b)[:, None] * _inter_key_increment(
            k_tiles, v_tiles, gates.k_b, dims
        )
        if grads:
            q_tiles, do_tiles = [s.q for s in subs], [s.do for s in subs]
            ds_f = ds_f + jnp.exp(log_f)[:, None] * _inter_key_increment(
                q_tiles, do_tiles, gates.q_f, dims
            )
            ds_b = jnp.exp(gates.tb)[:, None] * ds_b + _inter_key_increment(
                q_tiles, do_tiles, gates.q_b, dims
            )
        return log_f + gates.tf, log_b + gates.tb, s_f, s_b, ds_f, ds_b

    init = (zero_d, zero_d, zero_s, zero_s, zero_s, zero_s)
    log_f, log_b, s_f, s_b, ds_f, ds_b = lax.fori_loop(first, last, body, init)
    dec_f_ref[...] = log_f
    dec_b_ref[...] = log_b
    sum_f_ref[...] = s_f
    sum_b_ref[...] = s_b
    if grads:
        dsum_f_ref[...] = ds_f
        dsum_b_ref[...] = ds_b


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


def _suffix_in_chunk(rows, totals_after):
    """Inclusive suffix sums over a chunk's rows, sub-chunk by sub-chunk."""
    return [
        jnp.sum(x, 0)[None, :] - jnp.cumsum(x, axis=0) + x + t[None, :]
        for x, t in zip(rows, totals_after, strict=True)
    ]


def _chunk_gradients(subs, gates: _ChunkGates, s_f, s_b, ds_f, ds_b, dims: _Dims):
    """All five gradients of one chunk's rows, per sub-chunk.

    Args:
      subs: the chunk's sub-chunks (with q, k, v and the scaled output cotangent do).
      s_f: forward state entering the chunk (from the left); s_b: backward state entering it
        (from the right). ds_f: gradient of the forward state leaving the chunk; ds_b: gradient
        of the backward state leaving the chunk (to the left). All [Dk, Dv] fp32.

    Returns:
      (dq, dk, dv, dgf, dgb): lists over sub-chunks of [BC, D] fp32 tiles.
    """
    n_sub = len(subs)
    q32 = [s.q.astype(jnp.float32) for s in subs]
    k32 = [s.k.astype(jnp.float32) for s in subs]
    tf, tb = [s.tf for s in subs], [s.tb for s in subs]
    e_pf = [jnp.exp(s.pf) for s in subs]
    e_sb = [jnp.exp(s.sb) for s in subs]
    e_xf = [jnp.exp(s.xf) for s in subs]
    e_xb = [jnp.exp(s.xb) for s in subs]
    qf = [q * e for q, e in zip(q32, e_pf, strict=True)]
    qb = [q * e for q, e in zip(q32, e_sb, strict=True)]

    # Inter-chunk terms.
    e_qf = [jnp.exp(x) for x in gates.q_f]
    e_qb = [jnp.exp(x) for x in gates.q_b]
    e_kf = [jnp.exp(x) for x in gates.k_f]
    e_kb = [jnp.exp(x) for x in gates.k_b]
    dq_f = [_mm_nt(s.do, s_f, dims) * e for s, e in zip(subs, e_qf, strict=True)]
    dq_b = [_mm_nt(s.do, s_b, dims) * e for s, e in zip(subs, e_qb, strict=True)]
    dk_f_inter = [_mm_nt(s.v, ds_f, dims) * e for s, e in zip(subs, e_kf, strict=True)]
    dk_b_inter = [_mm_nt(s.v, ds_b, dims) * e for s, e in zip(subs, e_kb, strict=True)]
    dv = [
        _mm(k * ef, ds_f, dims) + _mm(k * eb, ds_b, dims)
        for k, ef, eb in zip(k32, e_kf, e_kb, strict=True)
    ]
    dk_f = [jnp.zeros_like(x) for x in k32]  # intra-chunk, strictly off the diagonal
    dk_b = [jnp.zeros_like(x) for x in k32]

    # Off-diagonal sub-blocks.
    for i in range(n_sub):
        for j in range(n_sub):
            if i == j:
                continue
            if i > j:  # forward direction: keys before the query
                between = _between(tf, j, i)
                q_side, k_side, e_key = qf[i], k32[j] * e_xf[j], e_xf[j]
                e_query, dq_dir, dk_dir = e_pf[i], dq_f, dk_f
            else:
                between = _between(tb, i, j)
                q_side, k_side, e_key = qb[i], k32[j] * e_xb[j], e_xb[j]
                e_query, dq_dir, dk_dir = e_sb[i], dq_b, dk_b
            if between is not None:
                w = jnp.exp(between)[None, :]
                k_side, e_key = k_side * w, e_key * w
            a = _mm_nt(q_side, k_side, dims)  # [BC_i, BC_j]
            da = _mm_nt(subs[i].do, subs[j].v, dims)
            dq_dir[i] = dq_dir[i] + _mm(da, k_side, dims) * e_query
            dk_dir[j] = dk_dir[j] + _mm_tn(da, q_side, dims) * e_key
            dv[j] = dv[j] + _mm_tn(a, subs[i].do, dims)

    # Diagonal sub-blocks, exact; the token's own pair is kept out of the gate gradients.
    dq_self, dk_self = [], []
    for i in range(n_sub):
        decay, r, s = _diag_decay(subs[i])
        da = _mm_nt(subs[i].do, subs[i].v, dims)[:, :, None]  # [r, s, 1]
        lower = jnp.where(r > s, decay, 0.0) * da
        upper = jnp.where(r < s, decay, 0.0) * da
        dq_f[i] = dq_f[i] + jnp.sum(lower * k32[i][None, :, :], axis=1)
        dq_b[i] = dq_b[i] + jnp.sum(upper * k32[i][None, :, :], axis=1)
        dk_f[i] = dk_f[i] + jnp.sum(lower * q32[i][:, None, :], axis=0)
        dk_b[i] = dk_b[i] + jnp.sum(upper * q32[i][:, None, :], axis=0)
        weight = decay + (r == s).astype(jnp.float32)
        a_ii = jnp.sum(q32[i][:, None, :] * k32[i][None, :, :] * weight, 2)
        dv[i] = dv[i] + _mm_tn(a_ii, subs[i].do, dims)
        own = 2.0 * jnp.sum(subs[i].do * subs[i].v.astype(jnp.float32), axis=1)[:, None]
        dq_self.append(own * k32[i])
        dk_self.append(own * q32[i])

    # Gate gradients. Forward: suffix sums of the query-side terms and of minus the intra key
    # terms, prefix (exclusive) sums of the inter key terms; backward mirrored.
    cross_f = jnp.exp(gates.tf) * jnp.sum(s_f * ds_f, axis=1)
    cross_b = jnp.exp(gates.tb) * jnp.sum(s_b * ds_b, axis=1)
    a_f = [q * dqf - k * dkf for q, k, dqf, dkf in zip(q32, k32, dq_f, dk_f, strict=True)]
    b_f = [k * d for k, d in zip(k32, dk_f_inter, strict=True)]
    a_b = [q * dqb - k * dkb for q, k, dqb, dkb in zip(q32, k32, dq_b, dk_b, strict=True)]
    b_b = [k * d for k, d in zip(k32, dk_b_inter, strict=True)]
    sa_f, sb_f = [jnp.sum(x, 0) for x in a_f], [jnp.sum(x, 0) for x in b_f]
    sa_b, sb_b = [jnp.sum(x, 0) for x in a_b], [jnp.sum(x, 0) for x in b_b]
    _, after_a_f = _partial_sums(sa_f)
    before_b_f, _ = _partial_sums(sb_f)
    before_a_b, _ = _partial_sums(sa_b)
    _, after_b_b = _partial_sums(sb_b)
    suffix_a_f = _suffix_in_chunk(a_f, after_a_f)
    suffix_b_b = _suffix_in_chunk(b_b, after_b_b)
    dgf, dgb = [], []
    for m in range(n_sub):
        prefix_b_f = jnp.cumsum(b_f[m], axis=0) - b_f[m] + before_b_f[m][None, :]
        dgf.append(suffix_a_f[m] + prefix_b_f + cross_f[None, :])
        prefix_a_b = jnp.cumsum(a_b[m], axis=0) + before_a_b[m][None, :]
        dgb.append(prefix_a_b + (suffix_b_b[m] - b_b[m]) + cross_b[None, :])

    dq = [a + b + c for a, b, c in zip(dq_f, dq_b, dq_self, strict=True)]
    dk = [
        a + b + c + d + e
        for a, b, c, d, e in zip(dk_f, dk_b, dk_f_inter, dk_b_inter, dk_self, strict=True)
    ]
    return dq, dk, dv, dgf, dgb


def _backward_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref, *rest, dims: _Dims, barrier: bool
):
    if dims.ns > 1:
        (dec_f_ref, dec_b_ref, sum_f_ref, sum_b_ref, dsum_f_ref, dsum_b_ref, *outs) = rest
    else:
        outs = rest
    dq_ref, dk_ref, dv_ref, dgf_ref, dgb_ref, hb_ref, dhf_ref = outs
    refs = (q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref)
    seg, first, last = _segment_bounds(dims)
    zero = jnp.zeros((dims.dk, dims.dv), jnp.float32)
    if dims.ns > 1:
        s_f0 = _fold_summaries(dec_f_ref, sum_f_ref, seg, dims, from_left=True)
        s_b0 = _fold_summaries(dec_b_ref, sum_b_ref, seg, dims, from_left=False)
        ds_f0 = _fold_summaries(dec_f_ref, dsum_f_ref, seg, dims, from_left=False)
        ds_b0 = _fold_summaries(dec_b_ref, dsum_b_ref, seg, dims, from_left=True)
    else:
        s_f0 = s_b0 = ds_f0 = ds_b0 = zero

    def right_to_left(i, carry):
        s_b, ds_f = carry
        c = last - 1 - i
        hb_ref[c, :, :] = s_b
        dhf_ref[c, :, :] = ds_f
        subs = _load_chunk(refs, c, dims, do=True)
        gates = _chunk_gates(subs)
        inc_b = _inter_key_increment([s.k for s in subs], [s.v for s in subs], gates.k_b, dims)
        inc_df = _inter_key_increment([s.q for s in subs], [s.do for s in subs], gates.q_f, dims)
        return (
            jnp.exp(gates.tb)[:, None] * s_b + inc_b,
            jnp.exp(gates.tf)[:, None] * ds_f + inc_df,
        )

    lax.fori_loop(0, last - first, right_to_left, (s_b0, ds_f0))
    if barrier:  # sweep 2 reads states that other threads stored (no-op when interpreted)
        plt.debug_barrier()

    def left_to_right(c, carry):
        s_f, ds_b = carry
        subs = _load_chunk(refs, c, dims, do=True)
        gates = _chunk_gates(subs)
        grads = _chunk_gradients(subs, gates, s_f, hb_ref[c, :, :], dhf_ref[c, :, :], ds_b, dims)
        for ref, tiles in zip((dq_ref, dk_ref, dv_ref, dgf_ref, dgb_ref), grads, strict=True):
            for m, tile in enumerate(tiles):
                _store_rows(ref, c * dims.bt + m * SUB, dims.n, tile)
        inc_f = _inter_key_increment([s.k for s in subs], [s.v for s in subs], gates.k_f, dims)
        inc_db = _inter_key_increment([s.q for s in subs], [s.do for s in subs], gates.q_b, dims)
        return (
            jnp.exp(gates.tf)[:, None] * s_f + inc_f,
            jnp.exp(gates.tb)[:, None] * ds_b + inc_db,
        )

    lax.fori_loop(first, last, left_to_right, (s_f0, ds_b0))


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers
# ----------------------------------------------------------------------------------------------


def _row_spec(dims: _Dims, d: int) -> pl.BlockSpec:
    """One (b, h) of a token-major [B, N, H, D] array, the whole (padded) sequence."""
    return pl.BlockSpec((None, dims.n_pad, None, d), lambda b, h, s: (b, 0, h, 0))


def _state_spec(dims: _Dims, rows: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, rows, dims.dk, dims.dv), lambda b, h, s: (b, h, 0, 0, 0))


def _segment_spec(dims: _Dims, matrix: bool) -> pl.BlockSpec:
    if matrix:
        return pl.BlockSpec((None, None, None, dims.dk, dims.dv), lambda b, h, s: (b, h, s, 0, 0))
    return pl.BlockSpec((None, None, None, dims.dk), lambda b, h, s: (b, h, s, 0))


def _all_segments_spec(dims: _Dims, matrix: bool) -> pl.BlockSpec:
    nsp = _next_pow2(dims.ns)
    if matrix:
        return pl.BlockSpec((None, None, nsp, dims.dk, dims.dv), lambda b, h, s: (b, h, 0, 0, 0))
    return pl.BlockSpec((None, None, nsp, dims.dk), lambda b, h, s: (b, h, 0, 0))


def _compiler_params(config: Config):
    return plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _summaries(args, dims: _Dims, config: Config, interpret: bool, grads: bool):
    """Per-segment summaries ([B, H, NSP, ...] fp32) for the folds of the main kernels."""
    b, _, h, _ = args[0].shape
    nsp = _next_pow2(dims.ns)
    vec = jax.ShapeDtypeStruct((b, h, nsp, dims.dk), jnp.float32)
    mat = jax.ShapeDtypeStruct((b, h, nsp, dims.dk, dims.dv), jnp.float32)
    n_mat = 4 if grads else 2
    in_specs = [_row_spec(dims, x.shape[-1]) for x in args]
    return pl.pallas_call(
        functools.partial(_summary_kernel, dims=dims, grads=grads),
        out_shape=[vec, vec] + [mat] * n_mat,
        grid=(b, h, dims.ns),
        in_specs=in_specs,
        out_specs=[_segment_spec(dims, False)] * 2 + [_segment_spec(dims, True)] * n_mat,
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="bigla_segment_summaries",
    )(*args)


def _forward(q, k, v, gf, gb, dims: _Dims, config: Config, interpret: bool):
    b, _, h, _ = q.shape
    args = (q, k, v, gf, gb)
    in_specs = [_row_spec(dims, x.shape[-1]) for x in args]
    extra = []
    if dims.ns > 1:
        extra = list(_summaries(args, dims, config, interpret, grads=False))
        in_specs += [_all_segments_spec(dims, False)] * 2 + [_all_segments_spec(dims, True)] * 2
    ncp = _next_pow2(dims.nc)
    out_shape = [
        jax.ShapeDtypeStruct((b, dims.n, h, dims.dv), v.dtype),
        jax.ShapeDtypeStruct((b, h, ncp, dims.dk, dims.dv), jnp.float32),  # scratch
    ]
    o, _ = pl.pallas_call(
        functools.partial(_forward_kernel, dims=dims, barrier=not interpret),
        out_shape=out_shape,
        grid=(b, h, dims.ns),
        in_specs=in_specs,
        out_specs=[_row_spec(dims, dims.dv), _state_spec(dims, ncp)],
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="bigla_forward",
    )(*args, *extra)
    return o


def _backward(q, k, v, gf, gb, do, dims: _Dims, config: Config, interpret: bool):
    b, _, h, _ = q.shape
    args = (q, k, v, gf, gb, do)
    in_specs = [_row_spec(dims, x.shape[-1]) for x in args]
    extra = []
    if dims.ns > 1:
        extra = list(_summaries(args, dims, config, interpret, grads=True))
        in_specs += [_all_segments_spec(dims, False)] * 2 + [_all_segments_spec(dims, True)] * 4
    ncp = _next_pow2(dims.nc)
    state = jax.ShapeDtypeStruct((b, h, ncp, dims.dk, dims.dv), jnp.float32)
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(gf.shape, jnp.float32),
        jax.ShapeDtypeStruct(gb.shape, jnp.float32),
        state,
        state,
    ]
    out_specs = [_row_spec(dims, x.shape[-1]) for x in (q, k, v, gf, gb)]
    out_specs += [_state_spec(dims, ncp)] * 2
    dq, dk, dv, dgf, dgb, _, _ = pl.pallas_call(
        functools.partial(_backward_kernel, dims=dims, barrier=not interpret),
        out_shape=out_shape,
        grid=(b, h, dims.ns),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="bigla_backward",
    )(*args, *extra)
    return dq, dk, dv, dgf.astype(gf.dtype), dgb.astype(gb.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _bigla(q, k, v, gf, gb, dims: _Dims, config: Config, interpret: bool):
    return _forward(q, k, v, gf, gb, dims, config, interpret)


def _bigla_fwd(q, k, v, gf, gb, dims, config, interpret):
    return _forward(q, k, v, gf, gb, dims, config, interpret), (q, k, v, gf, gb)


def _bigla_bwd(dims, config, interpret, residuals, do):
    return _backward(*residuals, do, dims, config, interpret)


_bigla.defvjp(_bigla_fwd, _bigla_bwd)


def _pad_last(x, size):
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def bigla_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gf: jax.Array,
    gb: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
    config: Config | None = None,
) -> jax.Array:
    """BiGLA with Pallas (Triton) kernels; differentiable (Pallas backward via custom_vjp).

    Args:
      q, k: [B, N, H, Dk] queries and keys (fp32 or bf16; Dk >= 16).
      v: [B, N, H, Dv] values (same dtype as q; Dv >= 16).
      gf, gb: [B, N, H, Dk] per-step log forget gates (<= 0), forward and backward direction;
        used in fp32.
      scale: query scale; ``Dk ** -0.5`` if None.
      interpret: run the same kernels in Pallas interpret mode (any backend, e.g. CPU).
      config: tuning knobs; defaults to :class:`Config()`.

    Returns:
      [B, N, H, Dv] in v's dtype: ``(o_fwd + o_bwd) / 2``.
    """
    config = Config() if config is None else config
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype")
    dk, dv = q.shape[-1], v.shape[-1]
    if dk < SUB or dv < SUB:
        raise ValueError(f"Dk={dk}, Dv={dv}; the Triton kernels need Dk >= {SUB} and Dv >= {SUB}")
    if q.shape[1] == 0:
        return jnp.zeros(v.shape, v.dtype)
    # Power-of-two head dims (Triton tiles); zero columns change nothing.
    dk_p, dv_p = _next_pow2(dk), _next_pow2(dv)
    scale = dk**-0.5 if scale is None else scale
    q, k = _pad_last(q, dk_p), _pad_last(k, dk_p)
    gf, gb = _pad_last(gf.astype(jnp.float32), dk_p), _pad_last(gb.astype(jnp.float32), dk_p)
    v = _pad_last(v, dv_p)
    dims = _dims(q, v, scale, config, q.shape[0] * q.shape[2])
    o = _bigla(q, k, v, gf, gb, dims, config, interpret)
    return o[..., :dv]


__all__ = ["Config", "bigla_triton"]
