"""3x3 depthwise convolution (stride 1, zero padding 1, no bias) as Pallas Triton kernels.

ViG's mixer starts with ``act(Conv2d(d, d, 3, padding=1, groups=d)(u))`` (act = SiLU for ViG-T).
:func:`dwconv3x3` computes it on token-major images ``x`` [B, H, W, C] with one forward kernel
(the optional SiLU applied before the store) and one backward kernel that writes ``dx`` and each
program's partial weight gradient (summed over programs by XLA, a [programs, 16, C] fp32 array).
The backward recomputes the pre-activation from ``x`` (the residuals are ``x`` and the weights
only). Products and sums are fp32; the output and ``dx`` are in ``x``'s dtype.

Layout: a program owns ``block_rows`` consecutive tokens (row-major over (H, W)) of one image and
``block_channels`` channels. Its nine taps are row gathers from the image (token ``n`` reads
``n + (a - 1) W + (b - 1)``, indices clipped into the image and the products masked where the
tap falls into the zero padding), so nothing is padded or copied in device memory and any H, W
work; a program's channels are the largest power of two dividing C, at most
``block_channels`` (64 for every ViG width; 1 for odd C: correct, slow). ``dx`` is the same
correlation of the cotangent with the flipped taps.

``reference`` is the plain XLA form (``lax.conv_general_dilated``), which the tests compare with.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.rows import check_powers_of_two, compiler_params, resolve_interpret

TAPS = 9
TAPS_PAD = 16  # weights are [16, C] inside the kernels (power-of-two blocks)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tuning knobs.

    Attributes:
      block_rows: tokens per program (a power of two; the last block of an image is ragged).
      block_channels: most channels per program (the largest power of two dividing C is used
        when that is smaller).
      num_warps: warps per program.
    """

    block_rows: int = 32
    block_channels: int = 64
    num_warps: int = 4

    def __post_init__(self):
        check_powers_of_two(self, ("block_rows", "block_channels", "num_warps"))


def reference(x: jax.Array, kernel: jax.Array, act: bool = False) -> jax.Array:
    """``act(conv(x))`` through ``lax.conv_general_dilated`` (fp32 accumulation).

    x [B, H, W, C], kernel [3, 3, C] -> [B, H, W, C] in x's dtype."""
    c = x.shape[-1]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    y = lax.conv_general_dilated(
        x.astype(acc),
        kernel.astype(acc).reshape(3, 3, 1, c),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=lax.Precision.HIGHEST,
    )
    return (jax.nn.silu(y) if act else y).astype(x.dtype)


def _block_channels(c: int, config: Config) -> int:
    """The largest power of two dividing C, at most ``config.block_channels``."""
    return min(config.block_channels, c & -c)


def _tap_rows(h: int, w: int, block_rows: int, flip: bool):
    """Per tap: (clipped source token index [BR], valid mask [BR]) of this program's rows."""
    n = pl.program_id(1) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    i, j = n // w, n % w
    inside = n < h * w
    for a in range(3):
        for b in range(3):
            da, db = (1 - a, 1 - b) if flip else (a - 1, b - 1)
            ii, jj = i + da, j + db
            valid = inside & (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
            src = jnp.clip(ii * w + jj, 0, h * w - 1)
            yield 3 * a + b, src, valid


def _acc_dtype(ref):
    return jnp.promote_types(ref.dtype, jnp.float32)


def _gathered(ref, src, valid):
    """Rows ``src`` of a [N, BC] ref as [BR, BC] (>= fp32), zero where not ``valid``."""
    return jnp.where(valid[:, None], ref[src, :].astype(_acc_dtype(ref)), 0.0)


def _conv_tile(x_ref, w_ref, h, w, block_rows, flip):
    acc = None
    for t, src, valid in _tap_rows(h, w, block_rows, flip):
        term = _gathered(x_ref, src, valid) * w_ref[t, :][None, :]
        acc = term if acc is None else acc + term
    return acc


def _store_rows(ref, x, h, w, block_rows):
    """Stores this program's rows [BR, BC] into a whole-image [N, BC] ref, rows >= N masked.

    The output blocks are whole images because the Triton lowering does not mask a ragged last
    block: a [BR, BC] tile block past the image's end wrote into the next image's rows (H100)."""
    index = jax.dtypes.canonicalize_dtype(jnp.int64)  # the slices' 0 is int64 under x64
    start = (pl.program_id(1) * block_rows).astype(index)
    rows = start + lax.broadcasted_iota(start.dtype, x.shape, 0)
    plt.store(ref.at[pl.ds(start, block_rows), :], x.astype(ref.dtype), mask=rows < h * w)


def _forward_kernel(x_ref, w_ref, y_ref, *, h, w, block_rows, act):
    z = _conv_tile(x_ref, w_ref, h, w, block_rows, flip=False)
    _store_rows(y_ref, jax.nn.silu(z) if act else z, h, w, block_rows)


def _backward_kernel(g_ref, x_ref, w_ref, dx_ref, dw_ref, *, h, w, block_rows):
    """dx = correlation of g with the flipped taps; dw partial = sum_rows x(tap) * g."""
    _store_rows(dx_ref, _conv_tile(g_ref, w_ref, h, w, block_rows, flip=True), h, w, block_rows)
    n = pl.program_id(1) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    g = jnp.where((n < h * w)[:, None], g_ref[jnp.minimum(n, h * w - 1), :], 0)
    g = g.astype(dw_ref.dtype)
    rows = jnp.arange(TAPS_PAD, dtype=jnp.int32)[:, None]
    dw = jnp.zeros(dw_ref.shape, dw_ref.dtype)
    for t, src, valid in _tap_rows(h, w, block_rows, flip=False):
        part = jnp.sum(_gathered(x_ref, src, valid) * g, axis=0)  # [BC]
        dw = jnp.where(rows == t, part[None, :], dw)
    dw_ref[...] = dw


def _specs(b, h, w, c, config):
    bc = _block_channels(c, config)
    br = config.block_rows
    nb = pl.cdiv(h * w, br)
    image = pl.BlockSpec((None, h * w, bc), lambda i, r, k: (i, 0, k))
    weights = pl.BlockSpec((TAPS_PAD, bc), lambda i, r, k: (0, k))
    return (b, nb, c // bc), image, weights


def _pad_taps(kernel, dtype):
    """[3, 3, C] -> [16, C] in the accumulation dtype of ``dtype`` (rows 9..15 zero)."""
    taps = kernel.reshape(TAPS, -1).astype(jnp.promote_types(dtype, jnp.float32))
    return jnp.pad(taps, ((0, TAPS_PAD - TAPS), (0, 0)))


def _run_forward(x, taps, act, config, interpret):
    b, h, w, c = x.shape
    grid, image, weights = _specs(b, h, w, c, config)
    y = pl.pallas_call(
        functools.partial(_forward_kernel, h=h, w=w, block_rows=config.block_rows, act=act),
        grid=grid,
        in_specs=[image, weights],
        out_specs=image,
        out_shape=jax.ShapeDtypeStruct((b, h * w, c), x.dtype),
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="dwconv_forward",
    )(x.reshape(b, h * w, c), taps)
    return y.reshape(b, h, w, c)


def _run_backward(g, x, taps, config, interpret):
    b, h, w, c = x.shape
    grid, image, weights = _specs(b, h, w, c, config)
    bc = c // grid[2]
    dw_spec = pl.BlockSpec((None, None, TAPS_PAD, bc), lambda i, r, k: (i, r, 0, k))
    dx, dw = pl.pallas_call(
        functools.partial(_backward_kernel, h=h, w=w, block_rows=config.block_rows),
        grid=grid,
        in_specs=[image, image, weights],
        out_specs=[image, dw_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, h * w, c), x.dtype),
            jax.ShapeDtypeStruct((b, grid[1], TAPS_PAD, c), taps.dtype),
        ],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="dwconv_backward",
    )(g.reshape(b, h * w, c), x.reshape(b, h * w, c), taps)
    return dx.reshape(b, h, w, c), dw.sum(axis=(0, 1))[:TAPS]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dwconv(x, kernel, act, config, interpret):
    return _run_forward(x, _pad_taps(kernel, x.dtype), act, config, interpret)


def _dwconv_fwd(x, kernel, act, config, interpret):
    return _dwconv(x, kernel, act, config, interpret), (x, kernel)


def _dwconv_bwd(act, config, interpret, res, dy):
    x, kernel = res
    taps = _pad_taps(kernel, x.dtype)
    g = dy.astype(taps.dtype)
    if act:
        z = _run_forward(x, taps, False, config, interpret).astype(taps.dtype)
        s = jax.nn.sigmoid(z)
        g = g * s * (1 + z * (1 - s))
    dx, dw = _run_backward(g.astype(x.dtype), x, taps, config, interpret)
    return dx, dw.reshape(kernel.shape).astype(kernel.dtype)


_dwconv.defvjp(_dwconv_fwd, _dwconv_bwd)


def dwconv3x3(
    x: jax.Array,
    kernel: jax.Array,
    *,
    act: bool = False,
    config: Config | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``act(depthwise_conv3x3(x, kernel))``, differentiable in both arguments.

    Args:
      x: [B, H, W, C] (bf16 / fp16 / fp32).
      kernel: [3, 3, C] taps (``kernel[a, b, c]`` multiplies ``x[i + a - 1, j + b - 1, c]``).
      act: apply SiLU to the convolution.
      config: tuning knobs (default :class:`Config`).
      interpret: run the kernels in Pallas interpret mode (default: off the GPU).

    Returns:
      [B, H, W, C] in x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"x has shape {x.shape}; expected [B, H, W, C]")
    if kernel.shape != (3, 3, x.shape[-1]):
        raise ValueError(f"kernel has shape {kernel.shape}; expected (3, 3, {x.shape[-1]})")
    config = Config() if config is None else config
    return _dwconv(x, kernel, bool(act), config, resolve_interpret(interpret))
