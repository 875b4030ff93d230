"""Every shipped preset loads, and its key values equal the paper's Tables 3-7 and App. B."""
import pytest

from ctbench.presets import load_config, preset_names

METHODS = ["pgd", "edac", "ibp", "crown_ibp", "sabr", "taps", "staps", "mtl_ibp"]
_ = None  # "/" in the paper's tables

# Transcribed from the paper, one row per table row, columns in the order of METHODS.
TABLES = {
    "mnist-0.1": {  # Table 3
        "l1": [1e-5, 1e-5, 2e-6, 2e-6, 1e-6, 1e-6, 1e-6, 1e-5],
        "w_rob": [1.0, 1.0, 1.0, 1.0, 0.7, 0.7, 0.7, 0.7],
        "train_eps": [0.2] * 8,
        "eps_shrink": [_, _, _, _, 0.4, _, 0.4, _],
        "classifier_size": [_, _, _, _, _, 3, 1, _],
        "gradient_scale": [_, _, _, _, _, 4, 4, _],
        "relu_shrink": [_] * 8,
        "ibp_coefficient": [_, _, _, _, _, _, _, 0.02],
    },
    "mnist-0.3": {  # Table 4
        "l1": [5e-6, 5e-6, 1e-6, 1e-6, 2e-6, 2e-6, 2e-6, 1e-6],
        "w_rob": [1.0] * 8,
        "train_eps": [0.3] * 8,
        "eps_shrink": [_, _, _, _, 0.8, _, 0.8, _],
        "classifier_size": [_, _, _, _, _, 1, 1, _],
        "gradient_scale": [_, _, _, _, _, 3, 1, _],
        "relu_shrink": [_] * 8,
        "ibp_coefficient": [_, _, _, _, _, _, _, 0.5],
    },
    "cifar10-2_255": {  # Table 5
        "l1": [2e-5, 5e-6, 1e-6, 1e-6, 1e-6, 2e-6, 5e-6, 3e-6],
        "w_rob": [1.0, 1.0, 1.0, 1.0, 0.7, 1.0, 1.0, 0.9],
        "train_eps": [2 / 255, 2 / 255, 2 / 255, 2 / 255, 3 / 255, 2 / 255, 3 / 255, 2 / 255],
        "eps_shrink": [_, _, _, _, 0.1, _, 0.1, _],
        "classifier_size": [_, _, _, _, _, 5, 1, _],
        "gradient_scale": [_, _, _, _, _, 5, 5, _],
        "relu_shrink": [_, _, _, _, 0.8, _, 0.8, _],
        "ibp_coefficient": [_, _, _, _, _, _, _, 0.01],
    },
    "cifar10-8_255": {  # Table 6
        "l1": [1e-6, 1e-6, 0, 0, 0, 0, 0, 0],
        "w_rob": [1.0] * 8,
        "train_eps": [8 / 255] * 8,
        "eps_shrink": [_, _, _, _, 0.7, _, 0.9, _],
        "classifier_size": [_, _, _, _, _, 1, 1, _],
        "gradient_scale": [_, _, _, _, _, 2, 2, _],
        "relu_shrink": [_] * 8,
        "ibp_coefficient": [_, _, _, _, _, _, _, 0.5],
    },
    "tinyimagenet-1_255": {  # Table 7
        "l1": [5e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 5e-5],
        "w_rob": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7],
        "train_eps": [1 / 255] * 8,
        "eps_shrink": [_, _, _, _, 0.4, _, 0.6, _],
        "classifier_size": [_, _, _, _, _, 1, 1, _],
        "gradient_scale": [_, _, _, _, _, 8, 4, _],
        "relu_shrink": [_] * 8,
        "ibp_coefficient": [_, _, _, _, _, _, _, 0.05],
    },
}
# App. B.3 / B.4: (epochs, ramp start, ramp end, lr milestones, batch, Shi weight, attack steps,
# test eps, MTL-IBP SWA start)
SCHEDULES = {
    "mnist-0.1": (70, 0, 20, (50, 60), 256, 0.5, 10, 0.1, 65),
    "mnist-0.3": (70, 0, 20, (50, 60), 256, 0.5, 5, 0.3, 65),
    "cifar10-2_255": (160, 1, 81, (120, 140), 128, 0.5, 8, 2 / 255, 150),
    "cifar10-8_255": (240, 1, 121, (200, 220), 128, 0.5, 10, 8 / 255, 225),
    "tinyimagenet-1_255": (160, 1, 81, (120, 140), 128, 0.2, 1, 1 / 255, 150),
}
MINI = {"mnist-mini-0.1": "mnist-0.1", "mnist-mini-0.3": "mnist-0.3"}
# mini presets tuned on their own schedule (App. B.4 sweep, validation split) instead of the tables' values
MINI_TUNED = {("mnist-mini-0.1", "ibp"): {"l1": 1e-6, "train_eps": 0.15}, ("mnist-mini-0.1", "sabr"): {"train_eps": 0.15}}


def test_every_setting_has_every_method_and_all_presets_load():
    names = set(preset_names())
    for setting in list(TABLES) + list(MINI):
        for method in METHODS:
            assert f"{setting}/{method}" in names
    for name in names:
        load_config(name)


def _cases():
    for setting, table in TABLES.items():
        for column, method in enumerate(METHODS):
            for setting_name in [setting] + [mini for mini, full in MINI.items() if full == setting]:
                expected = {key: row[column] for key, row in table.items()}
                yield setting_name, method, {**expected, **MINI_TUNED.get((setting_name, method), {})}


@pytest.mark.parametrize("setting,method,expected", list(_cases()))
def test_preset_values_equal_the_paper_tables(setting, method, expected):
    config = load_config(f"{setting}/{method}")
    options = config.method.options
    assert config.method.name == method
    assert config.regularization.l1 == pytest.approx(expected["l1"], abs=1e-12)
    assert config.method.w_rob == expected["w_rob"]
    assert config.eps.train_eps == pytest.approx(expected["train_eps"])
    if setting in MINI and expected["classifier_size"] is not None:
        expected = {**expected, "classifier_size": 1}  # CNN3 has 2 ReLU layers: the head keeps one
    for key in ("eps_shrink", "classifier_size", "gradient_scale", "ibp_coefficient"):
        if expected[key] is not None:
            assert getattr(options, key) == pytest.approx(expected[key]), key
    if method in ("sabr", "staps"):
        assert options.relu_shrink == (expected["relu_shrink"] or 1.0)
    full = MINI.get(setting, setting)
    epochs, ramp_start, ramp_end, milestones, batch, shi, steps, test_eps, swa = SCHEDULES[full]
    assert config.eps.test_eps == pytest.approx(test_eps)
    assert config.optim.batch_size == batch and config.optim.lr == 5e-4 and config.optim.lr_decay == 0.2
    assert config.optim.grad_clip == 10.0 and config.regularization.shi_weight == shi
    assert config.attack.restarts == 3
    mtl_single_step = method == "mtl_ibp" and full != "cifar10-2_255"
    assert config.attack.steps == (1 if mtl_single_step else steps)
    assert config.attack.eps_factor == (2.0 if (method == "mtl_ibp" and full == "cifar10-2_255") else 1.0)
    if setting in MINI:  # CPU scale: CNN3-BN, 14 epochs, ramp over 0-4, decays at 10 and 12
        assert (config.model.architecture, config.optim.epochs) == ("cnn3", 14)
        assert (config.eps.ramp_start_epoch, config.eps.ramp_end_epoch, config.optim.lr_milestones) == (0, 4, (10, 12))
        assert config.swa.start_epoch == (13 if method == "mtl_ibp" else None)
    else:
        assert (config.model.architecture, config.model.batch_norm, config.optim.epochs) == ("cnn7", True, epochs)
        assert (config.eps.ramp_start_epoch, config.eps.ramp_end_epoch) == (ramp_start, ramp_end)
        assert config.eps.standard_epochs == ramp_start and config.optim.lr_milestones == milestones
        assert config.swa.start_epoch == (swa if method == "mtl_ibp" else None)
    if config.swa.start_epoch is not None:  # SWA hands on its average: nothing to select, all data trained on
        assert config.data.validation_size == 0 and config.swa.every_steps == 10
    assert config.attack.step_size is None  # each method's reference step (attack.step_size unset)


def test_a_config_saved_before_the_reference_keys_reads_as_the_behaviour_it_was_trained_with():
    from ctbench.config import config_to_dict, saved_config_from_dict

    saved = config_to_dict(load_config("mnist-mini-0.1/sabr"))
    for section, key in (("attack", "step_relative_to"), ("attack", "step_schedule"),
                         ("regularization", "shi_input_space"), ("swa", "every_steps"), ("data", "normalize")):
        del saved[section][key]
    del saved["method"]["regularizer_box"]
    saved["attack"]["random_start"] = True
    old = saved_config_from_dict(saved)
    assert (old.attack.random_start, old.attack.step_relative_to, old.attack.step_schedule) == ("uniform", "width", "decay")
    assert old.regularization.shi_input_space == "pixel" and old.swa.every_steps is None
    assert old.data.normalize is False and old.method.options.regularizer_box == "full"
    current = load_config("mnist-mini-0.1/sabr")  # a config saved today reads back unchanged
    assert saved_config_from_dict(config_to_dict(current)) == current
