"""Data augmentation of the official ViG recipe (timm 0.4.12 ``create_transform`` + ``Mixup``).

Two halves:

* Per-image host ops (PIL / NumPy, run in Grain workers, randomness from the
  ``np.random.Generator`` Grain hands to ``random_map``): random-resized crop (bicubic) or,
  for 32-px inputs, random crop with 4-px zero padding (as the official ``build_transform``),
  horizontal flip, and RandAugment ``rand-m9-mstd0.5-inc1``; eval resize + center crop.
  They return uint8 images so that a quarter of the bytes cross to the accelerator.
* Per-batch device ops (JAX, inside the jitted train step, randomness from a JAX key):
  normalisation, random erasing (``pixel`` mode, p=0.25), and mixup 0.8 / cutmix 1.0 with
  switch probability 0.5 and label smoothing 0.1 (timm's batch mode: one lambda per batch,
  mixed with the batch in reversed order).

Written from the timm / official definitions in vig-reference.md section 10; no code copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_LEVEL = 10.0

# ---------------------------------------------------------------------------------------------
# Host side: crops and flips
# ---------------------------------------------------------------------------------------------


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """timm ``RandomResizedCropAndInterpolation`` (bicubic): a random area/aspect crop.

    Args:
      img: input image, any size.
      size: output height = width.
      rng: randomness.
      scale: range of the crop's area as a fraction of the image's.
      ratio: range of the crop's aspect ratio w/h (sampled log-uniformly).

    Returns:
      A ``size`` x ``size`` image.
    """
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # Central crop with the aspect ratio clamped into range.
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def random_crop_with_padding(
    img: Image.Image, size: int, padding: int, rng: np.random.Generator
) -> Image.Image:
    """torchvision ``RandomCrop(size, padding)``: zero-pad every side, then a random crop."""
    arr = np.asarray(img)
    arr = np.pad(arr, ((padding, padding), (padding, padding), (0, 0)))
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image of {img.size} padded by {padding} is smaller than {size}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return Image.fromarray(arr[top : top + size, left : left + size])


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 224 / 256) -> Image.Image:
    """Eval transform: bicubic resize of the shorter side to ``size / crop_pct``, center crop.

    For ``size <= 32`` (CIFAR) the official code only resizes to ``size`` x ``size``.
    """
    if size <= 32:
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return img
    short = int(math.floor(size / crop_pct))
    width, height = img.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------
# Host side: RandAugment rand-m9-mstd0.5-inc1
# ---------------------------------------------------------------------------------------------


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, coeffs: tuple, fill: tuple[int, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=fill)


def _rotate(img, level, rng, fill):
    return img.rotate(_signed(level / _MAX_LEVEL * 30.0, rng), Image.BICUBIC, fillcolor=fill)


def _shear_x(img, level, rng, fill):
    return _affine(img, (1, _signed(level / _MAX_LEVEL * 0.3, rng), 0, 0, 1, 0), fill)


def _shear_y(img, level, rng, fill):
    return _affine(img, (1, 0, 0, _signed(level / _MAX_LEVEL * 0.3, rng), 1, 0), fill)


def _translate_x(img, level, rng, fill):
    pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0), fill)


def _translate_y(img, level, rng, fill):
    pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, pixels), fill)


def _posterize_increasing(img, level, rng, fill):
    bits = 4 - int(level / _MAX_LEVEL * 4)  # 4 (level 0) .. 0 (level 10)
    # Keep the top ``bits`` bits; 0 bits gives black, as PIL's posterize did before it
    # started refusing 0.
    mask = (0xFF << (8 - bits)) & 0xFF
    return Image.fromarray(np.asarray(img) & np.uint8(mask))


def _solarize_increasing(img, level, rng, fill):
    return ImageOps.solarize(img, 256 - int(level / _MAX_LEVEL * 256))


def _solarize_add(img, level, rng, fill):
    add = int(level / _MAX_LEVEL * 110)
    arr = np.asarray(img).astype(np.int32)
    arr = np.where(arr < 128, np.minimum(arr + add, 255), arr)
    return Image.fromarray(arr.astype(np.uint8))


def _enhance_increasing(enhancer) -> Callable:
    def op(img, level, rng, fill):
        return enhancer(img).enhance(1.0 + _signed(level / _MAX_LEVEL * 0.9, rng))

    return op


RAND_AUGMENT_OPS: dict[str, Callable] = {
    "AutoContrast": lambda img, level, rng, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng, fill: ImageOps.equalize(img),
    "Invert": lambda img, level, rng, fill: ImageOps.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance_increasing(ImageEnhance.Color),
    "ContrastIncreasing": _enhance_increasing(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance_increasing(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance_increasing(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


def parse_rand_augment(spec: str) -> dict:
    """Parses a timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``.

    Returns:
      dict(num_layers, magnitude, magnitude_std); only the increasing op set ("inc1") is
      implemented, as the official recipe uses it.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r}; expected it to start with 'rand-'")
    out = dict(num_layers=2, magnitude=10.0, magnitude_std=0.0)
    increasing = False
    for part in parts[1:]:
        if part.startswith("mstd"):
            out["magnitude_std"] = float(part[4:])
        elif part.startswith("m"):
            out["magnitude"] = float(part[1:])
        elif part.startswith("n"):
            out["num_layers"] = int(part[1:])
        elif part.startswith("inc"):
            increasing = bool(int(part[3:]))
        else:
            raise ValueError(f"unknown RandAugment part {part!r} in {spec!r}")
    if not increasing:
        raise ValueError(f"RandAugment spec {spec!r}: only the 'inc1' op set is implemented")
    return out


def rand_augment(
    img: Image.Image,
    rng: np.random.Generator,
    *,
    num_layers: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
    fill: tuple[int, ...] = tuple(round(255 * m) for m in IMAGENET_MEAN),
) -> Image.Image:
    """timm ``RandAugment`` with the increasing op set: ``num_layers`` ops drawn with
    replacement, each applied with probability ``prob`` at a magnitude drawn from
    N(magnitude, magnitude_std) clipped to [0, 10]."""
    names = list(RAND_AUGMENT_OPS)
    for idx in rng.choice(len(names), size=num_layers, replace=True):
        if rng.random() > prob:
            continue
        level = magnitude
        if magnitude_std > 0:
            level = rng.normal(magnitude, magnitude_std)
        level = float(min(_MAX_LEVEL, max(0.0, level)))
        img = RAND_AUGMENT_OPS[names[idx]](img, level, rng, fill)
    return img


def train_transform(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    *,
    rand_augment_spec: str | None = "rand-m9-mstd0.5-inc1",
    hflip: float = 0.5,
) -> np.ndarray:
    """Host half of the training transform: crop, flip, RandAugment.

    Args:
      img: decoded RGB image of any size.
      size: output height = width.
      rng: randomness.
      rand_augment_spec: timm RandAugment string, or None/"" for none.
      hflip: probability of a horizontal flip.

    Returns:
      [size, size, 3] uint8.
    """
    if size <= 32:
        img = img.resize((size, size), Image.BICUBIC) if img.size != (size, size) else img
        img = random_crop_with_padding(img, size, 4, rng)
    else:
        img = random_resized_crop(img, size, rng)
    if rng.random() < hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if rand_augment_spec:
        img = rand_augment(img, rng, **parse_rand_augment(rand_augment_spec))
    return np.asarray(img, dtype=np.uint8)


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    """Host eval transform: [size, size, 3] uint8 (resize + center crop)."""
    return np.asarray(resize_center_crop(img, size), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Device side (JAX)
# ---------------------------------------------------------------------------------------------


def normalize(
    images: jax.Array,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
    """[B, H, W, 3] uint8 -> float32 ``(x / 255 - mean) / std``."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _erase_box(key: jax.Array, height: int, width: int, attempts: int = 10):
    """One timm RandomErasing box: (top, left, h, w, found) from up to ``attempts`` tries."""
    k_area, k_aspect, k_top, k_left = jax.random.split(key, 4)
    area = height * width
    target = jax.random.uniform(k_area, (attempts,), minval=0.02, maxval=1 / 3) * area
    log_aspect = jax.random.uniform(
        k_aspect, (attempts,), minval=math.log(0.3), maxval=math.log(1 / 0.3)
    )
    aspect = jnp.exp(log_aspect)
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits)
    h, w, found = h[first], w[first], fits[first]
    top = jax.random.randint(k_top, (), 0, height - h + 1)
    left = jax.random.randint(k_left, (), 0, width - w + 1)
    return top, left, h, w, found


def random_erasing(key: jax.Array, x: jax.Array, prob: float = 0.25) -> jax.Array:
    """timm ``RandomErasing(mode="pixel", count 1)`` per image, on normalised images.

    With probability ``prob`` an image gets one rectangle (area 2%..33%, aspect 0.3..3.3)
    filled with N(0, 1) noise per pixel and channel.

    Args:
      key: JAX PRNG key.
      x: [B, H, W, C] float images (normalised).
      prob: probability per image.

    Returns:
      [B, H, W, C], same dtype.
    """
    if prob <= 0:
        return x
    b, height, width, _ = x.shape
    k_apply, k_box, k_noise = jax.random.split(key, 3)
    apply = jax.random.uniform(k_apply, (b,)) < prob
    top, left, h, w, found = jax.vmap(lambda k: _erase_box(k, height, width))(
        jax.random.split(k_box, b)
    )
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + w)[:, None, None])
    )
    erase = inside & (apply & found)[:, None, None]
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    return jnp.where(erase[..., None], noise, x)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """[B] int -> [B, K] float32 with ``1 - s + s/K`` on the label and ``s/K`` elsewhere."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int):
    """timm ``rand_bbox``: a box of side ``sqrt(1 - lam)`` times the image, clipped."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(jnp.int32)
    cut_w = (width * ratio).astype(jnp.int32)
    k_y, k_x = jax.random.split(key)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy + cut_h // 2, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def mixup_cutmix(
    key: jax.Array,
    x: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """timm ``Mixup(mode="batch", correct_lam=True)``: mixes the batch with its reverse.

    With probability ``prob``, draw cutmix (probability ``switch_prob`` when both alphas are
    positive) or mixup with ``lam ~ Beta(alpha, alpha)``. Cutmix pastes a box of the reversed
    batch and sets ``lam`` to the unpasted area fraction. Targets are
    ``lam * smooth(y) + (1 - lam) * smooth(reverse(y))``.

    Args:
      key: JAX PRNG key.
      x: [B, H, W, C] float images.
      labels: [B] int labels.
      num_classes: K.
      mixup_alpha, cutmix_alpha: Beta parameters (0 disables that mode).
      switch_prob: probability of cutmix when both are enabled.
      prob: probability of mixing a batch at all.
      label_smoothing: smoothing of the one-hot targets.

    Returns:
      (mixed images [B, H, W, C], soft targets [B, K] float32 whose rows sum to 1).
    """
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0 or prob <= 0:
        return x, targets
    _, height, width, _ = x.shape
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
    apply = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
    y0, y1, x0, x1 = _cutmix_box(k_box, lam_cut, height, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam_cut = 1.0 - box.sum() / (height * width)

    flipped = x[::-1]
    mixed_cut = jnp.where(box[None, :, :, None], flipped, x)
    lam_m = lam_mix.astype(x.dtype)
    mixed_mix = x * lam_m + flipped * (1 - lam_m)
    mixed = jnp.where(use_cutmix, mixed_cut, mixed_mix)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    x = jnp.where(apply, mixed, x)
    lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return x, targets
