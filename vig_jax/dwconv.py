"""The mixer's 3x3 depthwise convolution (stride 1, zero padding 1, no bias) without cuDNN.

ViG's ``in_proj`` is ``Conv2d(d, d, 3, padding=1, groups=d)``. Through ``lax.conv`` XLA hands
it to cuDNN, which picks an algorithm per compilation; inside ViG's training step that pick
is not stable: the ViG-T step (224 px, batch 128, bf16) spent 1.0-1.3 ms of its kernel time
in convolutions in every profile on the H100, but 10.2 of 25.0 ms in one compile on the H200,
9.4 ms of it in ``cudnn conv2d_grouped_direct_kernel``
(``benchmarks/results/profile_step_h200.json``). Written as nine shifted multiply-adds the
convolution is an elementwise XLA fusion whose cost does not depend on an autotuner:

* ``"pallas"`` (default on a GPU): :func:`pallas_kernels.dwconv.dwconv3x3`, Triton kernels
  with the SiLU fused and a backward that keeps only the input (or also the SiLU's slope, and
  applies it inside its kernel: ``pallas_kernels.dwconv.SAVE_SLOPE_MAX_TOKENS`` and
  ``FUSED_SLOPE_BY_DEFAULT``, off until timed);
* ``"shifted"`` (default elsewhere): the forward as nine shifted products (sums in >= fp32),
  gradients by autodiff (``dx`` the same nine products of ``dy``, ``dw`` nine reductions that
  XLA fuses);
* ``"cudnn"``: ``lax.conv_general_dilated`` with ``feature_group_count = C`` (what
  ``nnx.Conv`` runs).

Measured on one H200 (``python benchmarks/bench_dwconv.py``, bf16, forward + backward, CUPTI;
``benchmarks/results/dwconv_h200.json``): at [128, 14, 14, 192] (ViG-T, 224 px, batch 128)
shifted 0.146 ms, cuDNN 0.047 ms alone (three compilations agreed); at [8, 64, 64, 192] (1024
px, batch 8) 0.176 vs 0.053 ms; at [8, 128, 128, 192] 0.641 vs 0.166 ms. Alone cuDNN is 3-4x
faster and was stable, but inside the training step its pick is not (9.4 ms above); "shifted"
costs about 1.2 ms per ViG-T step at 224 px / 128 against a good pick. A hand-written backward
with a two-stage weight reduction measured slower than autodiff's (0.86 ms at 1024 px) and was
dropped (its rows are the ``staged`` ones in that JSON).

On the H100 (``benchmarks/results/dwconv_h100.json``, one compile, bf16 fwd+bwd) at
[128, 14, 14, 192]: shifted 0.166 ms, "pallas" 0.067, cuDNN 0.049; at [8, 64, 64, 192]: 0.208,
0.073, 0.056. In the ViG-T step (``benchmarks.profile_step``) "pallas" cut the kernel time from
16.94 to 15.63 ms, but that run's kernels stored a ragged last tile unmasked (wrong values at
196 tokens; fixed in 0d34fe6). The fixed kernels pass their tests on the H100, and with them
(and the Pallas gated output) the step took 14.69 ms of kernels and 17.39 ms wall, so "pallas"
is the GPU default (``benchmarks/results/profile_step_h100.json``).

``benchmarks/bench_dwconv.py`` times both. Shapes: ``x`` [B, H, W, C] (NHWC), kernel
[3, 3, 1, C] (HWIO, as ``nnx.Conv`` stores a depthwise kernel); the output is [B, H, W, C] in
``dtype`` (default: x's and the kernel's promoted dtype); products and sums are fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dwconv import dwconv3x3 as pallas_dwconv3x3

IMPLEMENTATIONS = ("shifted", "cudnn", "hybrid", "pallas")


def default_implementation(backend: str | None = None) -> str:
    """``"pallas"`` on a GPU (its Triton kernels), else ``"shifted"`` (elsewhere the Pallas
    kernels would run interpreted)."""
    return "pallas" if (backend or jax.default_backend()) == "gpu" else "shifted"


TAPS = tuple((a, b) for a in range(3) for b in range(3))


def check_implementation(value: str, name: str = "implementation") -> None:
    """Raises ValueError naming ``name`` unless ``value`` is one of ``IMPLEMENTATIONS``."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{name}={value!r}; expected one of {IMPLEMENTATIONS}")


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"x has shape {x.shape}; expected [B, H, W, C]")
    c = x.shape[-1]
    if kernel.shape != (3, 3, 1, c):
        raise ValueError(f"kernel has shape {kernel.shape}; expected (3, 3, 1, {c}) for C={c}")


def _shifted_sum(xp: jax.Array, taps: jax.Array, h: int, w: int) -> jax.Array:
    """``sum_{a,b} xp[:, a:a+h, b:b+w] * taps[a, b]`` in >= fp32.

    xp [B, h+2, w+2, C] (zero-padded input), taps [3, 3, C] -> [B, h, w, C]."""
    acc = jnp.promote_types(xp.dtype, jnp.float32)
    out = None
    for a, b in TAPS:
        term = xp[:, a : a + h, b : b + w, :].astype(acc) * taps[a, b].astype(acc)
        out = term if out is None else out + term
    return out


def _pad(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _forward(x: jax.Array, taps: jax.Array) -> jax.Array:
    h, w = x.shape[1:3]
    return _shifted_sum(_pad(x), taps, h, w).astype(x.dtype)


def _cudnn(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``lax.conv_general_dilated`` as ``nnx.Conv`` runs a depthwise conv (cuDNN on the GPU)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


@jax.custom_vjp
def _hybrid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The shifted forward and ``dx``; ``dw`` as the convolution's weight gradient (cuDNN)."""
    return _forward(x, kernel[:, :, 0, :])


def _hybrid_fwd(x, kernel):
    return _hybrid(x, kernel), (x, kernel)


def _hybrid_bwd(res, dy):
    x, kernel = res
    _, dx_of = jax.vjp(lambda a: _forward(a, kernel[:, :, 0, :]), x)
    _, dw_of = jax.vjp(lambda w: _cudnn(x, w), kernel)
    return dx_of(dy)[0], dw_of(dy)[0]


_hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


def depthwise_conv3x3(
    x: jax.Array,
    kernel: jax.Array,
    *,
    implementation: str | None = None,
    dtype: jnp.dtype | None = None,
    act: bool = False,
) -> jax.Array:
    """3x3 depthwise convolution, stride 1, zero padding 1, no bias, optionally then SiLU.

    Args:
      x: [B, H, W, C].
      kernel: [3, 3, 1, C] (HWIO depthwise layout).
      implementation: one of ``IMPLEMENTATIONS``; None: :func:`default_implementation`.
      dtype: computation dtype of the operands and the output (default: promoted).
      act: apply SiLU to the result ("pallas": inside its kernels).

    Returns:
      [B, H, W, C] in ``dtype``.
    """
    _check(x, kernel)
    implementation = implementation or default_implementation()
    check_implementation(implementation)
    dtype = jnp.promote_types(x.dtype, kernel.dtype) if dtype is None else dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if implementation == "pallas":
        return pallas_dwconv3x3(x, kernel[:, :, 0, :], act=act)
    if implementation == "cudnn":
        y = _cudnn(x, kernel)
    elif implementation == "hybrid":
        y = _hybrid(x, kernel)
    else:
        y = _forward(x, kernel[:, :, 0, :])
    return jax.nn.silu(y) if act else y
