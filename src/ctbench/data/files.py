"""Your own data from files, ``data.dataset: files`` with ``data.path`` and ``data.format``:

* ``idx``: a folder of IDX files as MNIST ships them (train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally gzipped, ``.gz``);
* ``image-folder``: ``train/<class>/*.png`` and ``test/<class>/*.png`` (any format Pillow reads); the
  classes are the sorted folder names of ``train/``, numbered from 0;
* ``npz``: a NumPy ``.npz`` file, and ``pt``: a ``torch.save`` file of a dict, each with the arrays
  x_train, y_train, x_test, y_test; images (N, C, H, W), (N, H, W, C), or (N, H, W) for one channel.

data.format may be left out: ``.npz`` and ``.pt``/``.pth`` files, and folders with ``train/`` (images)
or IDX files, are recognized. ``data.shape`` (C, H, W), ``data.classes``, ``data.mean``/``data.std``
and ``data.value_range`` describe the data, and every file is checked against them: shapes, labels
in 0..classes-1, values inside the range; each failure names the file, the key and the fix. Values
are scaled from value_range to [0, 1] (the range eps is measured in): uint8 pixels of range
(0, 255) stay uint8 (divided by 255 per batch), anything else becomes float32.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import DataConfig
from ..models import InputSpec
from .common import Augmentation, DataError, Dataset, Split
from .mnist import read_idx

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def files_spec(data: DataConfig) -> InputSpec:
    channels, size, _ = data.shape
    return InputSpec(channels, size, data.classes, data.mean or (0.0,) * channels, data.std or (1.0,) * channels)


def load_files(data: DataConfig) -> Dataset:
    """The dataset data.path holds, checked against the data section (see the module's docstring)."""
    path = Path(data.path)
    if not path.exists():
        raise DataError(f"{path} does not exist (data.path; a relative path is taken from the current folder, "
                        f"{os.getcwd()}): set data.path to your .npz or .pt file, or to your IDX or image folder")
    read = {"idx": _read_idx_folder, "image-folder": _read_image_folder, "npz": _read_npz, "pt": _read_pt}
    splits = read[file_format(data)](path, data)
    train, test = (_checked_split(*splits[name], data) for name in ("train", "test"))
    return Dataset("files", files_spec(data), train, test, Augmentation())


def file_format(data: DataConfig) -> str:
    """data.format, else the format data.path looks like."""
    if data.format is not None:
        return data.format
    path = Path(data.path)
    if path.suffix == ".npz":
        return "npz"
    if path.suffix in (".pt", ".pth"):
        return "pt"
    if (path / "train").is_dir():
        return "image-folder"
    if path.is_dir() and _idx_file(path, IDX_FILES["train"][0]) is not None:
        return "idx"
    raise DataError(f"{path}: cannot tell its format from data.path (not a .npz or .pt file, nor a folder with "
                    "train/ or IDX files); set data.format to idx, image-folder, npz or pt")


# -- readers: {"train": (images, labels, images' source, labels' source), "test": ...} -------------------


def _read_npz(path: Path, data: DataConfig) -> dict:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in ARRAY_KEYS if key in arrays.files}
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a readable .npz file ({error}) (data.path): write it with "
                        "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    return _array_splits(path, found, "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")


def _read_pt(path: Path, data: DataConfig) -> dict:
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle and zip errors of many kinds
        raise DataError(f"{path} is not a readable .pt file ({error.__class__.__name__}: {error}) (data.path): "
                        "write it with torch.save({'x_train': ..., 'y_train': ..., 'x_test': ..., 'y_test': ...}, path)"
                        ) from None
    if not isinstance(stored, dict):
        raise DataError(f"{path} holds a {type(stored).__name__}, not a dict of tensors (data.path): write it with "
                        "torch.save({'x_train': ..., 'y_train': ..., 'x_test': ..., 'y_test': ...}, path)")
    return _array_splits(path, {key: stored[key] for key in ARRAY_KEYS if key in stored},
                         "torch.save({'x_train': ..., 'y_train': ..., 'x_test': ..., 'y_test': ...}, path)")


def _array_splits(path: Path, arrays: dict, how_to_write: str) -> dict:
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} (data.path): store the arrays x_train, y_train, x_test, "
                        f"y_test, e.g. {how_to_write}")
    tensors = {}
    for key, array in arrays.items():
        try:
            tensors[key] = torch.as_tensor(array)
        except (TypeError, RuntimeError, ValueError) as error:
            raise DataError(f"{path}: {key} is not a numeric array ({error}); store numbers") from None
    return {split: (tensors[f"x_{split}"], tensors[f"y_{split}"], f"{path}: x_{split}", f"{path}: y_{split}")
            for split in ("train", "test")}


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((folder / name for name in (stem, f"{stem}.gz") if (folder / name).is_file()), None)


def _read_idx_folder(folder: Path, data: DataConfig) -> dict:
    splits = {}
    for split, stems in IDX_FILES.items():
        arrays = []
        for stem in stems:
            path = _idx_file(folder, stem)
            if path is None:
                raise DataError(f"{folder} has no {stem} (or {stem}.gz) (data.path): an IDX folder holds "
                                f"{', '.join(s for pair in IDX_FILES.values() for s in pair)}, each optionally gzipped")
            try:
                arrays.append((torch.from_numpy(read_idx(path).copy()), str(path)))
            except (OSError, EOFError) as error:  # a broken gzip stream
                raise DataError(f"{path} is not readable ({error.__class__.__name__}: {error}); copy it again"
                                ) from None
        (images, images_source), (labels, labels_source) = arrays
        splits[split] = (images, labels, images_source, labels_source)
    return splits


def _read_image_folder(root: Path, data: DataConfig) -> dict:
    from PIL import Image, UnidentifiedImageError

    channels, height, width = data.shape
    if channels not in (1, 3):
        raise DataError(f"{root}: an image folder gives 1 (grayscale) or 3 (RGB) channels, but data.shape[0] is "
                        f"{channels}; set data.shape[0] to 1 or 3")
    mode = "L" if channels == 1 else "RGB"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder (data.path): an image folder holds train/<class>/ and "
                            "test/<class>/ with the same class names")
    classes = sorted(entry.name for entry in (root / "train").iterdir() if entry.is_dir())
    if len(classes) != data.classes:
        raise DataError(f"{root / 'train'} has {len(classes)} class folders ({', '.join(classes[:10])}"
                        f"{', ...' if len(classes) > 10 else ''}) but data.classes is {data.classes}: set data.classes "
                        f"to {len(classes)}, or put each class's images in {root / 'train'}/<class>/")
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        strays = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name not in classes)
        if strays:
            raise DataError(f"{folder / strays[0]} is a class folder that {root / 'train'} lacks: give train/ and "
                            "test/ the same class folders")
        images, labels = [], []
        for label, name in enumerate(classes):
            files = sorted((folder / name).iterdir()) if (folder / name).is_dir() else []
            for file in (file for file in files if file.suffix.lower() in IMAGE_SUFFIXES):
                try:
                    with Image.open(file) as image:
                        pixels = np.asarray(image.convert(mode))
                except (OSError, UnidentifiedImageError) as error:
                    raise DataError(f"{file} is not a readable image ({error}); replace or remove it") from None
                if pixels.shape[:2] != (height, width):
                    raise DataError(f"{file} is {pixels.shape[1]}x{pixels.shape[0]} pixels, but data.shape says "
                                    f"{width}x{height}: resize the images, or set data.shape to [{channels}, "
                                    f"{pixels.shape[0]}, {pixels.shape[1]}]")
                images.append(pixels)
                labels.append(label)
        if not images:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        stacked = torch.from_numpy(np.stack(images))
        splits[split] = (stacked.unsqueeze(1) if channels == 1 else stacked.permute(0, 3, 1, 2).contiguous(),
                         torch.tensor(labels), str(folder), str(folder))
    return splits


# -- checks, shared by every format --------------------------------------------------------------------


def _checked_split(images: Tensor, labels: Tensor, images_source: str, labels_source: str, data: DataConfig) -> Split:
    """A Split of (N, C, H, W) images scaled to [0, 1] (uint8 kept) and int64 labels, after checking
    both against data.shape, data.classes and data.value_range."""
    return Split(_scaled(_channels_first(images, images_source, data), images_source, data),
                 _checked_labels(labels, labels_source, len(images), data))


def _channels_first(images: Tensor, source: str, data: DataConfig) -> Tensor:
    channels, height, width = data.shape
    shape = tuple(images.shape)
    if len(shape) == 4 and shape[1:] == (channels, height, width):
        return images
    if len(shape) == 4 and shape[1:] == (height, width, channels):  # channels last, as images are usually stored
        return images.permute(0, 3, 1, 2).contiguous()
    if len(shape) == 3 and channels == 1 and shape[1:] == (height, width):
        return images.unsqueeze(1)
    raise DataError(f"{source} has shape {shape}, but data.shape is {list(data.shape)}: store the images as "
                    f"(N, C, H, W) = (N, {channels}, {height}, {width}) (or (N, H, W, C)), or set data.shape to "
                    "the images' [C, H, W]")


def _scaled(images: Tensor, source: str, data: DataConfig) -> Tensor:
    if len(images) == 0:
        raise DataError(f"{source} holds no images; every split needs some")
    if images.dtype == torch.bool or images.is_complex():
        raise DataError(f"{source} holds {images.dtype} values; store the pixels as numbers (uint8 or float)")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise DataError(f"{source} holds NaN or infinite values; replace them")
    uint8 = images.dtype == torch.uint8
    low, high = data.value_range or ((0.0, 255.0) if uint8 else (0.0, 1.0))
    smallest, largest = images.min().item(), images.max().item()
    if smallest < low or largest > high:
        stated = "data.value_range" if data.value_range else f"the default data.value_range for {images.dtype} values"
        raise DataError(f"{source} holds values from {smallest:g} to {largest:g}, outside [{low:g}, {high:g}] "
                        f"({stated}): set data.value_range to the range the values are stored in (e.g. [0, 255] for "
                        "8-bit pixels), or rescale them")
    if uint8 and (low, high) == (0.0, 255.0):
        return images
    return (images.float() - low) / (high - low)


def _checked_labels(labels: Tensor, source: str, count: int, data: DataConfig) -> Tensor:
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{source} must be a 1-D array of integer class labels, got {labels.dtype} of shape "
                        f"{tuple(labels.shape)}; store the labels as integers 0 to classes - 1")
    if len(labels) != count:
        raise DataError(f"{source} has {len(labels)} labels for {count} images; give one label per image")
    labels = labels.long()
    smallest, largest = int(labels.min()), int(labels.max())
    if smallest < 0 or largest >= data.classes:
        raise DataError(f"{source} holds labels from {smallest} to {largest}, outside 0 to {data.classes - 1} "
                        f"(data.classes is {data.classes}): set data.classes to the number of classes, or number "
                        "the labels from 0")
    return labels
