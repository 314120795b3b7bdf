"""The BiGLA token mixer of ViG and ViG-H (official ``GatedLinearAttention`` / ``GLA2D``).

On a token grid u [B, h, w, d] (vig-reference.md section 2.4)::

    c      = act(DWConv3x3(u))                      no bias; act = SiLU for ViG-T, else identity
    q,k,v  = split(c W_qkv, [d/2, d/2, d])          q, k shared by both directions
    a_f,a_b = split(gk_proj_1(gk_proj_0(c)))        low rank d -> 16 -> d (+ bias)
    o      = bigla(q, k, v, logsigmoid(a_f)/16, logsigmoid(a_b)/16)     per head, Dk = d/2H
    G      = sigmoid(g_proj(c))
    y      = G * RMSNorm_g(o) + (1 - G) * RMSNorm_l(c)                    per head over Dv = d/H
    out    = o_proj(act_out(y))                     act_out = SiLU for ViG-T, else identity

The op itself is :func:`pallas_kernels.bigla_packed` (:func:`pallas_kernels.bigla` on the fused
``q | k | v`` product, which its Triton kernels read in place); the module only builds its
inputs. Raster order (row-major over (h, w)) is the forward scan direction.

Mixed precision: the projections run in ``dtype``; the gate path runs in at least fp32 from the
first low-rank product's sums on (that product takes ``c`` in ``dtype``); the gated output (both
RMSNorms, the sigmoid gate, SiLU) is one fp32 expression with a hand-written gradient,
:func:`vig_jax.fused.gated_norm_output` (or the Pallas kernels of ``output_implementation``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import bigla_packed
from pallas_kernels import gates as pallas_gates
from pallas_kernels.gated_norm import gated_norm as pallas_gated_norm
from vig_jax import fused
from vig_jax.dwconv import check_implementation as check_conv_implementation
from vig_jax.dwconv import default_implementation as default_conv_implementation
from vig_jax.dwconv import depthwise_conv3x3
from vig_jax.layers import (
    Dtype,
    rms_norm,
    trunc_normal_timm,
    xavier_uniform_torch,
)

# How the gated output runs: "xla" (vig_jax.fused) or "pallas" (pallas_kernels.gated_norm: one
# forward and one backward kernel; the default on a GPU).
OUTPUT_IMPLEMENTATIONS = ("xla", "pallas")
# How the forget gates are made from the low-rank product: "xla" (two products and the
# log-sigmoid, rematerialised in the backward) or "pallas" (pallas_kernels.gates: one forward and
# one backward kernel).
GATE_IMPLEMENTATIONS = ("xla", "pallas")
GATE_LOW_RANK = 16  # gate_low_rank_dim
GATE_NORMALIZER = 16.0  # gate_logit_normalizer


def default_output_implementation(head_width: int = 64, backend: str | None = None) -> str:
    """``"pallas"`` on a GPU where the head width is a power of two (the kernels' tile), else
    ``"xla"``."""
    gpu = (backend or jax.default_backend()) == "gpu"
    return "pallas" if gpu and head_width & (head_width - 1) == 0 else "xla"


# The Pallas gate kernels are tested (float64 in interpret mode, fp32 against float64, the CUDA
# lowering) but were not yet run or timed on a GPU (this session's device time ran out):
# "xla" stays the GPU default until an H100 run shows them correct and faster.
PALLAS_GATES_BY_DEFAULT = False


def default_gate_implementation(key_dim: int = 96, backend: str | None = None) -> str:
    """``"pallas"`` on a GPU where :func:`pallas_kernels.gates.supports` the gate width and
    ``PALLAS_GATES_BY_DEFAULT`` is set, else ``"xla"``."""
    gpu = (backend or jax.default_backend()) == "gpu"
    usable = gpu and pallas_gates.supports(GATE_LOW_RANK, key_dim)
    return "pallas" if PALLAS_GATES_BY_DEFAULT and usable else "xla"


def _conv_act(conv: nnx.Conv, u: jax.Array, act: bool, implementation: str) -> jax.Array:
    """``act(conv(u))`` [B, h, w, d]; called rematerialised, so that only ``u`` is kept for the
    backward pass (the conv's output before the SiLU is recomputed there, one depthwise conv).

    ``implementation`` is :func:`vig_jax.dwconv.depthwise_conv3x3`'s ("cudnn" runs the
    convolution ``conv`` itself would); the parameters and dtype are ``conv``'s either way."""
    kernel = conv.kernel[...]
    return depthwise_conv3x3(u, kernel, implementation=implementation, dtype=conv.dtype, act=act)


def _log_gates(gk_proj: nnx.List, c: jax.Array, implementation: str) -> tuple[jax.Array, jax.Array]:
    """``logsigmoid(gk_proj[1](gk_proj[0](c))) / 16`` as (forward, backward) gates, each
    [B, N, d/2] in the gate dtype (>= fp32): the two halves of ``gk_proj[1]``'s output columns,
    computed as two products so that neither the gates nor their gradients are split or joined.

    ``gk_proj[0]`` multiplies ``c`` and its kernel in the compute dtype with fp32 sums and an fp32
    result (no fp32 copy of ``c``; under the official bf16 autocast both products and the
    logsigmoid run in bf16); ``gk_proj[1]`` and the logsigmoid run in the gate dtype.

    For the backward pass only the low-rank product [B, N, 16] is kept: the second product and
    the logsigmoid are rematerialised from it (a 16-deep product), because a residual of the
    gates themselves would be a second copy of what BiGLA keeps (custom-vjp residuals are
    separate outputs of a scanned block), and the fp32 logits are as large. ``implementation``
    "pallas" does the same in two kernels (:func:`pallas_kernels.gates.log_gates`).
    """
    low = gk_proj[0](c)
    up = gk_proj[1]
    dtype = up.dtype or jnp.result_type(low, up.kernel[...])
    kernel, bias = up.kernel[...].astype(dtype), up.bias[...].astype(dtype)
    if implementation == "pallas":
        return pallas_gates.log_gates(low, kernel, bias, normalizer=GATE_NORMALIZER)
    return jax.checkpoint(_gate_directions, static_argnums=(3,))(low, kernel, bias, up.precision)


def _gate_directions(low, kernel, bias, precision) -> tuple[jax.Array, jax.Array]:
    """``log_gate(low @ kernel + bias)`` for the two column halves (forward, backward)."""
    half = kernel.shape[-1] // 2

    def direction(cols: slice) -> jax.Array:
        logits = jnp.dot(low.astype(kernel.dtype), kernel[:, cols], precision=precision)
        return fused.log_gate(logits + bias[cols], GATE_NORMALIZER)

    return direction(slice(0, half)), direction(slice(half, None))


def _pallas_gated_output(o, c, gate_logits, weight_o, weight_c, eps, out_act):
    """:func:`vig_jax.fused.gated_norm_output`'s signature on the Pallas kernels."""
    return pallas_gated_norm(o, c, gate_logits, weight_o, weight_c, eps=eps, act=out_act)


class BiGLA(nnx.Module):
    """Bidirectional gated linear attention with 2-D gated locality injection.

    Parameters (PyTorch shapes in brackets, ours are transposed to ``[in, out]`` / HWIO):
    ``in_proj`` depthwise 3x3 conv [d, 1, 3, 3] -> kernel [3, 3, 1, d], no bias; ``qkv_proj``
    [2d, d] (fused q | k | v, no bias); ``gk_proj[0]`` [16, d] (no bias) and ``gk_proj[1]``
    [d, 16] + bias (first half forward gates, second half backward); ``g_proj`` [d, d] + bias;
    ``o_proj`` [d, d] (no bias); ``g_norm``, ``l_norm`` RMSNorm weight [Dv] shared by all heads.

    ``output_implementation`` picks how the gated output runs: ``"xla"``
    (:func:`vig_jax.fused.gated_norm_output`) or ``"pallas"`` (:mod:`pallas_kernels.gated_norm`;
    needs a power-of-two ``dim / num_heads``); None: :func:`default_output_implementation`
    ("pallas" on a GPU). Same parameters and values either way.

    ``gate_implementation`` picks how the forget gates are made from the low-rank product:
    ``"xla"`` or ``"pallas"`` (:mod:`pallas_kernels.gates`; needs ``dim / 2`` divisible by 16);
    None: :func:`default_gate_implementation` ("xla" until the kernels are timed on a GPU). Same
    parameters and values.

    ``conv_implementation`` picks how the depthwise conv runs (:mod:`vig_jax.dwconv`):
    ``"pallas"`` (Triton kernels with the SiLU fused; the default on a GPU), ``"shifted"``
    (nine shifted products, an XLA fusion of fixed cost; the default elsewhere) or ``"cudnn"``
    (``lax.conv`` as ``nnx.Conv`` runs it: fast when cuDNN's per-compilation pick is good;
    one H200 compile of the ViG-T training step picked a kernel that took 9.4 of its 25 ms).
    Same parameters either way. On the H100 the two Pallas defaults took the ViG-T training
    step (224 px, batch 128, bf16) from 16.94 to 14.69 ms of kernels, together with
    :func:`pallas_kernels.bigla_packed` and the compute-dtype gate product
    (``benchmarks/results/profile_step_h100.json``).

    Init (``linear_init``):
      * ``"xavier"`` (plain ViG, ``reset_parameters``): xavier_uniform(gain 2^-2.5) with the
        PyTorch fans on qkv_proj (fused [2d, d]), the conv (fan_in 9, fan_out 9d), g_proj,
        o_proj, gk_proj[0], gk_proj[1]; biases 0.
      * ``"trunc_normal"`` (ViG-H, whose ``_init_weights`` runs after ``reset_parameters``):
        timm trunc_normal(0.02) on every Linear, biases 0; the conv keeps its xavier init.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        conv_act: bool,
        out_act: bool,
        linear_init: Literal["xavier", "trunc_normal"] = "xavier",
        implementation: str | None = None,
        conv_implementation: str | None = None,
        output_implementation: str | None = None,
        gate_implementation: str | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % (2 * num_heads):
            raise ValueError(
                f"dim={dim} must be divisible by 2 * num_heads={2 * num_heads} "
                "(key_dim = dim/2 and value_dim = dim are split over the heads)"
            )
        head_v = dim // num_heads
        conv_implementation = conv_implementation or default_conv_implementation()
        output_implementation = output_implementation or default_output_implementation(head_v)
        gate_implementation = gate_implementation or default_gate_implementation(dim // 2)
        check_conv_implementation(conv_implementation, "conv_implementation")
        if gate_implementation not in GATE_IMPLEMENTATIONS:
            raise ValueError(
                f"gate_implementation={gate_implementation!r}; "
                f"expected one of {GATE_IMPLEMENTATIONS}"
            )
        if gate_implementation == "pallas" and not pallas_gates.supports(GATE_LOW_RANK, dim // 2):
            raise ValueError(
                f"gate_implementation='pallas' needs a gate width dim / 2 divisible by 16; "
                f"dim = {dim}"
            )
        if output_implementation not in OUTPUT_IMPLEMENTATIONS:
            raise ValueError(
                f"output_implementation={output_implementation!r}; "
                f"expected one of {OUTPUT_IMPLEMENTATIONS}"
            )
        if output_implementation == "pallas" and head_v & (head_v - 1):
            raise ValueError(
                f"output_implementation='pallas' needs a power-of-two head width; "
                f"dim / num_heads = {head_v}"
            )
        if linear_init not in ("xavier", "trunc_normal"):
            raise ValueError(f"linear_init={linear_init!r}; expected 'xavier' or 'trunc_normal'")
        self.dim = dim
        self.num_heads = num_heads
        self.key_dim = dim // 2
        self.conv_act = conv_act
        self.out_act = out_act
        self.implementation = implementation
        self.conv_implementation = conv_implementation
        self.output_implementation = output_implementation
        self.gate_implementation = gate_implementation
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        gate_dtype = jnp.promote_types(param_dtype if dtype is None else dtype, jnp.float32)
        gate_kw = dict(dtype=gate_dtype, param_dtype=param_dtype, rngs=rngs)

        def init(fan_in: int, fan_out: int):
            if linear_init == "xavier":
                return xavier_uniform_torch(fan_in, fan_out)
            return trunc_normal_timm()

        self.in_proj = nnx.Conv(
            dim,
            dim,
            kernel_size=(3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=dim,
            use_bias=False,
            kernel_init=xavier_uniform_torch(9, 9 * dim),
            **kw,
        )
        self.qkv_proj = nnx.Linear(
            dim, 2 * dim, use_bias=False, kernel_init=init(dim, 2 * dim), **kw
        )
        self.gk_proj = nnx.List(
            [
                nnx.Linear(  # inputs in the compute dtype (as the official autocast), fp32 sums
                    dim,
                    GATE_LOW_RANK,
                    use_bias=False,
                    kernel_init=init(dim, GATE_LOW_RANK),
                    preferred_element_type=gate_dtype,
                    **kw,
                ),
                nnx.Linear(GATE_LOW_RANK, dim, kernel_init=init(GATE_LOW_RANK, dim), **gate_kw),
            ]
        )
        self.g_proj = nnx.Linear(dim, dim, kernel_init=init(dim, dim), **kw)
        self.o_proj = nnx.Linear(dim, dim, use_bias=False, kernel_init=init(dim, dim), **kw)
        self.g_norm = rms_norm(head_v, **kw)
        self.l_norm = rms_norm(head_v, **kw)

    def __call__(self, u: jax.Array) -> jax.Array:
        """Mixes a token grid.

        Args:
          u: [B, h, w, d] normalised tokens (row-major raster order is the forward direction).

        Returns:
          [B, h, w, d].
        """
        b, h, w, d = u.shape
        n, heads = h * w, self.num_heads
        conv_act = _conv_act
        if self.conv_implementation != "pallas":  # its own vjp keeps only u and the kernel
            conv_act = nnx.remat(_conv_act, static_argnums=(2, 3))
        c = conv_act(self.in_proj, u, self.conv_act, self.conv_implementation)
        c = c.reshape(b, n, d)
        gf, gb = _log_gates(self.gk_proj, c, self.gate_implementation)
        o = bigla_packed(  # q | k | v read in place
            self.qkv_proj(c), gf, gb, num_heads=heads, implementation=self.implementation
        )

        def per_head(x):  # [B, N, H*D] -> [B, N, H, D]
            return x.reshape(b, n, heads, -1)

        pallas = self.output_implementation == "pallas"
        gated_output = _pallas_gated_output if pallas else fused.gated_norm_output
        y = gated_output(
            o,
            per_head(c),
            per_head(self.g_proj(c)),
            self.g_norm.scale[...],
            self.l_norm.scale[...],
            self.g_norm.epsilon,
            self.out_act,
        )
        return self.o_proj(y.reshape(b, n, d)).reshape(b, h, w, d)
