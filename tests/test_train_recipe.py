"""The official recipe in train/trainer.py and configs/: schedule, AdamW + mask + clip, EMA,
per-variant settings. References are written independently in NumPy (PyTorch / timm math)."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_utils import register_tiny_model, tiny_config

from train import sharding, trainer

# vig-reference.md sections 5.1 / 10: (BASE_LR, weight decay, drop path, dtype).
OFFICIAL = {
    "vig_t": (1e-3, 0.05, 0.0, "float32"),
    "vig_s": (5e-4, 0.1, 0.2, "float32"),
    "vig_b": (1e-3, 0.05, 0.5, "float32"),
    "vig_h_t": (8e-4, 0.05, 0.2, "bfloat16"),
    "vig_h_s": (5e-4, 0.05, 0.3, "bfloat16"),
    "vig_h_b": (5e-4, 0.05, 0.6, "bfloat16"),
    "deit_t": (5e-4, 0.05, 0.1, "bfloat16"),
    "deit_s": (5e-4, 0.05, 0.1, "bfloat16"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_encodes_the_official_hyper_parameters(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    lr, wd, dp, dtype = OFFICIAL[name]
    assert (c.optim.lr, c.optim.weight_decay, c.model.drop_path_rate) == (lr, wd, dp)
    assert c.model.name == name and c.model.dtype == dtype and c.model.param_dtype == "float32"
    assert (c.optim.warmup_lr, c.optim.min_lr, c.optim.clip_grad) == (5e-7, 5e-6, 5.0)
    assert (c.ema_decay, c.aug.mixup, c.aug.cutmix, c.aug.label_smoothing) == (
        0.9999,
        0.8,
        1.0,
        0.1,
    )
    assert (c.aug.rand_augment, c.aug.random_erasing) == ("rand-m9-mstd0.5-inc1", 0.25)
    assert c.total_epochs == 300 and c.batch_size == 1024
    quick = importlib.import_module(f"configs.{name}").get_config("quick")
    assert quick.data.source == "bundled" and quick.model.patch_size == 4
    assert quick.data.img_size == 32 and quick.data.num_classes == 10


def test_unknown_config_argument_is_refused():
    with pytest.raises(ValueError, match="quick"):
        importlib.import_module("configs.vig_t").get_config("fast")


def _timm_cosine(step, base, warm_lr, min_lr, warmup, total):
    if step < warmup:
        return warm_lr + step * (base - warm_lr) / warmup
    t = step - warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / (total - warmup)))


def test_lr_schedule_is_timm_cosine_with_warmup_prefix():
    base, warm, low, w, t = 2e-3, 1e-6, 1e-5, 20, 120
    schedule = trainer.lr_schedule(base, warm, low, w, t)
    for step in (0, 1, 7, 19, 20, 21, 64, 119, 120):
        assert float(schedule(step)) == pytest.approx(
            _timm_cosine(step, base, warm, low, w, t), rel=1e-5
        )


def _torch_adamw_reference(params, grads_seq, lrs, wd, decay, clip, b1=0.9, b2=0.999, eps=1e-8):
    """PyTorch clip_grad_norm_ + AdamW (two param groups) in float64."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        coef = clip / (norm + 1e-6)
        if coef < 1:
            g = {k: x * coef for k, x in g.items()}
        for k in p:
            if decay[k]:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def test_optimizer_equals_pytorch_adamw_with_official_groups_and_clip():
    rng = np.random.default_rng(0)
    params = {
        "blocks": {"fc": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}},
        "pos_embed": rng.normal(size=(1, 5, 4)),
        "norm": {"scale": rng.normal(size=(4,))},
        "conv": {"kernel": rng.normal(size=(3, 3, 1, 4))},
    }
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    config = tiny_config()
    config.batch_size = 1024  # lr scale 2
    config.optim.lr = 1e-2
    config.optim.clip_grad = 0.5
    tx, schedule = trainer.create_optimizer(config, total_steps=10, warmup_steps=2)
    grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 3, params)]
    grads_seq += [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)]
    grads_seq += [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)]

    state = tx.init(params)
    p = params
    for g in grads_seq:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)

    flat = lambda t: {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(t)[0]  # noqa: E731
    }
    decay = {
        "['blocks']['fc']['kernel']": True,
        "['blocks']['fc']['bias']": False,
        "['pos_embed']": True,  # Official: no no_weight_decay(), so pos_embed is decayed.
        "['norm']['scale']": False,
        "['conv']['kernel']": True,
    }
    assert flat(trainer.weight_decay_mask(params)) == decay
    lrs = [float(schedule(s)) for s in range(3)]
    assert lrs[0] == pytest.approx(5e-7 * 2, rel=1e-3) and lrs[2] == pytest.approx(2e-2, rel=1e-6)
    want = _torch_adamw_reference(flat(params), [flat(g) for g in grads_seq], lrs, 0.05, decay, 0.5)
    got = flat(p)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_weight_decay_mask_on_a_model():
    register_tiny_model()
    from vig_jax import create_model

    model = create_model("deit_tiny_test", num_classes=4, img_size=8, patch_size=4)
    params = nnx.state(model, nnx.Param)
    mask = trainer.weight_decay_mask(params)
    names = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert names["['pos_embed'].value"] and names["['patch_embed']['kernel'].value"]
    assert names["['blocks'][0]['attn']['qkv']['kernel'].value"]
    assert not names["['blocks'][0]['attn']['qkv']['bias'].value"]
    assert not names["['norm']['scale'].value"]


@pytest.fixture(scope="module")
def tiny_components():
    register_tiny_model()
    config = tiny_config(ema_decay=0.75)
    mesh = sharding.make_mesh(jax.devices()[:1])
    comps = trainer.build_components(config, mesh, 4, total_steps=10, warmup_steps=2)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, 4, (8,), dtype=np.int32),
    }
    return comps, sharding.host_to_global(batch, mesh)


def test_train_step_updates_ema_and_step(tiny_components):
    comps, batch = tiny_components
    state, rngs = comps.init()
    ema0 = jax.tree.map(np.asarray, state.ema_params)
    new, metrics = comps.train_step(state, rngs, batch)
    assert int(new.step) == 1
    for e0, e1, p1 in zip(
        jax.tree.leaves(ema0),
        jax.tree.leaves(new.ema_params),
        jax.tree.leaves(new.params),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(e1), 0.75 * e0 + 0.25 * np.asarray(p1), rtol=1e-6)
    assert np.isfinite(float(metrics["train/loss"]))
    assert float(metrics["train/lr"]) == pytest.approx(5e-7 * 8 / 512)


def test_train_step_is_a_function_of_state_and_batch(tiny_components):
    comps, batch = tiny_components
    s1, rngs = comps.init()
    s2, _ = comps.init()
    a, ma = comps.train_step(s1, rngs, batch)
    b, mb = comps.train_step(s2, rngs, batch)
    assert float(ma["train/loss"]) == float(mb["train/loss"])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Steps differ in their randomness (drop path, mixup, erasing): fold_in(key, step).
    c, mc = comps.train_step(a, rngs, batch)
    assert float(mc["train/loss"]) != float(ma["train/loss"])


def test_eval_step_counts_only_masked_rows(tiny_components):
    comps, batch = tiny_components
    state, rngs = comps.init()
    mask = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    eval_batch = dict(batch, mask=sharding.host_to_global({"m": mask}, comps.mesh)["m"])
    out = jax.device_get(comps.eval_step(state.params, state.model_state, rngs, eval_batch))
    assert float(out["count"]) == 5
    assert 0 <= float(out["top1"]) <= float(out["top5"]) <= 5


def test_bfloat16_compute_with_float32_params():
    register_tiny_model()
    config = tiny_config()
    config.model.dtype = "bfloat16"
    mesh = sharding.make_mesh(jax.devices()[:1])
    comps = trainer.build_components(config, mesh, 4, total_steps=10, warmup_steps=2)
    state, _ = comps.init()
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
