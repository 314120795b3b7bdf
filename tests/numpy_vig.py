"""An independent float64 NumPy forward pass of ViG and ViG-H, from the official state_dict.

Written straight from vig-reference.md (sections 2 and 4) and the official PyTorch code, without
calling anything in `vig_jax`: it takes the official key names and PyTorch layouts (see
`official_state_dict.py`) and NHWC images, and runs the BiGLA recurrence token by token.
Used to check our Flax models (through `vig_jax.convert`) to 1e-5.
"""

from __future__ import annotations

import numpy as np
from official_state_dict import OFFICIAL_CONFIGS
from scipy.special import erf

RMS_EPS = 1e-6
LN_EPS = 1e-5
GATE_NORMALIZER = 16.0


# ----------------------------------------------------------------------------- primitives
def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def gelu_exact(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def rms_norm(x, weight, eps=RMS_EPS):
    """Normalises the last axis: x / sqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def layer_norm(x, weight, bias, eps=LN_EPS):
    """LayerNorm over the last axis (biased variance, like torch)."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def linear(x, weight, bias=None):
    """torch.nn.Linear: x [..., in] @ weight[out, in]^T + bias."""
    y = x @ weight.T
    return y if bias is None else y + bias


def conv2d_nhwc(x, weight, bias=None, stride=1, padding=0, groups=1):
    """torch.nn.functional.conv2d on NHWC input with a torch OIHW weight.

    Args:
      x: [B, H, W, C_in].
      weight: [C_out, C_in / groups, kh, kw].

    Returns:
      [B, H_out, W_out, C_out].
    """
    c_out, c_in_g, kh, kw = weight.shape
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # [B, Ho, Wo, C_in, kh, kw]
    b, ho, wo, c_in = windows.shape[:4]
    windows = windows.reshape(b, ho, wo, groups, c_in // groups, kh, kw)
    w = weight.reshape(groups, c_out // groups, c_in_g, kh, kw)
    y = np.einsum("bhwgcij,gocij->bhwgo", windows, w).reshape(b, ho, wo, c_out)
    return y if bias is None else y + bias


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch's bicubic interpolation (A=-0.75, align_corners=False)."""
    a = -0.75
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        t = src - base
        coeffs = [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ]
        for offset, c in zip(range(-1, 3), coeffs, strict=True):
            mat[i, min(max(base + offset, 0), n_in - 1)] += c
    return mat


def resize_pos_embed(pos_embed, src_hw, dst_hw):
    """The official resize_pos_embed: [1, h*w, C] -> [1, H*W, C], bicubic per axis."""
    if tuple(src_hw) == tuple(dst_hw):
        return pos_embed
    grid = pos_embed.reshape(src_hw[0], src_hw[1], -1)
    grid = np.einsum("Hh,hwc->Hwc", torch_bicubic_matrix(src_hw[0], dst_hw[0]), grid)
    grid = np.einsum("Ww,Hwc->HWc", torch_bicubic_matrix(src_hw[1], dst_hw[1]), grid)
    return grid.reshape(1, dst_hw[0] * dst_hw[1], -1)


def bigla_recurrence(q, k, v, gf, gb):
    """(o_fwd + o_bwd)/2 of vig-reference 2.4, token by token; [B, N, H, D*] -> [B, N, H, Dv]."""
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5
    out = np.zeros((b, n, h, dv))
    for gates, order in ((gf, range(n)), (gb, reversed(range(n)))):
        state = np.zeros((b, h, dk, dv))
        for t in order:
            state = np.exp(gates[:, t])[..., None] * state + np.einsum(
                "bhd,bhe->bhde", k[:, t], v[:, t]
            )
            out[:, t] += scale * np.einsum("bhd,bhde->bhe", q[:, t], state)
    return out / 2


# ----------------------------------------------------------------------------- the mixer
def bigla_mixer(sd, p, u, heads, conv_act, out_act):
    """The official GatedLinearAttention / GLA2D on a token grid.

    Args:
      sd: the state_dict; p: key prefix of the mixer (e.g. "blocks.0.attn").
      u: [B, h, w, d] normalised tokens.

    Returns:
      [B, h, w, d].
    """
    b, hh, ww, d = u.shape
    c = conv2d_nhwc(u, sd[f"{p}.in_proj.0.weight"], padding=1, groups=d)
    if conv_act:
        c = silu(c)
    c = c.reshape(b, hh * ww, d)
    qkv = linear(c, sd[f"{p}.qkv_proj.weight"])
    q, k, v = qkv[..., : d // 2], qkv[..., d // 2 : d], qkv[..., d:]
    gk = linear(linear(c, sd[f"{p}.gk_proj.0.weight"]), *_wb(sd, f"{p}.gk_proj.1"))
    gf, gb = (log_sigmoid(g) / GATE_NORMALIZER for g in (gk[..., : d // 2], gk[..., d // 2 :]))
    split = lambda x: x.reshape(b, hh * ww, heads, -1)  # noqa: E731
    o = bigla_recurrence(split(q), split(k), split(v), split(gf), split(gb))
    o = rms_norm(o, sd[f"{p}.g_norm.weight"])
    local = rms_norm(split(c), sd[f"{p}.l_norm.weight"])
    gate = split(sigmoid(linear(c, *_wb(sd, f"{p}.g_proj"))))
    y = (gate * o + (1 - gate) * local).reshape(b, hh * ww, d)
    if out_act:
        y = silu(y)
    return linear(y, sd[f"{p}.o_proj.weight"]).reshape(b, hh, ww, d)


def _wb(sd, p):
    return sd[f"{p}.weight"], sd[f"{p}.bias"]


def swiglu(x, w_in, w_out):
    gate, value = np.split(linear(x, w_in), 2, axis=-1)
    return linear(silu(gate) * value, w_out)


# ----------------------------------------------------------------------------- the models
def vig_forward(sd, x, name="vig_t", patch_size=16, train_img_size=224, return_tokens=False):
    """Plain ViG logits [B, classes] for NHWC images x [B, H, W, 3] (float64)."""
    cfg = OFFICIAL_CONFIGS[name][1]
    heads = cfg["heads"]
    stride = patch_size // 2
    y = conv2d_nhwc(x, *_wb(sd, "patch_embed.proj.0"), stride=stride, padding=1)
    y = silu(layer_norm(y, *_wb(sd, "patch_embed.proj.1")))
    y = conv2d_nhwc(y, *_wb(sd, "patch_embed.proj.3"), stride=2, padding=1)
    y = layer_norm(y, *_wb(sd, "patch_embed.proj.4"))
    b, hh, ww, d = y.shape
    src = train_img_size // patch_size
    t = y.reshape(b, hh * ww, d) + resize_pos_embed(sd["pos_embed"], (src, src), (hh, ww))
    for i in range(cfg["depth"]):
        p = f"blocks.{i}"
        u = rms_norm(t, sd[f"{p}.attn_norm.weight"]).reshape(b, hh, ww, d)
        mix = bigla_mixer(sd, f"{p}.attn", u, heads, cfg["conv_act"], cfg["out_act"])
        t = t + mix.reshape(b, hh * ww, d)
        u = rms_norm(t, sd[f"{p}.mlp_norm.weight"])
        t = t + swiglu(u, sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.down_proj.weight"])
    t = rms_norm(t, sd["norm.weight"])
    if return_tokens:
        return t.reshape(b, hh, ww, d)
    return linear(t.mean(1), *_wb(sd, "head"))


def vig_h_forward(sd, x, name="vig_h_t", return_stages=False):
    """ViG-H logits [B, classes] (or its four stage outputs, NHWC) for NHWC images x."""
    cfg = OFFICIAL_CONFIGS[name][1]
    y = conv2d_nhwc(x, *_wb(sd, "patch_embed.0"), stride=2, padding=1)
    y = gelu_exact(layer_norm(y, *_wb(sd, "patch_embed.2")))
    y = conv2d_nhwc(y, *_wb(sd, "patch_embed.5"), stride=2, padding=1)
    y = layer_norm(y, *_wb(sd, "patch_embed.7"))
    stages = []
    for i, (depth, heads) in enumerate(zip(cfg["depths"], cfg["heads"], strict=True)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            u = layer_norm(y, *_wb(sd, f"{p}.norm"))
            y = y + bigla_mixer(sd, f"{p}.op", u, heads, conv_act=False, out_act=False)
            u = layer_norm(y, *_wb(sd, f"{p}.norm2"))
            y = y + swiglu(u, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc2.weight"])
        stages.append(y)
        if i < len(cfg["depths"]) - 1:
            y = conv2d_nhwc(y, *_wb(sd, f"layers.{i}.downsample.1"), stride=2, padding=1)
            y = layer_norm(y, *_wb(sd, f"layers.{i}.downsample.3"))
    if return_stages:
        return stages
    y = layer_norm(y, *_wb(sd, "classifier.norm"))
    return linear(y.mean((1, 2)), *_wb(sd, "classifier.head"))
