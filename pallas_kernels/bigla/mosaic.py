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
* The wgmma operands are 16-bit, so fp32 inputs get bf16-level accuracy (measured against the
  float64 reference: 3e-3 to 6e-3 relative for ``o`` and all five gradients, both dtypes).

XLA around the kernels: padding N to a multiple of 64, summing the two directions' fp32 halves,
the diagonal terms and the two cumulative sums of the gate gradients.

Speed (H100, jax 0.11.2, (B, H, N, Dk, Dv) = (128, 3, 196, 32, 64) bf16, CUPTI; see
``benchmarks/results/bigla_mosaic_h100.json``): forward
0.158 ms (Triton 0.134), forward + backward **0.599 ms (Triton 0.732 in the same run)**. The
Triton kernels tuned afterwards (split backward, commit 2783671) take 0.110 / 0.473 ms
(``benchmarks/results/tune_bigla_h100.json``), so Triton is faster and stays the default.
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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CHUNK = 64  # tokens per chunk: one wgmma M tile
SUB = 16  # rows per intra-chunk sub-block (one reference point each)
SPLIT = True  # one program per (batch, head, direction)
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


def _direction_chunk(x, y, cum, z_smem, state, scratch, *, forward, op_dtype, sub):
    """One chunk of one direction: its output and the state after it.

    Args:
      x, y: [64, Dk] fp32 (wgmma layout): query-role and key-role rows of the chunk.
      cum: [64, Dk] fp32 chunk-local cumulative log gate (prefix sums if ``forward``, suffix
        sums otherwise).
      z_smem: SMEM [64, Dv] value-role rows (operand dtype).
      state: [Dv, Dk] fp32 transposed state entering the chunk (wgmma layout).
      scratch: SMEM wgmma operands (operand dtype): the state [Dv, Dk], the decayed keys of the
        state update [64, Dk], the rescaled keys and queries of the intra-chunk blocks
        [8, 64, Dk] each, the gated queries [64, Dk] and the scores [64, 64]. (Interpret mode
        takes wgmma operands only from SMEM, so register operands go through SMEM too.)

    Returns:
      ([64, Dv] fp32 output of this direction, [Dv, Dk] fp32 state leaving the chunk).
    """
    s_smem, yd_smem, yr_smem, xr_smem, xg_smem, a_smem = scratch
    bt, dk = x.shape
    dv = state.shape[0]
    rows = _iota((bt, dk), 0)
    nsub = bt // sub

    # Rescaled keys and queries, one set per sub-block r (a loop, not unrolled: unrolling made
    # the kernel's MLIR 1 MB and its lowering + compilation ~10 s per call site).
    def rescale(r, carry):
        # Reference row: just before sub-block r going forward (row r*sub - 1, none for r = 0),
        # just after it going backward (row (r+1)*sub, none for the last one); none -> 0.
        ref_row = r * sub - 1 if forward else (r + 1) * sub
        ref = _bcast_row(_pick_row(cum, ref_row), (bt, dk))
        keep = rows < (r + 1) * sub if forward else rows >= r * sub
        expo = jnp.minimum(jnp.where(keep, ref - cum, -jnp.inf), CLAMP)
        yr_smem[r] = (y * jnp.exp(expo)).astype(op_dtype)
        in_block = (rows >= r * sub) & (rows < (r + 1) * sub)
        xr = jnp.where(in_block, x * jnp.exp(jnp.where(in_block, cum - ref, 0.0)), 0.0)
        xr_smem[r] = xr.astype(op_dtype)
        return carry

    lax.fori_loop(0, nsub, rescale, 0)
    last = _pick_row(cum, bt - 1 if forward else 0)  # [Dk] total log decay of the chunk
    yd_smem[...] = (y * jnp.exp(_bcast_row(last, (bt, dk)) - cum)).astype(op_dtype)
    xg_smem[...] = (x * jnp.exp(cum)).astype(op_dtype)
    s_smem[...] = state.astype(op_dtype)
    plgpu.commit_smem()

    # Intra-chunk scores A [64, 64], masked to the direction's triangle.
    def scores(acc):
        for r in range(nsub):
            plgpu.wgmma(acc, xr_smem.at[r], yr_smem.at[r].transpose((1, 0)))
        return acc[...]

    a = pl.run_scoped(scores, plgpu.ACC((bt, bt), jnp.float32))
    ai, aj = _iota((bt, bt), 0), _iota((bt, bt), 1)
    diag = _bcast_col(jnp.sum(x * y, axis=1), (bt, bt))
    a = jnp.where(ai == aj, diag, jnp.where(aj < ai if forward else aj > ai, a, 0.0))
    a_smem[...] = a.astype(op_dtype)
    plgpu.commit_smem()

    # Output: inter (x e^{G}) S + intra A z; state: S^T <- S^T e^{last} + z^T (y e^{last - G}).
    # Both in one scope: one wait for all four wgmmas.
    def products(out_acc, update_acc):
        plgpu.wgmma(out_acc, xg_smem, s_smem.transpose((1, 0)))
        plgpu.wgmma(out_acc, a_smem, z_smem)
        plgpu.wgmma(update_acc, z_smem.transpose((1, 0)), yd_smem)
        return out_acc[...], update_acc[...]

    # (Not ``pl.run_state(update)(plgpu.ACC.init(decayed))``: interpret mode cannot run that.)
    accs = (plgpu.ACC((bt, dv), jnp.float32), plgpu.ACC((dv, dk), jnp.float32))
    out, new = pl.run_scoped(products, *accs)
    return out, state * _bcast_row(jnp.exp(last), (dv, dk)) + new


def _cumsum_by_wgmma(g, tri_smem, part_smems, *, forward, op_dtype):
    """Chunk-local inclusive cumulative sums of log gates, on the tensor cores.

    Mosaic GPU cannot lower ``cumsum``, so this is ``T @ g`` with a triangular ones matrix ``T``.
    ``g`` is split into three operand-dtype parts (``hi + mid + lo``, together 24 mantissa bits
    for bf16), so the sum is fp32-accurate although the wgmma operands are 16-bit.

    Args:
      g: [64, Dk] fp32 log gates of one chunk (wgmma layout).
      tri_smem: SMEM [64, 64] wgmma operand buffer (operand dtype), overwritten with ``T``.
      part_smems: three SMEM [64, Dk] wgmma operand buffers, overwritten with the parts.
      forward: prefix sums (``T`` lower triangular) if True, else suffix sums (upper).

    Returns:
      [64, Dk] fp32 cumulative log gates.
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

    def accumulate(acc):
        for part_smem in part_smems:
            plgpu.wgmma(acc, tri_smem, part_smem)
        return acc[...]

    return pl.run_scoped(accumulate, plgpu.ACC(g.shape, jnp.float32))


def _chunk_kernel(
    x_ref, y_ref, z_ref, gf_ref, gb_ref, *refs, n_chunks, out_scale, op_dtype, sub, split
):
    """Program (b, h[, direction]): the sweeps of :func:`bidirectional_chunked`.

    Not ``split``: the backward-direction sweep (last chunk first) into ``ob_ref`` (fp32), then
    the forward-direction sweep, which adds it and writes ``out_scale * (o_f + o_b)`` to
    ``o_ref``. ``split``: program ``direction`` 0 runs the backward sweep into ``ob_ref``, 1 the
    forward sweep into ``o_ref`` (both fp32, unscaled), twice the programs at half the length.
    """
    o_ref, ob_ref, x_s, y_s, z_s, g_s, *stages = refs[:-7]
    operands, bars = refs[-7:-1], refs[-1]
    ob_s = stages[-1]  # fp32 [64, Dv] output tile
    b, h = lax.axis_index("b"), lax.axis_index("h")
    s_smem, yd_smem, yr_smem, xr_smem, xg_smem, a_smem = operands
    dv, dk = s_smem.shape

    def load(c, gate_ref, forward):
        rows = pl.ds(c * CHUNK, CHUNK)
        for i, (src, dst) in enumerate(((x_ref, x_s), (y_ref, y_s), (z_ref, z_s), (gate_ref, g_s))):
            plgpu.copy_gmem_to_smem(src.at[b, rows, h], dst, bars.at[i])
        for i in range(4):
            plgpu.barrier_wait(bars.at[i])
        x = _wg(x_s[...]).astype(jnp.float32)
        y = _wg(y_s[...]).astype(jnp.float32)
        # (The operand buffers are free here: the previous chunk's wgmmas have completed.)
        parts = (xr_smem.at[0], yr_smem.at[0], xg_smem)
        cum = _cumsum_by_wgmma(_wg(g_s[...]), a_smem, parts, forward=forward, op_dtype=op_dtype)
        return x, y, cum

    zero_state = jnp.zeros((dv, dk), jnp.float32)
    zero_state = plgpu.layout_cast(zero_state, plgpu.Layout.WGMMA)

    def sweep_to_fp32(out_ref, gate_ref, forward):
        def step(i, state):
            c = i if forward else n_chunks - 1 - i
            x, y, cum = load(c, gate_ref, forward=forward)
            out, state = _direction_chunk(
                x, y, cum, z_s, state, operands, forward=forward, op_dtype=op_dtype, sub=sub
            )
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
        plgpu.copy_gmem_to_smem(ob_ref.at[b, pl.ds(c * CHUNK, CHUNK), h], ob_s, bars.at[4])
        out, state = _direction_chunk(
            x, y, cum, z_s, state, operands, forward=True, op_dtype=op_dtype, sub=sub
        )
        plgpu.barrier_wait(bars.at[4])
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
      x, y: [B, N, H, Dk] query-role and key-role inputs (bf16 or f16).
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
    op_dtype = x.dtype
    n_chunks, n_pad, (x, y, z, gf, gb) = _pad_to_chunks(x, y, z, gf, gb)
    kernel = functools.partial(
        _chunk_kernel,
        n_chunks=n_chunks,
        out_scale=out_scale,
        op_dtype=op_dtype,
        sub=sub,
        split=split,
    )
    # One swizzle for every wgmma operand: Mosaic GPU wants A's and B's tilings to match.
    kt = _smem_transforms(dk, op_dtype)
    stages = [plgpu.SMEM((CHUNK, dv), jnp.float32)]  # fp32 output tile
    if not split:
        stages.insert(0, plgpu.SMEM((CHUNK, dv), out_dtype))  # output tile
    scratch = [
        plgpu.SMEM((CHUNK, dk), op_dtype),  # x
        plgpu.SMEM((CHUNK, dk), op_dtype),  # y
        plgpu.SMEM((CHUNK, dv), op_dtype, transforms=kt),  # z
        plgpu.SMEM((CHUNK, dk), jnp.float32),  # log gates
        *stages,
        # wgmma operands (see _direction_chunk)
        plgpu.SMEM((dv, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK // sub, CHUNK, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK // sub, CHUNK, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK, CHUNK), op_dtype, transforms=kt),
        plgpu.Barrier(num_barriers=5),
    ]
    fp32_out = jax.ShapeDtypeStruct((bsz, n_pad, h, dv), jnp.float32)
    first_out = fp32_out if split else jax.ShapeDtypeStruct((bsz, n_pad, h, dv), out_dtype)
    o, ob = plgpu.kernel(
        kernel,
        out_type=(first_out, fp32_out),
        scratch_types=scratch,
        grid=(bsz, h, 2) if split else (bsz, h),
        grid_names=("b", "h", "d") if split else ("b", "h"),
        interpret=interpret,
    )(x, y, z, gf, gb)
    if split:
        o = ((o[:, :n] + ob[:, :n]) * out_scale).astype(out_dtype)
    return o[:, :n]


def _gated_output_chunk(c, cum, a_smem, b_smem, state, scratch, *, forward, op_dtype, sub):
    """One chunk of one direction of :func:`bidirectional_gated_output`.

    Args:
      c: [64, Dk] fp32 (wgmma layout): the gated-role rows of the chunk.
      cum: [64, Dk] fp32 chunk-local cumulative log gate (prefix sums if ``forward``, suffix
        sums otherwise).
      a_smem, b_smem: SMEM [64, Dv] rows of the two score roles (operand dtype).
      state: [Dv, Dk] fp32 state ``sum_s b_s (c_s e^{G_end - G_s})^T`` entering the chunk.
      scratch: SMEM wgmma operands (operand dtype): the state [Dv, Dk], the decayed ``c`` of the
        state update [64, Dk], the rescaled ``c`` [nsub, 64, Dk] and the causal scores
        [64, 64] of the intra-chunk products.

    Returns:
      ([64, Dk] fp32 output of this direction, [Dv, Dk] fp32 state leaving the chunk).
    """
    h_smem, cd_smem, cr_smem, ar_smem = scratch
    bt, dk = c.shape
    dv = state.shape[0]
    nsub = bt // sub
    rows = _iota((bt, dk), 0)
    ai, aj = _iota((bt, bt), 0), _iota((bt, bt), 1)

    def raw_scores(acc):
        plgpu.wgmma(acc, a_smem, b_smem.transpose((1, 0)))
        return acc[...]

    scores = pl.run_scoped(raw_scores, plgpu.ACC((bt, bt), jnp.float32))  # a_t . b_s
    causal = aj < ai if forward else aj > ai  # strictly: the diagonal is added in XLA

    # Per sub-block r: c rescaled to r's reference, and the output-side factor e^{G_t - ref_r}
    # of r's rows (accumulated into one [64, Dk] array).
    def rescale(r, out_factor):
        ref_row = r * sub - 1 if forward else (r + 1) * sub
        ref = _bcast_row(_pick_row(cum, ref_row), (bt, dk))
        keep = rows < (r + 1) * sub if forward else rows >= r * sub
        expo = jnp.minimum(jnp.where(keep, ref - cum, -jnp.inf), CLAMP)
        cr_smem[r] = (c * jnp.exp(expo)).astype(op_dtype)
        in_block = (rows >= r * sub) & (rows < (r + 1) * sub)
        return out_factor + jnp.where(in_block, jnp.exp(jnp.where(in_block, cum - ref, 0.0)), 0.0)

    zero = plgpu.layout_cast(jnp.zeros((bt, dk), jnp.float32), plgpu.Layout.WGMMA)
    out_factor = lax.fori_loop(0, nsub, rescale, zero)
    last = _pick_row(cum, bt - 1 if forward else 0)  # [Dk] total log decay of the chunk
    cd_smem[...] = (c * jnp.exp(_bcast_row(last, (bt, dk)) - cum)).astype(op_dtype)
    h_smem[...] = state.astype(op_dtype)
    ar_smem[...] = jnp.where(causal, scores, 0.0).astype(op_dtype)
    plgpu.commit_smem()

    # All wgmmas of the step, one wait. Intra: sub-block r's rows of (A' @ c rescaled to r) --
    # one 64-row product per r, so that A' is stored once (SMEM for 3 programs per SM).
    def products(inter_acc, update_acc, *intra_accs):
        plgpu.wgmma(inter_acc, a_smem, h_smem)
        plgpu.wgmma(update_acc, b_smem.transpose((1, 0)), cd_smem)
        for r, acc in enumerate(intra_accs):
            plgpu.wgmma(acc, ar_smem, cr_smem.at[r])
        return inter_acc[...], update_acc[...], [acc[...] for acc in intra_accs]

    accs = [plgpu.ACC((bt, dk), jnp.float32), plgpu.ACC((dv, dk), jnp.float32)]
    accs += [plgpu.ACC((bt, dk), jnp.float32)] * nsub
    inter, new, intra_parts = pl.run_scoped(products, *accs)
    intra = jnp.zeros_like(inter)
    for r, part in enumerate(intra_parts):
        intra = intra + jnp.where((rows >= r * sub) & (rows < (r + 1) * sub), part, 0.0)
    out = out_factor * intra + jnp.exp(cum) * inter
    return out, state * _bcast_row(jnp.exp(last), (dv, dk)) + new


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
    one into ``of_ref`` (both fp32, times ``out_scale``); with ``split`` one of them."""
    a_s, b_s, c_s, g_s, o_s, *operands, bars = scratch
    b, h = lax.axis_index("b"), lax.axis_index("h")
    h_smem, cd_smem, cr_smem, ar_smem = operands
    dv, dk = h_smem.shape

    def load(chunk, gate_ref, forward):
        rows = pl.ds(chunk * CHUNK, CHUNK)
        pairs = ((a_ref, a_s), (b_ref, b_s), (c_ref, c_s), (gate_ref, g_s))
        for i, (src, dst) in enumerate(pairs):
            plgpu.copy_gmem_to_smem(src.at[b, rows, h], dst, bars.at[i])
        for i in range(4):
            plgpu.barrier_wait(bars.at[i])
        c = _wg(c_s[...]).astype(jnp.float32)
        parts = (cr_smem.at[0], cr_smem.at[1], cd_smem)
        cum = _cumsum_by_wgmma(
            _wg(g_s[...]), ar_smem, parts, forward=forward, op_dtype=kw["op_dtype"]
        )
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
      a, b: [B, N, H, Dv] score-role inputs (bf16 or f16).
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
    op_dtype = a.dtype
    n_chunks, n_pad, (a, b, c, gf, gb) = _pad_to_chunks(a, b, c, gf, gb)
    kernel = functools.partial(
        _gated_output_kernel,
        n_chunks=n_chunks,
        out_scale=out_scale,
        split=split,
        op_dtype=op_dtype,
        sub=sub,
    )
    kt = _smem_transforms(dk, op_dtype)  # one swizzle for every wgmma operand
    scratch = [
        plgpu.SMEM((CHUNK, dv), op_dtype, transforms=kt),  # a
        plgpu.SMEM((CHUNK, dv), op_dtype, transforms=kt),  # b
        plgpu.SMEM((CHUNK, dk), op_dtype),  # c
        plgpu.SMEM((CHUNK, dk), jnp.float32),  # log gates
        plgpu.SMEM((CHUNK, dk), jnp.float32),  # output tile
        # wgmma operands (see _gated_output_chunk)
        plgpu.SMEM((dv, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK // sub, CHUNK, dk), op_dtype, transforms=kt),
        plgpu.SMEM((CHUNK, CHUNK), op_dtype, transforms=kt),
        plgpu.Barrier(num_barriers=4),
    ]
    out_type = jax.ShapeDtypeStruct((bsz, n_pad, h, dk), jnp.float32)
    out_f, out_b = plgpu.kernel(
        kernel,
        out_type=(out_type, out_type),
        scratch_types=scratch,
        grid=(bsz, h, 2) if split else (bsz, h),
        grid_names=("b", "h", "d") if split else ("b", "h"),
        interpret=interpret,
    )(a, b, c, gf, gb)
    return out_f[:, :n], out_b[:, :n]


def _shift_tokens(g: jax.Array, step: int) -> jax.Array:
    """``g`` moved by ``step`` tokens along N (+1: row t holds row t-1), zero-filled. [B,N,H,D]."""
    zeros = jnp.zeros_like(g[:, :1])
    return jnp.concatenate([zeros, g[:, :-1]] if step > 0 else [g[:, 1:], zeros], axis=1)


def _interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or False


def _operand_dtype(dtype):
    return dtype if dtype in _OPERAND_DTYPES else jnp.bfloat16


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _bigla(q, k, v, gf, gb, scale, interpret, backward):
    return _fwd(q, k, v, gf, gb, scale, interpret, backward)[0]


def _fwd(q, k, v, gf, gb, scale, interpret, backward):
    del backward
    op = _operand_dtype(v.dtype)
    out = bidirectional_chunked(
        q.astype(op),
        k.astype(op),
        v.astype(op),
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
    op = _operand_dtype(v.dtype)
    later_gb, earlier_gf = _shift_tokens(gb, 1), _shift_tokens(gf, -1)
    qo, ko, vo, doo = (x.astype(op) for x in (q, k, v, do))
    dv = bidirectional_chunked(
        ko,
        qo,
        doo,
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
    dq_f, dq_b = bidirectional_gated_output(doo, vo, ko, gf, gb, **kw)
    dk_b, dk_f = bidirectional_gated_output(vo, doo, qo, later_gb, earlier_gf, **kw)
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    diag = scale * jnp.sum(do.astype(jnp.float32) * v.astype(jnp.float32), -1, keepdims=True)
    # q and k as the kernels saw them: then the sums of q dq and k dk over all tokens cancel
    # exactly as they do in exact arithmetic (dgf[0] = dgb[-1] = 0).
    qk, kk = qo.astype(jnp.float32), ko.astype(jnp.float32)
    dgf = lax.cumsum(qk * dq_f - kk * dk_f, axis=1, reverse=True)
    dgb = lax.cumsum(qk * dq_b - kk * dk_b, axis=1)
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

    The wgmma operands are bf16 (f16 inputs stay f16): fp32 inputs are rounded to bf16 for the
    tensor cores (fp32 accumulation, fp32 state and gates), so fp32 inputs get bf16-level accuracy
    (~1e-2 relative), not fp32's. tf32 wgmma would need K-major operands, i.e. no transposed SMEM
    operands, which the state update (``z^T y``) uses.
    """
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype")
    dk, dv = q.shape[-1], v.shape[-1]
    if dk % 16:
        raise ValueError(f"Dk={dk}; the Mosaic GPU kernel needs Dk to be a multiple of 16")
    if dv % 64:
        raise ValueError(f"Dv={dv}; the Mosaic GPU kernel needs Dv to be a multiple of 64")
    scale = dk**-0.5 if scale is None else float(scale)
    if backward not in _BACKWARDS:
        raise ValueError(f"backward={backward!r}; expected one of {_BACKWARDS}")
    return _bigla(q, k, v, gf, gb, scale, _interpret_params(interpret), backward)
