"""RMSNorm over the last axis as Pallas kernels: ``x / sqrt(mean(x^2) + eps) * w``.

:func:`rms_norm` flattens the leading axes into rows ([R, D]) and runs one forward kernel (a
block of rows per program; the row's D values as ``D / tile`` column tiles of a power-of-two
width, so that any D with such a divisor works, e.g. ViG-T's 192 as three tiles of 64) that
writes the output and the rows' 1/rms, and one backward kernel that writes ``dx`` and each
program's partial weight gradient ([programs, D] fp32, summed by XLA). Residuals: ``x``, the
weight and the fp32 1/rms per row. Arithmetic is fp32 (or wider); the output is in
``out_dtype``.

Why kernels: XLA ran ViG-T's block norms (this formula with a hand-written gradient,
``vig_jax.fused.rms_norm``) in 16 kernels, ~1.0 ms of the ViG-T training step on the
H100 (224 px, batch 128, bf16; ``benchmarks/attribute_profile.py`` at ea769b4).

:func:`reference` is the plain formula (autodiff gradients), which the tests compare with.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.rows import (
    MIN_TILE,
    check_powers_of_two,
    column_tile,
    compiler_params,
    resolve_interpret,
    row_block,
    whole,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tuning knobs.

    Attributes:
      block_rows: rows per program, a power of two.
      num_warps: warps per program, a power of two.
    """

    block_rows: int = 32
    num_warps: int = 4

    def __post_init__(self):
        check_powers_of_two(self, ("block_rows", "num_warps"))


tile_width = column_tile  # of the rows' width D: the kernels' column tile, or None


def reference(x: jax.Array, weight: jax.Array, eps: float, out_dtype) -> jax.Array:
    """The plain formula in (at least) fp32, rounded to ``out_dtype``."""
    ct = jnp.promote_types(jnp.result_type(x, weight), jnp.float32)
    xf = x.astype(ct)
    rstd = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * rstd * weight.astype(ct)).astype(out_dtype)


# ----------------------------------------------------------------------------------- kernels
def _load_tiles(ref, start, mask, block_rows, tile, dtype):
    """The rows' [BR, tile] column tiles of a [R, D] ref, rows past the end as 0."""
    return [
        plt.load(ref.at[pl.ds(start, block_rows), pl.ds(col, tile)], mask=mask, other=0).astype(
            dtype
        )
        for col in range(0, ref.shape[-1], tile)
    ]


def _store_tiles(ref, start, mask, block_rows, tile, tiles):
    for col, x in zip(range(0, ref.shape[-1], tile), tiles, strict=True):
        plt.store(
            ref.at[pl.ds(start, block_rows), pl.ds(col, tile)], x.astype(ref.dtype), mask=mask
        )


def _row_sum(tiles):
    """sum over all D columns [BR, 1] of a row split into tiles."""
    return sum(jnp.sum(t, axis=1, keepdims=True) for t in tiles)


def _weights(w_ref, tile):
    return [w_ref[pl.ds(col, tile)][None, :] for col in range(0, w_ref.shape[0], tile)]


def _forward_kernel(x_ref, w_ref, y_ref, rstd_ref, *, rows, block_rows, tile, eps):
    dim = x_ref.shape[-1]
    ct = w_ref.dtype
    start, mask = row_block(block_rows, rows, tile)
    xs = _load_tiles(x_ref, start, mask, block_rows, tile, ct)
    rstd = lax.rsqrt(_row_sum([x * x for x in xs]) / dim + eps)  # [BR, 1]
    ys = [x * rstd * w for x, w in zip(xs, _weights(w_ref, tile), strict=True)]
    _store_tiles(y_ref, start, mask, block_rows, tile, ys)
    _, in_rows = row_block(block_rows, rows)
    plt.store(rstd_ref.at[pl.ds(start, block_rows)], rstd[:, 0], mask=in_rows)


def _backward_kernel(
    x_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref, *, rows, block_rows, tile,
):  # fmt: skip
    dim = x_ref.shape[-1]
    ct = w_ref.dtype
    start, mask = row_block(block_rows, rows, tile)
    _, in_rows = row_block(block_rows, rows)
    rstd = plt.load(rstd_ref.at[pl.ds(start, block_rows)], mask=in_rows, other=0)[:, None]
    xhats = [x * rstd for x in _load_tiles(x_ref, start, mask, block_rows, tile, ct)]
    dys = _load_tiles(dy_ref, start, mask, block_rows, tile, ct)
    gs = [dy * w for dy, w in zip(dys, _weights(w_ref, tile), strict=True)]
    mean = _row_sum([g * xh for g, xh in zip(gs, xhats, strict=True)]) / dim
    dxs = [rstd * (g - xh * mean) for g, xh in zip(gs, xhats, strict=True)]
    _store_tiles(dx_ref, start, mask, block_rows, tile, dxs)
    for col, dy, xh in zip(range(0, dim, tile), dys, xhats, strict=True):
        dw_ref[pl.ds(col, tile)] = jnp.sum(dy * xh, axis=0).astype(dw_ref.dtype)


# ----------------------------------------------------------------------------------- calls
def _run_forward(x, w, eps, out_dtype, config, interpret):
    rows, dim = x.shape
    kw = dict(rows=rows, block_rows=config.block_rows, tile=tile_width(dim), eps=eps)
    return pl.pallas_call(
        functools.partial(_forward_kernel, **kw),
        grid=(pl.cdiv(rows, config.block_rows),),
        in_specs=[whole(x.shape), whole(w.shape)],
        out_specs=[whole(x.shape), whole((rows,))],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, out_dtype),
            jax.ShapeDtypeStruct((rows,), w.dtype),
        ],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="rms_norm_forward",
    )(x, w)


def _run_backward(x, w, rstd, dy, config, interpret):
    rows, dim = x.shape
    programs = pl.cdiv(rows, config.block_rows)
    kw = dict(rows=rows, block_rows=config.block_rows, tile=tile_width(dim))
    dx, dw = pl.pallas_call(
        functools.partial(_backward_kernel, **kw),
        grid=(programs,),
        in_specs=[whole(x.shape), whole(w.shape), whole(rstd.shape), whole(dy.shape)],
        out_specs=[whole(x.shape), pl.BlockSpec((None, dim), lambda i: (i, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((programs, dim), w.dtype),
        ],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="rms_norm_backward",
    )(x, w, rstd, dy)
    return dx, dw.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rms_norm(x, w, eps, out_dtype, config, interpret):
    return _run_forward(x, w, eps, out_dtype, config, interpret)[0]


def _rms_norm_fwd(x, w, eps, out_dtype, config, interpret):
    y, rstd = _run_forward(x, w, eps, out_dtype, config, interpret)
    return y, (x, w, rstd)


def _rms_norm_bwd(eps, out_dtype, config, interpret, residuals, dy):
    return _run_backward(*residuals, dy, config, interpret)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    *,
    eps: float,
    out_dtype=None,
    config: Config | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``x / sqrt(mean(x^2, -1) + eps) * weight``, statistics and arithmetic in (at least) fp32.

    Args:
      x: [..., D] with D divisible by a power of two >= 16 (:func:`tile_width`).
      weight: [D].
      eps: added to the mean square.
      out_dtype: dtype of the result (default: x's and the weight's promoted dtype).
      config: tuning knobs (default :class:`Config`).
      interpret: run the kernels in Pallas interpret mode (default: off the GPU).

    Returns:
      [..., D] in ``out_dtype``; differentiable in ``x`` and ``weight``.
    """
    dim = x.shape[-1] if x.ndim else 0
    if tile_width(dim) is None:
        raise ValueError(
            f"x has shape {x.shape}; expected a last axis divisible by {MIN_TILE} (Triton tiles)"
        )
    if weight.shape != (dim,):
        raise ValueError(f"weight has shape {weight.shape}; expected ({dim},)")
    config = Config() if config is None else config
    out_dtype = jnp.dtype(jnp.result_type(x, weight) if out_dtype is None else out_dtype)
    ct = jnp.promote_types(jnp.result_type(x, weight), jnp.float32)
    y = _rms_norm(
        x.reshape(-1, dim),
        weight.astype(ct),
        float(eps),
        out_dtype,
        config,
        resolve_interpret(interpret),
    )
    return y.reshape(x.shape)
