"""CIFAR-10 and TinyImageNet readers on small files written in the real formats, and batch augmentation."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ctbench.data import DATA_DIR_ENV, DATASETS, Augmentation, DataError, augment_batch, load_dataset
from ctbench.data import cifar10, tinyimagenet

PER_BATCH = 20


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def cifar_pattern(batch: int) -> tuple[np.ndarray, list[int]]:
    """Rows of 3072 channel-major bytes with a known pattern, and labels."""
    image = np.arange(PER_BATCH)[:, None]
    position = np.arange(3072)[None, :]
    data = ((image * 7 + position * 3 + batch * 31) % 256).astype(np.uint8)
    labels = [(i + batch) % 10 for i in range(PER_BATCH)]
    return data, labels


def python2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the official files are: a Python 2 cPickle (protocol 2) whose strings are
    8-bit str and whose arrays name numpy.core.multiarray, written opcode by opcode."""
    def string(value: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(value)]) + value

    rows, width = data.shape
    raw = data.tobytes()
    return (b"\x80\x02}(" + string(b"data")
            + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
            + b"(K\x01" + b"M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", width) + b"\x86"
            + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
            + b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            + b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
            + string(b"labels") + b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"eu.")


def write_cifar_batch(path: Path, batch: int, protocol: int | None) -> None:
    data, labels = cifar_pattern(batch)
    if protocol is None:
        path.write_bytes(python2_pickle(data, labels))
        return
    entry = {b"batch_label": f"batch {batch}".encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{batch}_{i}.png".encode() for i in range(PER_BATCH)]}
    path.write_bytes(pickle.dumps(entry, protocol=protocol))


def make_cifar_folder(root: Path) -> Path:
    """Five train batches (the first as Python 2 wrote the official ones, the others by Python 3
    with protocol 2) and a test batch (protocol 5, as numpy 2 arrays pickle out of band)."""
    batches = root / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for batch in range(1, 6):
        write_cifar_batch(batches / f"data_batch_{batch}", batch, protocol=None if batch == 1 else 2)
    write_cifar_batch(batches / "test_batch", 0, protocol=5)
    return batches


def test_cifar10_registered():
    info = DATASETS.get("cifar10")
    assert (info.spec.channels, info.spec.size, info.spec.classes) == (3, 32, 10)
    assert info.spec.mean == (0.4914, 0.4822, 0.4465) and info.spec.std == (0.2023, 0.1994, 0.2010)
    assert info.augmentation == Augmentation(crop_padding=2, horizontal_flip=True)


def test_cifar10_reads_batches(tmp_path, monkeypatch):
    make_cifar_folder(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    dataset = load_dataset("cifar10", download=False)
    train, test = dataset.train, dataset.test
    assert train.images.shape == (5 * PER_BATCH, 3, 32, 32) and test.images.shape == (PER_BATCH, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and test.labels.dtype == torch.int64
    for batch in range(1, 6):
        data, labels = cifar_pattern(batch)
        rows = slice((batch - 1) * PER_BATCH, batch * PER_BATCH)
        assert torch.equal(train.images[rows].reshape(PER_BATCH, -1), torch.from_numpy(data))
        assert train.labels[rows].tolist() == labels
    data, labels = cifar_pattern(0)
    assert torch.equal(test.images.reshape(PER_BATCH, -1), torch.from_numpy(data))
    assert test.labels.tolist() == labels
    # channel-major: byte c * 1024 + y * 32 + x is pixel (c, y, x)
    assert test.images[3, 2, 5, 7].item() == data[3, 2 * 1024 + 5 * 32 + 7]


def test_cifar10_missing_names_files_and_env(tmp_path):
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(caught.value)
    assert "cifar-10-python.tar.gz" in message and "data_batch_1" in message and "test_batch" in message
    assert DATA_DIR_ENV in message and str(tmp_path / "cifar10") in message


def test_cifar10_offline_download_fails_cleanly(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download cifar-10-python.tar.gz") as caught:
        load_dataset("cifar10", tmp_path, download=True)
    assert DATA_DIR_ENV in str(caught.value)
    assert not list((tmp_path / "cifar10").glob("*.part"))


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_cifar10_unpacks_archive_safely(tmp_path, monkeypatch):
    source = make_cifar_folder(tmp_path / "source")
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=f"cifar-10-batches-py/{path.name}")
        add_bytes(tar, "../escaped", b"x")
        add_bytes(tar, "cifar-10-batches-py/../../escaped2", b"x")
        link = tarfile.TarInfo("cifar-10-batches-py/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    monkeypatch.setattr(cifar10, "SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    train = load_dataset("cifar10", tmp_path, download=False).train
    assert len(train) == 5 * PER_BATCH
    assert torch.equal(train.images[:PER_BATCH].reshape(PER_BATCH, -1), torch.from_numpy(cifar_pattern(1)[0]))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped2").exists()
    assert not (tmp_path / "cifar10" / "cifar-10-batches-py" / "link").exists()

    # a damaged archive is refused by its checksum
    for path in (tmp_path / "cifar10" / "cifar-10-batches-py").iterdir():
        path.unlink()
    archive.write_bytes(archive.read_bytes()[:-10])
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("cifar10", tmp_path, download=False)


class Planted:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("content, complaint", [
    (b"not a pickle at all", "not a CIFAR-10 python batch"),
    (pickle.dumps({b"data": np.zeros((PER_BATCH, 3000), np.uint8), b"labels": [0] * PER_BATCH}), "3072"),
    (pickle.dumps({b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [0] * 3}), "labels"),
    (pickle.dumps({b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [10] * PER_BATCH}), "outside"),
    (pickle.dumps({b"labels": [0] * PER_BATCH}), "b'data'"),
    (pickle.dumps({b"data": Planted(), b"labels": []}), "refusing to load global"),
])
def test_cifar10_malformed_batch_names_file(tmp_path, content, complaint):
    batches = make_cifar_folder(tmp_path)
    (batches / "data_batch_3").write_bytes(content)
    with pytest.raises(DataError, match=complaint) as caught:
        load_dataset("cifar10", tmp_path, download=False)
    assert str(batches / "data_batch_3") in str(caught.value)


# ----------------------------------------------------------------------------------------------
# TinyImageNet

WNIDS = ["n03000000", "n01000000", "n02000000"]  # not sorted: the label is the line index
PER_CLASS = 3


def color(label: int, index: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 200 - 50 * index, 90 + 20 * label + 10 * index)


def save_jpeg(path: Path, rgb: tuple[int, int, int], gray: bool = False) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.new("L", (64, 64), rgb[0]).save(path, quality=95)
    else:
        Image.new("RGB", (64, 64), rgb).save(path, quality=95)


def make_tiny_folder(base: Path) -> dict:
    """A tiny-imagenet-200 tree under ``base``; returns the expected colours and labels."""
    folder = base / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    expected = {"train": [], "val": []}
    for label, wnid in enumerate(WNIDS):
        (folder / "train" / wnid).mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        for index in range(PER_CLASS):
            gray = label == 1 and index == 2
            rgb = color(label, index)
            save_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{index}.JPEG", rgb, gray=gray)
            expected["train"].append(((rgb[0],) * 3 if gray else rgb, label, gray))
    lines = []
    for index, label in enumerate([2, 0, 1, 0]):
        rgb = (10 + 50 * index, 120, 250 - 40 * index)
        save_jpeg(folder / "val" / "images" / f"val_{index}.JPEG", rgb)
        lines.append(f"val_{index}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
        expected["val"].append((rgb, label, False))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True)  # unlabelled; not read
    return expected


def check_split(split, expected) -> None:
    assert split.images.shape == (len(expected), 3, 64, 64) and split.images.dtype == torch.uint8
    assert split.labels.dtype == torch.int64
    assert split.labels.tolist() == [label for _, label, _ in expected]
    for image, (rgb, _, gray) in zip(split.images, expected):
        target = torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 64, 64)
        assert (image.float() - target).abs().max() <= 4  # JPEG of a flat colour is near exact
        if gray:
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_tinyimagenet_registered():
    info = DATASETS.get("tinyimagenet")
    assert (info.spec.channels, info.spec.size, info.spec.classes) == (3, 64, 200)
    assert info.spec.mean == (0.4802, 0.4481, 0.3975) and info.spec.std == (0.2302, 0.2265, 0.2262)
    assert info.augmentation == Augmentation(crop_padding=4, horizontal_flip=True)


def test_tinyimagenet_reads_caches_and_reuses(tmp_path, monkeypatch):
    expected = make_tiny_folder(tmp_path / "tinyimagenet")
    calls = []
    decode = tinyimagenet._decode_images

    def counting(paths):
        calls.append(len(paths))
        return decode(paths)

    monkeypatch.setattr(tinyimagenet, "_decode_images", counting)
    first = load_dataset("tinyimagenet", tmp_path, download=False)
    check_split(first.train, expected["train"])
    check_split(first.test, expected["val"])
    assert calls == [len(WNIDS) * PER_CLASS, 4]
    cache = tmp_path / "tinyimagenet" / "decoded.pt"
    assert cache.is_file()
    assert [p.name for p in cache.parent.iterdir() if p.name.endswith(".part")] == []

    second = load_dataset("tinyimagenet", tmp_path, download=False)  # from the cache
    assert len(calls) == 2
    assert torch.equal(second.train.images, first.train.images) and torch.equal(second.test.labels, first.test.labels)

    # a folder changed after the cache was written makes it decode again and rewrite the cache
    later = time.time() + 100
    os.utime(tmp_path / "tinyimagenet" / "tiny-imagenet-200" / "train" / WNIDS[0] / "images", (later, later))
    load_dataset("tinyimagenet", tmp_path, download=False)
    assert len(calls) == 4

    # a damaged cache is ignored with a warning
    cache.write_bytes(b"garbage")
    os.utime(cache, (later + 10, later + 10))
    with pytest.warns(UserWarning, match="ignoring the TinyImageNet cache"):
        third = load_dataset("tinyimagenet", tmp_path, download=False)
    assert len(calls) == 6 and torch.equal(third.train.images, first.train.images)


def test_tinyimagenet_missing_names_files_and_env(tmp_path):
    with pytest.raises(DataError) as caught:
        load_dataset("tinyimagenet", tmp_path, download=False)
    message = str(caught.value)
    assert "tiny-imagenet-200.zip" in message and "wnids.txt" in message and "val_annotations.txt" in message
    assert DATA_DIR_ENV in message and str(tmp_path / "tinyimagenet") in message


def test_tinyimagenet_offline_download_fails_cleanly(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download tiny-imagenet-200.zip"):
        load_dataset("tinyimagenet", tmp_path, download=True)


def zip_tree(folder: Path, archive: Path, extra: dict[str, bytes]) -> None:
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.write(path, path.relative_to(folder.parent).as_posix())
        for name, payload in extra.items():
            bundle.writestr(name, payload)


def test_tinyimagenet_unpacks_zip_checked_by_md5(tmp_path, monkeypatch):
    expected = make_tiny_folder(tmp_path / "source")
    archive = tmp_path / "tinyimagenet" / "tiny-imagenet-200.zip"
    archive.parent.mkdir()
    zip_tree(tmp_path / "source" / "tiny-imagenet-200", archive, {"__MACOSX/._junk": b"x"})

    # the published MD5 does not match this home-made zip: refused, naming the MD5
    with pytest.raises(DataError, match="MD5"):
        load_dataset("tinyimagenet", tmp_path, download=False)

    monkeypatch.setattr(tinyimagenet, "CHECKSUM", "md5:" + hashlib.md5(archive.read_bytes()).hexdigest())
    dataset = load_dataset("tinyimagenet", tmp_path, download=False)
    check_split(dataset.train, expected["train"])
    check_split(dataset.test, expected["val"])
    assert not (tmp_path / "tinyimagenet" / "__MACOSX").exists()


def test_tinyimagenet_refuses_unsafe_zip(tmp_path, monkeypatch):
    archive = tmp_path / "tinyimagenet" / "tiny-imagenet-200.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("tiny-imagenet-200/../../escaped", b"x")
    monkeypatch.setattr(tinyimagenet, "CHECKSUM", "md5:" + hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="unsafe entry"):
        load_dataset("tinyimagenet", tmp_path, download=False)
    assert not (tmp_path / "escaped").exists()


def test_tinyimagenet_bad_annotation_names_line(tmp_path):
    make_tiny_folder(tmp_path / "tinyimagenet")
    annotations = tmp_path / "tinyimagenet" / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:5: class id 'n09999999'"):
        load_dataset("tinyimagenet", tmp_path, download=False)


# ----------------------------------------------------------------------------------------------
# augment_batch


def shifted(image: torch.Tensor, dy: int, dx: int, mode: str) -> torch.Tensor:
    """out[:, r, c] = image[:, r + dy, c + dx], with zeros (or the nearest edge pixel) outside."""
    _, height, width = image.shape
    rows, cols = torch.arange(height) + dy, torch.arange(width) + dx
    out = image[:, rows.clamp(0, height - 1)][:, :, cols.clamp(0, width - 1)]
    if mode == "zeros":
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]
        out = out * inside
    return out


def matching_shifts(output, image, pad, mode, flips=(False,)):
    return [(dy, dx, flip) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1) for flip in flips
            if torch.equal(output, shifted(image, dy, dx, mode).flip(-1) if flip else shifted(image, dy, dx, mode))]


def batch(count=64, size=8):
    # strictly positive, so zeros in an output can only come from the padding
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1


@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_augment_crop_is_a_shift_with_fill(mode):
    images = batch()
    output = augment_batch(images, Augmentation(crop_padding=2, padding_mode=mode), torch.Generator().manual_seed(0))
    assert output.shape == images.shape and output.dtype == images.dtype
    assert output.min() >= 0 and output.max() <= 1
    seen = set()
    for out, image in zip(output, images):
        found = matching_shifts(out, image, 2, mode)
        assert len(found) == 1
        seen.add(found[0][:2])
    assert len(seen) > 10  # many different shifts, not just the identity
    if mode == "zeros":
        assert (output == 0).any()
    else:
        assert not (output == 0).any()  # replicated edges, never zeros


def test_augment_flip_is_an_exact_mirror():
    images = batch()
    output = augment_batch(images, Augmentation(horizontal_flip=True), torch.Generator().manual_seed(0))
    assert output.shape == images.shape
    mirrored = images[:, :, :, torch.arange(images.shape[3] - 1, -1, -1)]
    flipped = [torch.equal(out, mirror) for out, mirror in zip(output, mirrored)]
    kept = [torch.equal(out, image) for out, image in zip(output, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_augment_crop_and_flip_deterministic_per_seed():
    images = batch(count=32)
    augmentation = Augmentation(crop_padding=2, horizontal_flip=True)
    output = augment_batch(images, augmentation, torch.Generator().manual_seed(5))
    again = augment_batch(images, augmentation, torch.Generator().manual_seed(5))
    assert torch.equal(output, again)
    assert output.min() >= 0 and output.max() <= 1
    for out, image in zip(output, images):
        assert len(matching_shifts(out, image, 2, "zeros", flips=(False, True))) >= 1
