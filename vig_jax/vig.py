"""Plain (isotropic) ViG: ViG-T, ViG-S, ViG-B.

The official ``ViG`` of hustvl/ViG (``classification/models/vig.py``) as built by the yaml
configs (vig-reference.md section 2): V2 conv stem (16x downsampling), learned absolute
position embedding (no class token), 12 pre-norm blocks ``x += DropPath(BiGLA(RMSNorm(x)))``,
``x += DropPath(SwiGLU(RMSNorm(x)))``, final RMSNorm, global average pooling, linear head.

Variants (Liao et al., "ViG: Linear-complexity Visual Sequence Learning with Gated Linear
Attention", AAAI 2025, arXiv 2405.18425; official ``configs/vig/vig-{t,s,b}.yaml`` with
``config.py`` defaults; parameter counts measured from the official code):

=======  ====  =====  =====  =========  =======  =========  ===========
name     dim   depth  heads  conv SiLU  out SiLU  drop path  params
=======  ====  =====  =====  =========  =======  =========  ===========
vig_t    192   12     3      yes        yes      0.0        5,834,536
vig_s    384   12     6      no         no       0.2        22,615,144
vig_b    768   12     12     no         no       0.5        89,022,184
=======  ====  =====  =====  =========  =======  =========  ===========

ViG-T's SiLU after the depthwise conv comes from the config default ``USE_ACT_IN_CONV=True``
(vig-t.yaml does not set it), its output SiLU from ``USE_OUT_ACT: True``; its drop-path line is
commented out, so 0.0.
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
    PatchEmbed,
    SwiGLU,
    check_images,
    drop_path_rates,
    normal_init,
    resize_pos_embed,
    rms_norm,
    stem_output_size,
    trunc_normal_timm,
    vig_mlp_hidden,
)
from vig_jax.registry import register_variants


@dataclasses.dataclass(frozen=True)
class ViGConfig:
    """One plain ViG variant (values of the official yaml, see the module docstring)."""

    embed_dim: int
    num_heads: int
    conv_act: bool
    out_act: bool
    drop_path_rate: float
    depth: int = 12
    patch_size: int = 16


VIG_CONFIGS: dict[str, ViGConfig] = {
    "vig_t": ViGConfig(192, 3, conv_act=True, out_act=True, drop_path_rate=0.0),
    "vig_s": ViGConfig(384, 6, conv_act=False, out_act=False, drop_path_rate=0.2),
    "vig_b": ViGConfig(768, 12, conv_act=False, out_act=False, drop_path_rate=0.5),
}


class ViGBlock(nnx.Module):
    """``GLABlock``: ``x += dp(attn(attn_norm(x)))``; ``x += dp(mlp(mlp_norm(x)))``.

    One :class:`DropPath` serves both branches, as in the official block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        conv_act: bool,
        out_act: bool,
        drop_path: float,
        implementation: str | None,
        conv_implementation: str | None = None,
        output_implementation: str | None = None,
        gate_implementation: str | None = None,
        norm_implementation: str | None = None,
        dtype: Dtype | None,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = rms_norm(dim, implementation=norm_implementation, **kw)
        self.attn = BiGLA(
            dim,
            num_heads,
            conv_act=conv_act,
            out_act=out_act,
            linear_init="xavier",
            implementation=implementation,
            conv_implementation=conv_implementation,
            output_implementation=output_implementation,
            gate_implementation=gate_implementation,
            **kw,
        )
        self.mlp_norm = rms_norm(dim, implementation=norm_implementation, **kw)
        self.mlp = SwiGLU(dim, vig_mlp_hidden(dim), kernel_init=normal_init(), **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, h, w, d] -> [B, h, w, d]."""
        x = x + self.drop_path(self.attn(self.attn_norm(x)))
        return x + self.drop_path(self.mlp(self.mlp_norm(x)))


class ViG(nnx.Module):
    """Plain ViG classifier on NHWC images of any size (the position embedding is resized).

    Attributes (parameter paths follow the official state_dict names): ``patch_embed``
    (conv1, norm1, conv2, norm2), ``pos_embed`` [1, g*g, d] with g = img_size // patch_size,
    ``blocks[i]`` (attn_norm, attn, mlp_norm, mlp), ``norm``, ``head`` (None if
    num_classes == 0).
    """

    def __init__(
        self,
        config: ViGConfig,
        *,
        num_classes: int = 1000,
        img_size: int = 224,
        patch_size: int | None = None,
        drop_path_rate: float | None = None,
        implementation: str | None = None,
        conv_implementation: str | None = None,
        output_implementation: str | None = None,
        gate_implementation: str | None = None,
        norm_implementation: str | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        patch_size = config.patch_size if patch_size is None else patch_size
        rate = config.drop_path_rate if drop_path_rate is None else drop_path_rate
        d = config.embed_dim
        if img_size < patch_size:
            raise ValueError(f"img_size={img_size}; expected at least patch_size={patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes}; expected >= 0")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = d
        self.patch_size = patch_size
        self.img_size = img_size
        grid = img_size // patch_size
        self.pos_grid = (grid, grid)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.patch_embed = PatchEmbed(d, patch_size, hierarchical=False, **kw)
        self.pos_embed = nnx.Param(
            trunc_normal_timm()(rngs.params(), (1, grid * grid, d), param_dtype)
        )
        self.blocks = nnx.List(
            [
                ViGBlock(
                    d,
                    config.num_heads,
                    conv_act=config.conv_act,
                    out_act=config.out_act,
                    drop_path=r,
                    implementation=implementation,
                    conv_implementation=conv_implementation,
                    output_implementation=output_implementation,
                    gate_implementation=gate_implementation,
                    norm_implementation=norm_implementation,
                    **kw,
                )
                for r in drop_path_rates(rate, config.depth)
            ]
        )
        self.norm = rms_norm(d, implementation=norm_implementation, **kw)
        self.head = (
            nnx.Linear(d, num_classes, kernel_init=normal_init(), **kw) if num_classes else None
        )

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images -> the final normalised token map.

        Args:
          x: [B, H, W, 3] float images, H, W >= patch_size.

        Returns:
          [B, h, w, embed_dim] in the compute dtype, after the final RMSNorm; h = w = 14 for 224 px
          at patch 16 (in general h = ceil(floor((H + 1) / (p/2)) / 2)).
        """
        check_images(x, min_size=self.patch_size, model=type(self).__name__)
        y = self.patch_embed(x.astype(self.dtype))
        b, h, w, d = y.shape
        pos = resize_pos_embed(self.pos_embed[...], self.pos_grid, (h, w))
        y = y + pos.reshape(1, h, w, d).astype(y.dtype)
        for block in self.blocks:
            y = block(y)
        return self.norm(y)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, 3] images -> [B, num_classes] logits ([B, d] features if no head).

        Logits are fp32 (fp64 when computing in fp64), whatever the compute dtype.
        """
        feats = self.forward_features(x)
        out_dtype = jnp.promote_types(feats.dtype, jnp.float32)
        pooled = feats.astype(out_dtype).mean(axis=(1, 2))
        if self.head is None:
            return pooled
        return self.head(pooled.astype(self.dtype)).astype(out_dtype)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of height x width pixels."""
        return (
            stem_output_size(height, self.patch_size, hierarchical=False),
            stem_output_size(width, self.patch_size, hierarchical=False),
        )


register_variants(ViG, VIG_CONFIGS)
