"""Hierarchical ViG-H: ViG-H-T, ViG-H-S, ViG-H-B (four stages, for classification and dense heads).

The official ``HierViG`` of hustvl/ViG (``classification/models/vig_h.py``) as built by the
yaml configs (``norm_layer: ln2d``, ``patchembed v2``, ``downsample v3``, ``gmlp``;
vig-reference.md section 4). The official model is channel-first (``LayerNorm2d``, 1x1
``Linear2d`` convs); this one is channel-last (NHWC), which is the same math:

* stem: conv(3 -> C/2, k3 s2 p1) -> LN -> GELU (exact) -> conv(C/2 -> C, k3 s2 p1) -> LN
  (224 px -> 56x56);
* stage i (dim C*2^i): blocks ``x += dp(op(norm(x)))``, ``x += dp(mlp(norm2(x)))`` with LN
  eps 1e-5, the BiGLA mixer (no conv/out SiLU) and ``gMlp`` (SwiGLU); between stages
  conv(k3 s2 p1) -> LN;
* classifier: LN -> global average pool -> Linear.

Variants (Liao et al., AAAI 2025, arXiv 2405.18425; official ``configs/vig-h/vig-h-{t,s,b}.yaml``;
parameter counts measured from the official code):

=========  ===  ============  ==============  =========  ===========
name       C    depths        heads           drop path  params
=========  ===  ============  ==============  =========  ===========
vig_h_t    96   2, 2, 5, 2    3, 6, 12, 24    0.2        28,600,680
vig_h_s    96   2, 2, 17, 2   3, 6, 12, 24    0.3        50,051,688
vig_h_b    128  2, 2, 17, 2   4, 8, 16, 32    0.6        88,904,360
=========  ===  ============  ==============  =========  ===========
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vig_jax.bigla import BiGLA
from vig_jax.layers import (
    DropPath,
    Dtype,
    GatedMlp,
    PatchEmbed,
    check_images,
    drop_path_rates,
    layer_norm,
    torch_conv,
    trunc_normal_timm,
    vig_h_mlp_hidden,
)
from vig_jax.registry import register_variants

NUM_DOWNSAMPLES = 3  # between the four stages


@dataclasses.dataclass(frozen=True)
class ViGHConfig:
    """One ViG-H variant (values of the official yaml, see the module docstring)."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    drop_path_rate: float
    patch_size: int = 4

    @property
    def dims(self) -> tuple[int, ...]:
        """Channels of the four stages: C * 2^i."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


VIG_H_CONFIGS: dict[str, ViGHConfig] = {
    "vig_h_t": ViGHConfig(96, (2, 2, 5, 2), (3, 6, 12, 24), drop_path_rate=0.2),
    "vig_h_s": ViGHConfig(96, (2, 2, 17, 2), (3, 6, 12, 24), drop_path_rate=0.3),
    "vig_h_b": ViGHConfig(128, (2, 2, 17, 2), (4, 8, 16, 32), drop_path_rate=0.6),
}


class ViGHBlock(nnx.Module):
    """``VSSBlock``: ``x += dp(op(norm(x)))``; ``x += dp(mlp(norm2(x)))`` (one shared DropPath)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        drop_path: float,
        implementation: str | None,
        conv_implementation: str | None = None,
        output_implementation: str | None = None,
        gate_implementation: str | None = None,
        dtype: Dtype | None,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(dim, **kw)
        self.op = BiGLA(
            dim,
            num_heads,
            conv_act=False,
            out_act=False,
            linear_init="trunc_normal",
            implementation=implementation,
            conv_implementation=conv_implementation,
            output_implementation=output_implementation,
            gate_implementation=gate_implementation,
            **kw,
        )
        self.norm2 = layer_norm(dim, **kw)
        self.mlp = GatedMlp(dim, vig_h_mlp_hidden(dim), kernel_init=trunc_normal_timm(), **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, h, w, C] -> [B, h, w, C]."""
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nnx.Module):
    """``_make_downsample_v3``: conv(C -> C', k3, s2, p1, bias; PyTorch default init) -> LN."""

    def __init__(self, dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = torch_conv(dim, out_dim, 3, 2, 1, **kw)
        self.norm = layer_norm(out_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, h, w, C] -> [B, ceil(h/2), ceil(w/2), C']."""
        return self.norm(self.conv(x))


class ViGHStage(nnx.Module):
    """``layers[i]``: ``blocks`` then ``downsample`` (None for the last stage)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        drop_paths: list[float],
        out_dim: int | None,
        *,
        implementation: str | None,
        conv_implementation: str | None = None,
        output_implementation: str | None = None,
        gate_implementation: str | None = None,
        dtype: Dtype | None,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                ViGHBlock(
                    dim,
                    num_heads,
                    drop_path=r,
                    implementation=implementation,
                    conv_implementation=conv_implementation,
                    output_implementation=output_implementation,
                    gate_implementation=gate_implementation,
                    **kw,
                )
                for r in drop_paths
            ]
        )
        self.downsample = Downsample(dim, out_dim, **kw) if out_dim is not None else None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, h, w, C] -> (stage output [B, h, w, C], next stage input, downsampled)."""
        for block in self.blocks:
            x = block(x)
        return x, (x if self.downsample is None else self.downsample(x))


class Classifier(nnx.Module):
    """``classifier``: ``norm`` (LN over 8C) and ``head`` (Linear, None if num_classes == 0)."""

    def __init__(self, dim: int, num_classes: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(dim, **kw)
        self.head = (
            nnx.Linear(dim, num_classes, kernel_init=trunc_normal_timm(), **kw)
            if num_classes
            else None
        )


class ViGH(nnx.Module):
    """Hierarchical ViG on NHWC images of any size >= 32 (total stride 32 at patch 4).

    Attributes (official names): ``patch_embed`` (conv1, norm1, conv2, norm2),
    ``layers[i].blocks[j]`` (norm, op, norm2, mlp), ``layers[i].downsample`` (conv, norm;
    None for i = 3), ``classifier`` (norm, head).
    """

    def __init__(
        self,
        config: ViGHConfig,
        *,
        num_classes: int = 1000,
        img_size: int = 224,
        patch_size: int | None = None,
        drop_path_rate: float | None = None,
        implementation: str | None = None,
        conv_implementation: str | None = None,
        output_implementation: str | None = None,
        gate_implementation: str | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        patch_size = config.patch_size if patch_size is None else patch_size
        rate = config.drop_path_rate if drop_path_rate is None else drop_path_rate
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes}; expected >= 0")
        dims = config.dims
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.dims = dims
        self.patch_size = patch_size
        self.min_size = patch_size * 2**NUM_DOWNSAMPLES
        if img_size < self.min_size:
            raise ValueError(f"img_size={img_size}; expected at least {self.min_size}")
        self.img_size = img_size  # kept for symmetry with ViG; ViG-H has no size-bound parameter
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.patch_embed = PatchEmbed(dims[0], patch_size, hierarchical=True, **kw)
        rates = drop_path_rates(rate, sum(config.depths))
        stages, start = [], 0
        for i, (dim, depth, heads) in enumerate(
            zip(dims, config.depths, config.num_heads, strict=True)
        ):
            out_dim = dims[i + 1] if i + 1 < len(dims) else None
            stages.append(
                ViGHStage(
                    dim,
                    heads,
                    rates[start : start + depth],
                    out_dim,
                    implementation=implementation,
                    conv_implementation=conv_implementation,
                    output_implementation=output_implementation,
                    gate_implementation=gate_implementation,
                    **kw,
                )
            )
            start += depth
        self.layers = nnx.List(stages)
        self.classifier = Classifier(dims[-1], num_classes, **kw)

    def forward_stages(self, x: jax.Array) -> list[jax.Array]:
        """The four stage outputs (before each downsampling, un-normalised), for dense heads.

        Args:
          x: [B, H, W, 3] float images, H, W >= 32.

        Returns:
          [B, H/4, W/4, C], [B, H/8, W/8, 2C], [B, H/16, W/16, 4C], [B, H/32, W/32, 8C]
          (sizes rounded up), compute dtype. The official detection backbone applies its own
          ``outnorm{i}`` LayerNorms on top of these.
        """
        check_images(x, min_size=self.min_size, model=type(self).__name__)
        y = self.patch_embed(x.astype(self.dtype))
        outs = []
        for stage in self.layers:
            out, y = stage(y)
            outs.append(out)
        return outs

    def forward_features(self, x: jax.Array, return_stages: bool = False):
        """The final normalised feature map, or the four stage outputs.

        Args:
          x: [B, H, W, 3] float images, H, W >= 32.
          return_stages: if True, return :meth:`forward_stages` instead.

        Returns:
          [B, H/32, W/32, 8C] after ``classifier.norm`` (7x7 at 224 px), or the list of four
          stage outputs.
        """
        stages = self.forward_stages(x)
        if return_stages:
            return stages
        return self.classifier.norm(stages[-1])

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, 3] images -> [B, num_classes] logits ([B, 8C] features if no head).

        Logits are fp32 (fp64 when computing in fp64), whatever the compute dtype.
        """
        feats = self.forward_features(x)
        out_dtype = jnp.promote_types(feats.dtype, jnp.float32)
        pooled = feats.astype(out_dtype).mean(axis=(1, 2))
        if self.classifier.head is None:
            return pooled
        return self.classifier.head(pooled.astype(self.dtype)).astype(out_dtype)


register_variants(ViGH, VIG_H_CONFIGS)
