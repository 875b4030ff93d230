"""TinyImageNet-200 from its folder of JPEGs, decoded once into a cached uint8 tensor file.

Labels are line indices in wnids.txt. The official validation set (val/, labelled by
val/val_annotations.txt) serves as the test split; the unlabelled test/ folder is not used.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from ..models import InputSpec
from .common import DATASETS, Augmentation, DataError, DatasetInfo, Split, ensure_unpacked

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE = "tiny-imagenet-200.zip"
# Stanford publishes no checksum; this is the MD5 of the zip quoted wherever the set is used (no
# SHA256 of the official file could be found to check against).
CHECKSUM = "md5:90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"
CACHE = "decoded.pt"
CACHE_FORMAT = 1
SIZE = 64
REQUIRED = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
IMAGE_SUFFIXES = (".jpeg", ".jpg")


def _source_mtime(folder: Path) -> int:
    """Latest modification (ns) of the folder and the files and folders that list its images.
    Adding, removing or renaming images changes it; editing a JPEG in place does not."""
    paths = [folder, *(folder / name for name in REQUIRED), folder / "val"]
    train = folder / "train"
    if train.is_dir():
        for entry in os.scandir(train):
            paths += [Path(entry.path), Path(entry.path) / "images"]
    return max((path.stat().st_mtime_ns for path in paths if path.exists()), default=0)


def _read_cache(cache: Path) -> tuple[Split, Split] | None:
    """The cached splits, or None (with a warning) when the file is unreadable or malformed."""
    try:
        entry = torch.load(cache, map_location="cpu", weights_only=True)
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a format-{CACHE_FORMAT} cache")
        classes = len(entry["wnids"])
        splits = []
        for name in ("train", "test"):
            images, labels = entry[f"{name}_images"], entry[f"{name}_labels"]
            if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, SIZE, SIZE):
                raise ValueError(f"{name}_images: {images.dtype} of shape {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != (len(images),):
                raise ValueError(f"{name}_labels: {labels.dtype} of shape {tuple(labels.shape)}")
            if len(labels) and (labels.min() < 0 or labels.max() >= classes):
                raise ValueError(f"{name}_labels outside [0, {classes})")
            splits.append(Split(images, labels))
    except Exception as error:
        warnings.warn(f"ignoring the TinyImageNet cache {cache} ({error.__class__.__name__}: {error}); "
                      f"decoding the JPEGs again", stacklevel=3)
        return None
    return splits[0], splits[1]


def _write_cache(cache: Path, wnids: list[str], train: Split, test: Split) -> None:
    """Write through a temporary file in the same folder and a rename, so no reader (or a crash)
    ever sees half a file. A folder that cannot be written only costs the cache."""
    entry = {"format": CACHE_FORMAT, "wnids": wnids, "train_images": train.images, "train_labels": train.labels,
             "test_images": test.images, "test_labels": test.labels}
    partial = None
    try:
        with tempfile.NamedTemporaryFile(dir=cache.parent, prefix=f".{cache.name}.", suffix=".part",
                                         delete=False) as handle:
            partial = Path(handle.name)
            torch.save(entry, handle)
        os.replace(partial, cache)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        warnings.warn(f"could not write the TinyImageNet cache {cache} ({error}); "
                      f"the JPEGs will be decoded again next time", stacklevel=3)
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def _unpack(archive: Path, base: Path) -> None:
    """Copy the files under tiny-imagenet-200/ out of the zip into ``base``, each through a
    temporary file and a rename. A member name that is absolute or holds '..' (or a backslash)
    makes the archive refused; entries outside that folder are skipped."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                    raise DataError(f"{archive} holds an unsafe entry {info.filename!r}. "
                                    f"Delete it and download it again.")
                if info.is_dir() or len(name.parts) < 2 or name.parts[0] != FOLDER:
                    continue
                target = base.joinpath(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.part")
                try:
                    with bundle.open(info) as source, open(partial, "wb") as sink:
                        shutil.copyfileobj(source, sink)
                    os.replace(partial, target)
                finally:
                    partial.unlink(missing_ok=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as error:
        raise DataError(f"{archive} could not be unpacked ({error.__class__.__name__}: {error}). "
                        f"Delete it and download it again.") from error


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"{path} lists no class ids")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{path} lists a class id more than once")
    return wnids


def _list_images(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int], list[Path], list[int]]:
    """(train paths, train labels, val paths, val labels); train by class, then file name; val in
    the order of val_annotations.txt."""
    label = {wnid: index for index, wnid in enumerate(wnids)}
    train_paths, train_labels, absent = [], [], []
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            absent.append(str(images))
            continue
        paths = sorted(path for path in images.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        train_paths += paths
        train_labels += [label[wnid]] * len(paths)
    if absent:
        raise DataError(f"tinyimagenet: {len(absent)} class folder(s) listed in wnids.txt are missing, "
                        f"e.g. {', '.join(absent[:3])}")
    annotations = folder / "val" / "val_annotations.txt"
    val_paths, val_labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        name = fields[0].strip()
        if len(fields) < 2 or PurePosixPath(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{annotations}:{number}: expected 'file<TAB>wnid<TAB>...', found {line!r}")
        wnid = fields[1].strip()
        if wnid not in label:
            raise DataError(f"{annotations}:{number}: class id {wnid!r} is not in wnids.txt")
        val_paths.append(folder / "val" / "images" / name)
        val_labels.append(label[wnid])
    return train_paths, train_labels, val_paths, val_labels


def _decode_images(paths: list[Path]) -> Tensor:
    """Decode 64x64 JPEGs (grayscale ones converted to RGB) into a uint8 (N, 3, 64, 64) tensor."""
    try:
        from PIL import Image
    except ImportError as error:
        raise DataError("tinyimagenet: decoding its JPEGs needs Pillow (pip install pillow)") from error
    pixels = np.empty((len(paths), 3, SIZE, SIZE), dtype=np.uint8)

    def decode(block: range) -> None:
        for index in block:
            path = paths[index]
            try:
                with Image.open(path) as image:
                    rgb = np.asarray(image.convert("RGB"))
            except Exception as error:
                raise DataError(f"{path} could not be read as an image ({error.__class__.__name__}: {error})") \
                    from error
            if rgb.shape != (SIZE, SIZE, 3):
                raise DataError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]} pixels, expected {SIZE}x{SIZE}")
            pixels[index] = rgb.transpose(2, 0, 1)

    blocks = [range(start, min(start + 512, len(paths))) for start in range(0, len(paths), 512)]
    # Pillow releases the GIL while decoding, so threads share the work without copying pixels.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for _ in pool.map(decode, blocks):
            pass
    return torch.from_numpy(pixels)


def load_tinyimagenet(root: Path, download: bool) -> tuple[Split, Split]:
    base = root / "tinyimagenet"
    folder, cache = base / FOLDER, base / CACHE
    if cache.is_file() and (not folder.exists() or cache.stat().st_mtime_ns >= _source_mtime(folder)):
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    folder = ensure_unpacked("tinyimagenet", base, folder, REQUIRED, ARCHIVE, (URL, CHECKSUM),
                             lambda archive: _unpack(archive, base), download)
    wnids = _read_wnids(folder / "wnids.txt")
    train_paths, train_labels, val_paths, val_labels = _list_images(folder, wnids)
    train = Split(_decode_images(train_paths), torch.tensor(train_labels, dtype=torch.int64))
    test = Split(_decode_images(val_paths), torch.tensor(val_labels, dtype=torch.int64))
    _write_cache(cache, wnids, train, test)
    return train, test


DATASETS.register("tinyimagenet")(DatasetInfo(
    spec=InputSpec(3, 64, 200, mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
    augmentation=Augmentation(crop_padding=4, horizontal_flip=True),
    load=load_tinyimagenet,
))
