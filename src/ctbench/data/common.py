"""Datasets as uint8 tensors in memory, with checked files, validation split and batch augmentation."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import FILES_DATASET, ConfigError, DataConfig
from ..models import InputSpec
from ..registry import Registry

DATA_DIR_ENV = "CTBENCH_DATA"


class DataError(RuntimeError):
    """A data file is missing, corrupt or malformed; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)
class Split:
    """Images (N, C, H, W) as uint8 (the datasets'), or as floats in [0, 1] (a user's own data),
    and labels as int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> "Split":
        return Split(self.images[indices], self.labels[indices])

    def head(self, count: int | None) -> "Split":
        return self if count is None else Split(self.images[:count], self.labels[:count])


@dataclass(frozen=True)
class Augmentation:
    """Random crop after padding by ``crop_padding`` pixels, and random horizontal flip."""

    crop_padding: int = 0
    horizontal_flip: bool = False
    padding_mode: str = "zeros"  # the paper pads with zeros; the reference code replicates edges


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    spec: InputSpec
    train: Split
    test: Split
    augmentation: Augmentation


@dataclass(frozen=True)
class DatasetInfo:
    spec: InputSpec
    augmentation: Augmentation
    load: Callable[[Path, bool], tuple[Split, Split]]  # (root, download) -> (train, test)


DATASETS: Registry[DatasetInfo] = Registry(
    "dataset", key="data.dataset", plugin_group="ctbench.datasets",
    hint=f"Your own files (IDX, image folder, .npz, .pt): data.dataset: {FILES_DATASET} with data.path.")


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """The data directory: the given one, else $CTBENCH_DATA, else ./data."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    info = DATASETS.get(name)
    train, test = info.load(data_root(data_dir), download)
    return Dataset(name, info.spec, train, test, info.augmentation)


def input_spec(data: DataConfig) -> InputSpec:
    """The input spec of a config's data section: the registered dataset's, or for your own files the
    one data.shape, data.classes, data.mean and data.std give (no need to read the files)."""
    if data.dataset == FILES_DATASET:
        from .files import files_spec

        return files_spec(data)
    return DATASETS.get(data.dataset).spec


def load_data(data: DataConfig, data_dir: str | os.PathLike | None = None) -> Dataset:
    """The dataset of a config's data section; ``data_dir`` (e.g. --data-dir) replaces data.data_dir."""
    if data.dataset == FILES_DATASET:
        from .files import load_files

        return load_files(data)
    return load_dataset(data.dataset, data_dir or data.data_dir, data.download)


def split_validation(train: Split, size: int, seed: int) -> tuple[Split, Split]:
    """Carve a fixed, seeded validation split out of the training set (used for model
    selection, so the test set is only touched for the final numbers)."""
    if size < 0 or size >= len(train):
        raise ConfigError(f"data.validation_size={size} must be in [0, {len(train)}): smaller than the "
                          f"{len(train)} training images it is carved from")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[size:]), train.subset(order[:size])


def digest_of(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return digest_of(path, "sha256")


def verify_file(path: Path, sha256: str) -> None:
    """Check a file against a SHA256 hex digest, or against "md5:<hex>" where the publisher
    gives only an MD5 (TinyImageNet)."""
    algorithm, _, expected = sha256.rpartition(":")
    algorithm = algorithm or "sha256"
    actual = digest_of(path, algorithm)
    if actual != expected.lower():
        raise DataError(f"{path} is corrupt: its {algorithm.upper()} is {actual}, expected {expected}. "
                        f"Delete it and download it again (or copy a good copy there).")


def fetch(url: str, destination: Path, sha256: str) -> None:
    """Download ``url`` to ``destination`` atomically and verify its checksum (see verify_file)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False, suffix=".part") as part:
        partial = Path(part.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, part)
        except Exception:
            partial.unlink(missing_ok=True)
            raise
    try:
        verify_file(partial, sha256)
    except DataError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, destination)


def ensure_files(directory: Path, files: dict[str, tuple[str, str]], dataset: str, download: bool,
                 hint: str = "") -> None:
    """Make sure each file (name -> (url, checksum), see verify_file) is in ``directory`` with the
    right checksum, downloading what is missing when allowed; offline, name every missing file and
    the fix. ``hint`` is added to those messages (e.g. where an unpacked copy may go instead)."""
    hint = f" {hint}" if hint else ""
    missing = [name for name in files if not (directory / name).exists()]
    if missing and download:
        failures = []
        for name in missing:
            url, sha256 = files[name]
            try:
                fetch(url, directory / name, sha256)
            except DataError:
                raise
            except Exception as error:  # offline, DNS, HTTP errors
                failures.append(f"{url} ({error.__class__.__name__}: {error})")
        missing = [name for name in files if not (directory / name).exists()]
        if missing:
            raise DataError(
                f"{dataset}: could not download {', '.join(missing)} into {directory}: "
                + "; ".join(failures)
                + f". Put the files there by hand (or set ${DATA_DIR_ENV} / data.data_dir).{hint}")
    if missing:
        raise DataError(
            f"{dataset}: missing {', '.join(missing)} in {directory}. Copy them there, set "
            f"${DATA_DIR_ENV} or data.data_dir to the folder that holds them, or allow downloading.{hint}")
    for name, (url, sha256) in files.items():
        verify_file(directory / name, sha256)


def ensure_unpacked(dataset: str, base: Path, folder: Path, required: Sequence[str], archive: str,
                    source: tuple[str, str], unpack: Callable[[Path], None], download: bool) -> Path:
    """``folder`` (under ``base``, the dataset's folder) with every ``required`` file in it: as it
    is, else unpacked by ``unpack(base / archive)`` from the checksummed archive (``source`` =
    (url, checksum)), downloaded when allowed; every failure names the files and the fix."""
    missing = [name for name in required if not (folder / name).exists()]
    if not missing:
        return folder
    ensure_files(base, {archive: source}, dataset, download,
                 hint=f"Alternatively put the unpacked files in {folder} (missing now: {', '.join(missing)}); "
                      f"the data folder is the one that holds {base.name}/ (${DATA_DIR_ENV} or data.data_dir).")
    unpack(base / archive)
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise DataError(f"{dataset}: {base / archive} holds no {', '.join(f'{folder.name}/{n}' for n in missing)}. "
                        f"Delete it and download it again.")
    return folder


@dataclass(frozen=True, eq=False)
class AugmentationDraw:
    """The random choices of a batch's augmentation: crop offsets (2, batch) and flips (batch,)."""

    offsets: Tensor | None
    flips: Tensor | None

    def __getitem__(self, part: slice) -> "AugmentationDraw":
        """The choices of the samples ``part`` of the batch."""
        return AugmentationDraw(None if self.offsets is None else self.offsets[:, part],
                                None if self.flips is None else self.flips[part])


def draw_augmentation(batch: int, augmentation: Augmentation, generator: torch.Generator) -> AugmentationDraw:
    """Draw a batch's crop offsets, then its flips, from ``generator``."""
    pad = augmentation.crop_padding
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator) if pad > 0 else None
    flips = torch.rand(batch, generator=generator) < 0.5 if augmentation.horizontal_flip else None
    return AugmentationDraw(offsets, flips)


def apply_augmentation(images: Tensor, augmentation: Augmentation, draw: AugmentationDraw) -> Tensor:
    """Random crop (after padding) and horizontal flip of a whole float batch, on its device."""
    batch, _, height, width = images.shape
    if draw.offsets is not None:
        pad = augmentation.crop_padding
        mode = "constant" if augmentation.padding_mode == "zeros" else "replicate"
        padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
        offsets = draw.offsets.to(images.device)
        rows = offsets[0, :, None] + torch.arange(height, device=images.device)
        cols = offsets[1, :, None] + torch.arange(width, device=images.device)
        sample = torch.arange(batch, device=images.device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[sample, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if draw.flips is not None:
        flip = draw.flips.to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images.contiguous()


def augment_batch(images: Tensor, augmentation: Augmentation, generator: torch.Generator) -> Tensor:
    """Random crop (after padding) and horizontal flip of a whole float batch, on its device."""
    return apply_augmentation(images, augmentation, draw_augmentation(len(images), augmentation, generator))


def to_float(images: Tensor, device: torch.device | str) -> Tensor:
    """Images as float32 in [0, 1] on ``device``: uint8 images (the datasets') are divided by
    255, floating-point images (a user's own data, already in [0, 1]) are only cast."""
    if images.dtype != torch.uint8:
        return images.to(device=device, dtype=torch.float32, non_blocking=True)
    return images.to(device, non_blocking=True).float().div_(255.0)


def iterate_batches(split: Split, batch_size: int, device: torch.device | str, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, augmentation: Augmentation | None = None,
                    drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (float images in [0, 1], labels) batches on ``device``. Shuffling and augmentation
    draw from ``generator`` only, so the order is a function of its seed (resumable runs).

    ``shard=(k, n)`` yields only the k-th of n contiguous parts of every batch (data-parallel
    training: rank k of n); the augmentation is drawn for the whole batch, so each sample is
    augmented as in one process. A last batch of fewer than n samples is left out, as it would
    leave a part empty (``num_batches`` with ``parts=n`` counts the batches)."""
    index_of_part, parts = shard
    count = len(split)
    if shuffle:
        order = torch.randperm(count, generator=generator)
    else:
        order = torch.arange(count)
    stop = count - count % batch_size if drop_last else count
    augmenting = augmentation is not None and (augmentation.crop_padding or augmentation.horizontal_flip)
    for start in range(0, stop, batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < parts:
            break
        part = contiguous_part(len(batch), index_of_part, parts)
        draw = draw_augmentation(len(batch), augmentation, generator) if augmenting else None
        index = batch[part]
        images = to_float(split.images[index], device)
        if augmenting:
            images = apply_augmentation(images, augmentation, draw[part])
        yield images, split.labels[index].to(device, non_blocking=True)


def contiguous_part(size: int, index: int, parts: int) -> slice:
    """The index-th of ``parts`` contiguous parts of ``size`` items (sizes differ by at most one,
    the larger first, as ``torch.tensor_split``)."""
    small, larger = divmod(size, parts)
    start = index * small + min(index, larger)
    return slice(start, start + small + (index < larger))


def num_batches(count: int, batch_size: int, drop_last: bool = False, parts: int = 1) -> int:
    """Batches ``iterate_batches`` yields; with ``parts`` (shards), a last batch smaller than ``parts`` is left out."""
    full, rest = divmod(count, batch_size)
    return full + (not drop_last and rest >= parts)
