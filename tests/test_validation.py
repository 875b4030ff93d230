"""Bad input gets a clear message naming the key and the fix: no traceback, no half-made run
folder, no run that diverges and still "finishes", and Ctrl-C says what is kept."""
import json
import math

import pytest
import torch

from ctbench import cli
from ctbench.cli import main
from ctbench.config import ConfigError, apply_overrides, config_from_dict, config_to_dict
from ctbench.data import DATASETS
from ctbench.presets import load_config, preset_data
from ctbench.training import DivergenceError, Trainer, build_model_for, resolve_device
from ctbench.training.divergence import DivergenceMonitor

SMALL = ["data.train_subset=256", "data.validation_size=128", "optim.batch_size=64", "optim.epochs=3",
         "eps.ramp_end_epoch=1", "optim.lr_milestones=[2]", "evaluation.final_test_count=100",
         "evaluation.attack_steps=2", "evaluation.attack_restarts=1", "attack.steps=2"]


def demo(*overrides):
    return config_from_dict(apply_overrides(preset_data("demo/ibp"), list(overrides)))


def train_cli(capsys, out, *overrides):
    """(exit code, stderr) of `ctbench train demo/ibp --quiet --set ... --out OUT`."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    code = main(["train", "demo/ibp", "--quiet", *sets, "--out", str(out)])
    return code, capsys.readouterr().err


def error_of(*overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        demo(*overrides)
    return str(caught.value)


def test_unknown_dataset_names_the_key_the_known_names_and_a_suggestion(tmp_path, capsys):
    code, err = train_cli(capsys, tmp_path / "run", "data.dataset=mnsit")
    assert code == 2 and "Traceback" not in err
    assert "unknown dataset 'mnsit' (data.dataset); known: cifar10, mnist, tinyimagenet; did you mean 'mnist'?" in err
    assert not (tmp_path / "run").exists()


def test_unknown_architecture_names_the_key_and_the_known_models():
    assert "unknown model 'resnet18' (model.architecture); known: cnn3, cnn5, cnn7" in error_of(
        "model.architecture=resnet18")


def test_unknown_method_and_initialization_suggest_the_closest_name():
    assert "(method.name)" in error_of("method.name=ibpp") and "did you mean 'ibp'?" in error_of("method.name=ibpp")
    assert "(model.init); known: auto, keep, ibp, kaiming; did you mean 'kaiming'?" in error_of("model.init=kaimin")


def test_registry_lookups_raise_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"\(data.dataset\).*did you mean 'cifar10'"):
        DATASETS.get("cifar")


def test_unknown_config_keys_suggest_the_closest_key():
    assert "unknown config key optim.lrr" in error_of("optim.lrr=1e-3")
    assert "did you mean 'lr'?" in error_of("optim.lrr=1e-3")
    assert "valid keys of method: name, w_rob; did you mean 'w_rob'?" in error_of("method.w_robb=1")


def test_unknown_preset_suggests_the_closest_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'dmeo/ibp'.*SETTING one of .*demo.*did you mean 'demo/ibp'"):
        load_config("dmeo/ibp")


def test_zero_batch_size_is_an_error_before_any_run_folder_exists(tmp_path, capsys):
    code, err = train_cli(capsys, tmp_path / "run", "optim.batch_size=0")
    assert code == 2 and "optim.batch_size: must be >= 1, got 0" in err
    assert not (tmp_path / "run").exists()


def test_a_negative_train_subset_blames_train_subset():
    message = error_of("data.train_subset=-5")
    assert message.startswith("data.train_subset:") and "validation_size" not in message


def test_subset_and_validation_split_must_fit_in_the_training_set(tmp_path, mnist):
    with pytest.raises(ConfigError, match=r"data.train_subset=60000 plus data.validation_size=5000 is more than"):
        Trainer(demo("data.train_subset=60000"), tmp_path / "run", dataset=mnist)
    with pytest.raises(ConfigError, match=r"data.validation_size=60000 must be in \[0, 60000\)"):
        Trainer(demo("data.validation_size=60000"), tmp_path / "run", dataset=mnist)
    assert not (tmp_path / "run").exists()


def test_an_unavailable_device_lists_what_is_available(monkeypatch):
    with pytest.raises(ConfigError, match=r"device 'tpu' is not available; use auto, cpu, cuda, cuda:N or mps "
                                          r"\(available here: cpu"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available.*available here: cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("value", ["1e38", ".nan", ".inf", "-1", "0", "11"])
def test_the_learning_rate_must_be_finite_positive_and_sane(value):
    message = error_of(f"optim.lr={value}")
    assert message.startswith("optim.lr:") and ("in (0, 10]" in message or "finite" in message)


def test_zero_epochs_is_an_error_and_writes_nothing(tmp_path, capsys):
    code, err = train_cli(capsys, tmp_path / "run", "optim.epochs=0")
    assert code == 2 and "optim.epochs: must be >= 1, got 0" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, key", [
    (["eps.train_eps=-0.1"], "eps.train_eps"),
    (["eps.test_eps=-1"], "eps.test_eps"),
    (["eps.train_eps=2"], "eps.train_eps"),
    (["method.w_rob=1.5"], "method.w_rob"),
    (["method.name=sabr", "method.eps_shrink=0"], "method.eps_shrink"),
    (["method.name=sabr", "method.eps_shrink=1.5"], "method.eps_shrink"),
    (["regularization.l1=-1e-6"], "regularization.l1"),
    (["optim.grad_clip=0"], "optim.grad_clip"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.accumulation_steps=0"], "optim.accumulation_steps"),
    (["optim.accumulation_steps=3"], "optim.accumulation_steps"),
    (["optim.lr_decay=0"], "optim.lr_decay"),
    (["optim.lr_milestones=[2, -1]"], "optim.lr_milestones[1]"),
    (["optim.divergence_factor=1"], "optim.divergence_factor"),
    (["data.validation_size=-1"], "data.validation_size"),
    (["eps.ramp_start_epoch=3"], "ramp_start_epoch <= ramp_end_epoch"),
    (["eps.ramp_end_epoch=9"], "eps.ramp_end_epoch"),
    (["swa.start_epoch=5"], "swa.start_epoch"),
    (["attack.steps=-1"], "attack.steps"),
    (["attack.restarts=-1"], "attack.restarts"),
    (["evaluation.attack_steps=-1"], "evaluation.attack_steps"),
    (["evaluation.attack_restarts=0"], "evaluation.attack_restarts"),
    (["evaluation.batch_size=0"], "evaluation.batch_size"),
    (["threads=0"], "threads"),
])
def test_every_numeric_value_is_checked_and_the_message_names_the_key(overrides, key):
    assert key in error_of(*overrides)


def test_fractions_and_null_switches_are_still_accepted():
    config = demo("eps.train_eps=2/255", "eps.test_eps=2/255", "optim.grad_clip=null", "optim.divergence_factor=null")
    assert math.isclose(config.eps.train_eps, 2 / 255) and config.optim.grad_clip is None


def test_the_monitor_flags_non_finite_values_and_losses_far_above_the_recent_median():
    monitor = DivergenceMonitor(1e4)
    assert monitor.problem({"natural_loss": 2.3}) is None
    assert monitor.problem({"natural_loss": 2e3}) is None  # far above, but within the factor
    assert "over the limit 1e+07" in monitor.problem({"natural_loss": 2.0, "robust_loss": 2e7})  # median 1001
    assert "became nan" in monitor.problem({"natural_loss": 2.0, "shi_penalty": float("nan")})
    low = DivergenceMonitor(1e4)
    for _ in range(5):
        low.problem({"natural_loss": 1e-4})
    assert low.problem({"natural_loss": 50.0}) is None  # the floor of 1: one hard batch is no divergence
    off = DivergenceMonitor(None)
    off.problem({"natural_loss": 2.3})
    assert off.problem({"natural_loss": 1e30}) is None
    assert off.problem({"natural_loss": float("inf")}) is not None


def test_a_huge_learning_rate_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, mnist):
    """From scratch (lr 10): stopped in epoch 1, no run folder left. Raised to 1e9 in epoch 2: the
    checkpoint of epoch 1 stays on disk, untouched."""
    with pytest.raises(DivergenceError, match=r"epoch 1/3, step 2/4 .*optim.lr too high.*run's files are removed"):
        Trainer(demo(*SMALL, "optim.lr=10"), tmp_path / "scratch", dataset=mnist).fit()
    assert not (tmp_path / "scratch").exists()

    trainer = Trainer(demo(*SMALL), tmp_path / "run", dataset=mnist)
    kept = {}

    def raise_lr_in_epoch_2(iterable, total, description):
        if description.startswith("epoch 2/"):
            kept.update(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False))
            for group in trainer.optimizer.param_groups:
                group["lr"] = 1e9
        return iterable

    trainer.progress = raise_lr_in_epoch_2
    with pytest.raises(DivergenceError, match=r"epoch 2/3, step \d+/4 \(lr 1e\+09.*last good checkpoint \(epoch 1\)"):
        trainer.fit()
    on_disk = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert on_disk["epoch"] == 0 == kept["epoch"]
    assert all(torch.equal(on_disk["model"][key], kept["model"][key]) for key in kept["model"])
    assert not (tmp_path / "run" / "final.pt").exists()


def test_the_cli_reports_divergence_with_a_non_zero_exit_code(tmp_path, capsys):
    code, err = train_cli(capsys, tmp_path / "run", *SMALL, "optim.lr=10")
    assert code == 2 and "ctbench: error: training diverged at epoch 1/3" in err and "Traceback" not in err


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted_fit(self, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted_fit)
    code, err = train_cli(capsys, tmp_path / "run", *SMALL)
    assert code == 130
    assert err.strip() == ("ctbench: interrupted before the first checkpoint, so nothing is kept; "
                           "rerun the same command to start again")


def test_ctrl_c_in_train_keeps_the_last_checkpoint_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    train_epoch = Trainer._train_epoch

    def interrupt_in_epoch_2(self, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch, *args)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupt_in_epoch_2)
    run = tmp_path / "run"
    code, err = train_cli(capsys, run, *SMALL)
    assert code == 130
    assert err.strip() == (f"ctbench: interrupted: the last checkpoint is kept in {run}; "
                           "rerun the same command with --resume to continue")
    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)
    sets = [arg for override in SMALL for arg in ("--set", override)]
    assert main(["train", "demo/ibp", "--quiet", *sets, "--out", str(run), "--resume"]) == 0
    assert (run / "final.pt").exists()


def test_sigterm_stops_train_like_ctrl_c_even_with_sigint_ignored(tmp_path, capsys, monkeypatch):
    """A scheduler's or kill's SIGTERM, and a SIGINT to a command the shell started in the
    background (which starts with SIGINT ignored), keep the checkpoint and exit 128 + signal."""
    import os
    import signal

    train_epoch = Trainer._train_epoch
    for number in (signal.SIGTERM, signal.SIGINT):
        def signal_in_epoch_2(self, epoch, *args):
            if epoch == 1:
                os.kill(os.getpid(), number)
            return train_epoch(self, epoch, *args)

        monkeypatch.setattr(Trainer, "_train_epoch", signal_in_epoch_2)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code, err = train_cli(capsys, tmp_path / number.name, *SMALL)
        finally:
            signal.signal(signal.SIGINT, previous)
        assert code == 128 + number
        assert "interrupted: the last checkpoint is kept" in err
        assert (tmp_path / number.name / "checkpoint.pt").exists() and not (tmp_path / number.name / "final.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command restores the handlers


def test_ctrl_c_in_certify_counts_the_verdicts_kept(tmp_path, capsys, monkeypatch):
    config = demo(*SMALL, "model.architecture=cnn3")
    run = tmp_path / "run"
    run.mkdir()
    model = build_model_for(config, DATASETS.get("mnist").spec)
    torch.save({"config": config_to_dict(config), "model": model.state_dict()}, run / "final.pt")
    out = tmp_path / "verdicts"

    def certify_then_interrupt(*args, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        records = [json.dumps({"index": index, "verdict": "unknown"}) for index in (0, 1, 2)]
        (out_dir / "verdicts.jsonl").write_text("\n".join(records) + '\n{"index": 3, "ver')  # a partial last line
        raise KeyboardInterrupt

    monkeypatch.setattr("ctbench.certify.certify", certify_then_interrupt)
    code = main(["certify", str(run), "--count", "5", "--quiet", "--out", str(out)])
    assert code == 130
    assert capsys.readouterr().err.strip() == (f"ctbench: interrupted: 3 verdicts are kept in {out}; "
                                               "rerun the same command to resume")


def test_other_commands_report_a_plain_interruption(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_presets", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err.strip() == "ctbench: interrupted"
