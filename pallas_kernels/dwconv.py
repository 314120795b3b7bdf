"""3x3 depthwise convolution (stride 1, zero padding 1, no bias) as Pallas Triton kernels.

ViG's mixer starts with ``act(Conv2d(d, d, 3, padding=1, groups=d)(u))`` (act = SiLU for ViG-T).
:func:`dwconv3x3` computes it on token-major images ``x`` [B, H, W, C] with one forward kernel
(the optional SiLU applied before the store) and one backward kernel that writes ``dx`` and each
program's partial weight gradient (summed over programs by XLA, a [programs, 16, C] fp32 array).
Products and sums are fp32; the output and ``dx`` are in ``x``'s dtype.

With the SiLU the backward needs its slope ``silu'(z)`` at the pre-activation ``z``: by default
the forward kernel, run again in the backward, writes the slope (the residuals are ``x`` and the
weights only), and XLA multiplies it into the cotangent. Two options (:class:`Config`) remove
passes: ``save_slope`` has the forward store the slope as a residual (no second forward kernel;
one [B, H, W, C] array more memory per call), ``fused_slope`` has the backward kernel multiply the
cotangent by the slope as it reads both (no elementwise pass). Both are off by default until
timed on a GPU (``SAVE_SLOPE_MAX_TOKENS``, ``FUSED_SLOPE_BY_DEFAULT``).

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

from pallas_kernels.rows import check_powers_of_two, compiler_params, resolve_interpret, row_block

TAPS = 9
TAPS_PAD = 16  # weights are [16, C] inside the kernels (power-of-two blocks)
# Defaults of Config.save_slope / Config.fused_slope: the forward stores the SiLU slope for images
# of at most this many tokens (0: never), and whether the backward kernel applies the slope itself.
# Tested (float64 interpret mode, the CUDA lowering) but not yet timed on a GPU.
SAVE_SLOPE_MAX_TOKENS = 0
FUSED_SLOPE_BY_DEFAULT = False


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tuning knobs.

    Attributes:
      block_rows: tokens per program (a power of two; the last block of an image is ragged).
      block_channels: most channels per program (the largest power of two dividing C is used
        when that is smaller).
      num_warps: warps per program.
      save_slope: with the SiLU, the forward also stores ``silu'(z)`` for the backward instead
        of the backward recomputing it; None: for images of at most ``SAVE_SLOPE_MAX_TOKENS``
        tokens.
      fused_slope: with the SiLU, the backward kernel multiplies the cotangent by the slope as
        it loads them (else an XLA pass does, before the kernel); None:
        ``FUSED_SLOPE_BY_DEFAULT``.
    """

    block_rows: int = 32
    block_channels: int = 64
    num_warps: int = 4
    save_slope: bool | None = None
    fused_slope: bool | None = None

    def __post_init__(self):
        check_powers_of_two(self, ("block_rows", "block_channels", "num_warps"))

    def saves_slope(self, tokens: int) -> bool:
        """Whether the forward stores the SiLU slope for images of ``tokens`` tokens."""
        if self.save_slope is None:
            return tokens <= SAVE_SLOPE_MAX_TOKENS
        return self.save_slope

    def fuses_slope(self) -> bool:
        """Whether the backward kernel applies the SiLU slope itself."""
        return FUSED_SLOPE_BY_DEFAULT if self.fused_slope is None else self.fused_slope


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


def _rows_of(ref):
    """Loader of rows ``src`` of a [N, BC] ref as [BR, BC] in >= fp32."""
    return lambda src: ref[src, :].astype(_acc_dtype(ref))


def _rows_times_slope(g_ref, slope_ref):
    """Loader of rows ``src`` of ``g * slope`` (two [N, BC] refs) in >= fp32."""
    dtype = jnp.promote_types(_acc_dtype(g_ref), _acc_dtype(slope_ref))
    return lambda src: g_ref[src, :].astype(dtype) * slope_ref[src, :].astype(dtype)


def _conv_tile(load, w_ref, h, w, block_rows, flip):
    """sum over taps of ``load(source rows)`` (zero where the tap is padding) times the tap."""
    acc = None
    for t, src, valid in _tap_rows(h, w, block_rows, flip):
        term = jnp.where(valid[:, None], load(src), 0.0) * w_ref[t, :][None, :]
        acc = term if acc is None else acc + term
    return acc


def _store_rows(ref, x, h, w, block_rows):
    """Stores this program's rows [BR, BC] into a whole-image [N, BC] ref, rows >= N masked.

    The output blocks are whole images because the Triton lowering does not mask a ragged last
    block: a [BR, BC] tile block past the image's end wrote into the next image's rows (H100)."""
    start, mask = row_block(block_rows, h * w, x.shape[1], axis=1)
    plt.store(ref.at[pl.ds(start, block_rows), :], x.astype(ref.dtype), mask=mask)


def silu_slope(z):
    """``d silu(z) / dz = s (1 + z (1 - s))`` with ``s = sigmoid(z)``."""
    s = jax.nn.sigmoid(z)
    return s * (1 + z * (1 - s))


def _forward_kernel(x_ref, w_ref, *out_refs, h, w, block_rows, outputs):
    """``outputs`` names what ``out_refs`` receive, in order: "z" (the convolution), "silu"
    (its SiLU), "slope" (the SiLU's derivative at it)."""
    z = _conv_tile(_rows_of(x_ref), w_ref, h, w, block_rows, flip=False)
    values = {"z": lambda: z, "silu": lambda: jax.nn.silu(z), "slope": lambda: silu_slope(z)}
    for name, ref in zip(outputs, out_refs, strict=True):
        _store_rows(ref, values[name](), h, w, block_rows)


def _backward_kernel(*refs, h, w, block_rows, slope):
    """dx = correlation of g with the flipped taps; dw partial = sum_rows x(tap) * g.

    refs: (g, x, taps, dx, dw), or with ``slope`` (dy, slope, x, taps, dx, dw) and
    g = dy * slope formed as the rows are loaded."""
    if slope:
        dy_ref, slope_ref, x_ref, w_ref, dx_ref, dw_ref = refs
        load_g = _rows_times_slope(dy_ref, slope_ref)
    else:
        g_ref, x_ref, w_ref, dx_ref, dw_ref = refs
        load_g = _rows_of(g_ref)
    _store_rows(dx_ref, _conv_tile(load_g, w_ref, h, w, block_rows, flip=True), h, w, block_rows)
    n = pl.program_id(1) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    g = jnp.where((n < h * w)[:, None], load_g(jnp.minimum(n, h * w - 1)), 0)
    g = g.astype(dw_ref.dtype)
    rows = jnp.arange(TAPS_PAD, dtype=jnp.int32)[:, None]
    dw = jnp.zeros(dw_ref.shape, dw_ref.dtype)
    for t, src, valid in _tap_rows(h, w, block_rows, flip=False):
        x_tap = jnp.where(valid[:, None], _rows_of(x_ref)(src), 0.0)
        part = jnp.sum(x_tap * g, axis=0)  # [BC]
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


def _run_forward(x, taps, outputs, config, interpret):
    """The forward kernel on x [B, H, W, C]: one [B, H, W, C] array in x's dtype per name of
    ``outputs`` (see :func:`_forward_kernel`), as a tuple."""
    b, h, w, c = x.shape
    grid, image, weights = _specs(b, h, w, c, config)
    out = pl.pallas_call(
        functools.partial(_forward_kernel, h=h, w=w, block_rows=config.block_rows, outputs=outputs),
        grid=grid,
        in_specs=[image, weights],
        out_specs=[image] * len(outputs),
        out_shape=[jax.ShapeDtypeStruct((b, h * w, c), x.dtype)] * len(outputs),
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="dwconv_forward",
    )(x.reshape(b, h * w, c), taps)
    return tuple(y.reshape(b, h, w, c) for y in out)


def _run_backward(g, slope, x, taps, config, interpret):
    """(dx [B, H, W, C], dw [9, C]) for the cotangent ``g`` of the convolution, or with
    ``slope`` (not None) for the cotangent ``g`` of its SiLU, the slope applied in the kernel."""
    b, h, w, c = x.shape
    grid, image, weights = _specs(b, h, w, c, config)
    bc = c // grid[2]
    dw_spec = pl.BlockSpec((None, None, TAPS_PAD, bc), lambda i, r, k: (i, r, 0, k))
    rows = [g] if slope is None else [g, slope]
    dx, dw = pl.pallas_call(
        functools.partial(
            _backward_kernel, h=h, w=w, block_rows=config.block_rows, slope=slope is not None
        ),
        grid=grid,
        in_specs=[image] * (len(rows) + 1) + [weights],
        out_specs=[image, dw_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, h * w, c), x.dtype),
            jax.ShapeDtypeStruct((b, grid[1], TAPS_PAD, c), taps.dtype),
        ],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="dwconv_backward",
    )(*(a.reshape(b, h * w, c) for a in (*rows, x)), taps)
    return dx.reshape(b, h, w, c), dw.sum(axis=(0, 1))[:TAPS]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dwconv(x, kernel, act, config, interpret):
    outputs = ("silu",) if act else ("z",)
    return _run_forward(x, _pad_taps(kernel, x.dtype), outputs, config, interpret)[0]


def _dwconv_fwd(x, kernel, act, config, interpret):
    if act and config.saves_slope(x.shape[1] * x.shape[2]):
        y, slope = _run_forward(x, _pad_taps(kernel, x.dtype), ("silu", "slope"), config, interpret)
        return y, (x, kernel, slope)
    return _dwconv(x, kernel, act, config, interpret), (x, kernel, None)


def _dwconv_bwd(act, config, interpret, res, dy):
    x, kernel, slope = res
    taps = _pad_taps(kernel, x.dtype)
    g = dy.astype(x.dtype)
    if act:
        if slope is None:
            (slope,) = _run_forward(x, taps, ("slope",), config, interpret)
        if not config.fuses_slope():
            g = (g.astype(taps.dtype) * slope.astype(taps.dtype)).astype(x.dtype)
            slope = None
    dx, dw = _run_backward(g, slope, x, taps, config, interpret)
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
