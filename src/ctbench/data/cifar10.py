"""CIFAR-10 from its python batches (pickled dicts), unpacked from the official archive."""
from __future__ import annotations

import _codecs
import os
import pickle
import shutil
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..models import InputSpec
from .common import DATASETS, Augmentation, DataError, DatasetInfo, Split, ensure_unpacked

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
CLASSES = 10
CHANNELS, SIZE = 3, 32


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a batch may name: what numpy arrays (and bytes, for protocol-2 pickles
    written by Python 3) unpickle through. Taken from numpy itself, so both numpy.core (numpy 1,
    the official files) and numpy._core (numpy 2) spellings resolve."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, numbers, bytes and numpy arrays, and nothing else, so a
    planted file cannot run code."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _field(entry: dict, key: str):
    return entry[key.encode()] if key.encode() in entry else entry.get(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch as (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    try:
        with open(path, "rb") as handle:
            entry = _BatchUnpickler(handle, encoding="bytes").load()
    except Exception as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({error.__class__.__name__}: {error}). "
                        f"Delete {path.parent} and let it be unpacked again from {ARCHIVE}.") from error
    if not isinstance(entry, dict) or _field(entry, "data") is None or _field(entry, "labels") is None:
        raise DataError(f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' and b'labels'")
    data, labels = _field(entry, "data"), _field(entry, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != CHANNELS * SIZE * SIZE:
        described = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                     else type(data).__name__)
        raise DataError(f"{path}: b'data' is a {described}, expected uint8 of shape (N, {CHANNELS * SIZE * SIZE})")
    try:
        labels = np.asarray(labels)
    except Exception as error:
        raise DataError(f"{path}: b'labels' is not a list of integers ({error})") from error
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DataError(f"{path}: b'labels' must be {len(data)} integers (one per image), "
                        f"found {labels.dtype} of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(f"{path}: labels outside [0, {CLASSES}): min {labels.min()}, max {labels.max()}")
    return data.reshape(-1, CHANNELS, SIZE, SIZE), labels.astype(np.int64)


def _unpack(archive: Path, batches: Path) -> None:
    """Copy the regular files under cifar-10-batches-py/ out of the archive into ``batches``, each
    through a temporary file and a rename. Paths come from the archive only as names checked to be
    one level under that folder; links, devices and anything elsewhere are skipped."""
    batches.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) != 2 or parts[0] != FOLDER or parts[1] in ("", ".", ".."):
                    continue
                source = tar.extractfile(member)
                if source is None:
                    continue
                partial = batches / f".{parts[1]}.part"
                try:
                    with source, open(partial, "wb") as target:
                        shutil.copyfileobj(source, target)
                    os.replace(partial, batches / parts[1])
                finally:
                    partial.unlink(missing_ok=True)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive} could not be unpacked ({error.__class__.__name__}: {error}). "
                        f"Delete it and download it again.") from error


def load_cifar10(root: Path, download: bool) -> tuple[Split, Split]:
    base = root / "cifar10"
    batches = ensure_unpacked("cifar10", base, base / FOLDER, TRAIN_BATCHES + TEST_BATCHES, ARCHIVE, (URL, SHA256),
                              lambda archive: _unpack(archive, base / FOLDER), download)

    def split(names: tuple[str, ...]) -> Split:
        parts = [read_batch(batches / name) for name in names]
        images = np.concatenate([images for images, _ in parts])
        labels = np.concatenate([labels for _, labels in parts])
        return Split(torch.from_numpy(images), torch.from_numpy(labels))

    return split(TRAIN_BATCHES), split(TEST_BATCHES)


DATASETS.register("cifar10")(DatasetInfo(
    spec=InputSpec(channels=3, size=32, classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    augmentation=Augmentation(crop_padding=2, horizontal_flip=True),
    load=load_cifar10,
))
