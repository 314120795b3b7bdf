"""Building blocks shared by ViG and ViG-H: stem, norms, SwiGLU, drop path, initialisers.

Everything here is channel-last (NHWC / ``[..., C]``) and follows the official PyTorch code
(hustvl/ViG, ``classification/models/vig.py`` and ``vig_h.py``; vig-reference.md sections 2 and
4) so that the same parameters give the same outputs:

* :class:`PatchEmbed`: ``V2PatchEmbed`` (ViG) and ``_make_patch_embed_v2`` (ViG-H):
  conv -> LayerNorm -> SiLU/GELU -> conv -> LayerNorm;
* :func:`rms_norm` (FLA's RMSNorm: weight only, eps 1e-6; an :class:`RMSNorm` whose gradient is
  :func:`vig_jax.fused.rms_norm`'s) and :func:`layer_norm` (``nn.LayerNorm`` /
  ``LayerNorm2d`` over channels, eps 1e-5);
* :class:`SwiGLU` (ViG's ``GLAMLP``) and :class:`GatedMlp` (ViG-H's ``gMlp``), both with the
  down projection's input recomputed in the backward pass (or kept, for short sequences:
  ``SWIGLU_KEEP_MAX_TOKENS``);
* :class:`DropPath`: per-sample stochastic depth (timm's ``DropPath``) on an ``nnx.Rngs``
  stream named ``"dropout"``;
* PyTorch-equivalent initialisers (``xavier_uniform_``, default ``Conv2d`` init, timm's
  ``trunc_normal_``) and :func:`resize_pos_embed`, torch's bicubic ``F.interpolate`` as two
  small matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import rms_norm as pallas_rms_norm
from pallas_kernels import swiglu as pallas_swiglu
from vig_jax import fused

Dtype = jnp.dtype | type
Initializer = nnx.initializers.Initializer

LN_EPS = 1e-5  # nn.LayerNorm default: the stems, LayerNorm2d and all of ViG-H
RMS_EPS = 1e-6  # GLAConfig.rms_norm_eps: every RMSNorm of ViG, and g_norm / l_norm of ViG-H
INIT_STD = 0.02  # GLAConfig.initializer_range / timm trunc_normal_(std=.02)
XAVIER_GAIN = 2**-2.5  # the mixer's xavier_uniform_ gain (from FLA's GLA layer)


# ----------------------------------------------------------------------------- initialisers
def uniform_symmetric(bound: float) -> Initializer:
    """U(-bound, bound), whatever the shape (PyTorch's uniform initialisers)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def xavier_uniform_bound(fan_in: int, fan_out: int, gain: float = XAVIER_GAIN) -> float:
    """Bound of ``torch.nn.init.xavier_uniform_``: gain * sqrt(6 / (fan_in + fan_out))."""
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def xavier_uniform_torch(fan_in: int, fan_out: int, gain: float = XAVIER_GAIN) -> Initializer:
    """``xavier_uniform_(w, gain)`` with the fans PyTorch computes for the official tensor.

    The fans are passed explicitly because PyTorch computes them from its own layout
    (Linear ``[out, in]``: fan_in = in, fan_out = out; Conv2d ``[out, in/groups, kh, kw]``:
    fan_in = in/groups * kh * kw, fan_out = out * kh * kw), which differs from Flax's.
    """
    return uniform_symmetric(xavier_uniform_bound(fan_in, fan_out, gain))


def torch_default_conv_init(fan_in: int) -> tuple[Initializer, Initializer]:
    """(kernel_init, bias_init) of a freshly built ``torch.nn.Conv2d``.

    ``kaiming_uniform_(a=sqrt(5))`` gives the bound gain * sqrt(3 / fan_in) with
    gain = sqrt(2 / (1 + 5)), i.e. 1 / sqrt(fan_in); the bias uses the same bound.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return uniform_symmetric(bound), uniform_symmetric(bound)


def trunc_normal_timm(
    std: float = INIT_STD, lower: float = -2.0, upper: float = 2.0
) -> Initializer:
    """timm's ``trunc_normal_(w, std=std)``: N(0, std^2) cut at the ABSOLUTE values [-2, 2].

    (Not Flax's ``truncated_normal``, which cuts at +-2 standard deviations and rescales.)
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        unit = jax.random.truncated_normal(key, lower / std, upper / std, shape, jnp.float32)
        return (std * unit).astype(dtype)

    return init


def normal_init(std: float = INIT_STD) -> Initializer:
    """``w.data.normal_(0, std)``."""
    return nnx.initializers.normal(stddev=std)


# ----------------------------------------------------------------------------- norms
NORM_IMPLEMENTATIONS = ("xla", "pallas")


# Tested (float64 in interpret mode, fp32 / bf16 against float64, the CUDA lowering) but not
# yet run or timed on a GPU: "xla" stays the GPU default until an H100 run shows the kernels
# correct and faster.
PALLAS_NORM_BY_DEFAULT = False


def default_norm_implementation(dim: int, backend: str | None = None) -> str:
    """``"pallas"`` (:mod:`pallas_kernels.rms_norm`) on a GPU where ``dim`` splits into
    power-of-two tiles of at least 16 and ``PALLAS_NORM_BY_DEFAULT`` is set, else ``"xla"``
    (:func:`vig_jax.fused.rms_norm`)."""
    gpu = (backend or jax.default_backend()) == "gpu"
    usable = gpu and pallas_rms_norm.tile_width(dim) is not None
    return "pallas" if PALLAS_NORM_BY_DEFAULT and usable else "xla"


class RMSNorm(nnx.RMSNorm):
    """``nnx.RMSNorm`` over the last axis computed by :func:`vig_jax.fused.rms_norm` (attribute
    ``implementation`` "xla") or :func:`pallas_kernels.rms_norm.rms_norm` ("pallas": one
    forward and one backward kernel).

    Same parameter (``scale`` [D]) and forward formula; the arithmetic is fp32 (the input is
    first cast to ``dtype`` as in Flax, the scale is not rounded to it), and the backward pass
    keeps only the input and the per-row statistics.
    """

    implementation: str = "xla"

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[..., D] -> [..., D] in ``dtype`` (default: the input's and the scale's promoted)."""
        if mask is not None:
            raise ValueError("RMSNorm(mask=...) is not supported; expected mask=None")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        scale = self.scale[...]
        out_dtype = jnp.dtype(self.dtype if self.dtype is not None else jnp.result_type(x, scale))
        if self.implementation == "pallas":
            return pallas_rms_norm.rms_norm(x, scale, eps=self.epsilon, out_dtype=out_dtype)
        return fused.rms_norm(x, scale, self.epsilon, out_dtype)


def rms_norm(
    dim: int,
    *,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    implementation: str | None = None,
    rngs: nnx.Rngs,
) -> RMSNorm:
    """FLA's RMSNorm over the last axis: ``x / sqrt(mean(x^2) + 1e-6) * scale`` (stats in fp32).

    ``implementation``: "xla" or "pallas"; None: :func:`default_norm_implementation`.
    """
    implementation = implementation or default_norm_implementation(dim)
    if implementation not in NORM_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}; expected one of {NORM_IMPLEMENTATIONS}"
        )
    if implementation == "pallas" and pallas_rms_norm.tile_width(dim) is None:
        raise ValueError(f"implementation='pallas' needs dim divisible by 16; dim = {dim}")
    norm = RMSNorm(dim, epsilon=RMS_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm.implementation = implementation
    return norm


def layer_norm(
    dim: int, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """``nn.LayerNorm(dim)`` over the last axis (= the official ``LayerNorm2d`` on NHWC).

    Biased variance, eps 1e-5, statistics in fp32, two-pass variance (not E[x^2] - E[x]^2).
    """
    return nnx.LayerNorm(
        dim,
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


# ----------------------------------------------------------------------------- stem
def torch_conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    stride: int,
    padding: int,
    *,
    dtype: Dtype | None,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """``nn.Conv2d(in, out, k, stride, padding, bias=True)`` with PyTorch's default init, NHWC."""
    kernel_init, bias_init = torch_default_conv_init(in_features * kernel_size * kernel_size)
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution (PyTorch/XLA formula); < 1 means the input is too small."""
    return (size + 2 * padding - kernel) // stride + 1


def stem_geometry(patch_size: int, hierarchical: bool) -> tuple[tuple[int, int, int], ...]:
    """(kernel, stride, padding) of the two stem convolutions for ``patch_size``.

    Both official stems use stride = patch_size // 2, kernel = stride + 1, padding 1 for the
    first conv; the second is k3 s2 p1 in ViG (``V2PatchEmbed``) and repeats the first
    geometry in ViG-H (``_make_patch_embed_v2``; the same thing for patch_size 4).
    """
    if patch_size < 2:
        raise ValueError(f"patch_size={patch_size}; expected an integer >= 2")
    stride = patch_size // 2
    first = (stride + 1, stride, 1)
    return (first, first if hierarchical else (3, 2, 1))


def stem_output_size(size: int, patch_size: int, hierarchical: bool) -> int:
    """Token-grid length after the stem for an input of ``size`` pixels (< 1: too small)."""
    for kernel, stride, padding in stem_geometry(patch_size, hierarchical):
        size = conv_out_size(size, kernel, stride, padding)
        if size < 1:
            return size
    return size


def _patches(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, kernel * kernel * C]: each output position's input window
    (zero padded), ordered (row, column, channel) as an HWIO kernel reshaped to [k k C, O].
    Windows that tile the image (stride = kernel, no padding) are one reshape and transpose."""
    b, height, width, c = x.shape
    oh = conv_out_size(height, kernel, stride, padding)
    ow = conv_out_size(width, kernel, stride, padding)
    if stride == kernel and padding == 0:
        x = x[:, : oh * kernel, : ow * kernel].reshape(b, oh, kernel, ow, kernel, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, oh, ow, kernel * kernel * c)
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    windows = [
        x[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride]
        for i in range(kernel)
        for j in range(kernel)
    ]
    return jnp.concatenate(windows, axis=-1)


def _patch_product(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    k, _, c_in, c_out = kernel.shape
    return jnp.dot(_patches(x, k, stride, padding), kernel.reshape(k * k * c_in, c_out))


# PatchEmbed's first convolution as :func:`conv_as_product` (True) or ``nnx.Conv`` (cuDNN on a
# GPU): the same values; a switch so that benchmarks/ab_step.py can time both.
STEM_AS_PRODUCT = True


def conv_as_product(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """``conv(x)`` for a dense, undilated ``nnx.Conv`` with symmetric or ``"VALID"`` padding,
    computed as one matrix product of the input windows ([B, h, w, k k C] @ [k k C, O]); the
    windows are rebuilt in the backward pass (rematerialised), not kept.

    For the stem's first convolution (3 input channels). In the H100 profile of ViG-T's training
    step at ea769b4 (224 px, batch 128, bf16; ``benchmarks/profile_step.py``) cuDNN's stem
    kernels were a generic ``convolve_common_engine_float_NHWC``, an ``nhwcAddPadding`` pass and
    a cutlass weight-gradient kernel, 0.42 ms together (DeiT-T's 3-channel patch conv shows the
    same generic kernel), where the windows of this one ([128, 28, 28, 243] bf16) take ~0.05 ms
    of bandwidth. The product form is not yet timed on a GPU. DeiT's patch embedding (16 x 16,
    stride 16, "VALID") can run through it too (``vig_jax.deit.PATCH_EMBED_AS_PRODUCT``).
    """
    (padding, _), _ = ((0, 0), None) if conv.padding == "VALID" else conv.padding
    kernel = conv.kernel[...]
    dtype = conv.dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jax.checkpoint(_patch_product, static_argnums=(2, 3))(x, kernel, conv.strides[0], padding)
    if conv.bias is not None:
        y = y + conv.bias[...].astype(dtype)
    return y


class PatchEmbed(nnx.Module):
    """The v2 patch embedding: conv -> LayerNorm -> act -> conv -> LayerNorm.

    ViG (``V2PatchEmbed``, act SiLU): conv(3 -> d/2, k=p/2+1, s=p/2, p=1) ... conv(d/2 -> d,
    k3, s2, p1); 224 px -> 14x14 tokens at patch 16. ViG-H (``_make_patch_embed_v2``, act exact
    GELU): both convs k=p/2+1, s=p/2, p=1; 224 px -> 56x56 at patch 4.

    Attributes follow the official ``nn.Sequential`` in order: conv1 (``proj.0`` / ``0``), norm1
    (``proj.1`` / ``2``), conv2 (``proj.3`` / ``5``), norm2 (``proj.4`` / ``7``).
    """

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        *,
        hierarchical: bool,
        in_chans: int = 3,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        (k1, s1, p1), (k2, s2, p2) = stem_geometry(patch_size, hierarchical)
        half = embed_dim // 2
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hierarchical = hierarchical
        self.conv1 = torch_conv(in_chans, half, k1, s1, p1, **kw)
        self.norm1 = layer_norm(half, **kw)
        self.conv2 = torch_conv(half, embed_dim, k2, s2, p2, **kw)
        self.norm2 = layer_norm(embed_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, 3] images -> [B, h, w, embed_dim] tokens."""
        y = conv_as_product(self.conv1, x) if STEM_AS_PRODUCT else self.conv1(x)
        y = self.norm1(y)
        y = jax.nn.gelu(y, approximate=False) if self.hierarchical else jax.nn.silu(y)
        return self.norm2(self.conv2(y))


# ----------------------------------------------------------------------------- MLPs
def vig_mlp_hidden(dim: int) -> int:
    """``GLAMLP`` intermediate size: 256 * ceil(int(8 d / 3) / 256) (512/1024/2048 for T/S/B)."""
    return 256 * math.ceil(int(dim * 4 * 2 / 3) / 256)


def vig_h_mlp_hidden(dim: int) -> int:
    """``gMlp`` intermediate size: 32 * ceil(int(8 C / 3) / 32)."""
    return 32 * math.ceil(int(dim * 4 * 2 / 3) / 32)


def _swiglu_down(h: jax.Array, w_out: nnx.Linear) -> jax.Array:
    """``w_out(swiglu(h))``; called rematerialised, so that only ``h`` is kept for the backward.

    The down projection's weight gradient needs ``swiglu(h)`` [..., F]; recomputing it from ``h``
    (one elementwise pass) saves keeping it from the forward pass (a third of the MLP's
    activations).
    """
    return w_out(fused.swiglu(h))


# Images of at most this many tokens keep ``swiglu(h)`` from the forward pass for the down
# projection's weight gradient; longer ones recompute it in the backward pass (0: always). The
# compile of ViG-T's training step for an H100 (224 px, batch 128, bf16;
# ``benchmarks/static_step.py``, no GPU) shows what keeping it saves: the recomputation, one
# elementwise pass per block reading h and writing swiglu(h) (12 passes, 0.93 GB); it costs
# their size in memory (25 MB per block there). Off until timed on a GPU.
SWIGLU_KEEP_MAX_TOKENS = 0


# The MLP's products with the SwiGLU inside them (pallas_kernels.swiglu: one kernel for the first
# product and the SwiGLU, one for the second product's input gradient and the SwiGLU's) on a GPU
# in bf16 / fp16; swiglu(h) kept or recomputed as SWIGLU_KEEP_MAX_TOKENS says. Tested in
# interpret mode and for the CUDA lowering, not yet run on a GPU; off until timed there.
# Compiled for an H100 on the CPU (benchmarks/static_step.py, ViG-T, bf16) its step's memory
# plan is the same as XLA's form at 224 px / batch 128 (not kept) but 333 MiB larger at 1024 px
# / batch 8 (kept or not; cause not found), where the memory bar's margin was 445 MiB.
PALLAS_SWIGLU_BY_DEFAULT = False


def default_swiglu_implementation(w_in: nnx.Linear, w_out: nnx.Linear) -> str:
    """``"pallas"`` where ``PALLAS_SWIGLU_BY_DEFAULT`` is set, on a GPU, for bias-free
    projections computing in bf16 / fp16 with sizes :func:`pallas_kernels.swiglu.supports`;
    else ``"xla"``."""
    usable = (
        jax.default_backend() == "gpu"
        and w_in.dtype in pallas_swiglu.LOW_PRECISION
        and w_out.dtype == w_in.dtype
        and w_in.bias is None
        and w_out.bias is None
        and pallas_swiglu.supports(w_in.in_features, w_out.in_features, w_out.out_features)
    )
    return "pallas" if PALLAS_SWIGLU_BY_DEFAULT and usable else "xla"


def _swiglu(x: jax.Array, w_in: nnx.Linear, w_out: nnx.Linear) -> jax.Array:
    """``w_out(silu(gate) * value)`` with ``gate, value = w_in(x).chunk(2)`` (gate first).

    ``x`` [B, ..., dim]: the axes between the first and the last are an image's tokens, whose
    count picks between keeping and recomputing ``swiglu(h)`` (``SWIGLU_KEEP_MAX_TOKENS``)."""
    keep = math.prod(x.shape[1:-1]) <= SWIGLU_KEEP_MAX_TOKENS
    if default_swiglu_implementation(w_in, w_out) == "pallas":
        dtype = w_in.dtype
        kernels = (w.kernel[...].astype(dtype) for w in (w_in, w_out))
        return pallas_swiglu.swiglu_mlp(x.astype(dtype), *kernels, keep_output=keep)
    down = _swiglu_down if keep else nnx.remat(_swiglu_down)
    return down(w_in(x), w_out)


class SwiGLU(nnx.Module):
    """ViG's ``GLAMLP``: ``down_proj(silu(gate) * value)``, ``[gate | value] = gate_proj(x)``.

    Both projections have no bias; ``kernel_init`` defaults to the official N(0, 0.02).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        kernel_init: Initializer | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel_init = normal_init() if kernel_init is None else kernel_init
        kw = dict(use_bias=False, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = nnx.Linear(dim, 2 * hidden, **kw, rngs=rngs)
        self.down_proj = nnx.Linear(hidden, dim, **kw, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim]."""
        return _swiglu(x, self.gate_proj, self.down_proj)


class GatedMlp(nnx.Module):
    """ViG-H's ``gMlp``: ``fc2(silu(gate) * value)``, ``[gate | value] = fc1(x)``; no biases.

    ``kernel_init`` defaults to the official init (after ``HierViG._init_weights``): timm
    trunc_normal(0.02).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        kernel_init: Initializer | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel_init = trunc_normal_timm() if kernel_init is None else kernel_init
        kw = dict(use_bias=False, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = nnx.Linear(dim, 2 * hidden, **kw, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, **kw, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim]."""
        return _swiglu(x, self.fc1, self.fc2)


# ----------------------------------------------------------------------------- drop path
class DropPath(nnx.Dropout):
    """Stochastic depth per sample (timm's ``DropPath``): ``x * mask_b / keep``.

    One Bernoulli(keep = 1 - rate) draw per batch element, shared by all its other axes. An
    ``nnx.Dropout`` underneath: deterministic after ``model.eval()``, stochastic after
    ``model.train()`` (the NNX default at construction), keys from the ``"dropout"`` stream of the
    ``rngs`` given at construction (or at call time). Every call draws a new mask, so one module
    applied to both residual branches of a block behaves like the official shared module.
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate={rate}; expected 0 <= rate < 1")
        super().__init__(rate, rngs=rngs if rate > 0 else None)

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """[B, ...] -> [B, ...]: each sample kept (scaled by 1/keep) or zeroed."""
        if self.rate == 0.0:
            return x
        ones = jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
        return x * super().__call__(ones, deterministic=deterministic, rngs=rngs)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """``torch.linspace(0, rate, depth)`` in fp32, as Python floats (the official rule)."""
    return [float(r) for r in np.linspace(0.0, rate, depth, dtype=np.float32)]


# ----------------------------------------------------------------------------- pos embed
TORCH_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (PIL and jax.image use -0.5)


def _cubic_weights(t: np.ndarray, a: float = TORCH_CUBIC_A) -> np.ndarray:
    """Keys cubic weights of the 4 taps at offsets -1, 0, 1, 2 for fractions t: [n] -> [n, 4]."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 matrix M with ``out = M @ in`` along one axis, equal to torch's
    ``F.interpolate(mode="bicubic", align_corners=False)`` (no antialias).

    Source coordinate ``(i + 0.5) * n_in / n_out - 0.5`` (not clamped for cubic), taps at
    ``floor(src) - 1 .. floor(src) + 2`` clamped to the edge, weights of the Keys cubic with
    a = -0.75.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1; got n_in={n_in}, n_out={n_out}")
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - base)  # [n_out, 4]
    taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    mat = np.zeros((n_out, n_in))
    np.add.at(mat, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
    return mat


def resize_pos_embed(
    pos_embed: jax.Array, src_hw: tuple[int, int], dst_hw: tuple[int, int]
) -> jax.Array:
    """The official ``resize_pos_embed``: torch bicubic resize of a [1, h*w, C] grid in fp32.

    Args:
      pos_embed: [1, h*w, C] (row-major grid of ``src_hw``).
      src_hw: (h, w) of the stored grid.
      dst_hw: (H, W) wanted.

    Returns:
      [1, H*W, C] in pos_embed's dtype; ``pos_embed`` itself when the sizes agree.
    """
    if tuple(src_hw) == tuple(dst_hw):
        return pos_embed
    _, length, channels = pos_embed.shape
    if length != src_hw[0] * src_hw[1]:
        raise ValueError(
            f"pos_embed has {length} tokens; expected src_hw {src_hw} -> {src_hw[0] * src_hw[1]}"
        )
    dtype = jnp.promote_types(pos_embed.dtype, jnp.float32)  # fp32 as official (fp64 if given)
    grid = pos_embed.reshape(src_hw[0], src_hw[1], channels).astype(dtype)
    rows = jnp.asarray(torch_bicubic_matrix(src_hw[0], dst_hw[0]), dtype)
    cols = jnp.asarray(torch_bicubic_matrix(src_hw[1], dst_hw[1]), dtype)
    hi = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("Hh,hwc->Hwc", rows, grid, precision=hi)
    grid = jnp.einsum("Ww,Hwc->HWc", cols, grid, precision=hi)
    return grid.reshape(1, dst_hw[0] * dst_hw[1], channels).astype(pos_embed.dtype)


# ----------------------------------------------------------------------------- input checks
def check_images(x: jax.Array, *, min_size: int, model: str) -> None:
    """Raises ValueError unless ``x`` is a float NHWC batch [B, H, W, 3] with H, W >= min_size."""
    shape = tuple(getattr(x, "shape", ()))
    expected = f"{model} expects float NHWC images [B, H, W, 3] with H, W >= {min_size}"
    if len(shape) != 4:
        raise ValueError(f"{expected}; got an array of shape {shape} ({len(shape)} dims)")
    if shape[-1] != 3:
        hint = " (channels-first? transpose to NHWC)" if shape[1] == 3 else ""
        raise ValueError(f"{expected}; got {shape[-1]} channels in shape {shape}{hint}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{expected}; got dtype {x.dtype} (convert and normalise the images)")
    if shape[1] < min_size or shape[2] < min_size:
        raise ValueError(f"{expected}; got {shape[1]}x{shape[2]} pixels in shape {shape}")
