"""Tests of the ViG / ViG-H models: sizes, shapes, any resolution, errors, drop path, init.

Numerical equality with the official forward pass is tested through the converter against the
float64 NumPy model (tests/test_convert.py and the lead's tests); here the model is checked
against official numbers (parameter counts, init formulas, torch.linspace rates), torch's own
bicubic interpolation (tests/data/torch_reference.npz) and independent float64 formulas.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from agreement import assert_same_value_and_grads, assert_switch_changes_no_value
from flax import nnx
from official_state_dict import OFFICIAL_PARAM_COUNTS

from vig_jax import create_model, list_models, register_model
from vig_jax import layers as vig_layers
from vig_jax.bigla import GATE_NORMALIZER, BiGLA, _log_gates
from vig_jax.layers import (
    DropPath,
    conv_as_product,
    resize_pos_embed,
    stem_geometry,
    torch_bicubic_matrix,
    torch_conv,
)
from vig_jax.vig import VIG_CONFIGS, ViG
from vig_jax.vig_h import ViGH, ViGHConfig

DATA = pathlib.Path(__file__).parent / "data"

XAVIER_GAIN = 2**-2.5


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract(name: str, **kwargs) -> nnx.Module:
    """The model with ShapeDtypeStructs for parameters (no compute; the cheapest op to trace)."""
    kwargs.setdefault("implementation", "reference")
    return nnx.eval_shape(lambda: create_model(name, **kwargs))


@pytest.fixture(scope="module")
def tiny_vig_t():
    """ViG-T with a 4-pixel patch for 32-px images (8x8 tokens), drop path 0.5, eval mode."""
    model = create_model("vig_t", rngs=nnx.Rngs(params=0, dropout=1), **TINY)
    model.eval()
    return model


TINY = dict(
    img_size=32, patch_size=4, num_classes=5, drop_path_rate=0.5, implementation="reference"
)


@pytest.fixture(scope="module")
def vig_t():
    """A real ViG-T (official init, seed 0) in eval mode, built once for this module."""
    model = create_model("vig_t", implementation="reference", rngs=nnx.Rngs(0))
    model.eval()
    return model


# ----------------------------------------------------------------------------- registry, sizes
@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_param_count_equals_official(name):
    assert param_count(abstract(name)) == OFFICIAL_PARAM_COUNTS[name]


def test_list_models_has_the_six_variants():
    assert set(OFFICIAL_PARAM_COUNTS) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_register_model_passes_create_model_arguments():
    seen = {}

    @register_model("_test_registry_probe")
    def probe(**kwargs):
        seen.update(kwargs)
        return nnx.Linear(1, 1, rngs=kwargs["rngs"])

    create_model("_test_registry_probe", num_classes=7, img_size=32, patch_size=4, extra=1)
    assert "_test_registry_probe" in list_models()
    assert seen["num_classes"] == 7 and seen["img_size"] == 32 and seen["patch_size"] == 4
    assert seen["extra"] == 1 and seen["drop_path_rate"] is None
    assert isinstance(seen["rngs"], nnx.Rngs)
    with pytest.raises(ValueError, match="already registered"):
        register_model("_test_registry_probe")(lambda **kw: None)


def test_create_model_unknown_name_lists_the_models():
    with pytest.raises(ValueError, match="vig_t"):
        create_model("vig_xl")


def test_models_work_in_nnx_tree_mode():
    """Tree mode (graph=False) refuses shared submodules/variables; the split must succeed."""
    for name in ("vig_t", "vig_h_t"):
        model = abstract(name)
        _, params_tree, _ = nnx.split(model, nnx.Param, ..., graph=False)
        assert sum(x.size for x in jax.tree.leaves(params_tree)) == OFFICIAL_PARAM_COUNTS[name]


# ----------------------------------------------------------------------------- shapes
def conv_len(n: int, kernel: int, stride: int, pad: int = 1) -> int:
    return (n + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize("size", [224, 384, 512])
def test_vig_t_gives_finite_logits_at_any_resolution(vig_t, size):
    x = jax.random.normal(jax.random.key(size), (1, size, size, 3))
    logits = nnx.jit(lambda m, x: m(x))(vig_t, x)
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
    "name,hw,patch,grid",
    [
        ("vig_t", (224, 224), None, (14, 14)),
        ("vig_s", (100, 132), None, (6, 8)),
        ("vig_b", (1024, 1024), None, (64, 64)),
        ("vig_t", (32, 32), 4, (8, 8)),
    ],
)
def test_vig_feature_map_shape(name, hw, patch, grid):
    model = abstract(name, patch_size=patch, img_size=32 if patch else 224)
    p = patch or 16
    expected = tuple(conv_len(conv_len(n, p // 2 + 1, p // 2), 3, 2) for n in hw)
    assert expected == grid
    feats = nnx.eval_shape(lambda m: m.forward_features(jnp.zeros((2, *hw, 3))), model)
    assert feats.shape == (2, *grid, model.embed_dim)
    assert model.grid_size(*hw) == grid


@pytest.mark.parametrize("name,hw", [("vig_h_t", (224, 224)), ("vig_h_b", (100, 132))])
def test_vig_h_stage_shapes(name, hw):
    model = abstract(name)
    x = jnp.zeros((2, *hw, 3))
    stages = nnx.eval_shape(lambda m: m.forward_stages(x), model)
    sizes = [tuple(conv_len(conv_len(n, 3, 2), 3, 2) for n in hw)]
    for _ in range(3):
        sizes.append(tuple(conv_len(n, 3, 2) for n in sizes[-1]))
    c = model.dims[0]
    assert [s.shape for s in stages] == [(2, *hw_i, c * 2**i) for i, hw_i in enumerate(sizes)]
    if hw == (224, 224):
        assert sizes == [(56, 56), (28, 28), (14, 14), (7, 7)]
    same = nnx.eval_shape(lambda m: m.forward_features(x, return_stages=True), model)
    assert [s.shape for s in same] == [s.shape for s in stages]
    final = nnx.eval_shape(lambda m: m.forward_features(x), model)
    assert final.shape == (2, *sizes[-1], 8 * c)
    logits = nnx.eval_shape(lambda m: m(x), model)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def test_num_classes_zero_returns_pooled_features():
    for name, width in (("vig_t", 192), ("vig_h_t", 768)):
        model = abstract(name, num_classes=0)
        out = nnx.eval_shape(lambda m: m(jnp.zeros((3, 64, 64, 3))), model)
        assert out.shape == (3, width)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "name,x,match",
    [
        ("vig_t", jnp.zeros((224, 224, 3)), "NHWC images .*3 dims"),
        ("vig_t", jnp.zeros((1, 224, 224, 1)), "got 1 channels"),
        ("vig_t", jnp.zeros((1, 3, 224, 224)), "channels-first"),
        ("vig_t", jnp.zeros((1, 224, 224, 3), jnp.uint8), "dtype uint8"),
        ("vig_t", jnp.zeros((1, 224, 224, 3), jnp.int32), "dtype int32"),
        ("vig_t", jnp.zeros((1, 15, 224, 3)), "H, W >= 16.*15x224"),
        ("vig_h_t", jnp.zeros((1, 224, 31, 3)), "H, W >= 32.*224x31"),
        ("vig_h_s", jnp.zeros((1, 224, 224, 4)), "got 4 channels"),
    ],
)
def test_bad_input_raises_value_error_naming_the_expected_input(name, x, match):
    model = abstract(name)
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda m: m(x), model)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="img_size=8"):
        create_model("vig_t", img_size=8)
    with pytest.raises(ValueError, match="patch_size=1"):
        abstract("vig_t", patch_size=1)
    with pytest.raises(ValueError, match="img_size=16; expected at least 32"):
        abstract("vig_h_t", img_size=16)
    with pytest.raises(ValueError, match="drop path rate"):
        abstract("vig_s", drop_path_rate=1.5)


def test_implementation_is_passed_to_the_op():
    model = abstract("vig_t", implementation="associative_scan")
    assert {b.attn.implementation for b in model.blocks} == {"associative_scan"}
    bad = abstract("vig_t", implementation="no_such_kernel")
    with pytest.raises(ValueError, match="no_such_kernel"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 64, 64, 3))), bad)


# ----------------------------------------------------------------------------- pos embed resize
def torch_bicubic_2d_float64(src: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """torch's upsample_bicubic2d (align_corners=False, A=-0.75), pixel by pixel, float64.

    Args:
      src: [h, w, C]. Returns: [H, W, C].
    """
    a = -0.75
    h, w, _ = src.shape

    def weights(t):
        c1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
        c2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
        return [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]

    def source(i, n_in, n_out):
        real = n_in / n_out * (i + 0.5) - 0.5  # not clamped for cubic
        base = math.floor(real)
        return base, real - base

    out = np.zeros((*out_hw, src.shape[2]))
    for oy in range(out_hw[0]):
        y0, ty = source(oy, h, out_hw[0])
        for ox in range(out_hw[1]):
            x0, tx = source(ox, w, out_hw[1])
            for i, wy in enumerate(weights(ty)):
                yy = min(max(y0 - 1 + i, 0), h - 1)
                for j, wx in enumerate(weights(tx)):
                    xx = min(max(x0 - 1 + j, 0), w - 1)
                    out[oy, ox] += wy * wx * src[yy, xx]
    return out


@pytest.mark.parametrize(
    "src_hw,dst_hw",
    [((14, 14), (24, 24)), ((14, 14), (32, 32)), ((14, 14), (9, 5)), ((3, 7), (8, 2)),
     ((1, 1), (4, 4)), ((5, 5), (1, 1)), ((2, 3), (2, 3))],
)  # fmt: skip
def test_resize_pos_embed_equals_float64_torch_formula(src_hw, dst_hw):
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((*src_hw, 5))
    pos = jnp.asarray(grid.reshape(1, -1, 5), jnp.float32)
    out = np.asarray(resize_pos_embed(pos, src_hw, dst_hw)).reshape(*dst_hw, 5)
    ref = torch_bicubic_2d_float64(grid, dst_hw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    if src_hw == dst_hw:
        assert resize_pos_embed(pos, src_hw, dst_hw) is pos


def test_bicubic_matrix_rows_sum_to_one_and_differ_from_jax_image():
    mat = torch_bicubic_matrix(14, 24)
    np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-12)
    # jax.image.resize uses the Keys cubic with a = -0.5 and antialiases: not torch's numbers.
    x = np.random.default_rng(1).standard_normal((14, 14))
    jax_out = np.asarray(jax.image.resize(jnp.asarray(x), (24, 24), "bicubic"))
    assert np.abs(jax_out - mat @ x @ torch_bicubic_matrix(14, 24).T).max() > 1e-3


def test_resize_pos_embed_matches_torch_interpolate():
    """Against F.interpolate(bicubic, align_corners=False) run by PyTorch (fp32, CPU)."""
    ref = np.load(DATA / "torch_reference.npz")
    cases = sorted({k.split("/")[1] for k in ref.files if k.startswith("bicubic/")})
    assert len(cases) >= 8
    for case in cases:
        src, dst = ref[f"bicubic/{case}/src"][0], ref[f"bicubic/{case}/dst"][0]  # [C, h, w]
        (c, h, w), out_hw = src.shape, dst.shape[1:]
        pos = jnp.asarray(src.transpose(1, 2, 0).reshape(1, h * w, c))
        out = np.asarray(resize_pos_embed(pos, (h, w), out_hw))
        out = out.reshape(*out_hw, c).transpose(2, 0, 1)
        # torch's own fp32 rounding is ~1e-6 relative (it computes coordinates in fp32)
        np.testing.assert_allclose(out, dst, rtol=0, atol=2e-6 * np.abs(dst).max())


# ----------------------------------------------------------------------------- drop path
def test_drop_path_rates_equal_torch_linspace():
    ref = np.load(DATA / "torch_reference.npz")
    plain = {"vig_s": (0.2, 12), "vig_b": (0.5, 12)}
    for name, (rate, depth) in plain.items():
        rates = [b.drop_path.rate for b in abstract(name).blocks]
        np.testing.assert_allclose(rates, ref[f"linspace/{rate}/{depth}"], rtol=0, atol=1e-7)
    assert {b.drop_path.rate for b in abstract("vig_t").blocks} == {0.0}
    for name, (rate, depth) in {"vig_h_s": (0.3, 23), "vig_h_b": (0.6, 23)}.items():
        model = abstract(name)
        rates = [b.drop_path.rate for stage in model.layers for b in stage.blocks]
        np.testing.assert_allclose(rates, ref[f"linspace/{rate}/{depth}"], rtol=0, atol=1e-7)
    assert [b.drop_path.rate for b in abstract("vig_s", drop_path_rate=0.0).blocks] == [0.0] * 12


def test_drop_path_drops_whole_samples_at_the_expected_rate():
    rate, n = 0.3, 4000
    layer = DropPath(rate, rngs=nnx.Rngs(dropout=3))
    x = jnp.broadcast_to(jnp.arange(1.0, 7.0).reshape(1, 2, 3), (n, 2, 3))
    y = np.asarray(layer(x))
    kept = np.all(np.isclose(y, np.asarray(x) / (1 - rate)), axis=(1, 2))
    dropped = np.all(y == 0, axis=(1, 2))
    assert np.all(kept ^ dropped)  # per sample: all kept (and rescaled) or all zero
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(dropped.sum() - n * rate) < 5 * sigma
    assert not np.array_equal(np.asarray(layer(x)), y)  # a new mask for every call
    layer.eval()
    assert np.array_equal(np.asarray(layer(x)), np.asarray(x))


def test_model_drop_path_is_stochastic_in_train_and_deterministic_in_eval(tiny_vig_t):
    model = tiny_vig_t
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 32, 32, 3)), (4, 32, 32, 3))
    forward = nnx.jit(lambda m, x: m(x))
    first, second = forward(model, x), forward(model, x)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert np.allclose(first, first[:1], atol=1e-6)  # same image, same logits
    model.train()
    try:
        a, b = np.asarray(forward(model, x)), np.asarray(forward(model, x))
    finally:
        model.eval()
    assert not np.allclose(a, b)  # new masks per call
    assert not np.allclose(a, a[:1])  # per-sample masks within a batch


def test_vig_with_the_pallas_gates_and_norms_matches_xla():
    """A two-block ViG-T with ``gate_implementation`` and ``norm_implementation`` "pallas"
    (interpreted here) gives the logits and parameter gradients of the XLA paths."""
    config = dataclasses.replace(VIG_CONFIGS["vig_t"], depth=2)
    kw = dict(img_size=32, patch_size=4, num_classes=5, implementation="xla")
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    ref = ViG(config, **kw, rngs=nnx.Rngs(0))
    kernels = ViG(
        config, **kw, gate_implementation="pallas", norm_implementation="pallas", rngs=nnx.Rngs(0)
    )
    block = kernels.blocks[0]
    assert block.attn.gate_implementation == "pallas" and block.mlp_norm.implementation == "pallas"
    assert ref.blocks[0].attn.gate_implementation == "xla" and ref.norm.implementation == "xla"
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    assert_same_value_and_grads(ref, kernels, loss, rtol_value=1e-5, rtol=2e-4, atol=2e-6)


# ----------------------------------------------------------------------------- stem
def _assert_product_is_conv(conv, x):
    """conv_as_product(conv, x) has nnx.Conv's values and kernel / bias gradients (float64)."""
    np.testing.assert_allclose(conv_as_product(conv, x), conv(x), rtol=1e-12, atol=1e-12)
    loss = lambda f: lambda c: jnp.sum(jnp.sin(f(c)))
    want = nnx.grad(loss(lambda c: c(x)))(conv)
    got = nnx.grad(loss(lambda c: conv_as_product(c, x)))(conv)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            getattr(got, name)[...], getattr(want, name)[...], rtol=1e-11, atol=1e-11
        )


@pytest.mark.parametrize(
    "patch,hierarchical,size", [(16, False, 224), (16, False, 37), (4, True, 30)]
)
def test_stem_conv_as_product_equals_lax_conv(x64, patch, hierarchical, size):
    """The first stem convolution as one product of its input windows: the values and the
    kernel / bias gradients of ``lax.conv`` (nnx.Conv) in float64, odd sizes included."""
    kernel, stride, padding = stem_geometry(patch, hierarchical)[0]
    conv = torch_conv(3, 8, kernel, stride, padding, dtype=None, param_dtype=jnp.float64,
                      rngs=nnx.Rngs(0))  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (2, size, size + 3, 3), jnp.float64)
    _assert_product_is_conv(conv, x)


@pytest.mark.parametrize("size", [16, 30])
def test_valid_patchify_conv_as_product_equals_lax_conv(x64, size):
    """A "VALID" p x p, stride-p convolution (DeiT's patch embedding; windows tiling the image,
    taken by one reshape) as one product: lax.conv's values and kernel / bias gradients in
    float64, an image size that p does not divide included (the last rows dropped)."""
    conv = nnx.Conv(3, 8, kernel_size=(4, 4), strides=(4, 4), padding="VALID",
                    param_dtype=jnp.float64, rngs=nnx.Rngs(0))  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (2, size, size + 3, 3), jnp.float64)
    _assert_product_is_conv(conv, x)


def test_stem_switch_changes_no_value(monkeypatch):
    """``STEM_AS_PRODUCT`` (the first stem conv as a product, else nnx.Conv): the same logits and
    gradients (to fp32 rounding; the product itself is checked in float64 above)."""
    model = create_model("vig_t", rngs=nnx.Rngs(0), **TINY)
    model.eval()
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    assert_switch_changes_no_value(
        monkeypatch, vig_layers, "STEM_AS_PRODUCT", model, x, convs=(2, 1), rtol=2e-4, atol=2e-6
    )


# ----------------------------------------------------------------------------- dtypes
def test_bf16_compute_keeps_fp32_params_and_logits(tiny_vig_t):
    m16 = create_model("vig_t", dtype=jnp.bfloat16, **TINY)
    nnx.update(m16, nnx.state(tiny_vig_t, nnx.Param))
    m16.eval()
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m16, nnx.Param))} == {jnp.dtype("float32")}
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    feats = nnx.eval_shape(lambda m: m.forward_features(x), m16)
    assert feats.dtype == jnp.bfloat16
    forward = nnx.jit(lambda m, x: m(x))
    ref, out = np.asarray(forward(tiny_vig_t, x)), np.asarray(forward(m16, x))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_bf16_gate_path_takes_bf16_inputs_and_sums_in_fp32(implementation):
    """The first gate product multiplies bf16 ``c`` and the bf16-rounded kernel with fp32 sums;
    the log gates come out in fp32, equal to float64 math on those rounded inputs (either gate
    implementation)."""
    op = BiGLA(64, 2, conv_act=True, out_act=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    c = jax.random.normal(jax.random.key(2), (2, 9, 64)).astype(jnp.bfloat16)
    gates = jnp.concatenate(_log_gates(op.gk_proj, c, implementation), axis=-1)
    assert gates.dtype == jnp.float32 and gates.shape == (2, 9, 64)
    as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    w0 = as64(op.gk_proj[0].kernel[...].astype(jnp.bfloat16))
    logits = as64(c) @ w0 @ as64(op.gk_proj[1].kernel[...]) + as64(op.gk_proj[1].bias[...])
    expected = -np.logaddexp(0.0, -logits) / GATE_NORMALIZER
    np.testing.assert_allclose(np.asarray(gates), expected, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda c: _log_gates(op.gk_proj, c, implementation))(c))
    assert "convert_element_type[new_dtype=float32" not in jaxpr.split("dot_general")[0]


# ----------------------------------------------------------------------------- init
def assert_uniform(w, bound: float, what: str):
    """w ~ U(-bound, bound): inside the bound, its max near it, std = bound / sqrt(3)."""
    w = np.asarray(w, np.float64).ravel()
    n = w.size
    assert np.abs(w).max() <= bound * (1 + 1e-6), what
    assert np.abs(w).max() >= bound * (1 - min(0.5, 20 / n)), what
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 5 * 0.45 / math.sqrt(n), what
    assert abs(w.mean()) < 5 * bound / math.sqrt(3 * n), what


def assert_normal(w, std: float, what: str):
    """w ~ N(0, std^2), untruncated at +-2 std (timm's trunc_normal_ cuts at +-2 absolute)."""
    w = np.asarray(w, np.float64).ravel()
    n = w.size
    assert abs(w.std() / std - 1) < 5 / math.sqrt(2 * n), what
    assert abs(w.mean()) < 5 * std / math.sqrt(n), what
    assert np.abs(w).max() > 3 * std, what  # a normal tail, not xavier's box or a 2-sigma cut


def assert_const(w, value: float, what: str):
    assert np.all(np.asarray(w) == value), what


def stacked(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def test_vig_init_follows_the_official_formulas(vig_t):
    """vig.py: N(0, .02) Linear, then xavier(2^-2.5) in the mixer; torch default stem convs."""
    d = vig_t.embed_dim
    mixers = [b.attn for b in vig_t.blocks]

    def xavier(fan_in, fan_out):
        return XAVIER_GAIN * math.sqrt(6 / (fan_in + fan_out))

    group = lambda f: stacked(f(m) for m in mixers)  # noqa: E731
    assert_uniform(group(lambda m: m.in_proj.kernel), xavier(9, 9 * d), "dwconv")
    assert_uniform(group(lambda m: m.qkv_proj.kernel), xavier(d, 2 * d), "qkv (fused fans)")
    assert_uniform(group(lambda m: m.gk_proj[0].kernel), xavier(d, 16), "gk_proj.0")
    assert_uniform(group(lambda m: m.gk_proj[1].kernel), xavier(16, d), "gk_proj.1")
    assert_uniform(group(lambda m: m.g_proj.kernel), xavier(d, d), "g_proj")
    assert_uniform(group(lambda m: m.o_proj.kernel), xavier(d, d), "o_proj")
    assert_const(group(lambda m: m.gk_proj[1].bias), 0.0, "gk_proj.1 bias")
    assert_const(group(lambda m: m.g_proj.bias), 0.0, "g_proj bias")
    assert_normal(stacked(b.mlp.gate_proj.kernel for b in vig_t.blocks), 0.02, "gate_proj")
    assert_normal(stacked(b.mlp.down_proj.kernel for b in vig_t.blocks), 0.02, "down_proj")
    assert_normal(vig_t.head.kernel, 0.02, "head")
    assert_const(vig_t.head.bias, 0.0, "head bias")
    assert_normal(vig_t.pos_embed, 0.02, "pos_embed")
    stem = vig_t.patch_embed
    for conv, fan_in in ((stem.conv1, 3 * 9 * 9), (stem.conv2, d // 2 * 9)):
        assert_uniform(conv.kernel, 1 / math.sqrt(fan_in), "stem conv (kaiming a=sqrt5)")
        assert np.abs(np.asarray(conv.bias)).max() <= 1 / math.sqrt(fan_in)
        assert np.std(np.asarray(conv.bias)) > 0.3 / math.sqrt(fan_in)
    scales = [stem.norm1.scale, stem.norm2.scale, vig_t.norm.scale]
    scales += [b.attn_norm.scale for b in vig_t.blocks] + [b.mlp_norm.scale for b in vig_t.blocks]
    scales += [m.g_norm.scale for m in mixers] + [m.l_norm.scale for m in mixers]
    assert_const(stacked(scales), 1.0, "norm scales")
    assert_const(stacked([stem.norm1.bias, stem.norm2.bias]), 0.0, "stem LN bias")


def test_vig_h_init_follows_the_official_formulas():
    """vig_h.py: trunc_normal(.02) on every Linear/Linear2d AFTER the mixer's xavier, which
    survives only on the depthwise conv; stem and downsampling convs keep torch's default.
    The init code does not depend on depth or width, so a small two-stage config is used."""
    cfg = ViGHConfig(64, (2, 1), (2, 4), drop_path_rate=0.0)
    model = ViGH(cfg, num_classes=100, img_size=32, rngs=nnx.Rngs(0))
    blocks = [b for stage in model.layers for b in stage.blocks]
    for dim in cfg.dims:
        convs = [b.op.in_proj.kernel for b in blocks if b.op.dim == dim]
        assert_uniform(stacked(convs), XAVIER_GAIN * math.sqrt(6 / (9 + 9 * dim)), "dwconv")
    linears = {
        "qkv": [b.op.qkv_proj for b in blocks],
        "gk0": [b.op.gk_proj[0] for b in blocks],
        "gk1": [b.op.gk_proj[1] for b in blocks],
        "g": [b.op.g_proj for b in blocks],
        "o": [b.op.o_proj for b in blocks],
        "fc1": [b.mlp.fc1 for b in blocks],
        "fc2": [b.mlp.fc2 for b in blocks],
        "head": [model.classifier.head],
    }
    for what, layers in linears.items():
        assert_normal(stacked(m.kernel for m in layers), 0.02, what)
        biases = [m.bias for m in layers if m.bias is not None]
        if biases:
            assert_const(stacked(biases), 0.0, f"{what} bias")
    down = model.layers[0].downsample.conv
    stem = model.patch_embed
    for conv, fan_in in ((stem.conv1, 27), (stem.conv2, 32 * 9), (down, 64 * 9)):
        assert_uniform(conv.kernel, 1 / math.sqrt(fan_in), "conv (kaiming a=sqrt5)")
        assert np.abs(np.asarray(conv.bias)).max() <= 1 / math.sqrt(fan_in)
    norms = [stem.norm1, stem.norm2, model.layers[0].downsample.norm, model.classifier.norm]
    norms += [b.norm for b in blocks] + [b.norm2 for b in blocks]
    assert_const(stacked(n.scale for n in norms), 1.0, "LN scale")
    assert_const(stacked(n.bias for n in norms), 0.0, "LN bias")
    assert_const(stacked([b.op.g_norm.scale for b in blocks]), 1.0, "g_norm")
