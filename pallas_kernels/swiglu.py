"""ViG's SwiGLU MLP with its elementwise parts inside the products (Pallas, Triton).

``swiglu_mlp(x, w_in, w_out) = (silu(a) * b) @ w_out`` with ``[a | b] = x @ w_in`` (gate first):

* forward, one kernel (a block of rows and of F features per program): ``h = x @ w_in`` for the
  block's a and b columns, stored, and ``z = silu(a) * b`` from the stored (rounded) values,
  stored too; ``y = z @ w_out`` is XLA's product.
* backward, one kernel for ``dh``: ``dz = dy @ w_out^T`` for the block (rounded to the input
  dtype, as XLA's product would), then ``dh = [dz * b * silu'(a) | dz * silu(a)]`` from the
  stored h; the weight gradients and ``dx = dh @ w_in^T`` are XLA's products.

Against XLA's form (``vig_jax.layers``: product, SwiGLU pass, product; in the backward product,
SwiGLU-gradient pass), this moves neither h a second time in the forward nor dz through memory
in the backward: for ViG-T's training step at 224 px, batch 128 (bf16), ~100 MB per block.
Residuals: x, h and z (what the down projection's weight gradient needs), or with
``keep_output=False`` x and h only, z then recomputed from h in the backward pass (one
elementwise pass; for long sequences, where activation memory binds).

For bf16 / fp16 inputs (fp32 accumulation, fp32 elementwise arithmetic, results rounded to the
input dtype where XLA rounds them). The sizes K, F and D must each split into power-of-two
tiles of at least 16 (:func:`supports`). :func:`reference` is the plain formula.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.rows import (
    check_powers_of_two,
    column_tile,
    compiler_params,
    resolve_interpret,
    row_block,
    whole,
)

LOW_PRECISION = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tuning knobs.

    Attributes:
      block_rows: rows per program, a power of two >= 16.
      block_features: features (of F) per program, a power of two >= 16; clipped to F's tile.
      num_warps: warps per program, a power of two.
    """

    block_rows: int = 64
    block_features: int = 64
    num_warps: int = 4

    def __post_init__(self):
        check_powers_of_two(self, ("block_rows", "block_features", "num_warps"))


def supports(in_features: int, hidden: int, out_features: int) -> bool:
    """Whether K = ``in_features``, F = ``hidden`` and D = ``out_features`` tile (powers of two
    >= 16 dividing each)."""
    return all(column_tile(n) is not None for n in (in_features, hidden, out_features))


def silu_glu(h: jax.Array) -> jax.Array:
    """``silu(a) * b`` of ``[a | b] = h`` [..., 2F], fp32 arithmetic, in h's dtype."""
    a, b = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return (jax.nn.silu(a) * b).astype(h.dtype)


def reference(x: jax.Array, w_in: jax.Array, w_out: jax.Array) -> jax.Array:
    """The plain formula (XLA's products in the inputs' dtype), [M, K] -> [M, D]."""
    return jnp.dot(silu_glu(jnp.dot(x, w_in)), w_out)


# ----------------------------------------------------------------------------------- kernels
def _tile_product(a_ref, b_ref, cols, *, rows: int, block_rows: int, transpose_b: bool):
    """``a[block, :] @ b[:, cols]`` (or ``@ b[cols, :]^T``) for this program's block of rows,
    over the contraction axis in power-of-two tiles, fp32 accumulation: [BM, BF]."""
    depth = a_ref.shape[1]
    tile = column_tile(depth)
    start, mask = row_block(block_rows, rows, tile)
    acc = None
    for k in range(0, depth, tile):
        a = plt.load(a_ref.at[pl.ds(start, block_rows), pl.ds(k, tile)], mask=mask, other=0)
        if transpose_b:
            b = b_ref[cols, pl.ds(k, tile)]
            part = jax.lax.dot_general(
                a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
        else:
            b = b_ref[pl.ds(k, tile), cols]
            part = jnp.dot(a, b, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


def _feature_blocks(block_features: int, hidden: int):
    """This program's (a columns, b columns) of h: the same F features of either half."""
    f0 = pl.program_id(1) * block_features
    return pl.ds(f0, block_features), pl.ds(hidden + f0, block_features)


def _up_kernel(x_ref, w_ref, h_ref, z_ref, *, rows, block_rows, block_features, hidden):
    cols_a, cols_b = _feature_blocks(block_features, hidden)
    product = functools.partial(_tile_product, rows=rows, block_rows=block_rows, transpose_b=False)
    a = product(x_ref, w_ref, cols_a).astype(h_ref.dtype)
    b = product(x_ref, w_ref, cols_b).astype(h_ref.dtype)
    start, mask = row_block(block_rows, rows, block_features)
    block = pl.ds(start, block_rows)
    plt.store(h_ref.at[block, cols_a], a, mask=mask)
    plt.store(h_ref.at[block, cols_b], b, mask=mask)
    z = jax.nn.silu(a.astype(jnp.float32)) * b.astype(jnp.float32)  # from the stored h
    plt.store(z_ref.at[block, cols_a], z.astype(z_ref.dtype), mask=mask)


def _down_grad_kernel(dy_ref, w_ref, h_ref, dh_ref, *, rows, block_rows, block_features, hidden):
    cols_a, cols_b = _feature_blocks(block_features, hidden)
    dz = _tile_product(dy_ref, w_ref, cols_a, rows=rows, block_rows=block_rows, transpose_b=True)
    dz = dz.astype(h_ref.dtype).astype(jnp.float32)  # rounded where XLA's product rounds it
    start, mask = row_block(block_rows, rows, block_features)
    block = pl.ds(start, block_rows)
    a = plt.load(h_ref.at[block, cols_a], mask=mask, other=0).astype(jnp.float32)
    b = plt.load(h_ref.at[block, cols_b], mask=mask, other=0).astype(jnp.float32)
    s = jax.nn.sigmoid(a)
    da = dz * b * s * (1 + a * (1 - s))  # silu'(a) = s (1 + a (1 - s))
    plt.store(dh_ref.at[block, cols_a], da.astype(dh_ref.dtype), mask=mask)
    plt.store(dh_ref.at[block, cols_b], (dz * a * s).astype(dh_ref.dtype), mask=mask)


# ----------------------------------------------------------------------------------- calls
def _grid_and_kw(rows: int, hidden: int, config: Config):
    features = min(config.block_features, column_tile(hidden))
    kw = dict(rows=rows, block_rows=config.block_rows, block_features=features, hidden=hidden)
    return (pl.cdiv(rows, config.block_rows), hidden // features), kw


def _up(x, w_in, config, interpret):
    rows, hidden = x.shape[0], w_in.shape[1] // 2
    grid, kw = _grid_and_kw(rows, hidden, config)
    return pl.pallas_call(
        functools.partial(_up_kernel, **kw),
        grid=grid,
        in_specs=[whole(x.shape), whole(w_in.shape)],
        out_specs=[whole((rows, 2 * hidden)), whole((rows, hidden))],
        out_shape=[
            jax.ShapeDtypeStruct((rows, 2 * hidden), x.dtype),
            jax.ShapeDtypeStruct((rows, hidden), x.dtype),
        ],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="swiglu_up",
    )(x, w_in)


def _down_grad(dy, w_out, h, config, interpret):
    rows, hidden = h.shape[0], h.shape[1] // 2
    grid, kw = _grid_and_kw(rows, hidden, config)
    return pl.pallas_call(
        functools.partial(_down_grad_kernel, **kw),
        grid=grid,
        in_specs=[whole(dy.shape), whole(w_out.shape), whole(h.shape)],
        out_specs=whole(h.shape),
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="swiglu_down_grad",
    )(dy, w_out, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _swiglu_mlp(x, w_in, w_out, keep_output, config, interpret):
    return _swiglu_mlp_fwd(x, w_in, w_out, keep_output, config, interpret)[0]


def _swiglu_mlp_fwd(x, w_in, w_out, keep_output, config, interpret):
    h, z = _up(x, w_in, config, interpret)
    return jnp.dot(z, w_out), (x, w_in, w_out, h, z if keep_output else None)


def _swiglu_mlp_bwd(keep_output, config, interpret, residuals, dy):
    x, w_in, w_out, h, z = residuals
    if z is None:
        z = silu_glu(jax.lax.optimization_barrier(h))  # recomputed, not kept from the forward
    dh = _down_grad(dy, w_out, h, config, interpret)
    return jnp.dot(dh, w_in.T), jnp.dot(x.T, dh), jnp.dot(z.T, dy)


_swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


def swiglu_mlp(
    x: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    *,
    keep_output: bool = True,
    config: Config | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``(silu(a) * b) @ w_out`` with ``[a | b] = x @ w_in``, differentiable.

    Args:
      x: [..., K] in bf16 or fp16.
      w_in: [K, 2F] (gate columns first), x's dtype.
      w_out: [F, D], x's dtype.
      keep_output: keep ``silu(a) * b`` for the backward pass (else recompute it from h).
      config: tuning knobs (default :class:`Config`).
      interpret: run the kernels in Pallas interpret mode (default: off the GPU).

    Returns:
      [..., D] in x's dtype.
    """
    k = x.shape[-1]
    if x.dtype not in LOW_PRECISION or w_in.dtype != x.dtype or w_out.dtype != x.dtype:
        raise ValueError(
            f"dtypes x {x.dtype}, w_in {w_in.dtype}, w_out {w_out.dtype}; expected one of "
            f"{[jnp.dtype(d).name for d in LOW_PRECISION]} for all three"
        )
    if w_in.ndim != 2 or w_in.shape[0] != k or w_in.shape[1] % 2:
        raise ValueError(f"w_in has shape {w_in.shape}; expected ({k}, 2F)")
    hidden = w_in.shape[1] // 2
    if w_out.ndim != 2 or w_out.shape[0] != hidden:
        raise ValueError(f"w_out has shape {w_out.shape}; expected ({hidden}, D)")
    if not supports(k, hidden, w_out.shape[1]):
        raise ValueError(
            f"sizes K={k}, F={hidden}, D={w_out.shape[1]}; each must be divisible by a power "
            "of two >= 16"
        )
    config = Config() if config is None else config
    interpret = resolve_interpret(interpret)
    y = _swiglu_mlp(x.reshape(-1, k), w_in, w_out, bool(keep_output), config, interpret)
    return y.reshape(*x.shape[:-1], w_out.shape[1])
