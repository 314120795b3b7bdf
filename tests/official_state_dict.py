"""Random state_dicts with the official PyTorch key names and shapes (hustvl/ViG).

Written from the official code (`classification/models/vig.py`, `vig_h.py`, the yaml configs)
and vig-reference.md sections 2-5, independently of `vig_jax`, so the converter and the float64
NumPy forward pass in `numpy_vig.py` can be tested against the official layout.
Layouts are PyTorch's: Linear `[out, in]`, Conv2d `[out, in/groups, kh, kw]`.
"""

from __future__ import annotations

import math
import re

import numpy as np

# name -> (kind, config); values from the official yaml files and config.py defaults.
OFFICIAL_CONFIGS = {
    "vig_t": ("vig", dict(dim=192, depth=12, heads=3, conv_act=True, out_act=True)),
    "vig_s": ("vig", dict(dim=384, depth=12, heads=6, conv_act=False, out_act=False)),
    "vig_b": ("vig", dict(dim=768, depth=12, heads=12, conv_act=False, out_act=False)),
    "vig_h_t": ("vig_h", dict(dim=96, depths=(2, 2, 5, 2), heads=(3, 6, 12, 24))),
    "vig_h_s": ("vig_h", dict(dim=96, depths=(2, 2, 17, 2), heads=(3, 6, 12, 24))),
    "vig_h_b": ("vig_h", dict(dim=128, depths=(2, 2, 17, 2), heads=(4, 8, 16, 32))),
}

OFFICIAL_PARAM_COUNTS = {
    "vig_t": 5_834_536,
    "vig_s": 22_615_144,
    "vig_b": 89_022_184,
    "vig_h_t": 28_600_680,
    "vig_h_s": 50_051_688,
    "vig_h_b": 88_904_360,
}

GATE_LOW_RANK = 16


def vig_mlp_hidden(dim: int) -> int:
    """GLAMLP intermediate size: 256 * ceil(int(8 d / 3) / 256)."""
    return 256 * math.ceil(int(dim * 4 * 2 / 3) / 256)


def vig_h_mlp_hidden(dim: int) -> int:
    """gMlp intermediate size: 32 * ceil(int(8 C / 3) / 32)."""
    return 32 * math.ceil(int(dim * 4 * 2 / 3) / 32)


def _mixer_shapes(prefix: str, d: int, heads: int) -> dict[str, tuple[int, ...]]:
    head_v = d // heads
    return {
        f"{prefix}.in_proj.0.weight": (d, 1, 3, 3),
        f"{prefix}.qkv_proj.weight": (2 * d, d),
        f"{prefix}.gk_proj.0.weight": (GATE_LOW_RANK, d),
        f"{prefix}.gk_proj.1.weight": (d, GATE_LOW_RANK),
        f"{prefix}.gk_proj.1.bias": (d,),
        f"{prefix}.o_proj.weight": (d, d),
        f"{prefix}.g_norm.weight": (head_v,),
        f"{prefix}.l_norm.weight": (head_v,),
        f"{prefix}.g_proj.weight": (d, d),
        f"{prefix}.g_proj.bias": (d,),
    }


def vig_shapes(dim, depth, heads, num_classes=1000, img_size=224, patch_size=16, **_):
    """Key -> shape of the plain ViG state_dict."""
    k = patch_size // 2 + 1
    grid = img_size // patch_size
    hidden = vig_mlp_hidden(dim)
    shapes = {
        "pos_embed": (1, grid * grid, dim),
        "patch_embed.proj.0.weight": (dim // 2, 3, k, k),
        "patch_embed.proj.0.bias": (dim // 2,),
        "patch_embed.proj.1.weight": (dim // 2,),
        "patch_embed.proj.1.bias": (dim // 2,),
        "patch_embed.proj.3.weight": (dim, dim // 2, 3, 3),
        "patch_embed.proj.3.bias": (dim,),
        "patch_embed.proj.4.weight": (dim,),
        "patch_embed.proj.4.bias": (dim,),
        "head.weight": (num_classes, dim),
        "head.bias": (num_classes,),
    }
    for i in range(depth):
        p = f"blocks.{i}"
        shapes[f"{p}.attn_norm.weight"] = (dim,)
        shapes.update(_mixer_shapes(f"{p}.attn", dim, heads))
        shapes[f"{p}.mlp_norm.weight"] = (dim,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (2 * hidden, dim)
        shapes[f"{p}.mlp.down_proj.weight"] = (dim, hidden)
    shapes["norm.weight"] = (dim,)
    return shapes


def vig_h_shapes(dim, depths, heads, num_classes=1000, **_):
    """Key -> shape of the hierarchical ViG-H state_dict."""
    dims = [dim * 2**i for i in range(len(depths))]
    c0 = dims[0]
    shapes = {
        "patch_embed.0.weight": (c0 // 2, 3, 3, 3),
        "patch_embed.0.bias": (c0 // 2,),
        "patch_embed.2.weight": (c0 // 2,),
        "patch_embed.2.bias": (c0 // 2,),
        "patch_embed.5.weight": (c0, c0 // 2, 3, 3),
        "patch_embed.5.bias": (c0,),
        "patch_embed.7.weight": (c0,),
        "patch_embed.7.bias": (c0,),
    }
    for i, (c, depth, h) in enumerate(zip(dims, depths, heads, strict=True)):
        hidden = vig_h_mlp_hidden(c)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            shapes[f"{p}.norm.weight"] = (c,)
            shapes[f"{p}.norm.bias"] = (c,)
            shapes.update(_mixer_shapes(f"{p}.op", c, h))
            shapes[f"{p}.norm2.weight"] = (c,)
            shapes[f"{p}.norm2.bias"] = (c,)
            shapes[f"{p}.mlp.fc1.weight"] = (2 * hidden, c)
            shapes[f"{p}.mlp.fc2.weight"] = (c, hidden)
        if i < len(depths) - 1:
            shapes[f"layers.{i}.downsample.1.weight"] = (dims[i + 1], c, 3, 3)
            shapes[f"layers.{i}.downsample.1.bias"] = (dims[i + 1],)
            shapes[f"layers.{i}.downsample.3.weight"] = (dims[i + 1],)
            shapes[f"layers.{i}.downsample.3.bias"] = (dims[i + 1],)
    shapes["classifier.norm.weight"] = (dims[-1],)
    shapes["classifier.norm.bias"] = (dims[-1],)
    shapes["classifier.head.weight"] = (num_classes, dims[-1])
    shapes["classifier.head.bias"] = (num_classes,)
    return shapes


def official_shapes(name: str, num_classes: int = 1000, img_size: int = 224, **kw):
    """Key -> shape of the official state_dict of model ``name`` (e.g. "vig_t")."""
    kind, cfg = OFFICIAL_CONFIGS[name]
    if kind == "vig":
        return vig_shapes(**cfg, num_classes=num_classes, img_size=img_size, **kw)
    return vig_h_shapes(**cfg, num_classes=num_classes)


def official_state_dict(
    name: str,
    rng: np.random.Generator,
    num_classes: int = 1000,
    img_size: int = 224,
    dtype=np.float32,
    **kw,
) -> dict[str, np.ndarray]:
    """A state_dict with the official keys and shapes, filled with random values.

    Norm weights are drawn around 1 and the rest with a fan-in scale, so a forward pass stays
    well conditioned (every value is still random, so misplaced tensors show up).
    """
    out = {}
    for key, shape in official_shapes(name, num_classes, img_size, **kw).items():
        if _is_norm_scale(key, shape):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 0.1 * rng.standard_normal(shape)
        elif key == "pos_embed":
            value = 0.5 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[key] = value.astype(dtype)
    return out


_NORM_SCALE_KEYS = re.compile(
    r"(norm2?\.weight|patch_embed\.proj\.[14]\.weight|patch_embed\.[27]\.weight"
    r"|downsample\.3\.weight)$"
)


def _is_norm_scale(key: str, shape: tuple[int, ...]) -> bool:
    """True for the scale vector of an RMSNorm or LayerNorm."""
    return len(shape) == 1 and _NORM_SCALE_KEYS.search(key) is not None
