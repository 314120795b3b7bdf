"""Pieces shared by the row-blocked kernels (``gated_norm``, ``gates``, ``rms_norm``; ``dwconv``
uses the config check, compiler parameters, interpret default and the row mask of its stores):
each program takes ``block_rows`` rows of a [R, D] array passed whole, and masks the rows past R
itself, because the Triton lowering does not mask a ragged last block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

MAX_TILE = 128  # widest column tile
MIN_TILE = 16  # Triton's smallest product dimension


def check_powers_of_two(config, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of ``config``'s attributes ``names`` that is not a
    power of two."""
    for name in names:
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value}; expected a power of two")


def compiler_params(config) -> plt.CompilerParams:
    """Triton parameters of a one-stage kernel with ``config.num_warps`` warps."""
    return plt.CompilerParams(num_warps=config.num_warps, num_stages=1)


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret``, where None means: interpret mode off the GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def column_tile(width: int) -> int | None:
    """The column tile for rows of ``width`` values: the largest power-of-two divisor of
    ``width`` up to ``MAX_TILE``, or None where that is below ``MIN_TILE``."""
    tile = min(width & -width if width > 0 else 0, MAX_TILE)
    return tile if tile >= MIN_TILE else None


def row_block(block_rows: int, rows: int, width: int | None = None, axis: int = 0):
    """(first row of this program, mask of the rows inside the array: [block_rows, width], or
    [block_rows] for ``width`` None); the row blocks are walked by grid axis ``axis``."""
    index = jax.dtypes.canonicalize_dtype(jnp.int64)  # the slices' 0 is int64 under x64
    start = (pl.program_id(axis) * block_rows).astype(index)
    shape = (block_rows,) if width is None else (block_rows, width)
    row = start + lax.broadcasted_iota(start.dtype, shape, 0)
    return start, row < rows


def whole(shape: tuple[int, ...]) -> pl.BlockSpec:
    """The whole array as every program's block, on a grid of any rank (rows are sliced and
    masked in the kernel)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
