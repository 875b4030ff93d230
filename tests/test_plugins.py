"""Your own models, datasets and methods (plugins: --plugin MODULE, entry points) and your own
data files (data.dataset: files with IDX, image folder, .npz and .pt), as every command sees them."""
import gzip
import importlib.metadata
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from ctbench import plugins
from ctbench.cli import main
from ctbench.config import ConfigError, config_from_dict
from ctbench.data import DATASETS, DataError, load_data
from ctbench.methods import METHODS
from ctbench.models import MODELS
from ctbench.plugins import PLUGINS_ENV, PluginError

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN_MODULES = ("tiny_plugin", "ep_plugin", "broken_plugin")
TINY_PLUGIN = '''
"""A model and a dataset of one's own, registered on import (what --plugin imports)."""
import torch
from torch import nn

from ctbench.data import DATASETS, Augmentation, DatasetInfo, Split
from ctbench.models import MODELS, InputSpec, Normalize

SPEC = InputSpec(channels=1, size=8, classes=3, mean=(0.5,), std=(0.25,))


@MODELS.register("tiny_plugin_model")
def tiny_model(spec, batch_norm):
    return nn.Sequential(Normalize(spec.mean, spec.std), nn.Flatten(), nn.Linear(spec.channels * spec.size ** 2, 16),
                         nn.ReLU(), nn.Linear(16, spec.classes))


def load(root, download):
    generator = torch.Generator().manual_seed(0)
    def split(count):
        labels = torch.arange(count) % 3
        images = (labels.view(-1, 1, 1, 1) * 100 + torch.randint(0, 50, (count, 1, 8, 8), generator=generator))
        return Split(images.to(torch.uint8), labels)
    return split(64), split(24)


DATASETS.register("tiny_plugin_data")(DatasetInfo(spec=SPEC, augmentation=Augmentation(), load=load))
'''
TINY_CONFIG = '''
data: {dataset: tiny_plugin_data, validation_size: 16}
model: {architecture: tiny_plugin_model, batch_norm: false}
method: {name: ibp}
optim: {epochs: 1, batch_size: 16, lr_milestones: []}
eps: {train_eps: 0.05, test_eps: 0.05, ramp_end_epoch: 1}
evaluation: {attack_steps: 1, attack_restarts: 1}
'''


BUILT_IN = {registry: dict(registry._entries) for registry in (MODELS, DATASETS, METHODS)}


def forget_plugins(monkeypatch):
    """Back to the registries of a fresh process: only the built-in entries, plugins not loaded yet."""
    for registry, entries in BUILT_IN.items():
        monkeypatch.setattr(registry, "_entries", dict(entries))
        monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(plugins, "_imported", {})
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Plugins register into process-wide registries, modules and environment: undo that after each test."""
    monkeypatch.setenv(PLUGINS_ENV, "")  # recorded, so what --plugin adds to it is undone
    monkeypatch.delenv(PLUGINS_ENV)
    forget_plugins(monkeypatch)
    yield
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# -- plugins on the command line ------------------------------------------------------------------


def test_cli_trains_and_evaluates_a_plugin_model_on_a_plugin_dataset(tmp_path, capsys, monkeypatch):
    plugin = write(tmp_path / "tiny_plugin.py", TINY_PLUGIN)
    config = write(tmp_path / "tiny.yaml", TINY_CONFIG)
    run = tmp_path / "run"
    code = main(["train", str(config), "--plugin", str(plugin), "--out", str(run), "--quiet", "--json"])
    output = capsys.readouterr()
    assert code == 0, output.err
    results = json.loads(output.out)
    assert results["test"]["samples"] == 24 and "tiny_plugin_model" in (run / "config.yaml").read_text()
    assert PLUGINS_ENV in os.environ  # worker processes import the plugin too

    # a later command in a new process: the plugin by module name, given after the command's arguments
    forget_plugins(monkeypatch)
    monkeypatch.delenv(PLUGINS_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["evaluate", str(run), "--count", "8", "--steps", "0", "--json", "--plugin", "tiny_plugin"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert json.loads(output.out)["samples"] == 8


def test_a_model_unknown_to_the_cli_names_the_known_ones_and_plugin(tmp_path, capsys):
    config = write(tmp_path / "tiny.yaml", TINY_CONFIG)
    code = main(["train", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "unknown dataset 'tiny_plugin_data' (data.dataset); known: cifar10, mnist, tinyimagenet" in err
    assert "--plugin MODULE" in err and "'ctbench.datasets' entry point" in err and "data.dataset: files" in err
    with pytest.raises(ConfigError, match=r"known: cnn3, cnn5, cnn7.*--plugin MODULE or a 'ctbench.models' entry"):
        MODELS.get("tiny_plugin_model")


def test_a_plugin_that_fails_to_import_is_named_with_its_exception(tmp_path, capsys):
    plugin = write(tmp_path / "broken_plugin.py", "raise RuntimeError('no GPU driver here')\n")
    assert main(["presets", "--plugin", str(plugin)]) == 2
    err = capsys.readouterr().err
    assert f"plugin {str(plugin)!r} failed to import: RuntimeError: no GPU driver here" in err
    assert main(["presets", "--plugin", "no_such_plugin_module"]) == 2
    assert "plugin 'no_such_plugin_module' failed to import: ModuleNotFoundError" in capsys.readouterr().err


def test_listed_plugins_are_imported_by_the_first_lookup_as_in_a_worker_process(tmp_path, monkeypatch):
    plugin = write(tmp_path / "tiny_plugin.py", TINY_PLUGIN)
    plugins.use_plugins([str(plugin)])
    assert os.environ[PLUGINS_ENV] == str(plugin)
    forget_plugins(monkeypatch)  # a spawned worker: the environment, but nothing imported
    assert "tiny_plugin_model" in MODELS and DATASETS.get("tiny_plugin_data").spec.size == 8


# -- entry points -----------------------------------------------------------------------------------


EP_PLUGIN = '''
from ctbench.data import Augmentation, DatasetInfo
from ctbench.methods.ibp import IBP
from ctbench.models import InputSpec
from ctbench.models.cnn import cnn3


def ep_model(spec, batch_norm):
    return cnn3(spec, batch_norm)


EP_DATA = DatasetInfo(spec=InputSpec(1, 8, 3, (0.5,), (0.25,)), augmentation=Augmentation(), load=None)


class EpMethod(IBP):
    """IBP under another name."""
'''


def fake_distribution(folder, entry_points: str, module: str = EP_PLUGIN):
    """A package installed in ``folder`` as importlib.metadata sees one: a dist-info with METADATA and
    entry_points.txt, and its module."""
    info = folder / "ep_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    write(info / "entry_points.txt", entry_points)
    write(folder / "ep_plugin.py", module)


ENTRY_POINTS = '''
[ctbench.models]
ep_model = ep_plugin:ep_model
[ctbench.datasets]
ep_data = ep_plugin:EP_DATA
[ctbench.methods]
ep_method = ep_plugin:EpMethod
'''


def test_entry_points_register_models_datasets_and_methods_once_on_first_lookup(tmp_path, monkeypatch):
    fake_distribution(tmp_path, ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    scans = []
    real_entry_points = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **selection: scans.append(selection["group"]) or real_entry_points(**selection))
    assert "ep_plugin" not in sys.modules  # nothing is imported before a name is looked up
    config = config_from_dict({"data": {"dataset": "ep_data"}, "model": {"architecture": "ep_model"},
                               "method": {"name": "ep_method"}})
    module = sys.modules["ep_plugin"]
    assert MODELS.get("ep_model") is module.ep_model and DATASETS.get("ep_data") is module.EP_DATA
    assert METHODS.get(config.method.name) is module.EpMethod
    assert "ep_method" in METHODS.names() and "ep_model" in MODELS
    assert sorted(scans) == ["ctbench.datasets", "ctbench.methods", "ctbench.models"]  # each group scanned once


def test_an_entry_point_that_fails_to_load_is_named_with_its_exception(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "[ctbench.models]\nbad = ep_plugin:missing_builder\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):  # every lookup says so, not only the first
        with pytest.raises(PluginError, match=r"plugin 'bad' \(entry point 'ep_plugin:missing_builder' in group "
                                              r"'ctbench.models' of ep-plugin\) failed to load: AttributeError"):
            MODELS.get("cnn3")


def test_an_entry_point_may_not_take_a_built_in_name(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "[ctbench.models]\ncnn3 = ep_plugin:ep_model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="a model named 'cnn3' is already registered; rename the entry point"):
        MODELS.names()


# -- data.dataset: files --------------------------------------------------------------------------------


def files_data(path, **keys):
    """The data section of a config reading ``path``: 8x8 grayscale images of 3 classes, unless ``keys`` say
    otherwise."""
    data = {"dataset": "files", "path": str(path), "shape": [1, 8, 8], "classes": 3, **keys}
    return config_from_dict({"data": data}).data


def synthetic(count, channels=1, seed=0):
    generator = np.random.default_rng(seed)
    return (generator.integers(0, 256, (count, channels, 8, 8), dtype=np.uint8),
            generator.integers(0, 3, count).astype(np.int64))


def write_idx(path, array, gzipped=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gzipped:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def test_idx_folder_gzipped_or_not(tmp_path):
    (train_x, train_y), (test_x, test_y) = synthetic(20), synthetic(10, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x[:, 0])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x[:, 0], gzipped=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, gzipped=False)
    dataset = load_data(files_data(tmp_path))  # the format comes from the folder
    assert dataset.train.images.shape == (20, 1, 8, 8) and dataset.train.images.dtype == torch.uint8
    assert torch.equal(dataset.train.images, torch.from_numpy(train_x)) and torch.equal(dataset.test.labels,
                                                                                        torch.from_numpy(test_y))
    assert dataset.spec.classes == 3 and dataset.spec.mean == (0.0,) and dataset.spec.std == (1.0,)


def test_image_folder_of_pngs(tmp_path):
    from PIL import Image

    generator = np.random.default_rng(0)
    pixels = {}
    for split, count in (("train", 2), ("test", 1)):
        for name in ("cat", "bird", "dog"):  # classes: bird 0, cat 1, dog 2
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(count):
                image = generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / name / f"{index}.png")
                pixels[split, name, index] = image
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    dataset = load_data(files_data(tmp_path, shape=[3, 8, 8], mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]))
    assert dataset.train.images.shape == (6, 3, 8, 8) and dataset.test.images.shape == (3, 3, 8, 8)
    assert dataset.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and dataset.test.labels.tolist() == [0, 1, 2]
    assert torch.equal(dataset.train.images[2], torch.from_numpy(pixels["train", "cat", 0]).permute(2, 0, 1))
    assert dataset.spec.mean == (0.5, 0.5, 0.5)


def test_npz_of_channels_last_floats_and_of_a_stated_value_range(tmp_path):
    (train_x, train_y), (test_x, test_y) = synthetic(12, channels=3), synthetic(6, channels=3, seed=1)
    np.savez(tmp_path / "unit.npz", x_train=train_x.transpose(0, 2, 3, 1) / 255.0, y_train=train_y,
             x_test=test_x.transpose(0, 2, 3, 1) / 255.0, y_test=test_y)
    dataset = load_data(files_data(tmp_path / "unit.npz", shape=[3, 8, 8]))
    assert dataset.train.images.shape == (12, 3, 8, 8) and dataset.train.images.dtype == torch.float32
    assert torch.allclose(dataset.train.images, torch.from_numpy(train_x).float() / 255)

    np.savez(tmp_path / "bytes.npz", x_train=train_x.astype(np.float32), y_train=train_y,
             x_test=test_x.astype(np.float32), y_test=test_y)
    dataset = load_data(files_data(tmp_path / "bytes.npz", shape=[3, 8, 8], value_range=[0, 255]))
    assert torch.allclose(dataset.test.images, torch.from_numpy(test_x).float() / 255)
    assert float(dataset.test.images.min()) >= 0 and float(dataset.test.images.max()) <= 1


def test_pt_dict_of_tensors(tmp_path):
    (train_x, train_y), (test_x, test_y) = synthetic(12), synthetic(6, seed=1)
    torch.save({"x_train": torch.from_numpy(train_x[:, 0]), "y_train": torch.from_numpy(train_y),
                "x_test": torch.from_numpy(test_x[:, 0]), "y_test": torch.from_numpy(test_y).int()}, tmp_path / "d.pt")
    dataset = load_data(files_data(tmp_path / "d.pt"))
    assert dataset.train.images.shape == (12, 1, 8, 8) and dataset.train.images.dtype == torch.uint8
    assert dataset.test.labels.dtype == torch.int64 and torch.equal(dataset.test.labels, torch.from_numpy(test_y))


def test_cli_trains_on_an_npz_file(tmp_path, capsys):
    (train_x, train_y), (test_x, test_y) = synthetic(48), synthetic(16, seed=1)
    np.savez(tmp_path / "mine.npz", x_train=train_x, y_train=train_y, x_test=test_x, y_test=test_y)
    config = write(tmp_path / "mine.yaml", f'''
        preset: demo/ibp
        data: {{dataset: files, path: {tmp_path / "mine.npz"}, shape: [1, 8, 8], classes: 3, validation_size: 16}}
        optim: {{epochs: 1, batch_size: 16, lr_milestones: []}}
        eps: {{ramp_end_epoch: 1}}
        attack: {{steps: 1, restarts: 1}}
        evaluation: {{attack_steps: 1, attack_restarts: 1}}
        ''')
    code = main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet", "--json"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert json.loads(output.out)["test"]["samples"] == 16


def bad_npz(tmp_path, **changes):
    (train_x, train_y), (test_x, test_y) = synthetic(12), synthetic(6, seed=1)
    arrays = {"x_train": train_x, "y_train": train_y, "x_test": test_x, "y_test": test_y, **changes}
    path = tmp_path / "bad.npz"
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


@pytest.mark.parametrize("changes, keys, message", [
    ({"x_train": np.zeros((12, 1, 9, 9), np.uint8)}, {},
     r"bad.npz: x_train has shape \(12, 1, 9, 9\), but data.shape is \[1, 8, 8\]: store the images as"),
    ({"y_test": np.array([0, 1, 2, 5, 0, 1])}, {},
     r"bad.npz: y_test holds labels from 0 to 5, outside 0 to 2 \(data.classes is 3\): set data.classes"),
    ({"y_train": np.zeros(12, np.float32)}, {}, r"y_train must be a 1-D array of integer class labels"),
    ({"y_train": np.zeros(11, np.int64)}, {}, r"y_train has 11 labels for 12 images"),
    ({"x_test": None}, {}, r"bad.npz has no x_test \(data.path\): store the arrays x_train, y_train, x_test, y_test"),
    ({"x_train": np.full((12, 1, 8, 8), 2.0)}, {},
     r"x_train holds values from 2 to 2, outside \[0, 1\] \(the default data.value_range for torch.float64 "
     r"values\): set data.value_range"),
    ({"x_train": np.full((12, 1, 8, 8), 300.0)}, {"value_range": [0, 255]},
     r"x_train holds values from 300 to 300, outside \[0, 255\] \(data.value_range\)"),
    ({"x_test": np.full((6, 1, 8, 8), np.nan)}, {}, r"x_test holds NaN or infinite values"),
])
def test_bad_arrays_name_the_file_the_key_and_the_fix(tmp_path, changes, keys, message):
    with pytest.raises(DataError, match=message):
        load_data(files_data(bad_npz(tmp_path, **changes), **keys))


def test_bad_folders_and_paths_name_the_file_and_the_fix(tmp_path):
    from PIL import Image

    with pytest.raises(DataError, match=r"missing.npz does not exist \(data.path; a relative path is taken from"):
        load_data(files_data(tmp_path / "missing.npz"))
    with pytest.raises(DataError, match=r"has no train-labels-idx1-ubyte \(or train-labels-idx1-ubyte.gz\)"):
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", synthetic(4)[0][:, 0])
        load_data(files_data(tmp_path))
    images = tmp_path / "images"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (images / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / split / name / "0.png")
    with pytest.raises(DataError, match=r"train has 2 class folders \(a, b\) but data.classes is 3: set data.classes"):
        load_data(files_data(images))
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(images / "test" / "b" / "1.png")
    with pytest.raises(DataError, match=r"1.png is 8x9 pixels, but data.shape says 8x8: resize the images"):
        load_data(files_data(images, classes=2))
    with pytest.raises(DataError, match=r"cannot tell its format from data.path.*set data.format"):
        load_data(files_data(tmp_path / "images" / "train"))


@pytest.mark.parametrize("keys, message", [
    ({"shape": None}, r"data.shape is required with data.dataset: files, e.g. data.shape: \[1, 28, 28\]"),
    ({"shape": [1, 8, 6]}, r"data.shape: the models take square images \(H == W\), got 8x6"),
    ({"shape": [8, 8]}, r"data.shape: give the images' \[C, H, W\]"),
    ({"classes": 1}, r"data.classes: must be >= 2, got 1"),
    ({"mean": [0.5, 0.5]}, r"data.mean and data.std go together"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, r"data.mean: give one value per channel \(1, data.shape\[0\]\)"),
    ({"value_range": [1, 0]}, r"data.value_range: give \[low, high\] with low < high"),
    ({"format": "csv"}, r"data.format: use idx or image-folder or npz or pt, got 'csv'"),
    ({"dataset": "mnist"}, r"data.path describes your own files, read only with data.dataset: files"),
    ({"fromat": "npz"}, r"unknown config key data.fromat.*did you mean 'format'\?"),
])
def test_bad_files_keys_are_config_errors_naming_the_key(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        files_data(tmp_path / "d.npz", **keys)
