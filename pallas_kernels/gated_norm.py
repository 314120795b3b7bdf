"""The ViG mixer's gated output (two per-head RMSNorms mixed by a sigmoid gate) as Pallas kernels.

Per head (last axis ``Dv``, weights shared by all heads)::

    RMSNorm(x) = x / sqrt(mean(x^2) + eps)
    s = sigmoid(z)
    y = s * RMSNorm(o) * w_o + (1 - s) * RMSNorm(c) * w_c
    out = silu(y) if act else y

:func:`gated_norm` flattens every leading axis and the heads into rows ([R, Dv]) and runs one
forward kernel (a row block per program, the row statistics in registers, one store) and one
backward kernel that recomputes the forward from the inputs and writes ``do``, ``dc``, ``dz``
and each program's partial weight gradients ([programs, 2, Dv] fp32, summed by XLA). Residuals:
the three inputs and the weights. Arithmetic is fp32; outputs are in the inputs' dtype.

Why a kernel: XLA on the H100 split this expression's backward into several fusions, with the
two weight gradients as a slow two-stage column reduction over R = 75,264 rows (ViG-T, 224 px,
batch 128: ~2.4 ms of kernels per training step, forward and backward, on the H100 by
``benchmarks/attribute_profile.py`` over ``benchmarks/results/profile_step_h100.json``).
Not timed yet as a kernel; ``vig_jax.bigla.BiGLA(output_implementation="pallas")`` uses it.

``reference`` is the plain formula (autodiff gradients), which the tests compare with.
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
    check_powers_of_two,
    compiler_params,
    resolve_interpret,
    row_block,
    whole,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tuning knobs.

    Attributes:
      block_rows: rows (token-heads) per program, a power of two.
      num_warps: warps per program.
    """

    block_rows: int = 64
    num_warps: int = 4

    def __post_init__(self):
        check_powers_of_two(self, ("block_rows", "num_warps"))


def reference(o, c, z, weight_o, weight_c, eps: float, act: bool) -> jax.Array:
    """The plain formula in fp32 (or wider), rounded to the inputs' promoted dtype."""
    ct = jnp.promote_types(jnp.result_type(o, c, z), jnp.float32)

    def norm(x, w):
        x = x.astype(ct)
        return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(ct)

    s = jax.nn.sigmoid(z.astype(ct))
    y = s * norm(o, weight_o) + (1 - s) * norm(c, weight_c)
    return (jax.nn.silu(y) if act else y).astype(jnp.result_type(o, c, z))


# ----------------------------------------------------------------------------------- kernels
def _load(ref, start, mask, block_rows, dtype):
    x = plt.load(ref.at[pl.ds(start, block_rows), :], mask=mask, other=0)
    return x.astype(dtype)


def _store(ref, start, mask, block_rows, x):
    plt.store(ref.at[pl.ds(start, block_rows), :], x.astype(ref.dtype), mask=mask)


def _parts(o, c, z, wo, wc, eps):
    """Normalised o and c, their 1/rms [BR, 1], the gate s, and the pre-activation y."""
    rstd_o = lax.rsqrt(jnp.mean(o * o, axis=1, keepdims=True) + eps)
    rstd_c = lax.rsqrt(jnp.mean(c * c, axis=1, keepdims=True) + eps)
    no, nc = o * rstd_o, c * rstd_c
    s = jax.nn.sigmoid(z)
    y = s * no * wo + (1 - s) * nc * wc
    return no, nc, rstd_o, rstd_c, s, y


def _forward_kernel(o_ref, c_ref, z_ref, wo_ref, wc_ref, y_ref, *, rows, block_rows, eps, act):
    dv = o_ref.shape[-1]
    ct = wo_ref.dtype
    start, mask = row_block(block_rows, rows, dv)
    o, c, z = (_load(r, start, mask, block_rows, ct) for r in (o_ref, c_ref, z_ref))
    wo, wc = wo_ref[...][None, :], wc_ref[...][None, :]
    *_, y = _parts(o, c, z, wo, wc, eps)
    _store(y_ref, start, mask, block_rows, jax.nn.silu(y) if act else y)


def _backward_kernel(
    o_ref, c_ref, z_ref, wo_ref, wc_ref, g_ref, do_ref, dc_ref, dz_ref, dw_ref,
    *, rows, block_rows, eps, act,
):  # fmt: skip
    dv = o_ref.shape[-1]
    ct = wo_ref.dtype
    start, mask = row_block(block_rows, rows, dv)
    o, c, z, g = (_load(r, start, mask, block_rows, ct) for r in (o_ref, c_ref, z_ref, g_ref))
    wo, wc = wo_ref[...][None, :], wc_ref[...][None, :]
    no, nc, rstd_o, rstd_c, s, y = _parts(o, c, z, wo, wc, eps)
    dy = g
    if act:
        sy = jax.nn.sigmoid(y)
        dy = g * sy * (1 + y * (1 - sy))
    a, b = dy * s, dy * (1 - s)
    ga, gb = a * wo, b * wc
    do = rstd_o * (ga - no * jnp.mean(ga * no, axis=1, keepdims=True))
    dc = rstd_c * (gb - nc * jnp.mean(gb * nc, axis=1, keepdims=True))
    dz = dy * (no * wo - nc * wc) * s * (1 - s)
    _store(do_ref, start, mask, block_rows, do)
    _store(dc_ref, start, mask, block_rows, dc)
    _store(dz_ref, start, mask, block_rows, dz)
    first = lax.broadcasted_iota(jnp.int32, (2, dv), 0) == 0
    dw_ref[...] = jnp.where(
        first, jnp.sum(a * no, axis=0)[None, :], jnp.sum(b * nc, axis=0)[None, :]
    )


# ----------------------------------------------------------------------------------- calls
def _specs(rows: int, dv: int):
    return whole((rows, dv)), whole((dv,))


def _kernel_kw(rows, eps, act, config):
    return dict(rows=rows, block_rows=config.block_rows, eps=eps, act=act)


def _run_forward(o, c, z, wo, wc, eps, act, config, interpret):
    rows, dv = o.shape
    matrix, vector = _specs(rows, dv)
    return pl.pallas_call(
        functools.partial(_forward_kernel, **_kernel_kw(rows, eps, act, config)),
        grid=(pl.cdiv(rows, config.block_rows),),
        in_specs=[matrix] * 3 + [vector] * 2,
        out_specs=matrix,
        out_shape=jax.ShapeDtypeStruct((rows, dv), jnp.result_type(o, c, z)),
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="gated_norm_forward",
    )(o, c, z, wo, wc)


def _run_backward(o, c, z, wo, wc, g, eps, act, config, interpret):
    rows, dv = o.shape
    matrix, vector = _specs(rows, dv)
    programs = pl.cdiv(rows, config.block_rows)
    do, dc, dz, dw = pl.pallas_call(
        functools.partial(_backward_kernel, **_kernel_kw(rows, eps, act, config)),
        grid=(programs,),
        in_specs=[matrix] * 3 + [vector] * 2 + [matrix],
        out_specs=[matrix] * 3 + [pl.BlockSpec((None, 2, dv), lambda i: (i, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, dv), x.dtype) for x in (o, c, z)]
        + [jax.ShapeDtypeStruct((programs, 2, dv), wo.dtype)],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="gated_norm_backward",
    )(o, c, z, wo, wc, g)
    dw = dw.sum(axis=0)
    return do, dc, dz, dw[0], dw[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _gated_norm(o, c, z, wo, wc, eps, act, config, interpret):
    return _run_forward(o, c, z, wo, wc, eps, act, config, interpret)


def _gated_norm_fwd(o, c, z, wo, wc, eps, act, config, interpret):
    y = _run_forward(o, c, z, wo, wc, eps, act, config, interpret)
    return y, (o, c, z, wo, wc)


def _gated_norm_bwd(eps, act, config, interpret, res, g):
    o, c, z, wo, wc = res
    return _run_backward(o, c, z, wo, wc, g, eps, act, config, interpret)


_gated_norm.defvjp(_gated_norm_fwd, _gated_norm_bwd)


def gated_norm(
    o: jax.Array,
    c: jax.Array,
    z: jax.Array,
    weight_o: jax.Array,
    weight_c: jax.Array,
    *,
    eps: float,
    act: bool = False,
    config: Config | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``act(sigmoid(z) * RMSNorm(o) * w_o + (1 - sigmoid(z)) * RMSNorm(c) * w_c)`` per row.

    Args:
      o, c, z: [..., Dv] (one dtype each, e.g. the BiGLA output, the conv branch and the gate
        logits as [B, N, H, Dv]); Dv a power of two (Triton tiles).
      weight_o, weight_c: [Dv] RMSNorm weights (shared by all leading indices).
      eps: added to the mean square.
      act: apply SiLU to the result.
      config: tuning knobs (default :class:`Config`).
      interpret: run the kernels in Pallas interpret mode (default: off the GPU).

    Returns:
      [..., Dv] in the promoted dtype of o, c and z; differentiable in all five arrays.
    """
    if not (o.shape == c.shape == z.shape) or o.ndim < 1:
        raise ValueError(f"o, c, z have shapes {o.shape}, {c.shape}, {z.shape}; expected one shape")
    dv = o.shape[-1]
    if dv & (dv - 1) or dv < 1:
        raise ValueError(f"the last axis is {dv}; expected a power of two")
    if weight_o.shape != (dv,) or weight_c.shape != (dv,):
        raise ValueError(
            f"weights have shapes {weight_o.shape}, {weight_c.shape}; expected ({dv},)"
        )
    config = Config() if config is None else config
    ct = jnp.promote_types(jnp.result_type(o, c, z, weight_o, weight_c), jnp.float32)
    flat = [x.reshape(-1, dv) for x in (o, c, z)]
    y = _gated_norm(
        *flat,
        weight_o.astype(ct),
        weight_c.astype(ct),
        float(eps),
        bool(act),
        config,
        resolve_interpret(interpret),
    )
    return y.reshape(o.shape)
