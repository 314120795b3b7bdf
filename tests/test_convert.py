"""Tests of the checkpoint converter, the torch-free ``.pth`` reader and the CLI.

References: the official key names and shapes of ``official_state_dict.py`` and the float64
NumPy model of ``numpy_vig.py`` (both written from the official code, independently of
vig_jax), tensors written by real PyTorch (``tests/data``), and layout rules restated here.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import types
import zipfile
from unittest import mock

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from numpy_vig import bigla_mixer, swiglu, vig_forward, vig_h_forward
from official_state_dict import official_shapes, official_state_dict

from vig_jax import create_model
from vig_jax.bigla import BiGLA
from vig_jax.convert import (
    RULES,
    CheckpointMismatchError,
    convert_state_dict,
    key_table,
    load_converted,
    load_official_checkpoint,
    select_state_dict,
)
from vig_jax.layers import GatedMlp, SwiGLU, layer_norm
from vig_jax.pth import OpaqueObject, load_pth

DATA = pathlib.Path(__file__).parent / "data"
ROOT = pathlib.Path(__file__).parent.parent
NAMES = ("vig_t", "vig_s", "vig_b", "vig_h_t", "vig_h_s", "vig_h_b")


# ----------------------------------------------------------------------------- helpers
def torch_to_ours(value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> ours, restated: Linear [out,in] -> [in,out]; Conv OIHW -> HWIO."""
    if value.ndim == 2:
        return value.T
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


_RENAMES = {  # official module path -> ours, where an nn.Sequential index has no Python name
    "patch_embed.proj.0": "patch_embed.conv1",
    "patch_embed.proj.1": "patch_embed.norm1",
    "patch_embed.proj.3": "patch_embed.conv2",
    "patch_embed.proj.4": "patch_embed.norm2",
    "patch_embed.0": "patch_embed.conv1",
    "patch_embed.2": "patch_embed.norm1",
    "patch_embed.5": "patch_embed.conv2",
    "patch_embed.7": "patch_embed.norm2",
}


def expected_path(key: str, ndim: int) -> tuple:
    """Where an official tensor must land in our parameter tree."""
    if key == "pos_embed":
        return ("pos_embed",)
    module, leaf = key.rsplit(".", 1)
    module = _RENAMES.get(module, module)
    module = module.replace("in_proj.0", "in_proj")
    module = module.replace("downsample.1", "downsample.conv").replace(
        "downsample.3", "downsample.norm"
    )
    if leaf == "weight":
        leaf = "kernel" if ndim >= 2 else "scale"
    return tuple(int(p) if p.isdigit() else p for p in module.split(".")) + (leaf,)


def flat_params(state: nnx.State) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def write_torch_zip(path, obj) -> None:
    """A minimal ``torch.save`` (zip format) for NumPy arrays, for building test inputs.

    Pickles with the globals torch uses (``torch._utils._rebuild_tensor_v2``,
    ``torch.FloatStorage`` ...) by putting stand-in modules in ``sys.modules`` during the dump.
    """
    storage_names = {
        np.dtype("f4"): "FloatStorage",
        np.dtype("f2"): "HalfStorage",
        np.dtype("i8"): "LongStorage",
    }
    torch_mod, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in storage_names.values():
        setattr(torch_mod, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod._utils = utils
    storages: dict[str, np.ndarray] = {}

    class Storage:
        def __init__(self, array):
            self.key, self.array = str(len(storages)), array
            storages[self.key] = array

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                cls = getattr(torch_mod, storage_names[obj.array.dtype])
                return ("storage", cls, obj.key, "cpu", obj.array.size)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, np.ndarray):
                array = np.ascontiguousarray(obj)
                strides = tuple(s // array.itemsize for s in array.strides)
                args = (
                    Storage(array.ravel()),
                    0,
                    array.shape,
                    strides,
                    False,
                    collections.OrderedDict(),
                )
                return _rebuild_tensor_v2, args
            return NotImplemented

    buffer = io.BytesIO()
    with mock.patch.dict(sys.modules, {"torch": torch_mod, "torch._utils": utils}):
        Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, array in storages.items():
            archive.writestr(
                f"archive/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes()
            )


# ----------------------------------------------------------------------------- the table
@pytest.mark.parametrize("name", NAMES)
def test_key_table_covers_the_official_state_dict(name):
    """Same keys as the official state_dict; each lands where the naming rule says, with a
    shape that is the official one in our layout."""
    table = key_table(name)
    official = official_shapes(name)
    assert set(table) == set(official)
    model = nnx.eval_shape(lambda: create_model(name, implementation="reference"))
    ours = {path: tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {path for path, _ in table.values()} == set(ours)
    for key, shape in official.items():
        path, _ = table[key]
        assert path == expected_path(key, len(shape)), key
        assert ours[path] == torch_to_ours(np.empty(shape, np.uint8)).shape, key


@pytest.mark.parametrize("name", ["vig_t", "vig_h_t"])
def test_every_tensor_lands_in_place_with_our_layout(name):
    state_dict = official_state_dict(name, np.random.default_rng(0), num_classes=10)
    ours = flat_params(convert_state_dict(state_dict, name))
    assert len(ours) == len(state_dict)
    for key, value in state_dict.items():
        path = expected_path(key, value.ndim)
        np.testing.assert_array_equal(ours[path], torch_to_ours(value), err_msg=key)


def test_linear2d_weights_may_be_4d():
    """ViG-H's Linear2d accepts [out, in, 1, 1] (its _load_from_state_dict views it)."""
    state_dict = official_state_dict("vig_h_t", np.random.default_rng(1), num_classes=10)
    key = "layers.2.blocks.1.op.qkv_proj.weight"
    as_conv = dict(state_dict, **{key: state_dict[key][:, :, None, None]})
    a, b = (flat_params(convert_state_dict(sd, "vig_h_t")) for sd in (state_dict, as_conv))
    path = ("layers", 2, "blocks", 1, "op", "qkv_proj", "kernel")
    np.testing.assert_array_equal(a[path], b[path])


# ----------------------------------------------------------------------------- layout semantics
def test_layout_rules_reproduce_torch_ops(x64):
    """Conv / Linear / LayerNorm outputs with converted weights equal PyTorch's (float64)."""
    ref = np.load(DATA / "torch_reference.npz")
    rngs = nnx.Rngs(0)
    f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
    for name, stride, groups in (("stem", 8, 1), ("stride2", 2, 1), ("depthwise", 1, 6)):
        x, w = ref[f"conv/{name}/x"], ref[f"conv/{name}/weight"]
        bias = f"conv/{name}/bias" in ref.files
        conv = nnx.Conv(
            x.shape[1],
            w.shape[0],
            kernel_size=w.shape[2:],
            strides=stride,
            padding=((1, 1), (1, 1)),
            feature_group_count=groups,
            use_bias=bias,
            rngs=rngs,
            **f64,
        )
        conv.kernel.set_value(jnp.asarray(RULES["conv"](w)))
        if bias:
            conv.bias.set_value(jnp.asarray(ref[f"conv/{name}/bias"]))
        y = np.asarray(conv(jnp.asarray(x.transpose(0, 2, 3, 1))))
        np.testing.assert_allclose(
            y, ref[f"conv/{name}/y"].transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12
        )
    linear = nnx.Linear(6, 5, rngs=rngs, **f64)
    linear.kernel.set_value(jnp.asarray(RULES["linear"](ref["linear/weight"])))
    linear.bias.set_value(jnp.asarray(ref["linear/bias"]))
    np.testing.assert_allclose(linear(jnp.asarray(ref["linear/x"])), ref["linear/y"], rtol=1e-12)
    norm = layer_norm(7, rngs=rngs, **f64)
    norm.scale.set_value(jnp.asarray(ref["layer_norm/weight"]))
    norm.bias.set_value(jnp.asarray(ref["layer_norm/bias"]))
    np.testing.assert_allclose(
        norm(jnp.asarray(ref["layer_norm/x"])), ref["layer_norm/y"], rtol=1e-10, atol=1e-12
    )
    gelu = jax.nn.gelu(jnp.asarray(ref["gelu/x"]), approximate=False)
    np.testing.assert_allclose(gelu, ref["gelu/y"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "name,prefix,ours,dim,heads,acts",
    [
        ("vig_t", "blocks.4.attn", ("blocks", 4, "attn"), 192, 3, True),
        ("vig_h_t", "layers.1.blocks.1.op", ("layers", 1, "blocks", 1, "op"), 192, 6, False),
    ],
)
def test_converted_mixer_equals_the_float64_reference(x64, name, prefix, ours, dim, heads, acts):
    """qkv split, gate split (fwd | bwd), heads, norms and the locality gate, in float64."""
    state_dict = official_state_dict(name, np.random.default_rng(2), num_classes=10)
    state_dict = {k: v.astype(np.float64) for k, v in state_dict.items()}
    state = convert_state_dict(state_dict, name, param_dtype=jnp.float64)
    mixer = BiGLA(
        dim,
        heads,
        conv_act=acts,
        out_act=acts,
        implementation="reference",
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        rngs=nnx.Rngs(0),
    )
    sub = state
    for part in ours:
        sub = sub[part]
    nnx.update(mixer, sub)
    u = np.random.default_rng(3).standard_normal((2, 5, 6, dim))
    ref = bigla_mixer(state_dict, prefix, u, heads, conv_act=acts, out_act=acts)
    np.testing.assert_allclose(np.asarray(mixer(jnp.asarray(u))), ref, rtol=1e-9, atol=1e-11)


def test_converted_mlps_equal_the_float64_reference(x64):
    rng = np.random.default_rng(4)
    for name, cls, keys in (
        ("vig_t", SwiGLU, ("blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.down_proj.weight")),
        (
            "vig_h_t",
            GatedMlp,
            ("layers.0.blocks.0.mlp.fc1.weight", "layers.0.blocks.0.mlp.fc2.weight"),
        ),
    ):
        sd = official_state_dict(name, rng, num_classes=10)
        w_in, w_out = (sd[k].astype(np.float64) for k in keys)
        dim, hidden = w_in.shape[1], w_out.shape[1]
        mlp = cls(dim, hidden, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        first, second = (mlp.gate_proj, mlp.down_proj) if cls is SwiGLU else (mlp.fc1, mlp.fc2)
        first.kernel.set_value(jnp.asarray(RULES["linear"](w_in)))
        second.kernel.set_value(jnp.asarray(RULES["linear"](w_out)))
        x = rng.standard_normal((3, dim))
        np.testing.assert_allclose(
            mlp(jnp.asarray(x)), swiglu(x, w_in, w_out), rtol=1e-10, atol=1e-12
        )


def test_converted_vig_t_equals_the_float64_reference_at_another_resolution(x64):
    """Whole ViG-T (patch 4, pos_embed of a 32-px grid) on 40-px images: resize included."""
    kw = dict(num_classes=10, img_size=32, patch_size=4)
    sd = official_state_dict("vig_t", np.random.default_rng(5), **kw)
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    model = nnx.eval_shape(
        lambda: create_model("vig_t", dtype=jnp.float64, implementation="reference", **kw)
    )
    nnx.update(model, convert_state_dict(sd, "vig_t", patch_size=4, param_dtype=jnp.float64))
    x = np.random.default_rng(6).standard_normal((2, 40, 40, 3))
    out = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
    ref = vig_forward(sd, x, name="vig_t", patch_size=4, train_img_size=32)
    np.testing.assert_allclose(out, ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())


# ----------------------------------------------------------------------------- strictness
@pytest.fixture(scope="module")
def vig_t_state_dict():
    return official_state_dict("vig_t", np.random.default_rng(7), num_classes=10)


def test_missing_keys_are_all_named(vig_t_state_dict):
    sd = dict(vig_t_state_dict)
    del sd["blocks.3.attn.g_proj.bias"], sd["norm.weight"]
    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(sd, "vig_t")
    message = str(info.value)
    assert "missing from the checkpoint: blocks.3.attn.g_proj.bias" in message
    assert "missing from the checkpoint: norm.weight" in message


def test_unexpected_key_is_named(vig_t_state_dict):
    sd = dict(vig_t_state_dict, **{"blocks.0.attn.dirpe": np.zeros(384, np.float32)})
    with pytest.raises(
        CheckpointMismatchError, match="unexpected in the checkpoint: blocks.0.attn.dirpe"
    ):
        convert_state_dict(sd, "vig_t")


def test_misshaped_key_names_both_shapes(vig_t_state_dict):
    key = "blocks.2.mlp.down_proj.weight"
    sd = dict(vig_t_state_dict, **{key: vig_t_state_dict[key].T})
    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(sd, "vig_t")
    message = str(info.value)
    assert f"shape mismatch for {key}: checkpoint (512, 192), model expects (192, 512)" in message
    with pytest.raises(CheckpointMismatchError, match=r"head.weight: checkpoint \(10, 192\)"):
        convert_state_dict(vig_t_state_dict, "vig_t", num_classes=1000)
    conv = "blocks.0.attn.in_proj.0.weight"
    hwio = dict(vig_t_state_dict, **{conv: torch_to_ours(vig_t_state_dict[conv])})
    with pytest.raises(
        CheckpointMismatchError, match=r"in_proj.0.weight: checkpoint \(3, 3, 1, 192\)"
    ):
        convert_state_dict(hwio, "vig_t")


def test_bad_pos_embed_and_unknown_model(vig_t_state_dict):
    sd = dict(vig_t_state_dict, pos_embed=np.zeros((1, 195, 192), np.float32))
    with pytest.raises(CheckpointMismatchError, match="195 tokens is not a square grid"):
        convert_state_dict(sd, "vig_t")
    with pytest.raises(ValueError, match="no checkpoint conversion for model 'vig_x'"):
        convert_state_dict(vig_t_state_dict, "vig_x")


# ----------------------------------------------------------------------------- the .pth reader
def test_pth_reader_reads_a_real_torch_file():
    checkpoint = load_pth(DATA / "tiny_checkpoint.pth")
    expected = np.load(DATA / "tiny_checkpoint_expected.npz")
    assert set(checkpoint) == {"model", "model_ema", "epoch", "max_accuracy", "config", "param"}
    dtypes = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16, "int64": np.int64}
    dtypes |= {"flag": np.bool_, "scalar": np.float32, "empty": np.float32}
    for entry in ("model", "model_ema"):
        tensors = checkpoint[entry]
        assert isinstance(tensors, collections.OrderedDict)
        assert list(tensors)[:3] == ["fp32", "fp16", "bf16"]  # order preserved
        for key, value in tensors.items():
            assert value.dtype == dtypes.get(key, np.float32), key
            assert value.flags.c_contiguous, key
            np.testing.assert_array_equal(
                value.astype(expected[f"{entry}/{key}"].dtype), expected[f"{entry}/{key}"]
            )
        np.testing.assert_array_equal(
            tensors["bf16"].view(np.uint16), expected[f"{entry}/bf16/bits"]
        )
        np.testing.assert_array_equal(tensors["transposed"], tensors["base"].T)
        np.testing.assert_array_equal(tensors["sliced"], tensors["base"][1:, ::2])
        assert tensors["scalar"].shape == () and tensors["empty"].shape == (0, 3)
    assert not np.array_equal(checkpoint["model"]["fp32"], checkpoint["model_ema"]["fp32"])
    assert checkpoint["epoch"] == 7 and checkpoint["max_accuracy"] == 77.2
    np.testing.assert_array_equal(checkpoint["param"], expected["param"])
    config = checkpoint["config"]
    assert isinstance(config, OpaqueObject) and "__main__.Config" in repr(config)
    assert config.state == {"MODEL": {"NAME": "tiny"}}


def test_select_state_dict():
    checkpoint = load_pth(DATA / "tiny_checkpoint.pth")
    assert select_state_dict(checkpoint) is checkpoint["model"]
    assert select_state_dict(checkpoint, use_ema=True) is checkpoint["model_ema"]
    assert select_state_dict(checkpoint, key="model_ema") is checkpoint["model_ema"]
    bare = dict(checkpoint["model"])
    assert select_state_dict(bare) is bare
    with pytest.raises(ValueError, match="no 'ema' entry; top-level keys: .*model_ema"):
        select_state_dict(checkpoint, key="ema")
    with pytest.raises(ValueError, match="no state_dict found"):
        select_state_dict({"epoch": 3, "weights": {}})
    with pytest.raises(ValueError, match="conflict"):
        select_state_dict(checkpoint, key="model", use_ema=True)


def test_pth_reader_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"model": {}, "x": Evil()}, protocol=2))
    loaded = load_pth(evil)
    assert isinstance(loaded["x"], OpaqueObject) and not marker.exists()


def test_pth_reader_rejects_non_zip_files(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a torch.save zip archive"):
        load_pth(legacy)


def test_test_writer_round_trips_through_the_reader(tmp_path):
    """The helper that makes the CLI's input writes what the (torch-verified) reader reads."""
    rng = np.random.default_rng(8)
    obj = {
        "model": collections.OrderedDict(a=rng.standard_normal((3, 2)).astype(np.float16)),
        "n": 1,
    }
    obj["model"]["b"] = np.arange(5, dtype=np.int64)
    write_torch_zip(tmp_path / "x.pth", obj)
    back = load_pth(tmp_path / "x.pth")
    assert back["n"] == 1 and list(back["model"]) == ["a", "b"]
    for key in ("a", "b"):
        np.testing.assert_array_equal(back["model"][key], obj["model"][key])
        assert back["model"][key].dtype == obj["model"][key].dtype


# ----------------------------------------------------------------------------- end to end
def test_cli_converts_a_pth_end_to_end(tmp_path):
    kw = dict(num_classes=10, img_size=32, patch_size=4)
    rng = np.random.default_rng(9)
    model_sd, ema_sd = (
        collections.OrderedDict(
            (k, v.astype(np.float16)) for k, v in official_state_dict("vig_t", rng, **kw).items()
        )
        for _ in range(2)
    )
    pth = tmp_path / "vig_t.pth"
    write_torch_zip(pth, {"model": model_sd, "model_ema": ema_sd, "epoch": 299})
    out_dir = tmp_path / "converted"
    cmd = [sys.executable, "-m", "vig_jax.convert", str(pth), str(out_dir), "--model", "vig_t"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        cmd + ["--ema", "--patch-size", "4"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    count = sum(v.size for v in model_sd.values())
    assert f"converted vig_t ({count:,} parameters)" in result.stdout

    meta = json.loads((out_dir / "model.json").read_text())
    assert meta["model"] == "vig_t" and meta["entry"] == "model_ema"
    assert meta["create_model_kwargs"] == kw
    restored = load_converted(out_dir, implementation="reference")
    expected = convert_state_dict(
        {k: v.astype(np.float32) for k, v in ema_sd.items()}, "vig_t", patch_size=4
    )
    got = flat_params(nnx.state(restored, nnx.Param))
    assert got.keys() == flat_params(expected).keys()
    for path, value in flat_params(expected).items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))

    direct = load_official_checkpoint(pth, "vig_t", patch_size=4, implementation="reference")
    assert direct.num_classes == 10 and direct.img_size == 32
    head = np.asarray(direct.head.kernel)
    np.testing.assert_array_equal(
        head, model_sd["head.weight"].astype(np.float32).T
    )  # default: model
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    assert bool(jnp.all(jnp.isfinite(restored(x))))

    bad = subprocess.run(cmd + ["--key", "nope"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "no 'nope' entry" in bad.stderr


def test_converted_vig_h_equals_the_float64_reference(x64):
    """Whole ViG-H-T on 32-px images (stage grids 8, 4, 2, 1)."""
    sd = official_state_dict("vig_h_t", np.random.default_rng(10), num_classes=10)
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    model = nnx.eval_shape(
        lambda: create_model(
            "vig_h_t",
            num_classes=10,
            img_size=32,
            drop_path_rate=0.0,  # no dropout RNG state: every variable comes from the checkpoint
            dtype=jnp.float64,
            implementation="reference",
        )
    )
    nnx.update(model, convert_state_dict(sd, "vig_h_t", param_dtype=jnp.float64))
    model.eval()
    x = np.random.default_rng(11).standard_normal((1, 32, 32, 3))
    out = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
    ref = vig_h_forward(sd, x, name="vig_h_t")
    np.testing.assert_allclose(out, ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())
