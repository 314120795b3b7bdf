"""Augmentation (train/augment.py): shapes, dtypes, value ranges and mixing arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train import augment


def _image(h=40, w=56, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------ host side


@pytest.mark.parametrize("size", [32, 48])
def test_train_transform_shape_and_dtype(size):
    rng = np.random.default_rng(0)
    for seed in range(8):
        out = augment.train_transform(_image(seed=seed), size, rng)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("size", [32, 48])
def test_eval_transform_shape_and_dtype(size):
    out = augment.eval_transform(_image(), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(augment.RAND_AUGMENT_OPS))
def test_every_rand_augment_op_keeps_size_and_mode(name):
    img = _image(32, 32)
    rng = np.random.default_rng(1)
    for level in (0.0, 5.0, 10.0):
        out = augment.RAND_AUGMENT_OPS[name](img, level, rng, (124, 116, 104))
        assert out.size == img.size and out.mode == "RGB"


def test_rand_augment_at_magnitude_zero_leaves_geometry_alone():
    # Rotate / shear / translate at level 0 are identities (up to resampling at integer
    # offsets, which is exact): the image must be unchanged.
    img = _image(32, 32)
    rng = np.random.default_rng(2)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        out = augment.RAND_AUGMENT_OPS[name](img, 0.0, rng, (0, 0, 0))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_parse_rand_augment():
    assert augment.parse_rand_augment("rand-m9-mstd0.5-inc1") == dict(
        num_layers=2, magnitude=9.0, magnitude_std=0.5
    )
    with pytest.raises(ValueError, match="inc1"):
        augment.parse_rand_augment("rand-m9")
    with pytest.raises(ValueError, match="rand-"):
        augment.parse_rand_augment("auto-m9")


def test_random_resized_crop_full_box_is_a_plain_resize():
    img = _image(40, 40)
    out = augment.random_resized_crop(
        img, 24, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((24, 24), Image.BICUBIC)))


def test_random_crop_with_padding_is_a_shifted_window():
    arr = np.random.default_rng(3).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    out = np.asarray(
        augment.random_crop_with_padding(Image.fromarray(arr), 32, 4, np.random.default_rng(5))
    )
    padded = np.pad(arr, ((4, 4), (4, 4), (0, 0)))
    matches = [
        (i, j)
        for i in range(9)
        for j in range(9)
        if np.array_equal(padded[i : i + 32, j : j + 32], out)
    ]
    assert len(matches) == 1


# ------------------------------------------------------------------------------ device side


def test_normalize_matches_formula():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    got = np.asarray(augment.normalize(jnp.asarray(x)))
    want = (x / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_random_erasing_erases_one_rectangle_of_allowed_area():
    b, h, w = 64, 32, 32
    x = jnp.full((b, h, w, 3), 7.0, jnp.float32)  # N(0, 1) noise never equals 7.
    out = np.asarray(augment.random_erasing(jax.random.key(0), x, prob=1.0))
    assert out.shape == x.shape and out.dtype == np.float32
    erased_any = 0
    for img in out:
        changed = np.any(img != 7.0, axis=-1)
        if not changed.any():
            continue  # No box fitted in 10 attempts (rare).
        erased_any += 1
        rows, cols = np.where(changed)
        box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # One filled rectangle.
        frac = box.size / (h * w)
        assert 0.015 <= frac <= 1 / 3 + 0.05
    assert erased_any >= b * 0.9


def test_random_erasing_probability_zero_is_identity():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(augment.random_erasing(jax.random.key(0), x, prob=0.0)), np.asarray(x)
    )


def test_random_erasing_rate():
    x = jnp.zeros((2000, 16, 16, 1), jnp.float32)
    out = np.asarray(augment.random_erasing(jax.random.key(1), x, prob=0.25))
    rate = np.mean(np.any(out != 0, axis=(1, 2, 3)))
    assert 0.2 < rate < 0.3


def test_smooth_one_hot_values():
    t = np.asarray(augment.smooth_one_hot(jnp.array([2, 0]), 4, 0.1))
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)


def _mix(seed, **kwargs):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.permutation(10)[:8], jnp.int32)  # Distinct labels.
    mixed, targets = augment.mixup_cutmix(jax.random.key(seed), x, labels, 10, **kwargs)
    return np.asarray(x), np.asarray(labels), np.asarray(mixed), np.asarray(targets)


@pytest.mark.parametrize("seed", range(6))
def test_mixup_cutmix_shapes_dtypes_and_label_sums(seed):
    x, labels, mixed, targets = _mix(seed)
    assert mixed.shape == x.shape and mixed.dtype == x.dtype
    assert targets.shape == (8, 10) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
    assert (targets >= 0).all()


def _lam_from_targets(targets, labels, smoothing=0.1, k=10):
    # targets[i, labels[i]] = lam * on + (1 - lam) * off  (labels distinct from the partner's).
    on, off = 1 - smoothing + smoothing / k, smoothing / k
    return (targets[np.arange(len(labels)), labels] - off) / (on - off)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_is_the_convex_combination_with_the_reversed_batch(seed):
    x, labels, mixed, targets = _mix(seed, cutmix_alpha=0.0)
    lam = _lam_from_targets(targets, labels)
    np.testing.assert_allclose(lam, lam[0], atol=1e-5)  # One lambda per batch.
    np.testing.assert_allclose(mixed, lam[0] * x + (1 - lam[0]) * x[::-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_a_box_and_lambda_is_the_kept_area(seed):
    x, labels, mixed, targets = _mix(seed, mixup_alpha=0.0)
    from_self = np.all(mixed == x, axis=-1)
    from_other = np.all(mixed == x[::-1], axis=-1)
    assert np.all(from_self | from_other)
    pasted = ~from_self[0]
    lam = _lam_from_targets(targets, labels)
    np.testing.assert_allclose(lam, 1.0 - pasted.mean(), atol=1e-5)
    if pasted.any():
        rows, cols = np.where(pasted)
        assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_mixing_disabled_gives_smoothed_targets_and_same_images():
    x, labels, mixed, targets = _mix(0, mixup_alpha=0.0, cutmix_alpha=0.0)
    np.testing.assert_array_equal(mixed, x)
    np.testing.assert_allclose(targets, np.asarray(augment.smooth_one_hot(labels, 10, 0.1)))


def test_switch_probability_picks_both_modes():
    kinds = set()
    for seed in range(16):
        x, labels, mixed, _ = _mix(seed)
        is_cut = np.all(np.all(mixed == x, -1) | np.all(mixed == x[::-1], -1))
        kinds.add(bool(is_cut))
    assert kinds == {True, False}


def test_posterize_keeps_the_top_bits():
    img = Image.fromarray(np.full((4, 4, 3), 0b10110111, np.uint8))
    rng = np.random.default_rng(0)
    op = augment.RAND_AUGMENT_OPS["PosterizeIncreasing"]
    assert np.asarray(op(img, 0.0, rng, None))[0, 0, 0] == 0b10110000  # 4 bits
    assert np.asarray(op(img, 5.0, rng, None))[0, 0, 0] == 0b10000000  # 2 bits
    assert np.asarray(op(img, 10.0, rng, None))[0, 0, 0] == 0  # 0 bits
