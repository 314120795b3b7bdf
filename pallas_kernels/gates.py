"""ViG's forget gates from their low-rank product as Pallas kernels: ``log_gate(low @ W + b)``.

ViG's gate path (vig-reference.md section 2.4) is ``gk_proj[1](gk_proj[0](c))`` (d -> 16 -> d,
bias on the second) followed by ``logsigmoid(x) / normalizer``; the first half of the columns are
the forward scan's log gates, the second half the backward scan's. This module takes the
low-rank product ``low`` [R, r] and computes both halves::

    x = low @ W + b                 W [r, 2K], b [2K]
    gf, gb = split(logsigmoid(x) / normalizer, 2, axis=-1)

with one forward kernel (a block of rows per program; for each column tile of ``W``, a
power of two wide, the r-deep product, the bias and the log-sigmoid, stored to gf or gb) and one
backward kernel, which recomputes the logits from ``low`` and writes ``dlow`` (summed over all
tiles) and per-program partial ``dW`` and ``db`` (summed by XLA). Residuals: ``low``, ``W`` and
``b`` only (r values per row instead of the 2K gates or logits). Arithmetic and products are
fp32 (``Precision.HIGHEST``: the gates' gradients feed exponents); the gates come out in the
compute dtype (at least fp32).

Why kernels: XLA ran the same path on the H100 (two products of ``W``'s column halves, the
log-sigmoid, rematerialised in the backward) in 18 kernels, 1.39 ms of a
ViG-T training step's 14.86 ms (224 px, batch 128, bf16; ``benchmarks/attribute_profile.py``
at ea769b4).

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
      block_rows: rows per program, a power of two >= 16.
      num_warps: warps per program, a power of two.
    """

    block_rows: int = 64
    num_warps: int = 4

    def __post_init__(self):
        check_powers_of_two(self, ("block_rows", "num_warps"))
        if self.block_rows < MIN_TILE:
            raise ValueError(f"block_rows={self.block_rows}; expected >= {MIN_TILE}")


tile_width = column_tile  # of the gates' width K: the kernels' column tile of W, or None


def supports(low_rank: int, key_dim: int) -> bool:
    """Whether :func:`log_gates` runs these sizes: a power-of-two ``low_rank`` >= 16 and a
    ``key_dim`` with a :func:`tile_width`."""
    pow2 = low_rank >= MIN_TILE and not low_rank & (low_rank - 1)
    return pow2 and tile_width(key_dim) is not None


def reference(
    low: jax.Array, kernel: jax.Array, bias: jax.Array, normalizer: float
) -> tuple[jax.Array, jax.Array]:
    """The plain formula in the compute dtype (autodiff gradients): (gf, gb), each [..., K]."""
    ct = jnp.promote_types(jnp.result_type(low, kernel, bias), jnp.float32)
    x = jnp.dot(low.astype(ct), kernel.astype(ct), precision=lax.Precision.HIGHEST)
    y = jax.nn.log_sigmoid(x + bias.astype(ct)) / normalizer
    half = kernel.shape[-1] // 2
    return y[..., :half], y[..., half:]


# ----------------------------------------------------------------------------------- kernels
def _product(a, b, contract):
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=a.dtype
    )


def _logits(low, w_ref, b_ref, cols: slice):
    """``low @ W[:, cols] + b[cols]`` [BR, tile]."""
    return _product(low, w_ref[:, cols], ((1,), (0,))) + b_ref[cols][None, :]


def _log_sigmoid(x):
    return jnp.minimum(x, 0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def _tiles(key_dim: int, tile: int):
    """(tile of W's columns, index of the output (0: gf, 1: gb), its columns there)."""
    for start in range(0, 2 * key_dim, tile):
        half, col = divmod(start, key_dim)
        yield slice(start, start + tile), half, pl.ds(col, tile)


def _forward_kernel(low_ref, w_ref, b_ref, gf_ref, gb_ref, *, rows, block_rows, tile, normalizer):
    key_dim = gf_ref.shape[-1]
    start, low_mask = row_block(block_rows, rows, low_ref.shape[-1])
    _, mask = row_block(block_rows, rows, tile)
    low = plt.load(low_ref.at[pl.ds(start, block_rows), :], mask=low_mask, other=0)
    for cols, half, out_cols in _tiles(key_dim, tile):
        y = _log_sigmoid(_logits(low, w_ref, b_ref, cols)) / normalizer
        out = (gf_ref, gb_ref)[half]
        plt.store(out.at[pl.ds(start, block_rows), out_cols], y.astype(out.dtype), mask=mask)


def _backward_kernel(
    low_ref, w_ref, b_ref, dgf_ref, dgb_ref, dlow_ref, dw_ref, db_ref,
    *, rows, block_rows, tile, normalizer,
):  # fmt: skip
    key_dim = dgf_ref.shape[-1]
    start, low_mask = row_block(block_rows, rows, low_ref.shape[-1])
    _, mask = row_block(block_rows, rows, tile)
    low = plt.load(low_ref.at[pl.ds(start, block_rows), :], mask=low_mask, other=0)
    dlow = jnp.zeros(low.shape, low.dtype)
    for cols, half, in_cols in _tiles(key_dim, tile):
        x = _logits(low, w_ref, b_ref, cols)
        dg = plt.load((dgf_ref, dgb_ref)[half].at[pl.ds(start, block_rows), in_cols], mask=mask)
        # d logsigmoid(x) / dx = sigmoid(-x); rows past the end load dg = 0.
        dx = jnp.where(mask, dg.astype(x.dtype), 0) * jax.nn.sigmoid(-x) / normalizer
        dlow += _product(dx, w_ref[:, cols], ((1,), (1,)))
        dw_ref[:, cols] = _product(low, dx, ((0,), (0,))).astype(dw_ref.dtype)
        db_ref[cols] = jnp.sum(dx, axis=0).astype(db_ref.dtype)
    plt.store(dlow_ref.at[pl.ds(start, block_rows), :], dlow.astype(dlow_ref.dtype), mask=low_mask)


# ----------------------------------------------------------------------------------- calls
def _kernel_kw(rows, tile, normalizer, config):
    return dict(rows=rows, block_rows=config.block_rows, tile=tile, normalizer=normalizer)


def _run_forward(low, w, b, normalizer, config, interpret):
    rows = low.shape[0]
    key_dim = w.shape[1] // 2
    tile = tile_width(key_dim)
    gate = jax.ShapeDtypeStruct((rows, key_dim), w.dtype)
    return pl.pallas_call(
        functools.partial(_forward_kernel, **_kernel_kw(rows, tile, normalizer, config)),
        grid=(pl.cdiv(rows, config.block_rows),),
        in_specs=[whole(low.shape), whole(w.shape), whole(b.shape)],
        out_specs=[whole(gate.shape)] * 2,
        out_shape=[gate, gate],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="log_gates_forward",
    )(low, w, b)


def _run_backward(low, w, b, dgf, dgb, normalizer, config, interpret):
    rows = low.shape[0]
    key_dim = w.shape[1] // 2
    tile = tile_width(key_dim)
    programs = pl.cdiv(rows, config.block_rows)
    dlow, dw, db = pl.pallas_call(
        functools.partial(_backward_kernel, **_kernel_kw(rows, tile, normalizer, config)),
        grid=(programs,),
        in_specs=[whole(x.shape) for x in (low, w, b, dgf, dgb)],
        out_specs=[
            whole(low.shape),
            pl.BlockSpec((None, *w.shape), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, *b.shape), lambda i: (i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(low.shape, low.dtype),
            jax.ShapeDtypeStruct((programs, *w.shape), w.dtype),
            jax.ShapeDtypeStruct((programs, *b.shape), b.dtype),
        ],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="log_gates_backward",
    )(low, w, b, dgf, dgb)
    return dlow, dw.sum(axis=0), db.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _log_gates(low, w, b, normalizer, config, interpret):
    return tuple(_run_forward(low, w, b, normalizer, config, interpret))


def _log_gates_fwd(low, w, b, normalizer, config, interpret):
    return _log_gates(low, w, b, normalizer, config, interpret), (low, w, b)


def _log_gates_bwd(normalizer, config, interpret, residuals, cotangents):
    return _run_backward(*residuals, *cotangents, normalizer, config, interpret)


_log_gates.defvjp(_log_gates_fwd, _log_gates_bwd)


def log_gates(
    low: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    normalizer: float,
    config: Config | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``logsigmoid(low @ kernel + bias) / normalizer`` split into its two column halves.

    Args:
      low: [..., r] the low-rank product (r a power of two >= 16; ViG: 16).
      kernel: [r, 2K] (first K columns: the forward direction's gates).
      bias: [2K].
      normalizer: the logits' divisor after the log-sigmoid (ViG: 16).
      config: tuning knobs (default :class:`Config`).
      interpret: run the kernels in Pallas interpret mode (default: off the GPU).

    Returns:
      (gf, gb), each [..., K] in the compute dtype (the promoted dtype of the inputs and fp32);
      differentiable in ``low``, ``kernel`` and ``bias``.
    """
    rank = low.shape[-1] if low.ndim else 0
    if kernel.ndim != 2 or kernel.shape[0] != rank or kernel.shape[1] % 2:
        raise ValueError(
            f"low has shape {low.shape} and kernel {kernel.shape}; expected low [..., r] and "
            "kernel [r, 2K]"
        )
    if bias.shape != (kernel.shape[1],):
        raise ValueError(f"bias has shape {bias.shape}; expected ({kernel.shape[1]},)")
    key_dim = kernel.shape[1] // 2
    if not supports(rank, key_dim):
        raise ValueError(
            f"low rank {rank} and gate width {key_dim}: expected a power-of-two rank >= "
            f"{MIN_TILE} and a width divisible by {MIN_TILE}"
        )
    config = Config() if config is None else config
    ct = jnp.promote_types(jnp.result_type(low, kernel, bias), jnp.float32)
    lead = low.shape[:-1]
    flat = low.reshape(-1, rank).astype(ct)
    gf, gb = _log_gates(
        flat,
        kernel.astype(ct),
        bias.astype(ct),
        float(normalizer),
        config,
        resolve_interpret(interpret),
    )
    return gf.reshape(*lead, key_dim), gb.reshape(*lead, key_dim)
