"""Rebuilds train/data/cifar10_mini from the CIFAR-10 image-folder archives.

Takes the first N_TRAIN (sorted by file name) JPEGs of every class of ``train.tar.gz`` and the
first N_TEST of ``test.tar.gz``, byte for byte (no re-encoding), so the subset is class
balanced and reproducible. Usage (from the repository root):

    python train/data/make_cifar10_mini.py ../shared/data/cifar10 train/data/cifar10_mini
"""

import sys
import tarfile
from collections import defaultdict
from pathlib import Path

N_TRAIN = 500
N_TEST = 100


def extract_subset(archive: Path, out: Path, per_class: int) -> int:
    """Copies the first ``per_class`` images of each class of ``archive`` into ``out``."""
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
            key=lambda m: m.name,
        )
        taken = defaultdict(int)
        for m in members:
            split, cls, name = m.name.split("/")
            if taken[cls] >= per_class:
                continue
            taken[cls] += 1
            dest = out / split / cls / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())
    return sum(taken.values())


def main(src: str, dst: str) -> None:
    src_dir, out = Path(src), Path(dst)
    n_train = extract_subset(src_dir / "train.tar.gz", out, N_TRAIN)
    n_test = extract_subset(src_dir / "test.tar.gz", out, N_TEST)
    print(f"wrote {n_train} train and {n_test} test images under {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
