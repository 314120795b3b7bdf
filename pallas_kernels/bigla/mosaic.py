"""BiGLA on Mosaic GPU (``plgpu.kernel``, Hopper wgmma): the backend that outlives Pallas-Triton.

Two kernels, both chunked (chunk = 64 tokens = one wgmma M tile) with an fp32 state per
direction and, by default, one program per (batch, head, direction):

* :func:`bidirectional_chunked` (:func:`_chunk_kernel`): GLA with gates on the *contracted*
  channels, ``out_t = sum_{s<=t} (x_t . y_s e^{F_t - F_s}) z_s + sum_{s>=t} (same with B)``
  (``F``/``B``: prefix / suffix cumulative log gates). The forward of the op is this kernel with
  ``(x, y, z) = (q, k, v)``; ``dv`` is the same kernel with ``(k, q, do)`` and shifted gates.
* :func:`bidirectional_gated_output` (:func:`_gated_output_kernel`): GLA with gates on the
  *output* channels, ``sum_{s<t} (a_t . b_s) c_s * e^{F_t - F_s}`` (and the ``s>t`` direction):
  ``dq`` with ``(a, b, c) = (do, v, k)`` and ``dk`` with ``(v, do, q)`` and shifted gates. The
  gate gradients are cumulative sums of ``q dq - k dk`` per direction, in XLA (:func:`_bwd`).

Numerics (all gates in log space, fp32; matmul operands bf16/f16 with fp32 accumulation):

* chunk-local cumulative gates: computed in the kernel as ``T @ g`` on the tensor cores with a
  triangular ones matrix and ``g`` split into three 16-bit parts (fp32-accurate), since Mosaic
  GPU (0.11/0.12) cannot lower ``cumsum``;
* inter-chunk: ``(x e^{G}) S`` and ``S <- e^{G_last} S + (y e^{G_last - G})^T z`` with exponents
  <= 0, fp32 state (cast to the operand dtype only as a wgmma operand, as FLA does);
* intra-chunk: per 16-row sub-block ``r``, ``(x_i e^{G_i - G_ref(r)}) . (y_j e^{G_ref(r) - G_j})``
  with ``G_ref(r)`` the cumulative gate at the sub-block's edge. For ``j`` in an earlier sub-block
  both exponents are <= 0; only inside a 16 x 16 diagonal block is the ``y`` exponent positive,
  and it is clamped at :data:`CLAMP` (finite always; exact unless one 16-token sub-block decays by
  more than ``e^-CLAMP``, i.e. gates below -3.75 per token, logits < -60 in ViG's
  ``logsigmoid(x) / 16``); the forward kernel computes the diagonal ``x_i . y_i`` elementwise in
  fp32, the backward adds its diagonal terms exactly in XLA.
* wgmma takes 16-bit operands. bf16 / f16 inputs are used as they are (bf16 inputs: 2e-3 to
  6e-3 relative error against the float64 reference for ``o`` and all five gradients). fp32
  inputs are split into three bf16 parts (``hi + mid + lo``, :func:`_split`; 24 mantissa bits),
  in XLA for the operands read straight from GMEM and in the kernel for the computed ones
  (rescaled keys and queries, state, scores), and every product is six wgmmas (the parts'
  products down to ``2^-24``, :func:`_wgmma_parts`): 3x the operand SMEM (220 KB for the
  forward kernel at Dk 32, Dv 64: one program per SM; fewer parts where it would not fit) and
  6x the tensor-core work. For fp32 the chunk-local cumulative gates are kept as two terms,
  ``T @ hi`` (exact) and ``T @ (mid + lo)``, and exponents are their termwise differences
  (:func:`_minus`): with steep gates ``|G|`` reaches ~160 within a chunk, and the difference of
  two such fp32 sums would be off by 1e-5. Measured against float64 (CPU interpret and H100
  alike): 6e-8 to 3e-6 relative for ``o`` and the five gradients, steep, flat and random gates
  (the largest: ``dg`` with steep gates). The parts are cut by a bit mask
  (:func:`_truncate_to_bf16`), not by ``astype`` pairs, which XLA on GPU folds away.

XLA around the kernels: padding N to a multiple of 64, summing the two directions' fp32 halves,
the diagonal terms and the two cumulative sums of the gate gradients.

Speed (H100, jax 0.11.2, (B, H, N, Dk, Dv) = (128, 3, 196, 32, 64) bf16, CUPTI; see
``benchmarks/results/bigla_mosaic_h100.json``): forward
0.158 ms (Triton 0.134), forward + backward **0.599 ms (Triton 0.732 in the same run)**. The
Triton kernels tuned afterwards (split backward, commit 2783671) take 0.110 / 0.473 ms
(``benchmarks/results/tune_bigla_h100.json``; today's defaults of c86bea0 about 0.109 /
0.453 ms), so Triton is faster and stays the default.
fp32 inputs (three-part operands, commit ad27922, same shape): forward 0.459 ms, forward +
backward 1.876 ms (Triton 0.207 / 1.070 in the same run), kernels 0.37-0.44 ms each instead of
0.105 (six wgmmas per product, one program per SM instead of two); bf16 in that run unchanged,
0.158 / 0.597 ms.
Each of the four kernel launches of fwd+bwd (forward, dv, dq, dk) takes 0.105-0.108 ms; the
rest (0.17 ms) is XLA: padding, the fp32 sums of the two directions, casts, the gate-gradient
cumsums. Measured variants of one kernel (ms):
16-row sub-blocks 0.105 vs 8-row 0.225 (half the rescaling work, and 92 KB instead of 124 KB
SMEM: 2 programs per SM instead of 1); one program per direction 0.105 vs both directions in one
0.132 (twice the programs on 132 SMs); the intra-chunk rescaling as a loop instead of unrolled
0.213 vs 0.329 (8-row) and 3.5 s instead of 9.5 s to compile; chunk cumsums in the kernel
instead of in XLA (XLA's cumsum took 0.08 ms). The old backward (dq, dk, dg by ``jax.vjp`` of
the XLA form, ``backward="xla"``) took 2.58 ms. What would make the forward faster too: no
padding (N = 196 runs 256 rows) and no XLA pre/post passes (0.05 ms of the 0.158 ms), and
overlapping the next chunk's TMA loads with this chunk's math (needs SMEM for a second buffer,
i.e. fewer programs per SM); long sequences (N = 4096, B*H = 24) need a sequence split (not
done: there each program runs 64 chunks serially; not measured).

Layout: ``q, k, gf, gb: [B, N, H, Dk]``, ``v: [B, N, H, Dv]``; Dk a multiple of 16, Dv a multiple
of 64 (the state is kept transposed, ``[Dv, Dk]``, so that Dv is the wgmma M dimension).
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CHUNK = 64  # tokens per chunk: one wgmma M tile
SUB = 16  # rows per intra-chunk sub-block (one reference point each)
SPLIT = True  # one program per (batch, head, direction)
FP32_PARTS = 3  # bf16 parts per fp32 wgmma operand (24 mantissa bits)
SMEM_BUDGET = 220 * 1024  # of sm90's 227 KB per block; the rest: barriers, alignment
CLAMP = 60.0  # cap of the only positive exponents (inside SUB x SUB diagonal blocks)
_OPERAND_DTYPES = (jnp.bfloat16, jnp.float16)
_BACKWARDS = ("mosaic", "xla")


def _smem_transforms(minor: int, dtype) -> tuple:
    """Tiling + swizzle for an SMEM wgmma operand whose minor dim has ``minor`` elements."""
    bits = minor * jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(bits)
    return (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _wg(x):
    """A value loaded from SMEM, in the wgmma register layout."""
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _pick_row(x: jax.Array, row: int) -> jax.Array:
    """``x[row]`` as a row vector for broadcasting (Mosaic GPU cannot slice register values).

    Args:
      x: [64, D] fp32 in the wgmma layout.

    Returns:
      [D]: exact (a column sum with one non-zero term).
    """
    return jnp.sum(jnp.where(_iota(x.shape, 0) == row, x, 0.0), axis=0)


def _bcast_row(row: jax.Array, shape) -> jax.Array:
    return lax.broadcast_in_dim(row, shape, [1])


def _bcast_col(col: jax.Array, shape) -> jax.Array:
    return lax.broadcast_in_dim(col, shape, [0])


def _operand_format(dtype) -> tuple[jnp.dtype, int]:
    """(wgmma operand dtype, parts) for inputs of ``dtype``.

    bf16 and f16 inputs are wgmma operands as they are (one part). fp32 inputs are split into
    :data:`FP32_PARTS` bf16 parts (see :func:`_split`), each product into six wgmmas.
    """
    dtype = jnp.dtype(dtype)
    if dtype in _OPERAND_DTYPES:
        return dtype, 1
    if dtype == jnp.float32:
        return jnp.dtype(jnp.bfloat16), FP32_PARTS
    raise TypeError(f"dtype {dtype}; the Mosaic GPU kernels take bfloat16, float16 or float32")


def _smem_bytes(scratch) -> int:
    """Bytes of the SMEM buffers in a ``scratch_types`` list (barriers not counted)."""
    return sum(
        math.prod(m.shape) * jnp.dtype(m.dtype).itemsize for m in scratch if hasattr(m, "shape")
    )


def _fitting_scratch(make_scratch, dtype):
    """(operand dtype, parts, scratch list) with the most operand parts whose SMEM fits.

    fp32 inputs take :data:`FP32_PARTS` parts where the head dims allow it (Dk 32, Dv 64:
    220 KB for the forward kernel), else fewer (less accurate: 16 or 8 mantissa bits).

    Args:
      make_scratch: ``(op_dtype, parts) -> scratch_types`` of the kernel.
      dtype: the dtype of the kernel's inputs.
    """
    op_dtype, parts = _operand_format(dtype)
    while True:
        scratch = make_scratch(op_dtype, parts)
        if parts == 1 or _smem_bytes(scratch) <= SMEM_BUDGET:
            return op_dtype, parts, scratch
        parts -= 1


def _truncate_to_bf16(x: jax.Array) -> jax.Array:
    """fp32 ``x`` with the low 16 bits of each value cleared: exactly a bf16 value, in fp32.

    A bit mask, not ``x.astype(bf16).astype(f32)``: XLA on GPU folds that pair of converts into
    nothing (openxla/xla#41605, ``xla_allow_excess_precision``), which would make every lower
    part of :func:`_split` zero.
    """
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _split(x: jax.Array, op_dtype, parts: int) -> list[jax.Array]:
    """``x`` as ``parts`` operand-dtype arrays whose sum approximates it.

    One part: ``x`` cast to the operand dtype. Several (bf16 operands of fp32 inputs): each part
    is the bf16 truncation of what the previous ones leave, 8 mantissa bits each, so three parts
    hold all 24 of fp32's exactly (two: 16, relative error up to 2^-16; measured as too coarse
    for the 1e-5 bar of the gate gradients).
    """
    if parts == 1:
        return [x.astype(op_dtype)]
    out = []
    rest = x.astype(jnp.float32)
    for _ in range(parts):
        part = _truncate_to_bf16(rest)
        out.append(part.astype(op_dtype))  # exact
        rest = rest - part
    return out


def _stack_parts(x: jax.Array, op_dtype, parts: int) -> jax.Array:
    """XLA side: [parts, *x.shape], the parts of :func:`_split` (an operand the kernel copies
    from GMEM straight into SMEM)."""
    return jnp.stack(_split(x, op_dtype, parts))


def _store_parts(ref, x: jax.Array, op_dtype, parts: int, index=0, stride: int = 1) -> None:
    """Part ``p`` of ``x`` into ``ref[index + p * stride]``."""
    for p, part in enumerate(_split(x, op_dtype, parts)):
        ref[index + p * stride] = part


def _parts(ref, parts: int, index=0, stride: int = 1, transpose: bool = False) -> list:
    """The SMEM views ``ref.at[index + p * stride]`` of the parts of one wgmma operand."""
    views = [ref.at[index + p * stride] for p in range(parts)]
    return [v.transpose((1, 0)) for v in views] if transpose else views


def _wgmma_parts(acc, a_parts: list, b_parts: list) -> None:
    """``acc += (sum a_parts) @ (sum b_parts)`` up to terms below fp32's resolution.

    With ``n`` parts per operand (part ``i`` is about ``2^{-8 i}`` of the whole), the products
    of parts ``i, j`` with ``i + j < n``, small terms first: one wgmma for bf16/f16 inputs, six
    for fp32 inputs (the dropped ones are below 2^-24 of the product).
    """
    n = max(len(a_parts), len(b_parts))
    pairs = [(i, j) for i in range(len(a_parts)) for j in range(len(b_parts)) if i + j < n]
    for i, j in sorted(pairs, key=lambda ij: -sum(ij)):
        plgpu.wgmma(acc, a_parts[i], b_parts[j])


def _total(terms) -> jax.Array:
    """The value of a cumulative gate given as terms (see :func:`_cumsum_by_wgmma`)."""
    return functools.reduce(operator.add, terms)


def _minus(a, b) -> jax.Array:
    """``total(a) - total(b)`` as the sum of the termwise differences: the leading terms are
    exact sums of bf16 values, so their difference is exact even where the totals are large
    and close (steep gates: |cum| up to ~160 within a chunk, fp32 ulp 1.5e-5)."""
    return _total([x - y for x, y in zip(a, b, strict=True)])


def _row(terms, row) -> tuple:
    """Row ``row`` of each term ([D] each)."""
    return tuple(_pick_row(t, row) for t in terms)


def _bcast_rows(rows, shape) -> tuple:
    return tuple(_bcast_row(r, shape) for r in rows)


def _direction_chunk(x, y, cum, z_smem, state, scratch, *, forward, op_dtype, parts, sub):
    """One chunk of one direction: its output and the state after it.

    Every wgmma operand is stored as ``parts`` operand-dtype parts (leading SMEM dim; for the
    per-sub-block buffers ``p * nsub + r``) and every product is :func:`_wgmma_parts`.

    Args:
      x, y: [64, Dk] fp32 (wgmma layout): query-role and key-role rows of the chunk.
      cum: [64, Dk] fp32 chunk-local cumulative log gate (prefix sums if ``forward``, suffix
        sums otherwise).
      z_smem: SMEM [parts, 64, Dv] value-role rows (operand dtype).
      state: [Dv, Dk] fp32 transposed state entering the chunk (wgmma layout).
      scratch: SMEM wgmma operands (operand dtype, ``parts`` each): the state [Dv, Dk], the
        decayed keys of the state update [64, Dk], the rescaled keys and queries of the
        intra-chunk blocks [nsub, 64, Dk] each, the gated queries [64, Dk] and the scores
        [64, 64]. (Interpret mode takes wgmma operands only from SMEM, so register operands go
        through SMEM too.)

    Returns:
      ([64, Dv] fp32 output of this direction, [Dv, Dk] fp32 state leaving the chunk).
    """
    s_smem, yd_smem, yr_smem, xr_smem, xg_smem, a_smem = scratch
    bt, dk = x.shape
    dv = state.shape[0]
    rows = _iota((bt, dk), 0)
    nsub = bt // sub
    store = functools.partial(_store_parts, op_dtype=op_dtype, parts=parts)
    views = functools.partial(_parts, parts=parts)

    # Rescaled keys and queries, one set per sub-block r (a loop, not unrolled: unrolling made
    # the kernel's MLIR 1 MB and its lowering + compilation ~10 s per call site).
    def rescale(r, carry):
        # Reference row: just before sub-block r going forward (row r*sub - 1, none for r = 0),
        # just after it going backward (row (r+1)*sub, none for the last one); none -> 0.
        ref_row = r * sub - 1 if forward else (r + 1) * sub
        ref = _bcast_rows(_row(cum, ref_row), (bt, dk))
        keep = rows < (r + 1) * sub if forward else rows >= r * sub
        expo = jnp.minimum(jnp.where(keep, _minus(ref, cum), -jnp.inf), CLAMP)
        store(yr_smem, y * jnp.exp(expo), index=r, stride=nsub)
        in_block = (rows >= r * sub) & (rows < (r + 1) * sub)
        xr = jnp.where(in_block, x * jnp.exp(jnp.where(in_block, _minus(cum, ref), 0.0)), 0.0)
        store(xr_smem, xr, index=r, stride=nsub)
        return carry

    lax.fori_loop(0, nsub, rescale, 0)
    last = _row(cum, bt - 1 if forward else 0)  # [Dk] total log decay of the chunk
    store(yd_smem, y * jnp.exp(_minus(_bcast_rows(last, (bt, dk)), cum)))
    store(xg_smem, x * jnp.exp(_total(cum)))
    store(s_smem, state)
    plgpu.commit_smem()

    # Intra-chunk scores A [64, 64], masked to the direction's triangle.
    def scores(acc):
        for r in range(nsub):
            sub_views = dict(index=r, stride=nsub)
            _wgmma_parts(
                acc, views(xr_smem, **sub_views), views(yr_smem, **sub_views, transpose=True)
            )
        return acc[...]

    a = pl.run_scoped(scores, plgpu.ACC((bt, bt), jnp.float32))
    ai, aj = _iota((bt, bt), 0), _iota((bt, bt), 1)
    diag = _bcast_col(jnp.sum(x * y, axis=1), (bt, bt))
    a = jnp.where(ai == aj, diag, jnp.where(aj < ai if forward else aj > ai, a, 0.0))
    store(a_smem, a)
    plgpu.commit_smem()

    # Output: inter (x e^{G}) S + intra A z; state: S^T <- S^T e^{last} + z^T (y e^{last - G}).
    # Both in one scope: one wait for all the wgmmas.
    def products(out_acc, update_acc):
        _wgmma_parts(out_acc, views(xg_smem), views(s_smem, transpose=True))
        _wgmma_parts(out_acc, views(a_smem), views(z_smem))
        _wgmma_parts(update_acc, views(z_smem, transpose=True), views(yd_smem))
        return out_acc[...], update_acc[...]

    # (Not ``pl.run_state(update)(plgpu.ACC.init(decayed))``: interpret mode cannot run that.)
    accs = (plgpu.ACC((bt, dv), jnp.float32), plgpu.ACC((dv, dk), jnp.float32))
    out, new = pl.run_scoped(products, *accs)
    return out, state * _bcast_row(jnp.exp(_total(last)), (dv, dk)) + new


def _cumsum_by_wgmma(g, tri_smem, part_smems, *, forward, op_dtype, terms):
    """Chunk-local inclusive cumulative sums of log gates, on the tensor cores.

    Mosaic GPU cannot lower ``cumsum``, so this is ``T @ g`` with a triangular ones matrix ``T``.
    ``g`` is split into three operand-dtype parts (``hi + mid + lo``, together 24 mantissa bits
    for bf16), so the sum is fp32-accurate although the wgmma operands are 16-bit.

    Args:
      g: [64, Dk] fp32 log gates of one chunk (wgmma layout).
      tri_smem: SMEM [64, 64] wgmma operand buffer (operand dtype), overwritten with ``T``.
      part_smems: three SMEM [64, Dk] wgmma operand buffers, overwritten with the parts.
      forward: prefix sums (``T`` lower triangular) if True, else suffix sums (upper).
      terms: 1: the sums as one array. 2: as ``(T @ hi, T @ (mid + lo))``, two accumulators;
        the first is exact (sums of at most 64 bf16 values of similar size), so differences of
        cumulative gates taken termwise (:func:`_minus`) keep fp32's relative accuracy.

    Returns:
      ``terms`` [64, Dk] fp32 arrays whose sum is the cumulative log gates.
    """
    bt = g.shape[0]
    i, j = _iota((bt, bt), 0), _iota((bt, bt), 1)
    tri_smem[...] = jnp.where(j <= i if forward else j >= i, 1.0, 0.0).astype(op_dtype)
    rest = g
    for part_smem in part_smems:
        part = rest.astype(op_dtype)
        part_smem[...] = part
        rest = rest - part.astype(jnp.float32)
    plgpu.commit_smem()

    def accumulate(*accs):
        for n, part_smem in enumerate(part_smems):
            plgpu.wgmma(accs[min(n, terms - 1)], tri_smem, part_smem)
        return tuple(acc[...] for acc in accs)

    return pl.run_scoped(accumulate, *[plgpu.ACC(g.shape, jnp.float32)] * terms)


def _chunk_kernel(
    x_ref, y_ref, z_ref, gf_ref, gb_ref, *refs, n_chunks, out_scale, op_dtype, parts, sub, split
):
    """Program (b, h[, direction]): the sweeps of :func:`bidirectional_chunked`.

    Not ``split``: the backward-direction sweep (last chunk first) into ``ob_ref`` (fp32), then
    the forward-direction sweep, which adds it and writes ``out_scale * (o_f + o_b)`` to
    ``o_ref``. ``split``: program ``direction`` 0 runs the backward sweep into ``ob_ref``, 1 the
    forward sweep into ``o_ref`` (both fp32, unscaled), twice the programs at half the length.
    ``z_ref`` holds the ``parts`` operand parts of z: [parts, B, N, H, Dv].
    """
    o_ref, ob_ref, x_s, y_s, z_s, g_s, *stages = refs[:-7]
    operands, bars = refs[-7:-1], refs[-1]
    ob_s = stages[-1]  # fp32 [64, Dv] output tile
    b, h = lax.axis_index("b"), lax.axis_index("h")
    s_smem, yd_smem, yr_smem, xr_smem, xg_smem, a_smem = operands
    dv, dk = s_smem.shape[1:]
    n_loads = 3 + parts  # x, y, the parts of z, the gates; barrier n_loads: the fp32 tile
    cum_kw = dict(op_dtype=op_dtype, terms=min(parts, 2))

    def load(c, gate_ref, forward):
        rows = pl.ds(c * CHUNK, CHUNK)
        pairs = [(x_ref.at[b, rows, h], x_s), (y_ref.at[b, rows, h], y_s)]
        pairs += [(z_ref.at[p, b, rows, h], z_s.at[p]) for p in range(parts)]
        pairs += [(gate_ref.at[b, rows, h], g_s)]
        for i, (src, dst) in enumerate(pairs):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
        for i in range(n_loads):
            plgpu.barrier_wait(bars.at[i])
        x = _wg(x_s[...]).astype(jnp.float32)
        y = _wg(y_s[...]).astype(jnp.float32)
        # (The operand buffers are free here: the previous chunk's wgmmas have completed.)
        cum_parts = (xr_smem.at[0], yr_smem.at[0], xg_smem.at[0])
        cum = _cumsum_by_wgmma(_wg(g_s[...]), a_smem.at[0], cum_parts, forward=forward, **cum_kw)
        return x, y, cum

    zero_state = jnp.zeros((dv, dk), jnp.float32)
    zero_state = plgpu.layout_cast(zero_state, plgpu.Layout.WGMMA)
    chunk = functools.partial(
        _direction_chunk, z_smem=z_s, scratch=operands, op_dtype=op_dtype, parts=parts, sub=sub
    )

    def sweep_to_fp32(out_ref, gate_ref, forward):
        def step(i, state):
            c = i if forward else n_chunks - 1 - i
            x, y, cum = load(c, gate_ref, forward=forward)
            out, state = chunk(x, y, cum, state=state, forward=forward)
            ob_s[...] = out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ob_s, out_ref.at[b, pl.ds(c * CHUNK, CHUNK), h])
            plgpu.wait_smem_to_gmem(0)
            return state

        lax.fori_loop(0, n_chunks, step, zero_state)

    if split:
        direction = lax.axis_index("d")
        pl.when(direction == 0)(lambda: sweep_to_fp32(ob_ref, gb_ref, forward=False))
        pl.when(direction == 1)(lambda: sweep_to_fp32(o_ref, gf_ref, forward=True))
        return

    o_s = stages[0]  # output tile in the output dtype
    sweep_to_fp32(ob_ref, gb_ref, forward=False)

    def forward_step(c, state):
        x, y, cum = load(c, gf_ref, forward=True)
        ob_bar = bars.at[n_loads]
        plgpu.copy_gmem_to_smem(ob_ref.at[b, pl.ds(c * CHUNK, CHUNK), h], ob_s, ob_bar)
        out, state = chunk(x, y, cum, state=state, forward=True)
        plgpu.barrier_wait(ob_bar)
        o_s[...] = ((out + _wg(ob_s[...])) * out_scale).astype(o_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, pl.ds(c * CHUNK, CHUNK), h])
        plgpu.wait_smem_to_gmem(0)
        return state

    lax.fori_loop(0, n_chunks, forward_step, zero_state)


def _pad_tokens(x: jax.Array, extra: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x


def _pad_to_chunks(*operands: jax.Array) -> tuple[int, int, list[jax.Array]]:
    """Three [B, N, H, D] operands and two gates -> (chunks, padded N, the five padded to it).

    The gates (the last two) are cast to fp32; padded tokens are zero (gate 0: no decay).
    """
    n = operands[0].shape[1]
    n_chunks = -(-n // CHUNK)
    n_pad = n_chunks * CHUNK
    *xs, gf, gb = operands
    xs += [gf.astype(jnp.float32), gb.astype(jnp.float32)]
    return n_chunks, n_pad, [_pad_tokens(x, n_pad - n) for x in xs]


def bidirectional_chunked(
    x,
    y,
    z,
    gf,
    gb,
    *,
    out_scale: float,
    out_dtype,
    interpret=False,
    sub: int = SUB,
    split: bool = SPLIT,
):
    """``out_scale * (forward + backward GLA)`` with key-channel gates, on Mosaic GPU.

    Args:
      x, y: [B, N, H, Dk] query-role and key-role inputs (bf16, f16, or fp32: split into bf16
        parts, see :func:`_fitting_scratch`).
      z: [B, N, H, Dv] value-role input (same dtype).
      gf, gb: [B, N, H, Dk] per-token log gates (<= 0) of the two directions.
      out_scale: factor applied to the sum of the two directions.
      out_dtype: dtype of the result.
      interpret: ``False``, or a ``plgpu.InterpretGPUParams`` to run on the CPU.
      sub: rows per intra-chunk sub-block.
      split: one program per (batch, head, direction), the two fp32 halves summed by XLA; else
        one program per (batch, head) runs both directions.

    Returns:
      [B, N, H, Dv] in ``out_dtype``.
    """
    bsz, n, h, dk = x.shape
    dv = z.shape[-1]
    n_chunks, n_pad, (x, y, z, gf, gb) = _pad_to_chunks(x, y, z, gf, gb)
    nsub = CHUNK // sub
    stages = [plgpu.SMEM((CHUNK, dv), jnp.float32)]  # fp32 output tile
    if not split:
        stages.insert(0, plgpu.SMEM((CHUNK, dv), out_dtype))  # output tile

    def make_scratch(op_dtype, parts):
        # One swizzle for every wgmma operand: Mosaic GPU wants A's and B's tilings to match.
        kt = _smem_transforms(dk, op_dtype)
        return [
            plgpu.SMEM((CHUNK, dk), x.dtype),  # x
            plgpu.SMEM((CHUNK, dk), x.dtype),  # y
            plgpu.SMEM((parts, CHUNK, dv), op_dtype, transforms=kt),  # z
            plgpu.SMEM((CHUNK, dk), jnp.float32),  # log gates
            *stages,
            # wgmma operands (see _direction_chunk)
            plgpu.SMEM((parts, dv, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts, CHUNK, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts * nsub, CHUNK, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts * nsub, CHUNK, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts, CHUNK, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts, CHUNK, CHUNK), op_dtype, transforms=kt),
            plgpu.Barrier(num_barriers=4 + parts),
        ]

    op_dtype, parts, scratch = _fitting_scratch(make_scratch, x.dtype)
    kernel = functools.partial(
        _chunk_kernel,
        n_chunks=n_chunks,
        out_scale=out_scale,
        op_dtype=op_dtype,
        parts=parts,
        sub=sub,
        split=split,
    )
    fp32_out = jax.ShapeDtypeStruct((bsz, n_pad, h, dv), jnp.float32)
    first_out = fp32_out if split else jax.ShapeDtypeStruct((bsz, n_pad, h, dv), out_dtype)
    o, ob = plgpu.kernel(
        kernel,
        out_type=(first_out, fp32_out),
        scratch_types=scratch,
        grid=(bsz, h, 2) if split else (bsz, h),
        grid_names=("b", "h", "d") if split else ("b", "h"),
        interpret=interpret,
    )(x, y, _stack_parts(z, op_dtype, parts), gf, gb)
    if split:
        o = ((o[:, :n] + ob[:, :n]) * out_scale).astype(out_dtype)
    return o[:, :n]


def _gated_output_chunk(c, cum, a_smem, b_smem, state, scratch, *, forward, op_dtype, parts, sub):
    """One chunk of one direction of :func:`bidirectional_gated_output`.

    Every wgmma operand is stored as ``parts`` operand-dtype parts, as in
    :func:`_direction_chunk`.

    Args:
      c: [64, Dk] fp32 (wgmma layout): the gated-role rows of the chunk.
      cum: [64, Dk] fp32 chunk-local cumulative log gate (prefix sums if ``forward``, suffix
        sums otherwise).
      a_smem, b_smem: SMEM [parts, 64, Dv] rows of the two score roles (operand dtype).
      state: [Dv, Dk] fp32 state ``sum_s b_s (c_s e^{G_end - G_s})^T`` entering the chunk.
      scratch: SMEM wgmma operands (operand dtype, ``parts`` each): the state [Dv, Dk], the
        decayed ``c`` of the state update [64, Dk], the rescaled ``c`` [nsub, 64, Dk] and the
        causal scores [64, 64] of the intra-chunk products.

    Returns:
      ([64, Dk] fp32 output of this direction, [Dv, Dk] fp32 state leaving the chunk).
    """
    h_smem, cd_smem, cr_smem, ar_smem = scratch
    bt, dk = c.shape
    dv = state.shape[0]
    nsub = bt // sub
    rows = _iota((bt, dk), 0)
    ai, aj = _iota((bt, bt), 0), _iota((bt, bt), 1)
    store = functools.partial(_store_parts, op_dtype=op_dtype, parts=parts)
    views = functools.partial(_parts, parts=parts)

    def raw_scores(acc):
        _wgmma_parts(acc, views(a_smem), views(b_smem, transpose=True))
        return acc[...]

    scores = pl.run_scoped(raw_scores, plgpu.ACC((bt, bt), jnp.float32))  # a_t . b_s
    causal = aj < ai if forward else aj > ai  # strictly: the diagonal is added in XLA

    # Per sub-block r: c rescaled to r's reference, and the output-side factor e^{G_t - ref_r}
    # of r's rows (accumulated into one [64, Dk] array).
    def rescale(r, out_factor):
        ref_row = r * sub - 1 if forward else (r + 1) * sub
        ref = _bcast_rows(_row(cum, ref_row), (bt, dk))
        keep = rows < (r + 1) * sub if forward else rows >= r * sub
        expo = jnp.minimum(jnp.where(keep, _minus(ref, cum), -jnp.inf), CLAMP)
        store(cr_smem, c * jnp.exp(expo), index=r, stride=nsub)
        in_block = (rows >= r * sub) & (rows < (r + 1) * sub)
        factor = jnp.exp(jnp.where(in_block, _minus(cum, ref), 0.0))
        return out_factor + jnp.where(in_block, factor, 0.0)

    zero = plgpu.layout_cast(jnp.zeros((bt, dk), jnp.float32), plgpu.Layout.WGMMA)
    out_factor = lax.fori_loop(0, nsub, rescale, zero)
    last = _row(cum, bt - 1 if forward else 0)  # [Dk] total log decay of the chunk
    store(cd_smem, c * jnp.exp(_minus(_bcast_rows(last, (bt, dk)), cum)))
    store(h_smem, state)
    store(ar_smem, jnp.where(causal, scores, 0.0))
    plgpu.commit_smem()

    # All wgmmas of the step, one wait. Intra: sub-block r's rows of (A' @ c rescaled to r) --
    # one 64-row product per r, so that A' is stored once (SMEM for 3 programs per SM).
    def products(inter_acc, update_acc, *intra_accs):
        _wgmma_parts(inter_acc, views(a_smem), views(h_smem))
        _wgmma_parts(update_acc, views(b_smem, transpose=True), views(cd_smem))
        for r, acc in enumerate(intra_accs):
            _wgmma_parts(acc, views(ar_smem), views(cr_smem, index=r, stride=nsub))
        return inter_acc[...], update_acc[...], [acc[...] for acc in intra_accs]

    accs = [plgpu.ACC((bt, dk), jnp.float32), plgpu.ACC((dv, dk), jnp.float32)]
    accs += [plgpu.ACC((bt, dk), jnp.float32)] * nsub
    inter, new, intra_parts = pl.run_scoped(products, *accs)
    intra = jnp.zeros_like(inter)
    for r, part in enumerate(intra_parts):
        intra = intra + jnp.where((rows >= r * sub) & (rows < (r + 1) * sub), part, 0.0)
    out = out_factor * intra + jnp.exp(_total(cum)) * inter
    return out, state * _bcast_row(jnp.exp(_total(last)), (dv, dk)) + new


def _gated_output_kernel(
    a_ref,
    b_ref,
    c_ref,
    gf_ref,
    gb_ref,
    of_ref,
    ob_ref,
    *scratch,
    n_chunks,
    out_scale,
    split,
    **kw,
):
    """Program (b, h[, direction]): the backward-direction sweep into ``ob_ref`` and the forward
    one into ``of_ref`` (both fp32, times ``out_scale``); with ``split`` one of them.
    ``a_ref``, ``b_ref`` hold the operand parts: [parts, B, N, H, Dv]."""
    a_s, b_s, c_s, g_s, o_s, *operands, bars = scratch
    b, h = lax.axis_index("b"), lax.axis_index("h")
    h_smem, cd_smem, cr_smem, ar_smem = operands
    dv, dk = h_smem.shape[1:]
    parts = kw["parts"]
    cum_kw = dict(op_dtype=kw["op_dtype"], terms=min(parts, 2))

    def load(chunk, gate_ref, forward):
        rows = pl.ds(chunk * CHUNK, CHUNK)
        pairs = [(a_ref.at[p, b, rows, h], a_s.at[p]) for p in range(parts)]
        pairs += [(b_ref.at[p, b, rows, h], b_s.at[p]) for p in range(parts)]
        pairs += [(c_ref.at[b, rows, h], c_s), (gate_ref.at[b, rows, h], g_s)]
        for i, (src, dst) in enumerate(pairs):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
        for i in range(len(pairs)):
            plgpu.barrier_wait(bars.at[i])
        c = _wg(c_s[...]).astype(jnp.float32)
        cum_parts = (cr_smem.at[0], cr_smem.at[1], cd_smem.at[0])
        cum = _cumsum_by_wgmma(_wg(g_s[...]), ar_smem.at[0], cum_parts, forward=forward, **cum_kw)
        return c, cum

    zero_state = plgpu.layout_cast(jnp.zeros((dv, dk), jnp.float32), plgpu.Layout.WGMMA)

    def sweep(out_ref, gate_ref, forward):
        def step(i, state):
            chunk = i if forward else n_chunks - 1 - i
            c, cum = load(chunk, gate_ref, forward)
            out, state = _gated_output_chunk(
                c, cum, a_s, b_s, state, operands, forward=forward, **kw
            )
            o_s[...] = out * out_scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, out_ref.at[b, pl.ds(chunk * CHUNK, CHUNK), h])
            plgpu.wait_smem_to_gmem(0)
            return state

        lax.fori_loop(0, n_chunks, step, zero_state)

    if split:
        direction = lax.axis_index("d")
        pl.when(direction == 0)(lambda: sweep(ob_ref, gb_ref, forward=False))
        pl.when(direction == 1)(lambda: sweep(of_ref, gf_ref, forward=True))
    else:
        sweep(ob_ref, gb_ref, forward=False)
        sweep(of_ref, gf_ref, forward=True)


def bidirectional_gated_output(
    a, b, c, gf, gb, *, out_scale: float, interpret=False, sub=SUB, split=SPLIT
):
    """Both directions of a GLA whose gate sits on the *output* channels, on Mosaic GPU:

        out_f[t] = sum_{s<t} (a_t . b_s) c_s * e^{F_t - F_s},
        out_b[t] = sum_{s>t} (a_t . b_s) c_s * e^{B_t - B_s}

    (``F``/``B``: prefix / suffix cumulative log gates, per channel of ``c``; the diagonal
    ``s = t`` is left out). With ``(a, b, c) = (do, v, k)`` these are the two directions' ``dq``
    without their diagonal terms; see :func:`_bwd` for ``dk``.

    Args:
      a, b: [B, N, H, Dv] score-role inputs (bf16, f16, or fp32: split into bf16 parts).
      c: [B, N, H, Dk] gated-role input (same dtype).
      gf, gb: [B, N, H, Dk] per-token log gates (<= 0) of the two directions.
      out_scale: factor applied to both outputs.
      interpret: ``False``, or a ``plgpu.InterpretGPUParams`` to run on the CPU.
      sub: rows per intra-chunk sub-block.
      split: one program per (batch, head, direction); else one per (batch, head).

    Returns:
      (out_f, out_b): [B, N, H, Dk] fp32 each.
    """
    bsz, n, h, dv = a.shape
    dk = c.shape[-1]
    n_chunks, n_pad, (a, b, c, gf, gb) = _pad_to_chunks(a, b, c, gf, gb)

    def make_scratch(op_dtype, parts):
        kt = _smem_transforms(dk, op_dtype)  # one swizzle for every wgmma operand
        return [
            plgpu.SMEM((parts, CHUNK, dv), op_dtype, transforms=kt),  # a
            plgpu.SMEM((parts, CHUNK, dv), op_dtype, transforms=kt),  # b
            plgpu.SMEM((CHUNK, dk), c.dtype),  # c
            plgpu.SMEM((CHUNK, dk), jnp.float32),  # log gates
            plgpu.SMEM((CHUNK, dk), jnp.float32),  # output tile
            # wgmma operands (see _gated_output_chunk)
            plgpu.SMEM((parts, dv, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts, CHUNK, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts * (CHUNK // sub), CHUNK, dk), op_dtype, transforms=kt),
            plgpu.SMEM((parts, CHUNK, CHUNK), op_dtype, transforms=kt),
            plgpu.Barrier(num_barriers=2 + 2 * parts),
        ]

    op_dtype, parts, scratch = _fitting_scratch(make_scratch, a.dtype)
    kernel = functools.partial(
        _gated_output_kernel,
        n_chunks=n_chunks,
        out_scale=out_scale,
        split=split,
        op_dtype=op_dtype,
        parts=parts,
        sub=sub,
    )
    out_type = jax.ShapeDtypeStruct((bsz, n_pad, h, dk), jnp.float32)
    out_f, out_b = plgpu.kernel(
        kernel,
        out_type=(out_type, out_type),
        scratch_types=scratch,
        grid=(bsz, h, 2) if split else (bsz, h),
        grid_names=("b", "h", "d") if split else ("b", "h"),
        interpret=interpret,
    )(_stack_parts(a, op_dtype, parts), _stack_parts(b, op_dtype, parts), c, gf, gb)
    return out_f[:, :n], out_b[:, :n]


def _shift_tokens(g: jax.Array, step: int) -> jax.Array:
    """``g`` moved by ``step`` tokens along N (+1: row t holds row t-1), zero-filled. [B,N,H,D]."""
    zeros = jnp.zeros_like(g[:, :1])
    return jnp.concatenate([zeros, g[:, :-1]] if step > 0 else [g[:, 1:], zeros], axis=1)


def _interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or False


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _bigla(q, k, v, gf, gb, scale, interpret, backward):
    return _fwd(q, k, v, gf, gb, scale, interpret, backward)[0]


def _fwd(q, k, v, gf, gb, scale, interpret, backward):
    del backward
    out = bidirectional_chunked(
        q,
        k,
        v,
        gf,
        gb,
        out_scale=0.5 * scale,
        out_dtype=v.dtype,
        interpret=interpret,
    )
    return out, (q, k, v, gf, gb)


def _bwd(scale, interpret, backward, residuals, do):
    """Cotangents of (q, k, v, gf, gb): three Mosaic kernels plus two cumulative sums in XLA.

    With ``A_ts`` the op's pair weights (``scale/2 (q_t . k_s) e^{...}``; ``e^{sum gf over
    (s, t]}`` for t >= s, ``e^{sum gb over [t, s)}`` for t <= s):

    * ``dv_s = sum_t A_ts do_t`` is :func:`bidirectional_chunked` with ``(x, y, z) = (k, q, do)``
      and the gates shifted by one token (``gb`` one step later, ``gf`` one step earlier), so
      that its two directions' weights are exactly the transposed pair weights.
    * ``dq`` (per direction) is :func:`bidirectional_gated_output` with ``(a, b, c) =
      (do, v, k)``; ``dk`` is the same kernel with ``(a, b, c) = (v, do, q)`` and the shifted
      gates (its forward direction gives the op's backward-direction ``dk`` and vice versa).
    * The kernels leave out the diagonal ``s = t``; XLA adds it exactly (fp32):
      ``dq_t += scale (do_t . v_t) k_t`` and ``dk_t += scale (do_t . v_t) q_t`` (both directions).
    * ``dgf = reverse-cumsum_t(q dq_f - k dk_f)``, ``dgb = cumsum_t(q dq_b - k dk_b)`` (each
      direction's own parts; fp32, in XLA). The diagonal terms cancel exactly in these
      differences, so they are left out of them; with them, their bf16 rounding errors (the
      largest terms for steep gates) would not cancel and dg would lose a digit.

    ``backward="xla"`` keeps only ``dv`` in Mosaic and takes ``dq, dk, dgf, dgb`` from
    ``jax.vjp`` of the chunked XLA form (the slower reference path of the first version).
    """
    q, k, v, gf, gb = residuals
    later_gb, earlier_gf = _shift_tokens(gb, 1), _shift_tokens(gf, -1)
    do = do.astype(v.dtype)
    dv = bidirectional_chunked(
        k,
        q,
        do,
        later_gb,
        earlier_gf,
        out_scale=0.5 * scale,
        out_dtype=v.dtype,
        interpret=interpret,
    )
    if backward == "xla":
        from pallas_kernels.bigla import xla  # noqa: PLC0415  (only this path needs it)

        fn = lambda q_, k_, gf_, gb_: xla.bigla_xla(q_, k_, v, gf_, gb_, scale=scale)
        _, vjp = jax.vjp(fn, q, k, gf, gb)
        dq, dk, dgf, dgb = vjp(do.astype(v.dtype))
        return dq, dk, dv, dgf, dgb
    kw = dict(out_scale=0.5 * scale, interpret=interpret)
    dq_f, dq_b = bidirectional_gated_output(do, v, k, gf, gb, **kw)
    dk_b, dk_f = bidirectional_gated_output(v, do, q, later_gb, earlier_gf, **kw)
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    diag = scale * jnp.sum(do.astype(jnp.float32) * v.astype(jnp.float32), -1, keepdims=True)
    dgf = lax.cumsum(q32 * dq_f - k32 * dk_f, axis=1, reverse=True)
    dgb = lax.cumsum(q32 * dq_b - k32 * dk_b, axis=1)
    return (
        (dq_f + dq_b + diag * k32).astype(q.dtype),
        (dk_f + dk_b + diag * q32).astype(k.dtype),
        dv,
        dgf.astype(gf.dtype),
        dgb.astype(gb.dtype),
    )


_bigla.defvjp(_fwd, _bwd)


def bigla_mosaic(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gf: jax.Array,
    gb: jax.Array,
    *,
    scale: float | None = None,
    interpret=False,
    backward: str = "mosaic",
) -> jax.Array:
    """BiGLA with a Mosaic GPU (Hopper wgmma) kernel; differentiable (custom_vjp).

    Args:
      q, k: [B, N, H, Dk] queries and keys; Dk a multiple of 16.
      v: [B, N, H, Dv] values (same dtype as q); Dv a multiple of 64.
      gf, gb: [B, N, H, Dk] per-step log forget gates (<= 0) of the two directions; used in fp32.
      scale: query scale; ``Dk ** -0.5`` if None.
      interpret: False (run on an sm90 GPU), True or a ``plgpu.InterpretGPUParams`` (run the same
        kernel in Mosaic GPU interpret mode, e.g. on the CPU).
      backward: "mosaic" (all five gradients from Mosaic kernels, see :func:`_bwd`) or "xla"
        (only ``dv`` from Mosaic; ``dq, dk, dgf, dgb`` from ``jax.vjp`` of the XLA form).

    Returns:
      [B, N, H, Dv] in v's dtype: ``(o_fwd + o_bwd) / 2``.

    The wgmma operands are 16-bit with fp32 accumulation. bf16 / f16 inputs are the operands;
    fp32 inputs are split into three bf16 parts (``hi + mid + lo``) and every product into six
    wgmmas, so they get fp32 accuracy (~1e-6 relative against float64; fewer parts, less
    accurate, only where the head dims leave too little SMEM, see :func:`_fitting_scratch`).
    tf32 wgmma would need K-major operands, i.e. no transposed SMEM operands, which the state
    update (``z^T y``) uses.
    """
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype")
    _operand_format(q.dtype)  # raises for dtypes other than bf16, f16, fp32
    dk, dv = q.shape[-1], v.shape[-1]
    if dk % 16:
        raise ValueError(f"Dk={dk}; the Mosaic GPU kernel needs Dk to be a multiple of 16")
    if dv % 64:
        raise ValueError(f"Dv={dv}; the Mosaic GPU kernel needs Dv to be a multiple of 64")
    scale = dk**-0.5 if scale is None else float(scale)
    if backward not in _BACKWARDS:
        raise ValueError(f"backward={backward!r}; expected one of {_BACKWARDS}")
    return _bigla(q, k, v, gf, gb, scale, _interpret_params(interpret), backward)
