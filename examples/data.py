"""Datasets for the GOT examples.  All images are float tensors in [0, 1], shape (C, H, W).

* ``digits``  -- scikit-learn's 1797 8x8 handwritten digits (bundled with scikit-learn, so it
  needs no download): pixel values 0..16 scaled to [0, 1], a fixed stratified 70/30 split.
* ``mnist``   -- the four idx ``.gz`` files read with gzip + numpy from ``--data-dir``.
* ``cifar10`` / ``cifar100`` / ``svhn`` -- through torchvision (optional dependency, imported
  only here), from files already on disk.  Nothing is ever downloaded.

Only ``load_datasets`` is meant to be called by the scripts.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("digits", "mnist", "cifar10", "cifar100", "svhn")

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# What torchvision expects under the root directory for each dataset (download=False).
VISION_FILES = {
    "cifar10": [
        "cifar-10-batches-py/" + f
        for f in [
            "data_batch_1",
            "data_batch_2",
            "data_batch_3",
            "data_batch_4",
            "data_batch_5",
            "test_batch",
            "batches.meta",
        ]
    ],
    "cifar100": ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
}


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int


INFO = {
    "digits": DataInfo("digits", 10, 1, 8),
    "mnist": DataInfo("mnist", 10, 1, 28),
    "cifar10": DataInfo("cifar10", 10, 3, 32),
    "cifar100": DataInfo("cifar100", 100, 3, 32),
    "svhn": DataInfo("svhn", 10, 3, 32),
}


def default_data_dir(name: str) -> Path:
    """``<repo>/../shared/data/<name>``: where the project keeps datasets next to the checkout."""
    return REPO_ROOT.parent / "shared" / "data" / name


def load_digits_tensors(split_seed: int = 0, test_fraction: float = 0.3):
    """Return ``(x_train, y_train, x_test, y_test)`` for sklearn's digits, x in [0,1]^(N,1,8,8).

    The split is stratified and depends only on ``split_seed`` (not on the training seed), so
    runs with different seeds are evaluated on the same test points.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te))


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: idx magic number {magic}, expected {expected_magic}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, found {data.size} (truncated file?)")
    return data.reshape(shape)


def load_mnist_tensors(data_dir: Path | None = None):
    """Read MNIST from the idx ``.gz`` files in ``data_dir``: x in [0,1]^(N,1,28,28), y int64."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir("mnist")
    missing = [f for f in MNIST_FILES.values() if not (data_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST files missing in {data_dir}: {', '.join(missing)}. Expected the four idx files "
            f"{', '.join(MNIST_FILES.values())} in that directory (pass --data-dir DIR)."
        )
    # idx magic: 0x00000803 for uint8 3-d images, 0x00000801 for uint8 1-d labels.
    arrays = {k: _read_idx(data_dir / f, 2051 if "images" in k else 2049) for k, f in MNIST_FILES.items()}

    def images(a):
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return (
        images(arrays["train_images"]),
        labels(arrays["train_labels"]),
        images(arrays["test_images"]),
        labels(arrays["test_labels"]),
    )


def _check_vision_files(name: str, root: Path) -> None:
    missing = [f for f in VISION_FILES[name] if not (root / f).exists()]
    if missing:
        hint = {
            "cifar10": "unpack cifar-10-python.tar.gz there",
            "cifar100": "unpack cifar-100-python.tar.gz there",
            "svhn": "put the cropped-digits files train_32x32.mat and test_32x32.mat there",
        }[name]
        raise FileNotFoundError(
            f"{name} files missing under {root}: {', '.join(missing)}. "
            f"Nothing is downloaded: {hint} or pass --data-dir DIR."
        )


def _vision_datasets(name: str, root: Path):
    _check_vision_files(name, root)
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as exc:
        raise ImportError(
            f"the {name} loader needs torchvision, which is an optional dependency: pip install 'got-reg[vision]'"
        ) from exc
    to_tensor = transforms.ToTensor()
    if name == "svhn":
        # No flips for digits; TRADES-style works train SVHN without augmentation.
        train = torchvision.datasets.SVHN(str(root), split="train", transform=to_tensor, download=False)
        test = torchvision.datasets.SVHN(str(root), split="test", transform=to_tensor, download=False)
        return train, test
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), to_tensor])
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return (
        cls(str(root), train=True, transform=augment, download=False),
        cls(str(root), train=False, transform=to_tensor, download=False),
    )


def _first(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n <= 0 or n >= len(ds):
        return ds
    return Subset(ds, range(n))


def check_data_dir(name: str, data_dir: str | None) -> None:
    """A ``--data-dir`` for ``digits`` would be silently unused: it is bundled with scikit-learn."""
    if name == "digits" and data_dir:
        raise ValueError(
            f"--data-dir {data_dir}: the digits data is bundled with scikit-learn and read from no "
            "directory; drop --data-dir (it is for mnist, cifar10, cifar100 and svhn)"
        )


def load_datasets(
    name: str,
    data_dir: str | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    split_seed: int = 0,
):
    """Return ``(train_set, test_set, info)``; ``*_subset=N`` keeps the first N points (smoke tests)."""
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    check_data_dir(name, data_dir)
    root = Path(data_dir) if data_dir else default_data_dir(name)
    if name == "digits":
        x_tr, y_tr, x_te, y_te = load_digits_tensors(split_seed)
        train, test = TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)
    elif name == "mnist":
        x_tr, y_tr, x_te, y_te = load_mnist_tensors(root)
        train, test = TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)
    else:
        train, test = _vision_datasets(name, root)
    return _first(train, train_subset), _first(test, test_subset), INFO[name]


def dataset_tensors(ds: Dataset, n: int | None = None):
    """Stack the first ``n`` items of ``ds`` into ``(x, y)`` tensors (evaluation helper)."""
    n = len(ds) if n is None or n <= 0 else min(n, len(ds))
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][:n], ds.tensors[1][:n]
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)
