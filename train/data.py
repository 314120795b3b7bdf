"""Grain input pipelines: image-folder trees, TFDS datasets on disk, the bundled mini set, fakes.

Every source is a random-access ``grain.sources.RandomAccessDataSource`` of dicts
``{"image": <encoded bytes or uint8 [H, W, 3]>, "label": int, "name": str}``. The pipeline is

    source -> shuffle -> repeat -> random_map(decode + host augment) -> [process::processes]
      -> to_iter_dataset (read_threads) -> skip corrupt images (counted) -> batch
      -> mp_prefetch (num_workers processes; train only)

and yields per-host batches of NumPy arrays:

    train: {"image": uint8 [b, S, S, 3], "label": int32 [b], "skipped": int32 [b]}
    eval:  {"image": uint8 [b, S, S, 3], "label": int32 [b], "mask": bool [b], "skipped": ...}

where ``b = global_batch / jax.process_count()``. ``skipped[i]`` counts the unreadable images
dropped just before example i, so ``batch["skipped"].sum()`` is exact in the main process even
with worker processes. The train iterator is a Grain ``DatasetIterator``: its state goes into
each checkpoint so that a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from train import augment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".JPEG", ".JPG", ".PNG")
BUNDLED_ROOT = Path(__file__).resolve().parent / "data" / "cifar10_mini"
SOURCES = ("image_folder", "bundled", "tfds", "fake")


class DatasetNotFoundError(FileNotFoundError):
    """A configured dataset is not where the config says; the message says how to provide it."""


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class ImageFolderSource(grain.sources.RandomAccessDataSource):
    """``<root>/<class>/<image>`` (the ImageNet / torchvision ``ImageFolder`` layout).

    Classes are the sorted sub-directory names (label = index); images are sorted by path.
    Reading is lazy: ``source[i]`` returns the encoded bytes (``b""`` if unreadable).
    """

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(f"image folder {root} does not exist")
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not found:
            raise DatasetNotFoundError(f"image folder {root} has no class sub-directories")
        if classes is not None and found != classes:
            raise ValueError(
                f"{root} has classes {found[:5]}... ({len(found)}); expected the training "
                f"split's {classes[:5]}... ({len(classes)})"
            )
        self.root = root
        self.classes = found
        self._items: list[tuple[str, int]] = []
        for label, name in enumerate(found):
            files = sorted(f for f in os.listdir(root / name) if f.endswith(IMAGE_EXTENSIONS))
            self._items.extend((os.path.join(name, f), label) for f in files)
        if not self._items:
            raise DatasetNotFoundError(
                f"image folder {root} has class directories but no images ({IMAGE_EXTENSIONS})"
            )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel, label = self._items[index]
        try:
            with open(self.root / rel, "rb") as f:
                data = f.read()
        except OSError as err:
            logging.warning("cannot read %s: %s", self.root / rel, err)
            data = b""
        return {"image": data, "label": label, "name": rel}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root}, {len(self)} images, {len(self.classes)} classes)"


class TfdsSource(grain.sources.RandomAccessDataSource):
    """A TFDS dataset already prepared on disk (ArrayRecord), read without TensorFlow.

    TFDS decodes images with NumPy/PIL (or OpenCV) in this mode; a record that fails to read
    or decode comes out as an empty image, which the pipeline counts as corrupt and skips.
    """

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as err:  # noqa: BLE001 - TFDS raises many types for "not there".
            where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} split {split!r} is not prepared under {where} ({err}). "
                f"Prepare it once with `tfds build {name} --data_dir {where} "
                f"--file_format array_record` (imagenet2012 needs its manual download in "
                f"<data_dir>/downloads/manual), or set --config.data.tfds_data_dir."
            ) from err
        self.name = name
        self.classes = list(self._source.dataset_info.features["label"].names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            record = self._source[index]
        except Exception as err:  # noqa: BLE001 - a bad record must not stop the run.
            logging.warning("cannot read record %d of %s: %s", index, self.name, err)
            return {"image": b"", "label": 0, "name": f"{self.name}[{index}]"}
        return {"image": record["image"], "label": int(record["label"]), "name": str(index)}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, {len(self)} records, {len(self.classes)} classes)"


class FakeSource(grain.sources.RandomAccessDataSource):
    """Deterministic random uint8 images (label = index mod num_classes) for tests/benchmarks."""

    def __init__(self, num_examples: int, img_size: int, num_classes: int, seed: int = 0):
        self._n = num_examples
        self._size = img_size
        self._seed = seed
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self._seed, index))
        image = rng.integers(0, 256, (self._size, self._size, 3), dtype=np.uint8)
        return {"image": image, "label": index % len(self.classes), "name": str(index)}

    def __repr__(self) -> str:
        return f"FakeSource({self._n} random {self._size}px images, {len(self.classes)} classes)"


def _folder_hint(root: Path, split: str) -> str:
    return (
        f"Expected {root / split}/<class>/<image>.jpg. Point --config.data.root at the folder "
        f"that holds '{split}/' (for CIFAR-10: mkdir -p DIR && tar -xzf "
        f"../shared/data/cifar10/{split}.tar.gz -C DIR), or use --config.data.source=bundled "
        f"for the bundled mini CIFAR-10 (train/data/cifar10_mini)."
    )


def create_source(
    data_config: ml_collections.ConfigDict, split: str, classes: list[str] | None = None
) -> grain.sources.RandomAccessDataSource:
    """The source named by ``data_config.source`` for ``split``; fails early if missing.

    Args:
      data_config: ``config.data`` (fields ``source``, ``root``, ``tfds_name``,
        ``tfds_data_dir``, ``img_size``, ``num_classes``, ``fake_num_examples``).
      split: directory / TFDS split name, e.g. "train", "val", "test".
      classes: the training split's classes; an eval split must have the same.

    Raises:
      DatasetNotFoundError: naming the path looked at and how to provide the data.
    """
    source = data_config.source
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}; expected one of {SOURCES}")
    if source == "fake":
        n = data_config.fake_num_examples if split == data_config.train_split else 256
        return FakeSource(
            n, data_config.img_size, data_config.num_classes, seed=zlib.crc32(split.encode())
        )
    if source == "tfds":
        return TfdsSource(data_config.tfds_name, split, data_config.tfds_data_dir or None)
    root = BUNDLED_ROOT if source == "bundled" else Path(data_config.root or "").expanduser()
    if source == "image_folder" and not data_config.root:
        raise DatasetNotFoundError(
            "data.source='image_folder' needs --config.data.root. " + _folder_hint(root, split)
        )
    try:
        return ImageFolderSource(root / split, classes)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(f"{err}. {_folder_hint(root, split)}") from None


# ---------------------------------------------------------------------------------------------
# Per-example transforms (run in Grain workers)
# ---------------------------------------------------------------------------------------------


def decode_image(image: Any) -> Image.Image:
    """Encoded bytes or a uint8 [H, W, C] array -> RGB PIL image (raises if undecodable)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        return Image.fromarray(image).convert("RGB")
    img = Image.open(io.BytesIO(image))
    img.load()
    return img.convert("RGB")


@dataclasses.dataclass(frozen=True)
class TrainPreprocess(grain.transforms.RandomMap):
    """Decode + host augmentation; an undecodable image becomes ``{"corrupt": name}``."""

    img_size: int
    rand_augment: str | None

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        try:
            img = decode_image(element["image"])
        except Exception as err:  # noqa: BLE001 - any decode failure means "corrupt".
            logging.warning("skipping unreadable image %s: %s", element["name"], err)
            return {"corrupt": element["name"]}
        image = augment.train_transform(
            img, self.img_size, rng, rand_augment_spec=self.rand_augment
        )
        return {"image": image, "label": np.int32(element["label"])}


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
    """Decode + resize/center crop; an undecodable image becomes ``{"corrupt": name}``."""

    img_size: int

    def map(self, element: dict) -> dict:
        try:
            img = decode_image(element["image"])
        except Exception as err:  # noqa: BLE001
            logging.warning("skipping unreadable image %s: %s", element["name"], err)
            return {"corrupt": element["name"]}
        image = augment.eval_transform(img, self.img_size)
        return {"image": image, "label": np.int32(element["label"]), "mask": np.bool_(True)}


class _SkipCorruptIterator(grain.DatasetIterator):
    """Drops ``{"corrupt": ...}`` elements, attaching the count to the next good element."""

    def __next__(self) -> dict:
        skipped = 0
        while True:
            element = next(self._parent)
            if "corrupt" in element:
                skipped += 1
                continue
            element["skipped"] = np.int32(skipped)
            return element

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)


class SkipCorrupt(grain.IterDataset):
    """IterDataset wrapper that skips corrupt images and counts them (see module doc)."""

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipCorruptIterator(self._parent.__iter__())


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about the training data."""

    num_train: int
    num_eval: int
    classes: list[str]
    train_source: str
    eval_source: str


def _multiprocessing(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers <= 0:
        return ds
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def create_datasets(
    config: ml_collections.ConfigDict,
    *,
    process_index: int,
    process_count: int,
) -> tuple[grain.IterDataset, Any, DatasetInfo]:
    """Builds the train dataset and an eval-batch factory for this host.

    Args:
      config: the full config (uses ``config.data``, ``config.batch_size``, ``config.seed``,
        ``config.aug.rand_augment``).
      process_index, process_count: this host and the number of hosts; each host reads a
        disjoint ``1/process_count`` of every split.

    Returns:
      (train IterDataset of per-host batches (infinite), ``eval_batches()`` -> iterator of
      per-host eval batches padded to the same count on every host, DatasetInfo).
    """
    dc = config.data
    if config.batch_size % process_count:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by {process_count} processes"
        )
    host_batch = config.batch_size // process_count
    train_src = create_source(dc, dc.train_split)
    classes = list(train_src.classes)
    if len(classes) != dc.num_classes:
        raise ValueError(
            f"{train_src!r} has {len(classes)} classes; config.data.num_classes is {dc.num_classes}"
        )
    eval_src = create_source(dc, dc.eval_split, classes if dc.source != "fake" else None)
    if len(train_src) < config.batch_size:
        raise ValueError(
            f"{train_src!r} has {len(train_src)} images, fewer than batch_size={config.batch_size}"
        )

    # Every host walks the same global shuffled, augmented stream (lazily: it decodes only its
    # own elements) and takes every process_count-th element. Global batch s is then the same
    # images with the same augmentation whatever the number of hosts (rows in host order).
    # Slicing the source before shuffling would give every host the same permutation and the
    # same augmentation draws, so a global batch would hold runs of neighbouring images.
    train = grain.MapDataset.source(train_src).seed(config.seed).shuffle().repeat()
    train = train.random_map(TrainPreprocess(dc.img_size, config.aug.rand_augment or None))
    train = train[process_index::process_count]
    read = grain.ReadOptions(num_threads=dc.read_threads, prefetch_buffer_size=2 * host_batch)
    train_iter = SkipCorrupt(train.to_iter_dataset(read)).batch(host_batch, drop_remainder=True)
    train_iter = _multiprocessing(train_iter, dc.num_workers)

    eval_host = grain.MapDataset.source(eval_src)[process_index::process_count]
    per_host = -(-len(eval_src) // process_count)
    num_eval_batches = -(-per_host // host_batch)
    # Threads, not processes: an eval pass is short and worker start-up would dominate it.
    eval_ds = SkipCorrupt(eval_host.map(EvalPreprocess(dc.img_size)).to_iter_dataset(read))
    eval_ds = eval_ds.batch(host_batch, drop_remainder=False)

    def eval_batches() -> Iterator[dict[str, np.ndarray]]:
        """Per-host eval batches, every one of ``host_batch`` rows (mask marks the real ones)."""
        produced = 0
        for batch in eval_ds:
            yield pad_batch(batch, host_batch)
            produced += 1
        empty = {
            "image": np.zeros((host_batch, dc.img_size, dc.img_size, 3), np.uint8),
            "label": np.zeros((host_batch,), np.int32),
            "mask": np.zeros((host_batch,), bool),
            "skipped": np.zeros((host_batch,), np.int32),
        }
        for _ in range(num_eval_batches - produced):  # Same number of batches on every host.
            yield empty

    info = DatasetInfo(
        num_train=len(train_src),
        num_eval=len(eval_src),
        classes=classes,
        train_source=repr(train_src),
        eval_source=repr(eval_src),
    )
    return train_iter, eval_batches, info


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads every array of ``batch`` along axis 0 to ``size`` rows with zeros (mask False)."""
    n = len(batch["label"])
    if n == size:
        return batch
    if n > size:
        raise ValueError(f"batch of {n} rows is larger than {size}")
    return {
        k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }
