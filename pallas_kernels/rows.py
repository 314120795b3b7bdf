"""Pieces shared by the row-blocked kernels (``gated_norm``, ``gates``, ``rms_norm``; ``dwconv``'s
config check): each program takes ``block_rows`` rows of a [R, D] array passed whole, and masks
the rows past R itself, because the Triton lowering does not mask a ragged last block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def check_powers_of_two(config, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of ``config``'s attributes ``names`` that is not a
    power of two."""
    for name in names:
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value}; expected a power of two")


def row_block(block_rows: int, rows: int, width: int):
    """(first row of this program, [block_rows, width] mask of the rows inside the array)."""
    index = jax.dtypes.canonicalize_dtype(jnp.int64)  # the slices' 0 is int64 under x64
    start = (pl.program_id(0) * block_rows).astype(index)
    row = start + lax.broadcasted_iota(start.dtype, (block_rows, width), 0)
    return start, row < rows


def whole(shape: tuple[int, ...]) -> pl.BlockSpec:
    """The whole array as every program's block (rows are sliced and masked in the kernel)."""
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))
