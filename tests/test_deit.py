"""DeiT (vig_jax/deit.py): parameter counts, float64 NumPy forward, attention padding, modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from agreement import assert_switch_changes_no_value
from flax import nnx
from scipy.special import erf

from vig_jax import create_model, deit, list_models

# timm: sum(p.numel() for p in deit_{tiny,small}_patch16_224().parameters()).
TIMM_PARAM_COUNTS = {"deit_t": 5_717_416, "deit_s": 22_050_664}


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_parameter_count_equals_timm(name):
    model = nnx.eval_shape(lambda: create_model(name))
    assert deit.num_params(model) == TIMM_PARAM_COUNTS[name]


def test_registered():
    assert {"deit_t", "deit_s"} <= set(list_models())


def _np_layer_norm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _numpy_deit(params: dict, x: np.ndarray, patch: int, heads: int) -> np.ndarray:
    """Float64 DeiT forward written from the paper / timm definitions."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, h, w, c = x.shape
    patches = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, -1, patch * patch * c)
    kernel = p["patch_embed"]["kernel"].reshape(-1, p["patch_embed"]["kernel"].shape[-1])
    t = patches @ kernel + p["patch_embed"]["bias"]
    cls = np.broadcast_to(p["cls_token"], (b, 1, t.shape[-1]))
    t = np.concatenate([cls, t], 1) + p["pos_embed"]
    n, d = t.shape[1:]
    dh = d // heads
    for i in sorted(p["blocks"]):
        blk = p["blocks"][i]
        y = _np_layer_norm(t, blk["norm1"]["scale"], blk["norm1"]["bias"])
        qkv = (y @ blk["attn"]["qkv"]["kernel"] + blk["attn"]["qkv"]["bias"]).reshape(
            b, n, 3, heads, dh
        )
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        logits -= logits.max(-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        t = t + o @ blk["attn"]["proj"]["kernel"] + blk["attn"]["proj"]["bias"]
        y = _np_layer_norm(t, blk["norm2"]["scale"], blk["norm2"]["bias"])
        y = y @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
        y = 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))
        t = t + y @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
    t = _np_layer_norm(t, p["norm"]["scale"], p["norm"]["bias"])
    return t[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]


def test_forward_matches_float64_numpy():
    model = deit.create_deit("deit_mu", img_size=16, patch_size=4, num_classes=5, rngs=nnx.Rngs(3))
    model.eval()
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    expected = _numpy_deit(params, x.astype(np.float64), patch=4, heads=2)
    got = np.asarray(model(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,multiple", [(17, 8), (197, 64), (16, 16)])
def test_padded_attention_equals_unpadded(n, multiple):
    rng = np.random.default_rng(n)
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), jnp.float32) for _ in range(3))
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    got = deit.padded_attention(q, k, v, implementation="xla", pad_multiple=multiple)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bad_attention_implementation_and_input_shape():
    with pytest.raises(ValueError, match="implementation"):
        deit.attention(*(jnp.zeros((1, 4, 1, 8)),) * 3, implementation="flash")
    model = deit.create_deit("deit_mu", img_size=16, patch_size=4, num_classes=5)
    with pytest.raises(ValueError, match=r"expected \[B, 16, 16, 3\]"):
        model(jnp.zeros((1, 32, 32, 3)))


def test_drop_path_only_in_train_mode():
    model = deit.create_deit(
        "deit_mu",
        img_size=16,
        patch_size=4,
        num_classes=5,
        drop_path_rate=0.5,
        rngs=nnx.Rngs(params=0, dropout=1),
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, 16, 3)), jnp.float32)
    model.train()
    a, b = model(x), model(x)
    assert not np.allclose(np.asarray(a), np.asarray(b))  # A new mask every call.
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))


def test_headless_model_returns_class_token_features():
    model = deit.create_deit("deit_mu", img_size=16, patch_size=4, num_classes=0)
    assert model(jnp.zeros((2, 16, 16, 3))).shape == (2, 32)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = deit.create_deit(
        "deit_mu", img_size=16, patch_size=4, num_classes=5, dtype=jnp.bfloat16
    )
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    assert model(jnp.zeros((2, 16, 16, 3))).dtype == jnp.float32


def test_patch_product_switch_changes_no_value(x64, monkeypatch):
    """``PATCH_EMBED_AS_PRODUCT``: the patch embedding as one product of the flattened patches
    gives nnx.Conv's logits and parameter gradients in float64."""
    kw = dict(img_size=16, patch_size=4, num_classes=5, dtype=jnp.float64)
    model = deit.create_deit("deit_mu", param_dtype=jnp.float64, rngs=nnx.Rngs(3), **kw)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3), jnp.float64)
    assert_switch_changes_no_value(
        monkeypatch, deit, "PATCH_EMBED_AS_PRODUCT", model, x, convs=(1, 0), rtol=1e-10, atol=1e-12
    )
