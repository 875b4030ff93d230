"""Watching a run (epoch lines, plain logs in files, metrics.csv, TensorBoard, environment.json,
plot), extending a run with --resume --allow-change and fine-tuning with --init-from."""
import csv
import json
import shutil
import subprocess

import pytest
import torch

from ctbench.attacks.pgd import fast_bfloat16
from ctbench.cli import main
from ctbench.config import ConfigError, apply_overrides, config_from_dict
from ctbench.environment import source_commit
from ctbench.presets import preset_data
from ctbench.training import CheckpointError, Trainer

SMALL = ["data.train_subset=256", "data.validation_size=128", "optim.batch_size=128", "optim.epochs=2",
         "eps.ramp_end_epoch=1", "optim.lr_milestones=[1]", "evaluation.final_test_count=100",
         "evaluation.attack_steps=2", "evaluation.attack_restarts=1", "model.architecture=cnn3", "attack.steps=2"]


def small_config(*extra):
    return config_from_dict(apply_overrides(preset_data("mnist-mini-0.1/ibp"), SMALL + list(extra)))


def test_the_trainer_logs_every_epoch_and_prints_nothing(tmp_path, mnist, capfd):
    records, phases = [], []

    def progress(iterable, total, description):
        phases.append(description)
        return iterable

    results = Trainer(small_config("attack.precision=auto"), tmp_path / "run", dataset=mnist, progress=progress,
                      on_epoch=records.append).fit()
    assert capfd.readouterr() == ("", "")  # silent: all it tells goes to the callbacks and the run folder
    assert [record["epoch"] for record in records] == [1, 2] and results["model"].startswith("epoch ")
    assert phases == ["epoch 1/2", "validation", "epoch 2/2", "validation", "test", "validation"]
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"train/natural_loss", "validation/certified_accuracy", "selected"} <= set(rows[0])
    session, = json.loads((run / "environment.json").read_text())["sessions"]
    assert {"ctbench", "torch", "git_commit", "device", "threads", "started", "finished"} <= set(session)
    assert session["device"] == "cpu" and session["finished"] >= session["started"]
    # auto is recorded as what it resolved to on this machine
    assert session["attack_precision"] == ("bfloat16" if fast_bfloat16("cpu") else "float32") and session["cpu"]
    if _has_tensorboard():
        assert any((run / "tensorboard").iterdir())


def test_the_recorded_commit_is_dirty_only_when_the_code_itself_differs(tmp_path, tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("no git on PATH")
    package, results = tmp_path / "src" / "pkg", tmp_path / "results"
    package.mkdir(parents=True)
    results.mkdir()
    (package / "code.py").write_text("x = 1\n")
    (results / "table.md").write_text("| a |\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert source_commit(package) == head
    (results / "table.md").write_text("| b |\n")  # results rewritten: the code is still the commit's
    assert source_commit(package) == head
    (package / "new_module.py").write_text("y = 2\n")  # a new, untracked module is a code change
    assert source_commit(package) == head + "+dirty"
    (package / "new_module.py").unlink()
    (package / "code.py").write_text("x = 2\n")
    assert source_commit(package) == head + "+dirty"
    outside = tmp_path_factory.mktemp("not-a-checkout")
    if subprocess.run(["git", "-C", str(outside), "rev-parse"], capture_output=True).returncode != 0:
        assert source_commit(outside) is None  # (skipped where the temporary folder lies in a checkout)
    assert source_commit(outside / "missing") is None


def _has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def train_cli(capsys, *arguments):
    code = main(["train", "mnist-mini-0.1/ibp", *[item for key in SMALL for item in ("--set", key)], *arguments])
    return code, capsys.readouterr()


def test_in_a_file_the_cli_writes_plain_lines_one_per_epoch(tmp_path, capsys):
    code, captured = train_cli(capsys, "--out", str(tmp_path / "run"))
    assert code == 0 and "\r" not in captured.err
    lines = captured.err.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert "validation natural" in lines[0] and lines[-1] == "final test: 1 batch"
    assert "adversarial" in captured.out and "(PGD 2x1 (CE+margin))" in captured.out
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_resume_names_each_changed_key_and_allows_the_safe_ones(tmp_path, mnist):
    run = tmp_path / "run"
    Trainer(small_config("optim.epochs=1"), run, dataset=mnist).fit()
    with pytest.raises(CheckpointError, match=r"optim.epochs: 1 in the run, 3 given \(may change with --allow-change"):
        Trainer(small_config("optim.epochs=3"), run, dataset=mnist).fit(resume=True)
    with pytest.raises(CheckpointError, match=r"in 2 key\(s\).*optim.lr: 0.0005 in the run, 0.001 given \(a resume may "
                                              r"not change it.*--init-from"):
        Trainer(small_config("optim.epochs=3", "optim.lr=1e-3"), run, dataset=mnist, allow_change=True).fit(resume=True)
    results = Trainer(small_config("optim.epochs=3", "evaluation.attack_steps=3"), run, dataset=mnist,
                      allow_change=True).fit(resume=True)
    assert results["test"]["attack"] == "PGD 3x1 (CE+margin)"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    sessions = json.loads((run / "environment.json").read_text())["sessions"]
    assert [session["first_epoch"] for session in sessions] == [1, 2]
    assert sessions[1]["changed"] == {"evaluation.attack_steps": [2, 3], "optim.epochs": [1, 3]}
    assert "epochs: 3" in (run / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="fewer than the 3 epochs already trained"):
        Trainer(small_config("optim.epochs=2", "evaluation.attack_steps=3"), run, dataset=mnist,
                allow_change=True).fit(resume=True)


def test_init_from_starts_a_new_run_from_trained_weights_and_names_a_shape_mismatch(tmp_path, mnist, capsys):
    Trainer(small_config("optim.epochs=1"), tmp_path / "source", dataset=mnist).fit()
    trained = torch.load(tmp_path / "source" / "final.pt", weights_only=False)["model"]
    tuned = Trainer(small_config("optim.epochs=1", "method.name=pgd"), tmp_path / "tuned", dataset=mnist,
                    init_from=tmp_path / "source")
    assert all(torch.equal(tuned.model.state_dict()[key], value) for key, value in trained.items())
    torch.save(trained, tmp_path / "weights.pt")  # a plain state_dict is accepted too
    Trainer(small_config("optim.epochs=1"), tmp_path / "plain", dataset=mnist, init_from=tmp_path / "weights.pt")
    code, captured = train_cli(capsys, "--set", "model.architecture=cnn5", "--init-from", str(tmp_path / "source"),
                               "--out", str(tmp_path / "wrong"))
    assert code == 2 and "has shape (16, 1, 5, 5) in the checkpoint but (16, 1, 3, 3) in the model" in captured.err
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(ConfigError, match="use one of them"):
        Trainer(small_config("optim.epochs=1"), tmp_path / "source", dataset=mnist,
                init_from=tmp_path / "weights.pt").fit(resume=True)
