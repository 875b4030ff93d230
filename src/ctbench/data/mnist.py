"""MNIST from its four gzip IDX files; a verified copy ships inside the package."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..models import InputSpec
from .common import DATASETS, Augmentation, DataError, DatasetInfo, Split, ensure_files, verify_file

BUNDLED = Path(__file__).parent / "bundled" / "mnist"
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FILES = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzipped when its name ends in .gz (magic: two zero bytes, type code, number
    of dims; big-endian sizes)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _directory(root: Path) -> Path:
    """root/mnist when it holds the files, else the bundled copy."""
    candidate = root / "mnist"
    if all((candidate / name).exists() for name in FILES):
        return candidate
    return BUNDLED


def load_mnist(root: Path, download: bool) -> tuple[Split, Split]:
    directory = _directory(root)
    if directory == BUNDLED:
        missing = [name for name in FILES if not (BUNDLED / name).exists()]
        if missing:
            ensure_files(root / "mnist", {name: (MIRROR + name, FILES[name]) for name in FILES}, "mnist", download)
            directory = root / "mnist"
    for name, sha256 in FILES.items():
        verify_file(directory / name, sha256)

    def split(images: str, labels: str) -> Split:
        pixels = torch.from_numpy(read_idx(directory / images).copy()).unsqueeze(1)
        targets = torch.from_numpy(read_idx(directory / labels).astype(np.int64))
        if len(pixels) != len(targets):
            raise DataError(f"{directory}: {images} has {len(pixels)} images but {labels} has {len(targets)} labels")
        return Split(pixels, targets)

    return (split("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            split("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


DATASETS.register("mnist")(DatasetInfo(
    # the reference's network normalizes MNIST (its first layer); data.normalize=false makes it the identity
    spec=InputSpec(channels=1, size=28, classes=10, mean=(0.1307,), std=(0.3081,)),
    augmentation=Augmentation(),
    load=load_mnist,
))
