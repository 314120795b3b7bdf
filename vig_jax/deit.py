"""DeiT (Touvron et al., ICML 2021, "Training data-efficient image transformers") in Flax NNX.

The baseline every ViG comparison in this project uses: a plain ViT with a class token,
learned absolute position embedding, 12 pre-norm blocks (LayerNorm -> multi-head attention ->
residual, LayerNorm -> GELU MLP -> residual) and a linear head on the class token, as in timm's
``deit_tiny_patch16_224`` / ``deit_small_patch16_224`` (5.72M / 22.05M parameters at 224).

Attention is :func:`jax.nn.dot_product_attention`. On a GPU with bf16/fp16 compute it uses
cuDNN's fused (flash) attention; cuDNN refuses some sequence lengths (197 = 196 patches + class
token, vig-reference.md section 14), so the sequence is padded to a multiple of
``pad_multiple`` and the padded keys are masked through ``key_value_seq_lengths``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vig_jax.layers import DropPath, conv_as_product, drop_path_rates
from vig_jax.registry import register_model

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class DeiTConfig:
    """Hyper-parameters of one DeiT variant."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    drop_path_rate: float = 0.1  # DeiT recipe (timm deit_*: --drop-path 0.1)


VARIANTS: dict[str, DeiTConfig] = {
    # timm deit_tiny_patch16_224: 72.2 top-1 on ImageNet-1k (DeiT paper, Table 1).
    "deit_t": DeiTConfig(embed_dim=192, depth=12, num_heads=3),
    # timm deit_small_patch16_224: 79.8 top-1.
    "deit_s": DeiTConfig(embed_dim=384, depth=12, num_heads=6),
    # A tiny variant for tests only.
    "deit_mu": DeiTConfig(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0),
}

_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def default_attention_implementation(dtype) -> str:
    """cuDNN flash attention on a GPU for 16-bit compute, XLA's attention otherwise."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "xla"


def padded_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str, pad_multiple: int
) -> jax.Array:
    """Attention with the sequence zero-padded to a multiple of ``pad_multiple``.

    The padded keys are masked through ``key_value_seq_lengths`` and the padded query rows
    are cut off, so the result equals unpadded attention.

    Args:
      q, k, v: [B, N, H, Dh].
      implementation: passed to :func:`jax.nn.dot_product_attention`.
      pad_multiple: the padded length is the next multiple of this.

    Returns:
      [B, N, H, Dh].
    """
    b, n = q.shape[:2]
    n_pad = -(-n // pad_multiple) * pad_multiple
    if n_pad == n:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, n_pad - n), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    lengths = jnp.full((b,), n, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :n]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str,
    pad_multiple: int = 64,
) -> jax.Array:
    """Softmax attention over the whole sequence (no mask).

    Args:
      q, k, v: [B, N, H, Dh].
      implementation: "xla", or "cudnn" (fused flash attention; the sequence is padded to a
        multiple of ``pad_multiple`` because cuDNN refuses some lengths such as 197).
      pad_multiple: see above.

    Returns:
      [B, N, H, Dh].
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return padded_attention(q, k, v, implementation="cudnn", pad_multiple=pad_multiple)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (timm ``Attention``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        implementation: str,
        pad_multiple: int,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.implementation = implementation
        self.pad_multiple = pad_multiple
        linear = dict(kernel_init=_trunc_normal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, **linear)
        self.proj = nnx.Linear(dim, dim, **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        o = attention(q, k, v, implementation=self.implementation, pad_multiple=self.pad_multiple)
        return self.proj(o.reshape(b, n, d))


class Mlp(nnx.Module):
    """Linear -> GELU (exact, as torch.nn.GELU) -> Linear."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = dict(kernel_init=_trunc_normal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden, **linear)
        self.fc2 = nnx.Linear(hidden, dim, **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, N, D] -> [B, N, D]."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def _layer_norm(dim: int, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Normalisation statistics in float32 whatever the compute dtype (as torch autocast does).
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


# The patch embedding (a p x p, stride p convolution on 3 channels) as nnx.Conv (cuDNN on a GPU;
# the default, the baseline every resolution-study row so far measured) or as one matrix product
# of the flattened patches (vig_jax.layers.conv_as_product, as ViG's stem): the same values;
# benchmarks/ab_step.py times both.
PATCH_EMBED_AS_PRODUCT = False


class Block(nnx.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        *,
        implementation: str,
        pad_multiple: int,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.norm1 = _layer_norm(dim, param_dtype, rngs)
        self.attn = Attention(
            dim,
            num_heads,
            implementation=implementation,
            pad_multiple=pad_multiple,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = _layer_norm(dim, param_dtype, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, N, D] -> [B, N, D]."""
        x = x + self.drop_path1(self.attn(self.norm1(x).astype(self.dtype)))
        x = x + self.drop_path2(self.mlp(self.norm2(x).astype(self.dtype)))
        return x


class DeiT(nnx.Module):
    """DeiT / ViT with a class token; ``model(x)`` maps NHWC images to logits.

    Args:
      config: the variant's hyper-parameters.
      num_classes: size of the classification head.
      img_size: input height = width; inputs must have this size.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); logits are returned in float32.
      param_dtype: parameter dtype (float32 for mixed precision).
      implementation: attention implementation, "xla" or "cudnn"; None picks cuDNN on a GPU
        with 16-bit compute. Other values (BiGLA implementation names such as "triton", which
        a shared config may carry) are ignored, i.e. mean None.
      pad_multiple: sequence padding for cuDNN attention.
      rngs: ``nnx.Rngs`` with "params" and (for drop path) "dropout" streams.
    """

    def __init__(
        self,
        config: DeiTConfig,
        *,
        num_classes: int = 1000,
        img_size: int = 224,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        implementation: Literal["xla", "cudnn"] | None = None,
        pad_multiple: int = 64,
        rngs: nnx.Rngs,
    ):
        p = config.patch_size
        if img_size % p:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={p}")
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            implementation = default_attention_implementation(dtype)
        d = config.embed_dim
        self.config = config
        self.img_size = img_size
        self.dtype = dtype
        self.num_classes = num_classes
        self.patch_embed = nnx.Conv(
            3,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=_torch_conv_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        num_patches = (img_size // p) ** 2
        key = rngs.params()
        self.cls_token = nnx.Param(_trunc_normal(key, (1, 1, d), param_dtype))
        key = rngs.params()
        self.pos_embed = nnx.Param(_trunc_normal(key, (1, num_patches + 1, d), param_dtype))
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nnx.List(
            [
                Block(
                    d,
                    config.num_heads,
                    config.mlp_ratio,
                    rate,
                    implementation=implementation,
                    pad_multiple=pad_multiple,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for rate in rates
            ]
        )
        self.norm = _layer_norm(d, param_dtype, rngs)
        self.head = (
            nnx.Linear(
                d,
                num_classes,
                kernel_init=_trunc_normal,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if num_classes > 0
            else nnx.data(None)
        )

    def forward_features(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, 3] images -> [B, 1 + N, D] normalised tokens (class token first)."""
        if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(
                f"input has shape {x.shape}; expected [B, {self.img_size}, {self.img_size}, 3]"
            )
        x = x.astype(self.dtype)
        x = conv_as_product(self.patch_embed, x) if PATCH_EMBED_AS_PRODUCT else self.patch_embed(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, 3] images -> [B, num_classes] float32 logits ([B, D] class-token
        features when num_classes is 0)."""
        cls = self.forward_features(x)[:, 0]
        if self.head is None:
            return cls.astype(jnp.float32)
        return self.head(cls.astype(self.dtype)).astype(jnp.float32)


def create_deit(
    variant: str,
    *,
    num_classes: int = 1000,
    img_size: int = 224,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    implementation: str | None = None,
    drop_path_rate: float | None = None,
    patch_size: int | None = None,
    pad_multiple: int = 64,
    rngs: nnx.Rngs | None = None,
) -> DeiT:
    """Builds a DeiT variant ("deit_t", "deit_s", "deit_mu") with optional overrides.

    Args:
      variant: key of :data:`VARIANTS`.
      num_classes, img_size, dtype, param_dtype, implementation: see :class:`DeiT`.
      drop_path_rate: overrides the variant's stochastic-depth rate when not None.
      patch_size: overrides the patch size (16) when not None, e.g. 4 for 32-px CIFAR.
      pad_multiple: sequence padding for cuDNN attention.
      rngs: defaults to ``nnx.Rngs(0)``.

    Returns:
      The model, in train mode (drop path active).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; expected one of {sorted(VARIANTS)}")
    config = VARIANTS[variant]
    overrides = {}
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = float(drop_path_rate)
    if patch_size is not None:
        overrides["patch_size"] = int(patch_size)
    config = dataclasses.replace(config, **overrides)
    return DeiT(
        config,
        num_classes=num_classes,
        img_size=img_size,
        dtype=dtype,
        param_dtype=param_dtype,
        implementation=implementation,
        pad_multiple=pad_multiple,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
    )


def num_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param``) in ``model``."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _factory(variant: str):
    def factory(**kwargs) -> DeiT:
        return create_deit(variant, **kwargs)

    factory.__name__ = variant
    factory.__doc__ = f"``{variant}`` through the registry (see :func:`create_deit`)."
    return factory


for _name in ("deit_t", "deit_s"):
    register_model(_name)(_factory(_name))
