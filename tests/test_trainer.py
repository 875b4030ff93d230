"""The training loop end to end on small MNIST subsets: resume, logs, errors, a real run."""
import json
import shutil

import pytest
import torch

from ctbench.cli import main
from ctbench.config import ConfigError, apply_overrides, config_from_dict
from ctbench.presets import preset_data
from ctbench.training import CheckpointError, Trainer

SMALL = ["data.train_subset=512", "data.validation_size=256", "optim.batch_size=128", "optim.epochs=3",
         "eps.ramp_end_epoch=1", "optim.lr_milestones=[2]", "evaluation.final_test_count=200",
         "evaluation.attack_steps=5", "evaluation.attack_restarts=1", "model.architecture=cnn3"]


def small_config(preset="mnist-0.1/ibp", extra=()):
    return config_from_dict(apply_overrides(preset_data(preset), SMALL + list(extra)))


class Interrupt(Exception):
    pass


def interrupt_in_epoch(epoch_to_stop):
    def progress(iterable, total, description):
        for index, item in enumerate(iterable):
            if description.startswith(f"epoch {epoch_to_stop + 1}/") and index == 2:
                raise Interrupt
            yield item
    return progress


# SABR's random attack starts check that the resumed run draws what the straight one drew
@pytest.mark.parametrize("preset", ["mnist-0.1/ibp", "mnist-0.1/sabr"])
def test_resumed_run_ends_where_an_uninterrupted_run_does(tmp_path, mnist, preset):
    config = small_config(preset, extra=["attack.steps=2", "evaluation.selection=last"])
    straight = Trainer(config, tmp_path / "straight", dataset=mnist).fit()
    with pytest.raises(Interrupt):
        Trainer(config, tmp_path / "killed", progress=interrupt_in_epoch(1), dataset=mnist).fit()
    log = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1]  # epochs are counted from 1 in the logs
    resumed = Trainer(config, tmp_path / "killed", dataset=mnist).fit(resume=True)
    assert resumed["test"] == straight["test"]
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert "validation" in lines[0] and "train" in lines[0]


def test_auto_attack_precision_trains_exactly_as_the_precision_it_resolves_to(tmp_path, mnist):
    """"auto" is bfloat16 or float32 by this machine's hardware, nothing of its own: a SABR run
    under it ends with the weights of the run that names the resolved precision, and its
    environment.json records that precision (what the results database reads)."""
    from ctbench.attacks.pgd import resolve_precision

    resolved = resolve_precision("auto", "cpu")
    finals = {}
    for precision in ("auto", resolved):
        config = small_config("mnist-0.1/sabr", extra=["attack.steps=2", "optim.epochs=2", "optim.lr_milestones=[1]",
                                                       "evaluation.selection=last", f"attack.precision={precision}"])
        Trainer(config, tmp_path / precision, dataset=mnist).fit()
        finals[precision] = torch.load(tmp_path / precision / "final.pt", weights_only=False)["model"]
        sessions = json.loads((tmp_path / precision / "environment.json").read_text())["sessions"]
        assert [session["attack_precision"] for session in sessions] == [resolved]
    assert all(torch.equal(finals["auto"][key], finals[resolved][key]) for key in finals[resolved])


def test_without_a_validation_split_every_training_image_is_used_and_the_last_epoch_is_handed_on(tmp_path, mnist):
    config = small_config(extra=["data.validation_size=0", "optim.epochs=2", "attack.steps=2"])
    trainer = Trainer(config, tmp_path / "run", dataset=mnist)
    assert len(trainer.train_split) == 512 and len(trainer.validation_split) == 0
    results = trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["validation"] for line in lines] == [None, None]
    assert [line["selected"] for line in lines] == [True, True]  # "last": each epoch replaces the one before
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    assert final["epoch"] == 1 and "test" in results
    with pytest.raises(ConfigError, match="needs a validation split"):
        small_config(extra=["data.validation_size=0", "evaluation.selection=certified"])


def test_run_folder_is_not_overwritten_and_resume_needs_the_same_config(tmp_path, mnist):
    config = small_config(extra=["optim.epochs=1", "eps.ramp_end_epoch=0"])
    Trainer(config, tmp_path / "run", dataset=mnist).fit()
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(config, tmp_path / "run", dataset=mnist).fit()
    other = small_config(extra=["optim.epochs=1", "eps.ramp_end_epoch=0", "optim.lr=0.1"])
    with pytest.raises(CheckpointError, match="config differs"):
        Trainer(other, tmp_path / "run", dataset=mnist).fit(resume=True)


def test_cli_evaluate_rejects_a_checkpoint_of_another_architecture(tmp_path, mnist, capsys):
    config = small_config(extra=["optim.epochs=1", "eps.ramp_end_epoch=0"])
    Trainer(config, tmp_path / "run", dataset=mnist).fit()
    state = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    state["config"]["model"]["architecture"] = "cnn5"
    torch.save(state, tmp_path / "mismatch.pt")
    assert main(["evaluate", str(tmp_path / "mismatch.pt"), "--count", "10"]) == 2
    message = capsys.readouterr().err
    assert "another architecture" in message and "shape" in message


def test_cli_errors_name_the_cause(tmp_path, capsys, monkeypatch):
    assert main(["train", "demo/ibp", "--set", "optim.learning_rate=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown config key optim.learning_rate" in capsys.readouterr().err
    assert main(["train", "demo/ibp", "--set", "optim.epochs=two", "--out", str(tmp_path / "x")]) == 2
    assert "optim.epochs: expected an integer" in capsys.readouterr().err
    assert main(["train", "nosuch/ibp"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_missing_and_corrupt_data_files_are_named(tmp_path, monkeypatch, capsys):
    from ctbench.data import mnist as mnist_module

    folder = tmp_path / "mnist"
    shutil.copytree(mnist_module.BUNDLED, folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the labels")
    monkeypatch.setattr(mnist_module, "BUNDLED", tmp_path / "nothing")
    assert main(["evaluate", "nowhere"]) == 2  # not a run
    capsys.readouterr()
    from ctbench.data import DataError, load_dataset

    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is corrupt"):
        load_dataset("mnist", tmp_path, download=False)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz.*CTBENCH_DATA"):
        load_dataset("mnist", tmp_path, download=False)


def test_train_and_certify_end_to_end_on_mnist_subset(tmp_path, mnist):
    """A real run: IBP on 5,000 MNIST images for 4 epochs, then certification of 500 test
    images must beat chance by far, and certified <= adversarial <= natural."""
    config = small_config(extra=["data.train_subset=5000", "optim.epochs=4", "eps.ramp_end_epoch=2", "optim.batch_size=64",
                                  "eps.train_eps=0.1",
                                  "optim.lr_milestones=[3]", "evaluation.final_test_count=500"])
    results = Trainer(config, tmp_path / "run", dataset=mnist).fit()
    test = results["test"]
    assert test["samples"] == 500
    assert test["certified_accuracy"] <= test["adversarial_accuracy"] <= test["natural_accuracy"]
    # the tighter of IBP and CROWN-IBP certifies at least what IBP does, and never beyond the attack
    assert test["certified_accuracy"] <= test["crown_ibp_certified_accuracy"] <= test["adversarial_accuracy"]
    assert test["natural_accuracy"] > 0.7 and test["certified_accuracy"] > 0.45
    assert main(["evaluate", str(tmp_path / "run"), "--count", "500", "--json"]) == 0
    # two worker processes, each certifying a shard, merge into what one process finds
    def certify_summary(out: str, *options: str) -> dict:
        assert main(["certify", str(tmp_path / "run"), "--count", "80", "--quiet", "--out", str(tmp_path / out),
                     *options]) == 0
        return json.loads((tmp_path / out / "summary.json").read_text())

    one = certify_summary("certify-1", "--stages", "ibp,crown-ibp")
    two = certify_summary("certify-2", "--stages", "ibp,crown-ibp", "--workers", "2")
    assert two["shards"] == {"of-2": {"found": [0, 1], "missing": []}}
    for key in ("samples", "counts", "certified_by_stage"):
        assert two[key] == one[key]
    # a restart with other stages replaces the merged verdicts instead of conflicting with them
    again = certify_summary("certify-2", "--stages", "ibp", "--workers", "2", "--restart")
    assert again["samples"] == 80 and set(again["certified_by_stage"]) == {"ibp"}


def test_swa_once_per_epoch_averages_the_weights_of_its_epochs_then_recomputes_batchnorm(tmp_path, mnist):
    config = small_config(extra=["optim.epochs=3", "swa.start_epoch=1", "swa.every_steps=null", "attack.steps=1"])
    snapshots = {}

    def progress(iterable, total, description):
        if not description.startswith("epoch "):  # validation and test batches
            return iterable
        epoch = int(description.split()[1].split("/")[0]) - 1
        if epoch >= 2:  # checkpoint.pt now holds the state after epoch - 1
            snapshots[epoch - 1] = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
        return iterable

    results = Trainer(config, tmp_path / "run", progress=progress, dataset=mnist).fit()
    snapshots[2] = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=False)["model"]
    assert results["model"].startswith("SWA")
    weights = [key for key in final if key.endswith("weight") and final[key].dim() > 1]
    for key in weights:
        assert torch.allclose(final[key], (snapshots[1][key] + snapshots[2][key]) / 2, atol=1e-6)
    running = [key for key in final if key.endswith("running_mean")]
    assert any(not torch.allclose(final[key], (snapshots[1][key] + snapshots[2][key]) / 2) for key in running)


def test_swa_snapshots_every_n_optimizer_steps_and_hands_on_their_mean(tmp_path, mnist):
    config = small_config(extra=["data.train_subset=640", "data.validation_size=0", "optim.batch_size=16",
                                 "optim.epochs=1", "swa.start_epoch=0", "swa.every_steps=10"])
    snapshots = []

    def parameters():
        return {key: value.detach().clone() for key, value in trainer.model.named_parameters()}

    def progress(iterable, total, description):
        if not description.startswith("epoch "):  # the test batches
            yield from iterable
            return
        assert total == 40
        for index, item in enumerate(iterable):
            if index and index % 10 == 0:  # `index` optimizer steps are done
                snapshots.append(parameters())
            yield item
        snapshots.append(parameters())

    trainer = Trainer(config, tmp_path / "run", progress=progress, dataset=mnist)
    results = trainer.fit()
    assert len(snapshots) == 4 and results["model"].startswith("SWA of 4 snapshots")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["swa"]["count"] == 4
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=False)["model"]
    for key in snapshots[0]:  # parameters only: BatchNorm statistics are recomputed after averaging
        assert torch.allclose(final[key], sum(snapshot[key] for snapshot in snapshots) / 4, atol=1e-6), key


def test_resume_in_the_middle_of_swa_ends_where_an_uninterrupted_run_does(tmp_path, mnist):
    # 10 steps an epoch, a snapshot every 4: after steps 4, 8 | 12, 16, 20 (the count runs across epochs)
    config = small_config(extra=["data.train_subset=160", "data.validation_size=0", "optim.batch_size=16",
                                 "optim.epochs=2", "swa.start_epoch=0", "swa.every_steps=4"])
    straight = Trainer(config, tmp_path / "straight", dataset=mnist).fit()
    with pytest.raises(Interrupt):
        Trainer(config, tmp_path / "killed", progress=interrupt_in_epoch(1), dataset=mnist).fit()
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["swa"]["count"] == 2
    resumed = Trainer(config, tmp_path / "killed", dataset=mnist).fit(resume=True)
    assert resumed["model"] == straight["model"] and resumed["model"].startswith("SWA of 5 snapshots")
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
