"""Grain input pipeline (train/data.py): sources, corrupt images, determinism, host sharding."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import default
from train import data

CLASSES = ["cat", "dog", "emu"]


def _write_folder(root: Path, split: str, per_class: int, size: int = 12) -> None:
    rng = np.random.default_rng(len(split))
    for label, name in enumerate(CLASSES):
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.full((size, size, 3), 40 * label, np.uint8) + rng.integers(
                0, 20, (size, size, 3), dtype=np.uint8
            )
            Image.fromarray(arr).save(d / f"{i:03d}.png")


def _config(root: Path, batch: int = 4, img: int = 8):
    c = default.get_config("quick")
    c.data.source = "image_folder"
    c.data.root = str(root)
    c.data.img_size = img
    c.data.num_classes = len(CLASSES)
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.num_workers = 0
    c.data.read_threads = 2
    c.batch_size = batch
    return c


@pytest.fixture
def folder(tmp_path):
    _write_folder(tmp_path, "train", 4)
    _write_folder(tmp_path, "test", 3)
    return tmp_path


def test_image_folder_source_lists_classes_and_labels(folder):
    src = data.ImageFolderSource(folder / "train")
    assert src.classes == CLASSES and len(src) == 12
    labels = [src[i]["label"] for i in range(len(src))]
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    assert isinstance(src[0]["image"], bytes) and src[0]["name"] == "cat/000.png"


def test_missing_dataset_names_the_path_and_the_remedy(tmp_path):
    c = _config(tmp_path / "nowhere")
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.create_datasets(c, process_index=0, process_count=1)
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "train") in msg
    assert "--config.data.root" in msg and "tar -xzf" in msg


def test_missing_root_setting_is_reported(tmp_path):
    c = _config(tmp_path)
    c.data.root = ""
    with pytest.raises(data.DatasetNotFoundError, match="needs --config.data.root"):
        data.create_datasets(c, process_index=0, process_count=1)


def test_eval_split_with_other_classes_is_refused(folder):
    (folder / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match="expected the training split's"):
        data.create_datasets(_config(folder), process_index=0, process_count=1)


def test_train_batches_shapes_dtypes(folder):
    train, _, info = data.create_datasets(_config(folder), process_index=0, process_count=1)
    assert info.num_train == 12 and info.num_eval == 9 and info.classes == CLASSES
    batch = next(iter(train))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["skipped"].sum() == 0


def test_corrupt_and_unreadable_images_are_skipped_and_counted(folder):
    (folder / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg at all")
    (folder / "train" / "emu" / "dir.jpg").mkdir()  # open() fails: unreadable.
    (folder / "test" / "cat" / "bad.png").write_bytes(b"\x89PNG garbage")
    c = _config(folder, batch=2)
    train, eval_batches, info = data.create_datasets(c, process_index=0, process_count=1)
    assert info.num_train == 14  # Listed, found bad only when read.
    it = iter(train)
    skipped = sum(int(next(it)["skipped"].sum()) for _ in range(6))  # One epoch: 12 good.
    assert skipped == 2
    batches = list(eval_batches())
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    assert sum(int(b["mask"].sum()) for b in batches) == 9


def test_iterator_state_restores_the_same_batches(folder):
    train, _, _ = data.create_datasets(_config(folder), process_index=0, process_count=1)
    it = iter(train)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # Crosses an epoch boundary (3 batches/epoch).
    it2 = iter(train)
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_epochs_are_reshuffled_and_augmented_differently(folder):
    train, _, _ = data.create_datasets(_config(folder), process_index=0, process_count=1)
    it = iter(train)
    epoch1 = [next(it) for _ in range(3)]
    epoch2 = [next(it) for _ in range(3)]
    labels1 = np.concatenate([b["label"] for b in epoch1])
    assert sorted(labels1) == [0] * 4 + [1] * 4 + [2] * 4  # Each image once per epoch.
    assert not all(
        np.array_equal(a["image"], b["image"]) for a, b in zip(epoch1, epoch2, strict=True)
    )


def test_hosts_read_disjoint_shards_and_the_same_number_of_eval_batches(folder):
    c = _config(folder, batch=4)
    per_host = []
    for pid in range(2):
        _, eval_batches, _ = data.create_datasets(c, process_index=pid, process_count=2)
        batches = list(eval_batches())
        assert all(b["image"].shape[0] == 2 for b in batches)  # 4 global / 2 hosts.
        per_host.append(batches)
    assert len(per_host[0]) == len(per_host[1])
    total = sum(int(b["mask"].sum()) for batches in per_host for b in batches)
    assert total == 9


def test_eval_batches_are_padded_with_a_mask(folder):
    _, eval_batches, _ = data.create_datasets(_config(folder), process_index=0, process_count=1)
    batches = list(eval_batches())
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 1]
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_eval_images_are_center_crops_of_the_decoded_image(folder):
    _, eval_batches, _ = data.create_datasets(
        _config(folder, img=12), process_index=0, process_count=1
    )
    first = next(iter(eval_batches()))["image"][0]
    src = np.asarray(Image.open(folder / "test" / "cat" / "000.png").convert("RGB"))
    np.testing.assert_array_equal(first, src)  # 12 px <= 32: resized to itself.


def test_fake_source_is_deterministic():
    a, b = data.FakeSource(10, 8, 4, seed=1), data.FakeSource(10, 8, 4, seed=1)
    np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
    assert a[3]["label"] == 3 and a[7]["label"] == 3
    assert not np.array_equal(a[3]["image"], a[4]["image"])


def test_decode_accepts_arrays_and_bytes():
    arr = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(data.decode_image(buf.getvalue())), arr)
    np.testing.assert_array_equal(np.asarray(data.decode_image(arr)), arr)
    gray = arr[..., :1]
    assert data.decode_image(gray).mode == "RGB"


def test_bundled_mini_cifar10_is_balanced_and_small():
    root = data.BUNDLED_ROOT
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    for split, per_class in (("train", 500), ("test", 100)):
        src = data.ImageFolderSource(root / split)
        assert len(src.classes) == 10
        counts = np.bincount([src[i]["label"] for i in range(len(src))])
        assert counts.tolist() == [per_class] * 10
    assert (root / "README.md").exists()


def test_tfds_dataset_not_prepared_is_reported(tmp_path):
    c = _config(tmp_path)
    c.data.source = "tfds"
    c.data.tfds_name = "mnist"
    c.data.tfds_data_dir = str(tmp_path / "tfds")
    with pytest.raises(data.DatasetNotFoundError, match="tfds build mnist"):
        data.create_source(c.data, "train")


def test_tfds_source_feeds_the_pipeline(tmp_path):
    import tensorflow_datasets as tfds

    c = _config(tmp_path, img=8)
    c.data.source = "tfds"
    c.data.tfds_name = "mnist"
    c.data.num_classes = 10
    with tfds.testing.mock_data(num_examples=20):
        train, eval_batches, info = data.create_datasets(c, process_index=0, process_count=1)
        batch = next(iter(train))
        assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
        assert info.num_train == 20 and len(info.classes) == 10
        assert sum(int(b["mask"].sum()) for b in eval_batches()) == 20
