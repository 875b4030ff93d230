"""``ctbench sweep``: the grid on Optuna's GridSampler and RDB storage, skip and retry, objectives
from the validation split only, the Pareto front, the chosen config as a user preset."""
import json

import pytest

pytest.importorskip("optuna")

from ctbench.bench import sweep_study  # noqa: E402
from ctbench.bench.jobs import canonical_config  # noqa: E402
from ctbench.bench.sweep import SweepError, make_sweep, preset_params  # noqa: E402
from ctbench.bench.sweep_results import (  # noqa: E402
    TrialRow, choose, front_of, pareto_front, preset_text, trial_rows, write_preset,
)
from ctbench.bench.sweep_study import open_storage, open_study, run_sweep, storage_path  # noqa: E402
from ctbench.cli import main  # noqa: E402
from ctbench.presets import load_config  # noqa: E402
from ctbench.training import trainer as trainer_module  # noqa: E402

PRESET = "mnist-mini-0.1/ibp"
OVERRIDES = ["data.train_subset=256", "data.validation_size=128", "optim.epochs=1", "eps.ramp_end_epoch=1",
             "optim.batch_size=64", "evaluation.final_test_count=16"]
GRID = ["optim.lr=1e-3,5e-4", "method.w_rob=1.0"]  # 2 x 1


def never_the_test_set(monkeypatch) -> list[int]:
    """Make any look at the test set fail; returns the sizes of the splits evaluated."""
    sizes = []
    evaluate = trainer_module.evaluate

    def validation_only(model, split, *args, **kwargs):
        sizes.append(len(split))
        assert len(split) == 128, "a sweep evaluated something other than the 128 validation images"
        return evaluate(model, split, *args, **kwargs)

    def test_set(self):
        raise AssertionError("a sweep evaluated the test set")

    monkeypatch.setattr(trainer_module, "evaluate", validation_only)
    monkeypatch.setattr(trainer_module.Trainer, "_evaluate_test", test_set)
    return sizes


def study_rows(sweep, db):
    return trial_rows(open_study(sweep, open_storage(storage_path(db)), create=False))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 2 x 1 sweep run once, with the test set out of reach."""
    db = tmp_path_factory.mktemp("sweep") / "ctbench.sqlite"
    sweep = make_sweep(PRESET, GRID, OVERRIDES, [0])
    with pytest.MonkeyPatch.context() as monkeypatch:
        sizes = never_the_test_set(monkeypatch)
        report = run_sweep(sweep, db)
    return sweep, db, report, sizes


def test_the_grid_is_enumerated_in_full_on_validation_records(swept):
    sweep, db, report, sizes = swept
    assert sorted(report.done) == ["optim.lr=0.0005,method.w_rob=1.0", "optim.lr=0.001,method.w_rob=1.0"]
    assert report.failed == [] and report.done_before == [] and sizes and set(sizes) == {128}
    rows = study_rows(sweep, db)
    assert [row.state for row in rows] == ["COMPLETE", "COMPLETE"]
    assert sorted(row.params["optim.lr"] for row in rows) == [5e-4, 1e-3]
    for row in rows:
        run_dir = sweep.run_dir(db.parent, row.params, 0)
        assert row.runs[0]["run_dir"] == str(run_dir.resolve())
        results = json.loads((run_dir / "results.json").read_text())
        assert results["test"] is None  # the Trainer's final test evaluation was not run
        validation = results["validation"]
        assert (row.certified, row.natural) == (validation["crown_ibp_certified_accuracy"],
                                                validation["natural_accuracy"])


def test_a_second_run_skips_the_done_trials(swept, monkeypatch):
    sweep, db, _, _ = swept
    checkpoints = {row.number: (sweep.run_dir(db.parent, row.params, 0) / "checkpoint.pt").stat().st_mtime_ns
                   for row in study_rows(sweep, db)}
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda self, resume=False: pytest.fail("trained again"))
    report = run_sweep(sweep, db)
    assert len(report.done_before) == 2 and report.done == [] and report.failed == []
    rows = study_rows(sweep, db)
    assert len(rows) == 2
    assert {row.number: (sweep.run_dir(db.parent, row.params, 0) / "checkpoint.pt").stat().st_mtime_ns
            for row in rows} == checkpoints


def test_a_failed_trial_is_retried_on_the_next_run(tmp_path, monkeypatch):
    db = tmp_path / "ctbench.sqlite"
    sweep = make_sweep(PRESET, GRID, OVERRIDES, [0])
    train = sweep_study._train

    def broken_for_large_lr(config, run_dir):
        if config.optim.lr == 1e-3:
            raise RuntimeError("out of memory")
        return train(config, run_dir)

    monkeypatch.setattr(sweep_study, "_train", broken_for_large_lr)
    report = run_sweep(sweep, db)
    assert len(report.done) == 1 and report.failed[0][0] == "optim.lr=0.001,method.w_rob=1.0"
    assert "RuntimeError: out of memory" in report.failed[0][1]
    monkeypatch.setattr(sweep_study, "_train", train)
    report = run_sweep(sweep, db)
    assert report.done == ["optim.lr=0.001,method.w_rob=1.0"] and len(report.done_before) == 1
    failed, *complete = sorted(study_rows(sweep, db), key=lambda row: row.state != "FAIL")
    assert failed.state == "FAIL" and failed.params["optim.lr"] == 1e-3 and "out of memory" in failed.error
    assert [row.state for row in complete] == ["COMPLETE", "COMPLETE"]


def test_an_interrupted_trial_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    db = tmp_path / "ctbench.sqlite"
    sweep = make_sweep(PRESET, ["optim.lr=1e-3"], OVERRIDES, [0])
    finish = trainer_module.Trainer._finish

    def interrupted(self, best, average):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "_finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, db)
    run_dir = sweep.run_dir(db.parent, {"optim.lr": 1e-3}, 0)
    checkpoint = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    assert json.loads((run_dir / "bench-train.json").read_text())["status"] == "interrupted"
    assert [row.state for row in study_rows(sweep, db)] == ["FAIL"]
    monkeypatch.setattr(trainer_module.Trainer, "_finish", finish)
    monkeypatch.setattr(trainer_module.Trainer, "_train_epoch", lambda *args: pytest.fail("an epoch ran again"))
    report = run_sweep(sweep, db)
    assert report.done == ["optim.lr=0.001"] and report.failed == []
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == checkpoint
    assert json.loads((run_dir / "bench-train.json").read_text())["status"] == "done"


def test_two_workers_share_one_study(tmp_path):
    db = tmp_path / "ctbench.sqlite"
    sweep = make_sweep(PRESET, ["optim.lr=2e-3,3e-3"], OVERRIDES, [0])
    report = run_sweep(sweep, db, workers=2, threads=2)
    assert len(report.done) == 2 and report.failed == []
    rows = study_rows(sweep, db)
    assert sorted(row.params["optim.lr"] for row in rows) == [2e-3, 3e-3]
    assert all(row.state == "COMPLETE" for row in rows)


def test_pareto_front_and_choice_on_synthetic_points():
    points = [(0.90, 0.10), (0.80, 0.30), (0.85, 0.20), (0.80, 0.25), (0.70, 0.30), (0.95, 0.05), (0.85, 0.20),
              (0.60, 0.10)]
    # (0.80, 0.25) is dominated by (0.80, 0.30); (0.70, 0.30) by (0.80, 0.30); (0.60, 0.10) by all; equal points stay
    assert pareto_front(points) == [1, 2, 6, 0, 5]
    assert pareto_front([]) == [] and pareto_front([(0.5, 0.5)]) == [0]
    rows = [TrialRow(number, "COMPLETE", {"k": number}, certified, natural)
            for number, (natural, certified) in enumerate(points)]
    rows.append(TrialRow(8, "FAIL", {"k": 8}, error="boom"))
    assert [row.number for row in front_of(rows)] == [1, 2, 6, 0, 5]
    assert choose(rows).number == 1  # certified 0.30 twice: natural 0.80 beats 0.70
    assert choose([rows[-1]]) is None


def test_an_exact_tie_keeps_the_presets_own_values():
    definition = {"preset": "mnist-mini-0.1/mtl_ibp", "overrides": ["data.validation_size=5000"],
                  "grid": {"method.w_rob": [0.8, 0.7], "regularization.l1": [5e-6, 1e-5]}, "seeds": [0]}
    assert preset_params(definition) == {"method.w_rob": 0.7, "regularization.l1": 1e-5}
    other = TrialRow(0, "COMPLETE", {"method.w_rob": 0.8, "regularization.l1": 5e-6}, 0.9346, 0.9674)
    own = TrialRow(1, "COMPLETE", {"method.w_rob": 0.7, "regularization.l1": 1e-5}, 0.9346, 0.9674)
    assert choose([other, own], definition) is own  # a tie is no evidence to change the preset
    assert choose([other, own]) is other  # without the definition: the earlier trial
    better = TrialRow(0, "COMPLETE", other.params, 0.9346, 0.9676)
    assert choose([better, own], definition) is better  # a higher natural accuracy is a difference


def test_the_written_preset_reproduces_the_chosen_config(swept, tmp_path, capsys):
    sweep, db, _, _ = swept
    rows = study_rows(sweep, db)
    path = tmp_path / "chosen.yaml"
    chosen = write_preset(path, sweep.definition(), rows, sweep.study)
    assert chosen == choose(rows, sweep.definition())
    assert path.read_text().startswith(f"preset: {PRESET}\n")
    # as a job trains it: IBP runs no attack, so attack.precision is float32 whatever the file says
    assert canonical_config(load_config(path)) == sweep.config(chosen.params, 0) == canonical_config(load_config(
        PRESET, OVERRIDES + [f"{key}={value}" for key, value in chosen.params.items()]))
    cli_path = tmp_path / "cli.yaml"
    args = ["sweep", PRESET, "--db", str(db), "--show", "--write-preset", str(cli_path)]
    args += [f"--grid={text}" for text in GRID] + [f"--set={text}" for text in OVERRIDES]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 trials" in out and "front (natural -> certified)" in out and f"chosen: trial {chosen.number}" in out
    assert cli_path.read_text() == preset_text(sweep.definition(), chosen, sweep.study)


def test_a_sweep_without_a_validation_split_is_refused(tmp_path, capsys):
    with pytest.raises(SweepError, match="data.validation_size is 0.*--set data.validation_size=5000"):
        make_sweep(PRESET, GRID, OVERRIDES + ["data.validation_size=0"])
    with pytest.raises(SweepError, match="data.validation_size is 0"):
        make_sweep(PRESET, ["data.validation_size=0,128"], OVERRIDES)
    assert main(["sweep", PRESET, "--grid", "optim.lr=1e-3", "--set", "data.validation_size=0",
                 "--db", str(tmp_path / "db.sqlite")]) == 2
    assert "data.validation_size is 0" in capsys.readouterr().err
    assert not (tmp_path / "db-sweeps.sqlite").exists()


@pytest.mark.parametrize("grid,message", [
    (["optim.lrr=1e-3"], "did you mean 'lr'"),
    (["optim.lr"], "must look like KEY=V1,V2"),
    (["optim.lr=1e-3,,2e-3"], "empty value"),
    (["optim.lr=1e-3,0.001"], "listed twice"),
    (["optim.lr=1e-3", "optim.lr=2e-3"], "given twice"),
    (["seed=0,1"], "--seeds"),
    (["optim.lr=-1"], "optim.lr: must be in (0, 10]"),
    (["optim.lr_milestones=[1],[2]"], "a grid takes numbers, strings and booleans"),
    ([], "no grid"),
])
def test_grid_errors_name_the_cause(grid, message):
    with pytest.raises(SweepError) as error:
        make_sweep(PRESET, grid, OVERRIDES)
    assert message in str(error.value)


def test_a_study_refuses_another_definition(swept):
    sweep, db, _, _ = swept
    other = make_sweep(PRESET, ["optim.lr=1e-3,5e-4,2e-4", "method.w_rob=1.0"], OVERRIDES, [0], study=sweep.study)
    with pytest.raises(SweepError, match="differs in: grid"):
        open_study(other, open_storage(storage_path(db)))
