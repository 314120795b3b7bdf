"""BiGLA as Pallas kernels with the Triton lowering: forward and backward, behind custom_vjp.

Both scan directions are handled by the same programs, and nothing is flipped or stacked in
device memory. The sequence is cut into chunks of ``BT`` tokens (FLA's ``chunk`` algorithm):

* **states** (one program per batch, head and sequence segment, sequential over its chunks):
  the forward-direction state ``[Dk, Dv]`` walks left to right while the backward-direction
  state walks right to left in the same loop; the state entering each chunk is stored. The
  backward pass also carries the gradients of both states (reading q and the cotangent).
* **segments** (long sequences only): each segment's summary (decay and state) is folded into
  the state entering every segment by a tiny kernel, so that the chunk kernels read complete
  carries and know nothing of segments. By default (``state_passes=2``) a summary-only state
  pass feeds the fold, then a second state pass starts each segment from its incoming state
  and stores complete carries (H100, 8x3x4096, per direction: 0.035 + 0.009 + 0.045 ms);
  ``state_passes=1`` stores segment-local carries and decays in one pass and completes them
  after the fold in an elementwise XLA pass (0.045 + 0.009 + 0.042 ms). Slower on the H100:
  a summary pass in steps of 64 tokens (0.037 / 0.040 ms instead of 0.035 / 0.036), and
  taking the local carry and the incoming state as two products inside the chunk kernels
  (0.87 vs 0.73 ms fwd+bwd at 8x3x4096, f137e45).
* **chunk** (one program per batch, head and chunk, fully parallel): the forward writes the
  output rows of the chunk once (intra-chunk part of both directions + both inter-chunk
  parts). The backward is split in two kernels so that few [BT, D] tiles are live at once
  (register spills dominated a single kernel): ``bigla_backward_dq`` writes dq and q*dq per
  direction; ``bigla_backward_dkv`` writes dk, dv and both gate gradients (in place of the
  q*dq buffers). With ``Config.save_states`` the backward reuses the forward's state carries
  and its state kernel only carries the two state gradients; with ``Config.save_scores`` also
  the forward's score matrices (dv without recomputing the in-sub-chunk scores).

Inside a chunk (e.g. 32 rows = 2 sub-chunks of 16): scores between different sub-chunks are
tensor core products of gate-rescaled operands around the sub-chunk boundary; inside a
sub-chunk they are exact elementwise products (one key row of every sub-chunk per step),
collected into the chunk's score matrix so that they meet v (or do) in one product. Every
exponent is <= 0 (masked before ``exp``) and is built from sums of gates within one sub-chunk
plus whole sub-chunk totals, with the exponents of neighbouring tokens exactly the gate in
between, so fp32 keeps the digits that the gate gradients of steep gates need. A chunk of 16
rows is one sub-chunk: its in-sub-chunk loops read one row per step (no gathers).

With ``Config.diag="split"`` all pairs of a chunk are two tensor-core products (one per
direction; no sub-chunk boundaries, no loop): query and key rows are rescaled by exp of their
gate sums from the chunk's start, so that the product of the two factors is the pair's decay
(each factor within exp(+-SPLIT_LIMIT)). Each program first checks its chunk's gate totals and
runs one of two whole bodies (``pl.when``): the split products, or the exact sub-chunk path
above where the chunk is steeper. Static SASS counts
(``benchmarks/kernel_stats.py``: Triton 3.6, sm_90, 8x3x4096 bf16, 16-token chunks, 2 warps):
the split body is 1176 / 1456 / 2680 instructions per warp in forward / dq / dkv against about
4400 / 5300 / 6700 executed by the loop path (its body 16 times); registers 128 / 128 / 255,
the loop path's (a ``lax.cond`` around the intra-chunk part alone, with values live into both
branches, took dq to 167). On the H200 the loops were measured at 0.26 of the 0.65 ms of
fwd+bwd at 8x3x4096 (by removing them). Timed on the H100 (bf16 fwd+bwd, ``diag="loop"`` ->
``"split"``): 8x3x4096 0.675 -> 0.487 ms, 128x3x196 0.457 -> 0.307, 128x12x196 1.738 -> 1.172
(``benchmarks/results/tune_bigla_split_h100.json``), so "split" is the default; with it, larger
chunks are slower (chunk 32: 0.527 ms at 8x3x4096, 64: 1.024).

Gate gradients follow FLA's chunk decomposition (no sequence-long cumulative sum): cumulative
sums of ``q*dq - k*dk`` over the chunk's rows (without each token's own pair, whose two terms
cancel) plus ``exp(T) sum(S * dS)`` for the pairs that cross the whole chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.bigla.reference import split_packed

SUB = 16  # rows per sub-chunk
# Config.diag="split" rescales operands by exp of gate sums within a chunk (|exponent| <= the
# chunk's total): up to e^64 ~ 6e27 keeps them and their products with O(1e9) values finite
# in fp32 and bf16; steeper chunks take the exact sub-chunk loop.
SPLIT_LIMIT = 64.0
# fp32 inputs on the GPU: 64-token chunks asked for 294,912 B of shared memory (H200, jax 0.11.2:
# RESOURCE_EXHAUSTED over the 232,448 B an SM has), so fp32 chunks are capped at 32 tokens.
FP32_MAX_CHUNK = 32
# diag="split" kernels hold both intra-chunk bodies: fp32 chunks of 32 at Dk = 64, Dv = 128 asked
# for 311,296 B (H100), so split fp32 chunks are capped at 16 tokens on the GPU (the default).
FP32_SPLIT_MAX_CHUNK = 16
# Config.save_states=None keeps the forward's state carries up to this many tokens (ViG at
# 512 px, patch 16) and recomputes them for longer sequences: ViG-T's training step at 1024 px,
# batch 8 planned 3,614 MiB with the carries kept against DeiT-T's 3,543 (H100, ec4f0db), of
# which the carries are 576 MiB by their shapes.
SAVE_STATES_MAX_TOKENS = 1024
# Config.merge_backward=None: one backward chunk kernel instead of two (tested in interpret mode
# and for the CUDA lowering, not yet run on a GPU). ViG-T's training step (224 px, batch 128,
# bf16) compiled for an H100 on the CPU (benchmarks/static_step.py) moves 2.3 GB less HBM per
# step with it, the packed gradient written in place included (26.8 -> 24.5 GB with the gate,
# slope and keep switches on; 49aefe0). Off until timed.
MERGE_BACKWARD_BY_DEFAULT = False
# Warps of the merged kernel (None: the backward's num_warps). Static Triton 3.6 / sm_90 stats
# at (128, 3, 196, 32, 64) bf16 (benchmarks/kernel_stats.py): 2 warps 255 registers, 20 B
# spilled, 8 warps per SM; 4 warps 168 registers, no spill, 12 warps per SM (the separate dkv
# kernel: 255 registers, 8 warps per SM).
MERGED_BACKWARD_WARPS = 4


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tuning knobs of the kernels.

    Attributes:
      chunk: tokens per chunk (BT), a power of two multiple of 16; shorter sequences use less,
        and fp32 inputs on the GPU at most ``FP32_MAX_CHUNK`` (``FP32_SPLIT_MAX_CHUNK`` with
        ``diag="split"``; shared memory).
      num_warps: warps per program of the chunk-parallel kernels.
      num_stages: software-pipelining stages (Triton) of all kernels.
      state_warps: warps per program of the sequential state kernel.
      segments: sequence segments per (batch, head) for the state kernel; None picks enough to
        give ``target_programs`` programs with at least ``min_chunks_per_segment`` chunks each.
      fp32_dots: products of fp32 inputs on the GPU: "tf32x3" (three TF32 tensor-core products,
        ~fp32 accuracy) or "ieee" (exact fp32 FMAs, much slower). Interpret mode: exact fp32.
      bwd_chunk, bwd_warps, bwd_stages: ``chunk``, ``num_warps`` and ``num_stages`` of the
        backward pass (its state and chunk kernels); None uses the forward's value.
      state_stages: ``num_stages`` of the state kernels; None uses ``num_stages``.
      save_states: keep the forward's state carries ([B, H, chunks, Dk, Dv] twice, in the dot
        dtype) for the backward instead of recomputing them (only when the backward's chunk is
        the forward's): more residual memory, less backward work. None (default): keep them
        for sequences of at most ``SAVE_STATES_MAX_TOKENS`` tokens. The carries are about as
        large as q, k, v and the gates together at every length (ViG-T at 1024 px, batch 8:
        48 MiB per block, 576 MiB over its 12 blocks); long sequences are where activation
        memory binds, short ones where the backward's extra state pass shows. Independent of
        ``save_scores``.
      save_scores: keep each chunk's score matrix ([B, H, chunks, BT, BT] in the dot dtype,
        which both products of the scores use) for dv, so that the backward does not recompute
        the in-sub-chunk scores (only when the backward's chunk is the forward's; with or
        without the states: the dkv kernel that recomputes them spills registers in bf16 at
        (8, 3, 4096, 32, 64), ``tests/test_kernel_stats.py``).
      unroll_rows: unroll the chunk kernels' 16-step in-sub-chunk loops (static row index:
        constant masks, no loop overhead; longer compiles).
      state_passes: with segments, 1: one state pass storing segment-local carries, which
        an elementwise XLA pass completes after the fold; 2: a pass storing only segment
        summaries, the fold, then a pass storing complete carries (no completion pass).
      diag: the intra-chunk terms: "split" (default): all pairs of a chunk as tensor-core
        products of operands rescaled by exp of gate sums from the chunk's start (a chunk whose
        gates sum below ``-SPLIT_LIMIT`` takes the "loop" path instead); "loop": products across
        16-row sub-chunks, exact elementwise products within them, one row per step.
      merge_backward: run the two backward chunk kernels' bodies in one program
        (``bigla_backward``: the dq body leaves q * dq in the gate-gradient outputs, a barrier,
        then the dkv body reads them back), so that a chunk's inputs and carries are read from
        HBM once and q * dq is never written there; None: ``MERGE_BACKWARD_BY_DEFAULT``.
      merged_warps: warps of that kernel; None: ``MERGED_BACKWARD_WARPS`` (None there: the
        backward's ``num_warps``).
    """

    chunk: int = 16
    num_warps: int = 2
    num_stages: int = 1
    state_warps: int = 4
    segments: int | None = None
    target_programs: int = 264
    min_chunks_per_segment: int = 2
    fp32_dots: str = "tf32x3"
    bwd_chunk: int | None = None
    bwd_warps: int | None = None
    bwd_stages: int | None = None
    save_states: bool | None = None
    state_stages: int | None = 3
    save_scores: bool = True
    unroll_rows: bool = False
    state_passes: int = 2
    diag: str = "split"
    merge_backward: bool | None = None
    merged_warps: int | None = None

    def __post_init__(self):
        if self.fp32_dots not in ("tf32x3", "ieee"):
            raise ValueError(f"fp32_dots={self.fp32_dots!r}; expected 'tf32x3' or 'ieee'")
        for name in ("chunk", "bwd_chunk"):
            chunk = getattr(self, name)
            if chunk is not None and (chunk < SUB or chunk & (chunk - 1)):
                raise ValueError(f"{name}={chunk}; expected a power of two >= {SUB}")
        if self.state_passes not in (1, 2):
            raise ValueError(f"state_passes={self.state_passes}; expected 1 or 2")
        if self.diag not in ("split", "loop"):
            raise ValueError(f"diag={self.diag!r}; expected 'split' or 'loop'")
        if self.segments is not None and self.segments < 1:
            raise ValueError(f"segments={self.segments}; expected None or >= 1")
        for name in ("num_warps", "state_warps", "bwd_warps", "merged_warps"):
            warps = getattr(self, name)
            if warps is not None and (warps < 1 or warps & (warps - 1)):
                raise ValueError(f"{name}={warps}; expected a power of two >= 1")

    def backward(self) -> Config:
        """The knobs of the backward pass as a forward-style Config (bwd_* fields applied)."""
        pick = lambda value, default: default if value is None else value
        return dataclasses.replace(
            self,
            chunk=pick(self.bwd_chunk, self.chunk),
            num_warps=pick(self.bwd_warps, self.num_warps),
            num_stages=pick(self.bwd_stages, self.num_stages),
            bwd_chunk=None,
            bwd_warps=None,
            bwd_stages=None,
        )


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
    precision: lax.Precision | lax.DotAlgorithmPreset
    unroll: bool = False  # Config.unroll_rows
    diag: str = "loop"  # Config.diag
    heads: int = 1
    # Head-axis offsets of q, k, v, gf, gb in the arrays the kernels read: all 0 for separate
    # [B, N, H, D] arrays; for packed projections (bigla_triton_packed) the same array is read
    # at the head block where each operand starts.
    offsets: tuple[int, ...] = (0, 0, 0, 0, 0)

    @property
    def subs(self) -> int:
        return self.bt // SUB

    @property
    def n_pad(self) -> int:
        return _next_pow2(self.nc * self.bt)

    @property
    def nc_pad(self) -> int:
        return _next_pow2(self.nc)

    @property
    def ns_pad(self) -> int:
        return _next_pow2(self.ns)


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _dims(
    q, v, scale, config: Config, interpret: bool, heads=None, offsets=(0, 0, 0, 0, 0)
) -> _Dims:
    b, n, h, dk = q.shape
    h = h if heads is None else heads
    dv = v.shape[-1]
    low = jnp.finfo(jnp.result_type(q.dtype, v.dtype)).bits < 32
    bt = min(config.chunk, max(SUB, _next_pow2(n)))
    if not low and not interpret:
        bt = min(bt, FP32_SPLIT_MAX_CHUNK if config.diag == "split" else FP32_MAX_CHUNK)
    nc = -(-n // bt)
    if config.segments is not None:
        ns = min(config.segments, nc)
    else:
        want = -(-config.target_programs // (b * h))
        ns = max(1, min(want, nc // config.min_chunks_per_segment))
    cps = -(-nc // ns)
    ns = -(-nc // cps)
    if low:
        precision = lax.Precision.DEFAULT
    elif interpret or config.fp32_dots == "ieee":
        precision = lax.Precision.HIGHEST
    else:
        precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
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
        precision=precision,
        unroll=bool(config.unroll_rows),
        diag=config.diag,
        heads=h,
        offsets=tuple(offsets),
    )


# ----------------------------------------------------------------------------------------------
# In-kernel building blocks. Refs of inputs are [N_pad, D] views of one (batch, head).
# ----------------------------------------------------------------------------------------------


def _dot(a, b, contract, dims: _Dims):
    """fp32-accumulated 2-D product in the dot dtype; ``contract`` = ((a_axis,), (b_axis,))."""
    return lax.dot_general(
        a.astype(dims.dot_dtype),
        b.astype(dims.dot_dtype),
        (contract, ((), ())),
        precision=dims.precision,
        preferred_element_type=jnp.float32,
    )


def _mm(a, b, dims):  # a [M, K] @ b [K, N]
    return _dot(a, b, ((1,), (0,)), dims)


def _mm_nt(a, b, dims):  # a [M, K] @ b [N, K]^T
    return _dot(a, b, ((1,), (1,)), dims)


def _mm_tn(a, b, dims):  # a [K, M]^T @ b [K, N]
    return _dot(a, b, ((0,), (0,)), dims)


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _load_chunk_rows(ref, c, dims: _Dims, dtype=jnp.float32):
    """Rows of chunk ``c`` of a [N_pad, D] ref as [BT, D] ``dtype``; rows >= N read as 0."""
    shape = (dims.bt, ref.shape[-1])
    rows = c * dims.bt + _iota(shape, 0)
    x = plt.load(ref.at[pl.ds(c * dims.bt, dims.bt), :], mask=rows < dims.n, other=0)
    return x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Columns [start, start + width) of a [N_pad, W] ref: one head of a packed gradient."""

    ref: object
    start: jax.Array
    width: int


def _store_chunk_rows(ref, c, dims: _Dims, x):
    """Stores x [BT, D] as chunk c's rows of a [N_pad, D] ref (or of a :class:`_Columns`)."""
    cols = slice(None)
    if isinstance(ref, _Columns):
        ref, cols = ref.ref, pl.ds(ref.start, ref.width)
    rows = c * dims.bt + _iota(x.shape, 0)
    plt.store(ref.at[pl.ds(c * dims.bt, dims.bt), cols], x.astype(ref.dtype), mask=rows < dims.n)


def _load_sub_row(ref, c, j, dims: _Dims):
    """Row j of each row's sub-chunk of chunk c: [BT, D] fp32 (row r gets row r//16*16 + j).

    A gather load (the 16 rows of a sub-chunk read the same row, from L1), so that no value
    is reshaped or broadcast across rows inside the per-row loops. A chunk of one sub-chunk
    loads the row once as [1, D] instead (it broadcasts against [BT, D]).
    """
    if dims.subs == 1:
        row = c * dims.bt + j
        mask = row + _iota((1, ref.shape[-1]), 0) < dims.n
        return plt.load(ref.at[pl.ds(row, 1), :], mask=mask, other=0).astype(jnp.float32)
    shape = (dims.bt, ref.shape[-1])
    rows = c * dims.bt + (_iota(shape, 0) // SUB) * SUB + j
    x = plt.load(ref.at[rows, _iota(shape, 1)], mask=rows < dims.n, other=0)
    return x.astype(jnp.float32)


def _per_row(x_sub, dims: _Dims):
    """[S, D] per sub-chunk -> [BT, D] (each sub-chunk's row repeated over its rows)."""
    s, d = x_sub.shape
    return jnp.broadcast_to(x_sub[:, None, :], (s, SUB, d)).reshape(dims.bt, d)


def _sub_sums(x, dims: _Dims):
    """[BT, D] -> [S, D] sums over each sub-chunk's rows."""
    return jnp.sum(x.reshape(dims.subs, SUB, x.shape[-1]), axis=1)


def _pick_row(x, j, dims: _Dims):
    """[BT, D] -> [S, D]: row ``j`` of every sub-chunk (an exact copy)."""
    local = _iota(x.shape, 0) % SUB
    return _sub_sums(jnp.where(local == j, x, 0.0), dims)


def _sub_range_sums(t, select):
    """sum_m select(out, m) t[m]: [S, D] -> [S, D]; ``select`` gets [S, S, 1] ids (out, m)."""
    s = t.shape[0]
    out_id, m_id = _iota((s, s, 1), 0), _iota((s, s, 1), 1)
    return jnp.sum(jnp.where(select(out_id, m_id), t[None, :, :], 0.0), axis=1)


@dataclasses.dataclass
class _Gates:
    """Gate exponents of one chunk (all <= 0), [BT, Dk] fp32 unless noted.

    Local (within each 16-row sub-chunk): pf inclusive prefix and xf exclusive suffix of gf;
    xb exclusive prefix and sb inclusive suffix of gb; tf, tb [S, Dk] sub-chunk totals (exact
    copies of the last prefix sums, so that xf and sb are exactly 0 / the gate on the edges).
    Chunk level: qf / qb query exponents (rows to the chunk's start / end), kf / kb key
    exponents (rows after / before the row to the chunk's end / start); totals [Dk].
    """

    pf: jax.Array
    xf: jax.Array
    xb: jax.Array
    sb: jax.Array
    tf: jax.Array
    tb: jax.Array
    qf: jax.Array
    kf: jax.Array
    qb: jax.Array
    kb: jax.Array
    total_f: jax.Array
    total_b: jax.Array


def _gates(gf, gb, dims: _Dims) -> _Gates:
    s, d = dims.subs, gf.shape[-1]
    pf = jnp.cumsum(gf.reshape(s, SUB, d), axis=1).reshape(dims.bt, d)
    pb = jnp.cumsum(gb.reshape(s, SUB, d), axis=1).reshape(dims.bt, d)
    tf = _pick_row(pf, SUB - 1, dims)
    tb = _pick_row(pb, SUB - 1, dims)
    xf = _per_row(tf, dims) - pf
    xb = pb - gb
    sb = _per_row(tb, dims) - pb + gb
    before = lambda t: _sub_range_sums(t, lambda out, m: m < out)
    after = lambda t: _sub_range_sums(t, lambda out, m: m > out)

    def chunk_level(local, sums, totals):  # one sub-chunk: the local exponents are the chunk's
        return local if s == 1 else local + _per_row(sums(totals), dims)

    return _Gates(
        pf=pf,
        xf=xf,
        xb=xb,
        sb=sb,
        tf=tf,
        tb=tb,
        qf=chunk_level(pf, before, tf),
        kf=chunk_level(xf, after, tf),
        qb=chunk_level(sb, after, tb),
        kb=chunk_level(xb, before, tb),
        total_f=jnp.sum(tf, axis=0),
        total_b=jnp.sum(tb, axis=0),
    )


def _boundary_factors(g: _Gates, dims: _Dims):
    """Per sub-chunk boundary, the key-side decay factors of the off-diagonal sub-blocks.

    Yields (direction, i, key_factor) where key_factor [BT, Dk] is exp(key exponent to the
    boundary of query sub-chunk i) on the key rows of that direction (sub-chunks before i for
    the forward direction, after i for the backward one) and 0 elsewhere.
    """
    sub = _iota((dims.bt, 1), 0) // SUB
    e_xf, e_xb = jnp.exp(g.xf), jnp.exp(g.xb)
    for i in range(1, dims.subs):  # forward: keys in sub-chunks m < i, query sub-chunk i
        between = _sub_range_sums(g.tf, lambda out, m, i=i: (m > out) & (m < i))
        yield "f", i, jnp.where(sub < i, e_xf * _per_row(jnp.exp(between), dims), 0.0)
    for i in range(dims.subs - 1):  # backward: keys in sub-chunks m > i
        between = _sub_range_sums(g.tb, lambda out, m, i=i: (m < out) & (m > i))
        yield "b", i, jnp.where(sub > i, e_xb * _per_row(jnp.exp(between), dims), 0.0)


def _off_diagonal_scores(q32, k32, g: _Gates, dims: _Dims):
    """Scores between different sub-chunks of a chunk (both directions), [BT, BT] fp32."""
    sub = _iota((dims.bt, 1), 0) // SUB
    q_f, q_b = q32 * jnp.exp(g.pf), q32 * jnp.exp(g.sb)
    a = jnp.zeros((dims.bt, dims.bt), jnp.float32)
    for direction, i, key_factor in _boundary_factors(g, dims):
        query = jnp.where(sub == i, q_f if direction == "f" else q_b, 0.0)
        a += _mm_nt(query, k32 * key_factor, dims)
    return a


def _prefix_init(dims: _Dims):
    """Zero gate prefix of the in-sub-chunk loops: [BT, Dk], or [1, Dk] for one sub-chunk."""
    return jnp.zeros((dims.bt if dims.subs > 1 else 1, dims.dk), jnp.float32)


def _diag_masks(j, dims: _Dims):
    """[BT, 1] masks of the rows after / before / at row j of their sub-chunk."""
    local = _iota((dims.bt, 1), 0) % SUB
    return local > j, local < j, local == j


def _diag_query_decay(g: _Gates, j, prefix_f, prefix_b, dims: _Dims):
    """Exact in-sub-chunk decays between query row r and key row j of r's sub-chunk, [BT, Dk].

    Args:
      prefix_f: [BT, Dk] (or [1, Dk]) sum of gf over rows 0..j of each row's sub-chunk.
      prefix_b: the same for gb over rows 0..j-1 (exclusive).

    Returns:
      exp of the exponent (<= 0) of the rows after j (forward pairs) and before j (backward
      pairs); 1 on row j itself.
    """
    after, before, _ = _diag_masks(j, dims)
    return jnp.exp(jnp.where(after, g.pf - prefix_f, jnp.where(before, prefix_b - g.xb, 0.0)))


def _diag_key_decay(g: _Gates, j, prefix_f, prefix_b, dims: _Dims):
    """Like :func:`_diag_query_decay` with row j as the query and row s as the key."""
    after, before, _ = _diag_masks(j, dims)
    return jnp.exp(jnp.where(before, prefix_f - g.pf, jnp.where(after, g.xb - prefix_b, 0.0)))


def _pair_masks(dims: _Dims):
    """[BT, BT] masks of the pairs of a chunk (row r, column s): r > s, r < s, r == s."""
    shape = (dims.bt, dims.bt)
    r, s = _iota(shape, 0), _iota(shape, 1)
    return r > s, r < s, r == s


def _split_factors(g: _Gates):
    """Rescaling factors of the pairs of one chunk as products, [BT, Dk] fp32 each.

    For rows r, s of the chunk: ``fq[r] fk[s] = exp(qf_r - qf_s)``, the forward decay for
    r > s, and ``bq[r] bk[s] = exp(kb_s - kb_r)``, the backward decay for r < s (qf, kb: gate
    sums from the chunk's start); each factor is within exp(+-|chunk total|). ``fq`` is also
    the query factor of the forward direction's inter-chunk term.
    """
    return jnp.exp(g.qf), jnp.exp(-g.qf), jnp.exp(-g.kb), jnp.exp(g.kb)


def _split_is_safe(gf_ref, gb_ref, c, dims: _Dims):
    """Whether chunk c's gates sum to >= ``-SPLIT_LIMIT`` in both directions (not NaN)."""
    totals = jnp.maximum(
        -jnp.sum(_load_chunk_rows(gf_ref, c, dims), axis=0),
        -jnp.sum(_load_chunk_rows(gb_ref, c, dims), axis=0),
    )
    return jnp.max(totals, axis=0) <= SPLIT_LIMIT


def _chunk_kernel(kernel, dims: _Dims, with_head: bool = False):
    """A chunk kernel ``kernel(q, k, v, gf, gb, ..., c=chunk, split=...)`` as ``Config.diag``
    asks, for the chunk of ``program_id(2)`` (``with_head``: also ``head=program_id(1)``).

    "split": each program checks its chunk's gate totals, then runs the whole kernel with the
    split products, or with the exact loop path where the chunk is too steep: two disjoint
    bodies (``pl.when``), so that no value is live across both and neither path pays the
    other's registers (a ``lax.cond`` around the intra-chunk part alone raised dq from 128 to
    167).
    """

    def run(*refs):
        c = pl.program_id(2)  # read outside the branches (interpret mode needs it so)
        body = functools.partial(kernel, head=pl.program_id(1)) if with_head else kernel
        if dims.diag == "loop":
            return body(*refs, c=c, split=False)
        safe = _split_is_safe(refs[3], refs[4], c, dims)
        pl.when(safe)(lambda: body(*refs, c=c, split=True))
        pl.when(jnp.logical_not(safe))(lambda: body(*refs, c=c, split=False))

    return run


def _intra_chunk(split: bool, by_products, by_loop, operand):
    """The intra-chunk terms not yet in ``operand``: all pairs of the chunk as split products,
    or (the off-diagonal sub-blocks already in ``operand``) the exact in-sub-chunk loop."""
    return by_products(operand) if split else by_loop(operand)


def _row_loop(body, init, dims: _Dims):
    """``body(j, carry)`` for the 16 rows j of a sub-chunk: a loop, or unrolled (static j)."""
    if not dims.unroll:
        return lax.fori_loop(0, SUB, body, init)
    carry = init
    for j in range(SUB):
        carry = body(j, carry)
    return carry


def _own_block_cols(shape, j):
    """[BT, BT] mask of column ``sub(r) * 16 + j`` in row r (entry j of r's own sub-chunk)."""
    return _iota(shape, 1) == (_iota(shape, 0) // SUB) * SUB + j


def _own_block_column(x, j):
    """[BT, BT] -> [BT, 1]: x[r, sub(r) * 16 + j], an exact copy."""
    return jnp.sum(jnp.where(_own_block_cols(x.shape, j), x, 0.0), axis=1, keepdims=True)


def _place_own_block_column(x, column, j):
    """x with x[r, sub(r) * 16 + j] = column[r] ([BT, BT], column [BT, 1])."""
    return jnp.where(_own_block_cols(x.shape, j), column, x)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def _segment(dims: _Dims):
    seg = pl.program_id(2)
    first = seg * dims.cps
    return first, jnp.minimum(first + dims.cps, dims.nc)


# State-kernel carries: name -> (walks from the left?, gate direction). h_f / h_b are the
# forward / backward direction's states, d_f / d_b their gradients.
_CARRY_WALKS = {"h_f": (True, "f"), "h_b": (False, "b"), "d_f": (False, "f"), "d_b": (True, "b")}
_STATES = ("h_f", "h_b")
_GRADS = ("d_f", "d_b")


def _states_kernel(*refs, dims: _Dims, names: tuple[str, ...], mode: str):
    """Sequential over the chunks of one segment: the carries ``names`` entering every chunk.

    Left walkers (h_f, d_b) move left to right and right walkers (h_b, d_f) right to left
    in the same loop. Inputs: q, k, v, gf, gb and, when a gradient carry is among ``names``,
    do. ``mode`` (see :func:`_carries`):

    * "local": per chunk the segment-local carry; with segments also the log decays from the
      segment's edge (per chunk) and the segment's own summary and whole decays.
    * "summary": only the segment's summary and whole decays (no per-chunk stores).
    * "complete": every segment starts from its incoming carries (one more input per carry)
      and stores the complete carry per chunk.
    """
    grads = any(name in _GRADS for name in names)
    n_in = 6 if grads else 5
    q_ref, k_ref, v_ref, gf_ref, gb_ref = refs[:5]
    do_ref = refs[5] if grads else None
    refs = list(refs[n_in:])
    n_carry = len(names)
    segmented = dims.ns > 1
    in_refs = carry_refs = log_refs = sum_refs = None
    if mode == "complete":
        in_refs, refs = refs[:n_carry], refs[n_carry:]  # per segment
    if mode != "summary":
        carry_refs, refs = refs[:n_carry], refs[n_carry:]  # per chunk
    if mode == "local" and segmented:
        log_refs, refs = refs[:n_carry], refs[n_carry:]  # per chunk
    if mode == "summary" or log_refs is not None:
        sum_refs, refs = refs[:n_carry], refs[n_carry:]  # per segment
        seg_log_f_ref, seg_log_b_ref = refs
    first, last = _segment(dims)
    states_needed = any(name in _STATES for name in names)

    def load(c):
        g = _gates(_load_chunk_rows(gf_ref, c, dims), _load_chunk_rows(gb_ref, c, dims), dims)
        k = v = q = do = None
        if states_needed:
            k = _load_chunk_rows(k_ref, c, dims)
            v = _load_chunk_rows(v_ref, c, dims, dims.dot_dtype)
        if grads:
            q = _load_chunk_rows(q_ref, c, dims)
            do = _load_chunk_rows(do_ref, c, dims) * (0.5 * dims.scale)
        return q, k, v, do, g

    def step(name, x, chunk):
        q, k, v, do, g = chunk
        total = g.total_f if _CARRY_WALKS[name][1] == "f" else g.total_b
        if name == "h_f":
            new = _mm_tn(k * jnp.exp(g.kf), v, dims)
        elif name == "h_b":
            new = _mm_tn(k * jnp.exp(g.kb), v, dims)
        elif name == "d_f":
            new = _mm_tn(q * jnp.exp(g.qf), do, dims)
        else:
            new = _mm_tn(q * jnp.exp(g.qb), do, dims)
        return jnp.exp(total)[:, None] * x + new, total

    def body(i, carry):
        states, logs = carry
        c_l, c_r = first + i, last - 1 - i
        chunk_of = lambda name: c_l if _CARRY_WALKS[name][0] else c_r
        for idx, name in enumerate(names):
            if carry_refs is not None:
                ref = carry_refs[idx]
                ref[chunk_of(name), :, :] = states[idx].astype(ref.dtype)
            if log_refs is not None:  # log decay from the segment's edge to the chunk
                log_refs[idx][chunk_of(name), :] = logs[idx]
        new_states, new_logs = list(states), list(logs)
        for from_left, c in ((True, c_l), (False, c_r)):  # one chunk's values live at a time
            chunk = load(c)
            for idx, name in enumerate(names):
                if _CARRY_WALKS[name][0] == from_left:
                    new_states[idx], total = step(name, states[idx], chunk)
                    new_logs[idx] = logs[idx] + total
        return tuple(new_states), tuple(new_logs)

    zero_s = jnp.zeros((dims.dk, dims.dv), jnp.float32)
    zero_d = jnp.zeros((dims.dk,), jnp.float32)
    start = (zero_s,) * n_carry if in_refs is None else tuple(ref[...] for ref in in_refs)
    init = (start, (zero_d,) * n_carry)
    states, logs = lax.fori_loop(0, last - first, body, init)
    if sum_refs is not None:
        for ref, x in zip(sum_refs, states, strict=True):
            ref[...] = x
        gates = [_CARRY_WALKS[name][1] for name in names]
        seg_log_f_ref[...] = logs[gates.index("f")]  # the segment's whole decays
        seg_log_b_ref[...] = logs[gates.index("b")]


def _fold_kernel(log_f_ref, log_b_ref, *refs, dims: _Dims, names: tuple[str, ...]):
    """Carries entering every segment from the segment summaries (sequential over segments)."""
    n = len(names)
    sum_refs, in_refs = refs[:n], refs[n:]
    zero = jnp.zeros((dims.dk, dims.dv), jnp.float32)

    def body(i, carries):
        new = []
        for idx, (name, h) in enumerate(zip(names, carries, strict=True)):
            from_left, gate = _CARRY_WALKS[name]
            log_ref = log_f_ref if gate == "f" else log_b_ref
            seg = i if from_left else dims.ns - 1 - i
            in_refs[idx][seg, :, :] = h
            new.append(jnp.exp(log_ref[seg, :])[:, None] * h + sum_refs[idx][seg, :, :])
        return tuple(new)

    lax.fori_loop(0, dims.ns, body, (zero,) * n)


def _carries_of_chunk(c, carry_refs):
    """The carries of chunk c (complete: segments already folded in), [Dk, Dv] fp32 each."""
    return [ref[c, :, :].astype(jnp.float32) for ref in carry_refs]


def _forward_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, *refs, dims: _Dims, scores: bool, c, split: bool
):
    """Output rows of one chunk; with ``scores`` also its [BT, BT] score matrix (query-major)."""
    carry_refs, refs = refs[:2], refs[2:]
    o_ref = refs[0]
    q32 = _load_chunk_rows(q_ref, c, dims)
    k32 = _load_chunk_rows(k_ref, c, dims)
    v = _load_chunk_rows(v_ref, c, dims, dims.dot_dtype)
    g = _gates(_load_chunk_rows(gf_ref, c, dims), _load_chunk_rows(gb_ref, c, dims), dims)
    h_f, h_b = _carries_of_chunk(c, carry_refs)
    o = _mm(q32 * jnp.exp(g.qf), h_f, dims)
    o += _mm(q32 * jnp.exp(g.qb), h_b, dims)

    def column(j, carry):  # key row j of every sub-chunk: the diagonal blocks' scores, exact
        a, prefix_f, prefix_b = carry
        prefix_f = prefix_f + _load_sub_row(gf_ref, c, j, dims)
        decay = _diag_query_decay(g, j, prefix_f, prefix_b, dims)
        own = _diag_masks(j, dims)[2].astype(jnp.float32)
        k_j = _load_sub_row(k_ref, c, j, dims)
        score = jnp.sum(q32 * k_j * (decay + own), axis=1, keepdims=True)
        a = _place_own_block_column(a, score, j)
        return a, prefix_f, prefix_b + _load_sub_row(gb_ref, c, j, dims)

    def by_products():  # all pairs of the chunk
        fq, fk, bq, bk = _split_factors(g)
        fwd, bwd, eye = _pair_masks(dims)
        a_f = _mm_nt(q32 * fq, k32 * fk, dims)
        a_b = _mm_nt(q32 * bq, k32 * bk, dims)
        own = 2.0 * jnp.sum(q32 * k32, axis=1, keepdims=True)  # both directions, exact
        return jnp.where(fwd, a_f, jnp.where(bwd, a_b, jnp.where(eye, own, 0.0)))

    def by_loop():  # pairs across sub-chunks as products, within them by the exact loop
        a = _off_diagonal_scores(q32, k32, g, dims)  # zero on the diagonal blocks
        zero = _prefix_init(dims)
        return _row_loop(column, (a, zero, zero), dims)[0]

    a = by_products() if split else by_loop()
    o += _mm(a, v, dims)
    _store_chunk_rows(o_ref, c, dims, o * (0.5 * dims.scale))
    if scores:
        refs[1][c, :, :] = a.astype(refs[1].dtype)


def _backward_dq_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref, *refs, dims: _Dims, c, split: bool
):
    """dq of one chunk's rows, and q * dq per direction for the gate gradients.

    The first of the two backward chunk kernels (split to keep few [BT, D] values live):
    inter-chunk and off-diagonal terms first, then the in-sub-chunk loop, so that little
    besides the loop's own values is live across it.
    """
    carry_refs, refs = refs[:2], refs[2:]
    dq_ref, qdq_f_ref, qdq_b_ref = refs
    k32 = _load_chunk_rows(k_ref, c, dims)
    v = _load_chunk_rows(v_ref, c, dims, dims.dot_dtype)
    do = _load_chunk_rows(do_ref, c, dims) * (0.5 * dims.scale)
    g = _gates(_load_chunk_rows(gf_ref, c, dims), _load_chunk_rows(gb_ref, c, dims), dims)
    da = _mm_nt(do, v, dims)  # [BT, BT]: d score[r, s]

    # Inter-chunk terms, then the off-diagonal sub-blocks.
    h_f, h_b = _carries_of_chunk(c, carry_refs)
    dq_f = _mm_nt(do, h_f, dims) * jnp.exp(g.qf)
    dq_b = _mm_nt(do, h_b, dims) * jnp.exp(g.qb)
    sub = _iota((dims.bt, 1), 0) // SUB
    e_pf, e_sb = jnp.exp(g.pf), jnp.exp(g.sb)
    for direction, i, key_factor in () if split else _boundary_factors(g, dims):
        if direction == "f":
            dq_f += jnp.where(sub == i, _mm(da, k32 * key_factor, dims) * e_pf, 0.0)
        else:
            dq_b += jnp.where(sub == i, _mm(da, k32 * key_factor, dims) * e_sb, 0.0)
    own = 2.0 * jnp.sum(do * v.astype(jnp.float32), axis=1, keepdims=True)  # both directions

    # Diagonal sub-blocks, exact. Step j: row j of every sub-chunk as the key.
    def dq_column(j, carry):
        dq_f, dq_b, prefix_f, prefix_b = carry
        prefix_f = prefix_f + _load_sub_row(gf_ref, c, j, dims)
        after, before, _ = _diag_masks(j, dims)
        decay = _diag_query_decay(g, j, prefix_f, prefix_b, dims)
        w = _own_block_column(da, j) * decay * _load_sub_row(k_ref, c, j, dims)
        dq_f += jnp.where(after, w, 0.0)
        dq_b += jnp.where(before, w, 0.0)
        return dq_f, dq_b, prefix_f, prefix_b + _load_sub_row(gb_ref, c, j, dims)

    def by_products(dq):
        fq, fk, bq, bk = _split_factors(g)
        fwd, bwd, _ = _pair_masks(dims)
        dq_f = dq[0] + _mm(jnp.where(fwd, da, 0.0), k32 * fk, dims) * fq
        dq_b = dq[1] + _mm(jnp.where(bwd, da, 0.0), k32 * bk, dims) * bq
        return dq_f, dq_b

    def by_loop(dq):
        zero = _prefix_init(dims)
        return _row_loop(dq_column, (*dq, zero, zero), dims)[:2]

    dq_f, dq_b = _intra_chunk(split, by_products, by_loop, (dq_f, dq_b))
    _store_chunk_rows(dq_ref, c, dims, dq_f + dq_b + own * k32)
    q32 = _load_chunk_rows(q_ref, c, dims)
    _store_chunk_rows(qdq_f_ref, c, dims, q32 * dq_f)
    _store_chunk_rows(qdq_b_ref, c, dims, q32 * dq_b)


def _backward_dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    gf_ref,
    gb_ref,
    do_ref,
    qdq_f_ref,
    qdq_b_ref,
    *refs,
    dims: _Dims,
    scores: bool,
    c,
    split: bool,
):
    """dk, dv and both gate gradients of one chunk's rows (second backward chunk kernel).

    Gate gradients (module docstring), the token's own pair left out: with a = q*dq - k*dk
    of the intra-chunk pairs and b = k*dk of the inter-chunk key terms, per direction
    dgf = suffix-sum(a_f) + exclusive prefix-sum(b_f) + cross_f and
    dgb = prefix-sum(a_b) + exclusive suffix-sum(b_b) + cross_b, one cumulative sum each.
    With ``scores`` the first extra ref holds the forward's score matrices (dv needs them).
    """
    a_ref = None
    if scores:
        a_ref, refs = refs[0], refs[1:]
    carry_refs, refs = refs[:4], refs[4:]
    dk_ref, dv_ref, dgf_ref, dgb_ref = refs
    q32 = _load_chunk_rows(q_ref, c, dims)
    k32 = _load_chunk_rows(k_ref, c, dims)
    v = _load_chunk_rows(v_ref, c, dims, dims.dot_dtype)
    do = _load_chunk_rows(do_ref, c, dims) * (0.5 * dims.scale)
    g = _gates(_load_chunk_rows(gf_ref, c, dims), _load_chunk_rows(gb_ref, c, dims), dims)
    dat = _mm_nt(v, do, dims)  # [BT, BT]: d score[r, s] at [s, r]

    # Inter-chunk terms: dv's, and dk's as part of the output (dk_inter) and of the gate
    # gradients (b = k * dk per direction), with the cross terms.
    h_f, h_b, d_f, d_b = _carries_of_chunk(c, carry_refs)
    e_kf, e_kb = jnp.exp(g.kf), jnp.exp(g.kb)
    dk_f_inter = _mm_nt(v, d_f, dims) * e_kf
    dk_b_inter = _mm_nt(v, d_b, dims) * e_kb
    dv = _mm(k32 * e_kf, d_f, dims) + _mm(k32 * e_kb, d_b, dims)
    own = 2.0 * jnp.sum(do * v.astype(jnp.float32), axis=1, keepdims=True)  # both directions
    dk_rest = dk_f_inter + dk_b_inter + own * q32
    b_f = k32 * dk_f_inter
    b_b = k32 * dk_b_inter
    cross_f = jnp.exp(g.total_f) * jnp.sum(h_f * d_f, axis=1)
    cross_b = jnp.exp(g.total_b) * jnp.sum(h_b * d_b, axis=1)

    # Off-diagonal sub-blocks; at[s, r] collects the score of query r and key s.
    sub = _iota((dims.bt, 1), 0) // SUB
    e_pf, e_sb = jnp.exp(g.pf), jnp.exp(g.sb)
    at = None if scores else jnp.zeros((dims.bt, dims.bt), jnp.float32)
    dk_f = jnp.zeros_like(k32)  # intra-chunk, strictly off the token's own pair
    dk_b = jnp.zeros_like(k32)
    for direction, i, key_factor in () if split else _boundary_factors(g, dims):
        query = jnp.where(sub == i, q32 * (e_pf if direction == "f" else e_sb), 0.0)
        if not scores:
            at += _mm_nt(k32 * key_factor, query, dims)
        if direction == "f":
            dk_f += _mm(dat, query, dims) * key_factor
        else:
            dk_b += _mm(dat, query, dims) * key_factor

    # Diagonal sub-blocks, exact. Step j: row j of every sub-chunk as the query.
    def dk_column(j, carry):
        dk_f, dk_b, at, prefix_f, prefix_b = carry if not scores else (*carry[:2], None, *carry[2:])
        prefix_f = prefix_f + _load_sub_row(gf_ref, c, j, dims)
        after, before, own_row = _diag_masks(j, dims)
        decay = _diag_key_decay(g, j, prefix_f, prefix_b, dims)
        q_j = _load_sub_row(q_ref, c, j, dims)
        w = _own_block_column(dat, j) * decay * q_j
        dk_f += jnp.where(before, w, 0.0)
        dk_b += jnp.where(after, w, 0.0)
        if scores:
            return dk_f, dk_b, prefix_f, prefix_b + _load_sub_row(gb_ref, c, j, dims)
        own_weight = decay + own_row.astype(jnp.float32)  # the token's own pair counts twice
        score = jnp.sum(q_j * k32 * own_weight, axis=1, keepdims=True)
        at = _place_own_block_column(at, score, j)
        return dk_f, dk_b, at, prefix_f, prefix_b + _load_sub_row(gb_ref, c, j, dims)

    def by_products(x):  # dat[s, r] of a forward pair (r > s) lies above the diagonal
        fwd, bwd, eye = _pair_masks(dims)
        if scores:  # one direction at a time (fewer live values)
            dk_f = _mm(jnp.where(bwd, dat, 0.0), q32 * jnp.exp(g.qf), dims) * jnp.exp(-g.qf)
            dk_b = _mm(jnp.where(fwd, dat, 0.0), q32 * jnp.exp(-g.kb), dims) * jnp.exp(g.kb)
            return x[0] + dk_f, x[1] + dk_b
        fq, fk, bq, bk = _split_factors(g)
        q_f, q_b = q32 * fq, q32 * bq
        dk_f = x[0] + _mm(jnp.where(bwd, dat, 0.0), q_f, dims) * fk
        dk_b = x[1] + _mm(jnp.where(fwd, dat, 0.0), q_b, dims) * bk
        at_f = _mm_nt(k32 * fk, q_f, dims)
        at_b = _mm_nt(k32 * bk, q_b, dims)
        own = 2.0 * jnp.sum(q32 * k32, axis=1, keepdims=True)
        at = x[2] + jnp.where(bwd, at_f, jnp.where(fwd, at_b, jnp.where(eye, own, 0.0)))
        return dk_f, dk_b, at

    def by_loop(x):
        zero = _prefix_init(dims)
        return _row_loop(dk_column, (*x, zero, zero), dims)[: len(x)]

    if scores:
        dk_f, dk_b = _intra_chunk(split, by_products, by_loop, (dk_f, dk_b))
        dv += _mm_tn(a_ref[c, :, :], do, dims)
    else:
        dk_f, dk_b, at = _intra_chunk(split, by_products, by_loop, (dk_f, dk_b, at))
        dv += _mm(at, do, dims)
    _store_chunk_rows(dv_ref, c, dims, dv)
    _store_chunk_rows(dk_ref, c, dims, dk_f + dk_b + dk_rest)
    a_f = _load_chunk_rows(qdq_f_ref, c, dims) - k32 * dk_f
    a_b = _load_chunk_rows(qdq_b_ref, c, dims) - k32 * dk_b
    x_f = b_f - a_f
    x_b = a_b - b_b
    dgf = jnp.sum(a_f, axis=0) + jnp.cumsum(x_f, axis=0) - x_f + cross_f[None, :]
    dgb = jnp.sum(b_b, axis=0) + jnp.cumsum(x_b, axis=0) + cross_b[None, :]
    _store_chunk_rows(dgf_ref, c, dims, dgf)
    _store_chunk_rows(dgb_ref, c, dims, dgb)


def _backward_merged_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref, *refs, dims: _Dims, scores: bool,
    barrier: bool, packed: bool, head, c, split: bool,
):  # fmt: skip
    """All five gradients of one chunk's rows (``Config.merge_backward``): the dq kernel's
    body, which stores q * dq per direction into the gate-gradient outputs, then (after a
    barrier: other threads of the program read those rows) the dkv kernel's body, which reads
    them back and overwrites them with the gate gradients. Refs after ``do``: the scores (with
    ``scores``), the four carries, then dq, dk, dv, dgf, dgb; with ``packed`` one
    [N_pad, 2K + V] ref in place of dq, dk, dv, written head by head as the inputs are read."""
    a_refs, refs = (refs[:1], refs[1:]) if scores else ((), refs)
    carries, refs = refs[:4], refs[4:]
    if packed:
        dqkv_ref, dgf_ref, dgb_ref = refs
        key_dim = dims.heads * dims.dk
        dq_ref = _Columns(dqkv_ref, head * dims.dk, dims.dk)
        dk_ref = _Columns(dqkv_ref, key_dim + head * dims.dk, dims.dk)
        dv_ref = _Columns(dqkv_ref, 2 * key_dim + head * dims.dv, dims.dv)
    else:
        dq_ref, dk_ref, dv_ref, dgf_ref, dgb_ref = refs
    inputs = (q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref)
    _backward_dq_kernel(
        *inputs, *carries[:2], dq_ref, dgf_ref, dgb_ref, dims=dims, c=c, split=split
    )
    if barrier:
        plt.debug_barrier()
    _backward_dkv_kernel(
        *inputs, dgf_ref, dgb_ref, *a_refs, *carries, dk_ref, dv_ref, dgf_ref, dgb_ref,
        dims=dims, scores=scores, c=c, split=split,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers
# ----------------------------------------------------------------------------------------------


def _seq_spec(dims: _Dims, d: int, offset: int = 0) -> pl.BlockSpec:
    """One (b, h) of a token-major [B, N, H', D] array, the whole (padded) sequence; head h is
    read at index ``offset + h`` of the head axis."""
    return pl.BlockSpec((None, dims.n_pad, None, d), lambda b, h, s: (b, 0, offset + h, 0))


def _input_specs(args, dims: _Dims) -> list[pl.BlockSpec]:
    """Specs of (q, k, v, gf, gb[, do]) at their head offsets (``do`` is never packed)."""
    offsets = dims.offsets + (0,) * (len(args) - len(dims.offsets))
    return [_seq_spec(dims, x.shape[-1], off) for x, off in zip(args, offsets, strict=True)]


def _per_bh_spec(rows: int, *tail: int) -> pl.BlockSpec:
    """All ``rows`` entries of one (b, h) of a [B, H, rows, *tail] array."""
    zeros = (0,) * len(tail)
    return pl.BlockSpec((None, None, rows, *tail), lambda b, h, s: (b, h, 0, *zeros))


def _per_program_spec(*tail: int) -> pl.BlockSpec:
    """Entry s of one (b, h) of a [B, H, S, *tail] array (one program's own row)."""
    zeros = (0,) * len(tail)
    return pl.BlockSpec((None, None, None, *tail), lambda b, h, s: (b, h, s, *zeros))


def _params(warps: int, stages: int):
    return plt.CompilerParams(num_warps=warps, num_stages=stages)


def _state_params(config: Config):
    stages = config.num_stages if config.state_stages is None else config.state_stages
    return _params(config.state_warps, stages)


def _state_kernel_name(grads: bool, mode: str) -> str:
    base = "bigla_states_bwd" if grads else "bigla_states"
    return base if mode == "local" else f"{base}_{mode}"


def _carries(args, dims: _Dims, config: Config, interpret: bool, names: tuple[str, ...]):
    """Per-chunk carries entering each chunk, complete (segments folded in).

    Args:
      args: (q, k, v, gf, gb) and, for gradient carries, do.
      names: which carries (see ``_CARRY_WALKS``), in the order they are returned.

    Returns:
      list of [B, H, NC_pad, Dk, Dv] carries entering each chunk, in the dot dtype. With
      segments and ``config.state_passes == 1``: segment-local carries completed by
      :func:`_add_incoming`; with 2: a summary pass, the fold, then a pass that starts every
      segment from its incoming carries and stores complete ones.
    """
    b, h = args[0].shape[0], dims.heads
    n = len(names)
    grads = any(name in _GRADS for name in names)
    carry = jax.ShapeDtypeStruct((b, h, dims.nc_pad, dims.dk, dims.dv), dims.dot_dtype)
    carry_spec = _per_bh_spec(dims.nc_pad, dims.dk, dims.dv)
    summary = jax.ShapeDtypeStruct((b, h, dims.ns_pad, dims.dk, dims.dv), jnp.float32)
    seg_log = jax.ShapeDtypeStruct((b, h, dims.ns_pad, dims.dk), jnp.float32)
    summary_shapes = [summary] * n + [seg_log] * 2
    summary_specs = [_per_program_spec(dims.dk, dims.dv)] * n + [_per_program_spec(dims.dk)] * 2
    two_pass = dims.ns > 1 and config.state_passes == 2

    def states(mode, out_shape, out_specs, extra=(), extra_specs=()):
        return pl.pallas_call(
            functools.partial(_states_kernel, dims=dims, names=names, mode=mode),
            out_shape=out_shape,
            grid=(b, h, dims.ns),
            in_specs=_input_specs(args, dims) + list(extra_specs),
            out_specs=out_specs,
            compiler_params=_state_params(config),
            interpret=interpret,
            name=_state_kernel_name(grads, mode),
        )(*args, *extra)

    if dims.ns == 1:
        return list(states("local", [carry] * n, [carry_spec] * n))
    if two_pass:
        outs = states("summary", summary_shapes, summary_specs)
        summaries, seg_logs = outs[:n], outs[n:]
    else:
        log = jax.ShapeDtypeStruct((b, h, dims.nc_pad, dims.dk), jnp.float32)
        out_shape = [carry] * n + [log] * n + summary_shapes
        out_specs = [carry_spec] * n + [_per_bh_spec(dims.nc_pad, dims.dk)] * n + summary_specs
        outs = states("local", out_shape, out_specs)
        carries, logs = outs[:n], outs[n : 2 * n]
        summaries, seg_logs = outs[2 * n : 3 * n], outs[3 * n :]
    incoming = pl.pallas_call(
        functools.partial(_fold_kernel, dims=dims, names=names),
        out_shape=[jax.ShapeDtypeStruct(summaries[0].shape, jnp.float32)] * n,
        grid=(b, h, 1),
        in_specs=[_per_bh_spec(dims.ns_pad, dims.dk)] * 2
        + [_per_bh_spec(dims.ns_pad, dims.dk, dims.dv)] * n,
        out_specs=[_per_bh_spec(dims.ns_pad, dims.dk, dims.dv)] * n,
        compiler_params=_state_params(config),
        interpret=interpret,
        name="bigla_segment_fold",
    )(*seg_logs, *summaries)
    if two_pass:
        in_specs = [_per_program_spec(dims.dk, dims.dv)] * n
        return list(states("complete", [carry] * n, [carry_spec] * n, incoming, in_specs))
    return [_add_incoming(*x, dims) for x in zip(carries, logs, incoming, strict=True)]


def _add_incoming(carry, log, incoming, dims: _Dims):
    """Complete carries: segment-local carry + decay from the segment's edge * incoming.

    One fused elementwise pass (XLA) over [B, H, NC_pad, Dk, Dv], so that the chunk kernels
    read one carry per chunk and nothing about segments.

    Args:
      carry: [B, H, NC_pad, Dk, Dv] segment-local carries (dot dtype).
      log: [B, H, NC_pad, Dk] log decay between the segment's edge and the chunk (<= 0).
      incoming: [B, H, NS_pad, Dk, Dv] fp32 carry entering each segment.
    """
    seg = jnp.minimum(jnp.arange(dims.nc_pad) // dims.cps, dims.ns_pad - 1)
    full = carry.astype(jnp.float32) + jnp.exp(log)[..., None] * incoming[:, :, seg]
    return full.astype(carry.dtype)


def _carry_specs(carries, dims: _Dims):
    return [_per_bh_spec(dims.nc_pad, dims.dk, dims.dv)] * len(carries)


def _forward(q, k, v, gf, gb, dims: _Dims, config: Config, interpret: bool, scores=False):
    """Output [B, N, H, Dv], the state carries [h_f, h_b] of :func:`_carries` and, with
    ``scores``, the chunks' score matrices [B, H, NC_pad, BT, BT] in the dot dtype (else None)."""
    b, h = q.shape[0], dims.heads
    args = (q, k, v, gf, gb)
    carries = _carries(args, dims, config, interpret, _STATES)
    out_shape = [jax.ShapeDtypeStruct((b, dims.n, h, dims.dv), v.dtype)]
    out_specs = [_seq_spec(dims, dims.dv)]
    if scores:
        score_shape = (b, h, dims.nc_pad, dims.bt, dims.bt)
        out_shape.append(jax.ShapeDtypeStruct(score_shape, dims.dot_dtype))
        out_specs.append(_per_bh_spec(dims.nc_pad, dims.bt, dims.bt))
    outs = pl.pallas_call(
        _chunk_kernel(functools.partial(_forward_kernel, dims=dims, scores=scores), dims),
        out_shape=out_shape,
        grid=(b, h, dims.nc),
        in_specs=_input_specs(args, dims) + _carry_specs(carries, dims),
        out_specs=out_specs,
        compiler_params=_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="bigla_forward",
    )(*args, *carries)
    return outs[0], carries, (outs[1] if scores else None)


def _merged_warps(config: Config) -> int:
    """Warps of the merged backward kernel: the config's, the module's, or the backward's."""
    for warps in (config.merged_warps, MERGED_BACKWARD_WARPS):
        if warps is not None:
            return warps
    return config.num_warps


def _backward(
    q, k, v, gf, gb, do, dims: _Dims, config: Config, interpret: bool, saved=None, packed=False
):
    """The five gradients, as ((dq, dk, dv), dgf, dgb); with ``packed`` (the inputs read from
    one [B, N, 2K + V] array) and the merged kernel, (dqkv [B, N, 2K + V], dgf, dgb) instead.

    ``saved``: None (states recomputed, no scores) or (the forward's state carries or None
    (recomputed), its score matrices or None).
    """
    b, h = q.shape[0], dims.heads
    args = (q, k, v, gf, gb, do)
    states, scores = (None, None) if saved is None else saved
    if states is None:
        carries = _carries(args, dims, config, interpret, _STATES + _GRADS)
    else:
        carries = list(states) + _carries(args, dims, config, interpret, _GRADS)
    score_args = [] if scores is None else [scores]
    score_specs = [] if scores is None else [_per_bh_spec(dims.nc_pad, dims.bt, dims.bt)]
    seq_specs = _input_specs(args, dims)
    key_shape = (b, dims.n, h, dims.dk)  # of each gradient, also when the inputs are packed
    per_key = lambda dtype: jax.ShapeDtypeStruct(key_shape, dtype)
    dv_shape = jax.ShapeDtypeStruct((b, dims.n, h, dims.dv), v.dtype)
    merge = MERGE_BACKWARD_BY_DEFAULT if config.merge_backward is None else config.merge_backward
    if merge:
        kernel = functools.partial(
            _backward_merged_kernel,
            dims=dims,
            scores=scores is not None,
            barrier=not interpret,
            packed=packed,
        )
        gate_shapes, gate_specs = [per_key(jnp.float32)] * 2, [_seq_spec(dims, dims.dk)] * 2
        if packed:
            width = 2 * h * dims.dk + h * dims.dv
            qkv_shapes = [jax.ShapeDtypeStruct((b, dims.n, width), q.dtype)]
            qkv_specs = [pl.BlockSpec((None, dims.n_pad, width), lambda b, h, s: (b, 0, 0))]
        else:
            qkv_shapes = [per_key(q.dtype), per_key(k.dtype), dv_shape]
            qkv_specs = [_seq_spec(dims, d) for d in (dims.dk, dims.dk, dims.dv)]
        *grads, dgf, dgb = pl.pallas_call(
            _chunk_kernel(kernel, dims, with_head=True),
            out_shape=qkv_shapes + gate_shapes,
            grid=(b, h, dims.nc),
            in_specs=seq_specs + score_specs + _carry_specs(carries, dims),
            out_specs=qkv_specs + gate_specs,
            compiler_params=_params(_merged_warps(config), config.num_stages),
            interpret=interpret,
            name="bigla_backward",
        )(*args, *score_args, *carries)
        grads = grads[0] if packed else tuple(grads)
        return grads, dgf.astype(gf.dtype), dgb.astype(gb.dtype)
    dq, qdq_f, qdq_b = pl.pallas_call(
        _chunk_kernel(functools.partial(_backward_dq_kernel, dims=dims), dims),
        out_shape=[per_key(q.dtype), per_key(jnp.float32), per_key(jnp.float32)],
        grid=(b, h, dims.nc),
        in_specs=seq_specs + _carry_specs(carries[:2], dims),
        out_specs=[_seq_spec(dims, dims.dk)] * 3,
        compiler_params=_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="bigla_backward_dq",
    )(*args, *carries[:2])
    n_in = len(args) + 2
    dk, dv, dgf, dgb = pl.pallas_call(
        _chunk_kernel(
            functools.partial(_backward_dkv_kernel, dims=dims, scores=scores is not None), dims
        ),
        out_shape=[per_key(k.dtype), dv_shape, per_key(jnp.float32), per_key(jnp.float32)],
        grid=(b, h, dims.nc),
        in_specs=seq_specs
        + [_seq_spec(dims, dims.dk)] * 2
        + score_specs
        + _carry_specs(carries, dims),
        out_specs=[_seq_spec(dims, d) for d in (dims.dk, dims.dv, dims.dk, dims.dk)],
        input_output_aliases={n_in - 2: 2, n_in - 1: 3},  # q*dq buffers become dgf, dgb
        compiler_params=_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="bigla_backward_dkv",
    )(*args, qdq_f, qdq_b, *score_args, *carries)
    return (dq, dk, dv), dgf.astype(gf.dtype), dgb.astype(gb.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _bigla(q, k, v, gf, gb, dims: _Dims, config: Config, interpret: bool):
    return _forward(q, k, v, gf, gb, dims, config, interpret)[0]


def _kept(dims: _Dims, config: Config) -> tuple[bool, bool]:
    """(states, scores): what the backward reuses from the forward (only with the same chunks)."""
    if config.backward().chunk != config.chunk:
        return False, False
    states = config.save_states
    if states is None:
        states = dims.n <= SAVE_STATES_MAX_TOKENS
    return bool(states), bool(config.save_scores)


def _forward_with_residuals(args, dims: _Dims, config: Config, interpret: bool):
    """The output and what the backward keeps: None or (state carries or None, scores or
    None)."""
    states, scores = _kept(dims, config)
    o, carries, a = _forward(*args, dims, config, interpret, scores)
    if not (states or scores):
        return o, None
    return o, (carries if states else None, a)


def _bigla_fwd(q, k, v, gf, gb, dims, config, interpret):
    o, saved = _forward_with_residuals((q, k, v, gf, gb), dims, config, interpret)
    return o, ((q, k, v, gf, gb), saved)


def _bigla_bwd(dims, config, interpret, residuals, do):
    inputs, saved = residuals
    config = config.backward()
    if saved is None:
        dims = _backward_dims(inputs, dims, config, interpret)
    (dq, dk, dv), dgf, dgb = _backward(*inputs, do, dims, config, interpret, saved)
    return dq, dk, dv, dgf, dgb


def _backward_dims(inputs, dims: _Dims, config: Config, interpret: bool) -> _Dims:
    """The backward's sizes when it recomputes the states with its own chunk."""
    return _dims(inputs[0], inputs[2], dims.scale, config, interpret, dims.heads, dims.offsets)


_bigla.defvjp(_bigla_fwd, _bigla_bwd)


def _packed_views(qkv, gf, gb, dims: _Dims):
    """(q, k, v, gf, gb) as the kernels read them: qkv [B, N, 2K + V] as [B, N, (2K + V)/Dk, Dk]
    for q and k and as [B, N, (2K + V)/Dv, Dv] for v, the gates [B, N, K] as [B, N, H, Dk];
    ``dims.offsets`` say where each operand's heads start."""
    b, n, width = qkv.shape
    qk = qkv.reshape(b, n, width // dims.dk, dims.dk)
    v = qkv.reshape(b, n, width // dims.dv, dims.dv)
    heads = lambda g: g.reshape(b, n, dims.heads, dims.dk)
    return qk, qk, v, heads(gf), heads(gb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bigla_packed(qkv, gf, gb, dims: _Dims, config: Config, interpret: bool):
    return _forward(*_packed_views(qkv, gf, gb, dims), dims, config, interpret)[0]


def _bigla_packed_fwd(qkv, gf, gb, dims, config, interpret):
    o, saved = _forward_with_residuals(_packed_views(qkv, gf, gb, dims), dims, config, interpret)
    return o, ((qkv, gf, gb), saved)


def _bigla_packed_bwd(dims, config, interpret, residuals, do):
    (qkv, gf, gb), saved = residuals
    config = config.backward()
    views = _packed_views(qkv, gf, gb, dims)
    if saved is None:
        dims = _backward_dims(views, dims, config, interpret)
    dqkv, dgf, dgb = _backward(*views, do, dims, config, interpret, saved, packed=True)
    flat = lambda x: x.reshape(*x.shape[:2], -1)
    if isinstance(dqkv, tuple):  # separate kernels: three arrays to join
        dqkv = jnp.concatenate([flat(g) for g in dqkv], axis=-1)
    return dqkv, flat(dgf).astype(gf.dtype), flat(dgb).astype(gb.dtype)


_bigla_packed.defvjp(_bigla_packed_fwd, _bigla_packed_bwd)


def packs(key_dim: int, value_dim: int, num_heads: int) -> bool:
    """Whether :func:`bigla_triton_packed` reads these sizes in place (else it splits): head
    widths Dk = key_dim / H and Dv = value_dim / H powers of two >= 16, and the values starting
    on a Dv boundary of the packed row (2 key_dim divisible by Dv)."""
    if key_dim % num_heads or value_dim % num_heads:
        return False
    dk, dv = key_dim // num_heads, value_dim // num_heads
    pow2 = lambda x: x >= SUB and not x & (x - 1)
    return pow2(dk) and pow2(dv) and (2 * key_dim) % dv == 0


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
    dims = _dims(q, v, scale, config, interpret)
    o = _bigla(q, k, v, gf, gb, dims, config, interpret)
    return o[..., :dv]


def bigla_triton_packed(
    qkv: jax.Array,
    gf: jax.Array,
    gb: jax.Array,
    *,
    num_heads: int,
    scale: float | None = None,
    interpret: bool = False,
    config: Config | None = None,
) -> jax.Array:
    """:func:`bigla_triton` on fused projections, read in place.

    A model that projects q, k and v with one matrix product would otherwise copy three
    slices of the product into separate arrays for the kernels; here the kernels read each
    operand's heads from the packed array, and its gradient comes back packed the same way.

    Args:
      qkv: [B, N, 2K + V] = [q | k | v], each head-major (head h of q is columns
        [h Dk, (h+1) Dk)), with Dk = K / H and Dv = V / H.
      gf, gb: [B, N, K] log forget gates of the two directions, head-major like q; used in
        fp32.
      num_heads: H.
      scale, interpret, config: as :func:`bigla_triton`.

    Returns:
      [B, N, H, Dv] in qkv's dtype. Sizes that :func:`packs` rejects run through split copies.
    """
    config = Config() if config is None else config
    b, n, width = qkv.shape
    if gf.ndim != 3 or gf.shape[:2] != (b, n) or gb.shape != gf.shape:
        raise ValueError(
            f"gf, gb have shapes {gf.shape}, {gb.shape}; expected one shape [B, N, K] with "
            f"[B, N] = [{b}, {n}]"
        )
    key_dim = gf.shape[-1]
    value_dim = width - 2 * key_dim
    if value_dim <= 0 or key_dim % num_heads or value_dim % num_heads:
        raise ValueError(
            f"qkv width {width} and gate width {key_dim} do not split into q, k [K] and "
            f"v [V] over num_heads={num_heads}: expected K = {key_dim} and V = width - 2K "
            "both positive multiples of num_heads"
        )
    gf, gb = gf.astype(jnp.float32), gb.astype(jnp.float32)
    if not packs(key_dim, value_dim, num_heads) or n == 0:
        operands = split_packed(qkv, gf, gb, num_heads)
        return bigla_triton(*operands, scale=scale, interpret=interpret, config=config)
    dk, dv = key_dim // num_heads, value_dim // num_heads
    scale = dk**-0.5 if scale is None else scale
    q_view = qkv.reshape(b, n, width // dk, dk)
    v_view = qkv.reshape(b, n, width // dv, dv)
    offsets = (0, num_heads, 2 * key_dim // dv, 0, 0)
    dims = _dims(q_view, v_view, scale, config, interpret, num_heads, offsets)
    return _bigla_packed(qkv, gf, gb, dims, config, interpret)


__all__ = ["Config", "bigla_triton", "bigla_triton_packed", "packs"]
