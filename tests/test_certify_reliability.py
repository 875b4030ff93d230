"""A "certified" verdict that cannot lie about its inputs, its provenance, resume or merge.

Each test is one way a careful user made ctbench report samples certified that are not (or a
final-looking figure over the wrong samples), reproduced; the fix must refuse it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from ctbench.certify import (
    AttackSettings, CertifyInputError, CertifySettings, ProvenanceMismatch, SoundnessError, certify, merge,
    read_verdicts,
)
from ctbench.certify.stages import STAGES, Decision, Outcome
from ctbench.cli import main
from ctbench.config import config_from_dict, config_to_dict
from ctbench.data import DATASETS
from ctbench.presets import preset_data
from ctbench.training import build_model_for

FAST = CertifySettings(stages=("ibp", "crown-ibp", "attack"), batch_size=8,
                       attack=AttackSettings(pgd_steps=10, pgd_restarts=2))


def small_net(seed: int = 3) -> nn.Sequential:
    """A dense net whose decision boundaries cross the unit cube (weights ~ N(0, 1))."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def data(count: int = 12, seed: int = 4):
    x = torch.rand(count, 6, generator=torch.Generator().manual_seed(seed))
    return x, small_net()(x).argmax(1)


# ----------------------------------------------------------------------------------------------
# inputs


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_eps_is_refused(eps):
    with pytest.raises(CertifyInputError, match="eps must be finite and >= 0"):
        certify(small_net(), data(), eps, settings=FAST)


def test_inputs_outside_the_data_range_are_refused():
    x, labels = data()
    shifted = 1.2 + 0.3 * (x - x.min()) / (x.max() - x.min())  # inputs in [1.2, 1.5]
    with pytest.raises(CertifyInputError, match=r"data range \[0, 1\].*\[1\.2, 1\.5\]"):
        certify(small_net(), (shifted, labels), 0.1, settings=FAST)
    with pytest.raises(CertifyInputError, match="NaN"):
        certify(small_net(), (x.masked_fill(x > 0.9, float("nan")), labels), 0.1, settings=FAST)


def test_labels_outside_the_classes_are_refused():
    x, labels = data()
    with pytest.raises(CertifyInputError, match=r"labels must lie in \[0, 2\]"):
        certify(small_net(), (x, labels + 3), 0.1, settings=FAST)


@pytest.mark.parametrize("change, message", [
    (dict(stages=("ibp", "foo")), "unknown certification stage 'foo'"),
    (dict(stages=("ibq",)), "did you mean 'ibp'"),
    (dict(stages=()), "no certification stage"),
    (dict(timeout=0.0), "timeout must be finite and > 0"),
    (dict(batch_size=0), "batch size must be >= 1"),
])
def test_bad_settings_are_refused_with_the_fix(change, message):
    with pytest.raises(CertifyInputError, match=message):
        dataclasses.replace(FAST, **change)


def test_bad_attack_settings_are_refused():
    with pytest.raises(CertifyInputError, match="attack steps and restarts must be >= 0"):
        AttackSettings(pgd_steps=-1)


def test_eps_zero_certifies_exactly_the_correct_samples():
    """At eps 0 the box is the point itself: certified = correctly classified, for every stage."""
    x, labels = data(16)
    labels[::4] = (labels[::4] + 1) % 3
    result = certify(small_net(), (x, labels), 0.0, settings=FAST)
    for verdict in result.verdicts:
        assert verdict.verdict == ("wrong" if verdict.index % 4 == 0 else "certified")


# ----------------------------------------------------------------------------------------------
# provenance: resume and merge


def test_resume_refuses_verdicts_of_another_model(tmp_path):
    x, labels = data()
    model = small_net()
    certify(model, (x, labels), 0.05, indices=range(6), out_dir=tmp_path, settings=FAST)
    negated = small_net()
    with torch.no_grad():
        negated[2].weight.neg_()
        negated[2].bias.neg_()
    with pytest.raises(ProvenanceMismatch, match="model: '[0-9a-f]{16}' here, '[0-9a-f]{16}' there"):
        certify(negated, (x, labels), 0.05, out_dir=tmp_path, settings=FAST)
    # --restart (resume=False) starts anew: the negated network is wrong on every sample
    fresh = certify(negated, (x, labels), 0.05, out_dir=tmp_path, settings=FAST, resume=False)
    assert {v.verdict for v in fresh.verdicts} == {"wrong"}


def test_resume_refuses_other_settings_data_and_old_records(tmp_path):
    x, labels = data()
    model = small_net()
    certify(model, (x, labels), 0.05, indices=range(6), out_dir=tmp_path, settings=FAST)
    with pytest.raises(ProvenanceMismatch, match="settings"):
        certify(model, (x, labels), 0.05, out_dir=tmp_path, settings=dataclasses.replace(FAST, timeout=5.0))
    with pytest.raises(ProvenanceMismatch, match="data"):
        certify(model, (x.flip(0), labels.flip(0)), 0.05, out_dir=tmp_path, settings=FAST)
    # a record without provenance (an older ctbench) cannot be checked, so it is not reused
    path = tmp_path / "verdicts.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    del records[0]["provenance"]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "provenance.json").unlink()
    with pytest.raises(ProvenanceMismatch, match="without provenance"):
        certify(model, (x, labels), 0.05, out_dir=tmp_path, settings=FAST)


def test_summary_counts_the_requested_samples_only(tmp_path):
    x, labels = data()
    certify(small_net(), (x, labels), 0.05, indices=range(6), out_dir=tmp_path, settings=FAST)
    again = certify(small_net(), (x, labels), 0.05, indices=range(2), out_dir=tmp_path, settings=FAST)
    assert again.summary["samples"] == 2 and len(again.verdicts) == 2
    assert json.loads((tmp_path / "summary.json").read_text())["samples"] == 2
    assert len(read_verdicts(tmp_path / "verdicts.jsonl")) == 6  # nothing decided was thrown away


def test_merge_refuses_shards_at_another_eps(tmp_path):
    x, labels = data()
    certify(small_net(), (x, labels), 0.05, out_dir=tmp_path, settings=FAST, shard="0/2")
    certify(small_net(), (x, labels), 0.07, out_dir=tmp_path / "other", settings=FAST, shard="1/2")
    (tmp_path / "other" / "verdicts-shard-1-of-2.jsonl").rename(tmp_path / "verdicts-shard-1-of-2.jsonl")
    with pytest.raises(ProvenanceMismatch, match="eps: 0.05 here, 0.07 there"):
        merge(tmp_path)


def test_merge_with_a_missing_shard_reports_missing_samples_not_an_accuracy(tmp_path, capsys):
    x, labels = data()
    certify(small_net(), (x, labels), 0.05, out_dir=tmp_path, settings=FAST, shard="0/2")
    result = merge(tmp_path)
    summary = result.summary
    assert summary["complete"] is False and summary["samples"] == 12 and summary["missing"] == 6
    assert summary["certified_accuracy"] is None and summary["natural_accuracy"] is None
    assert summary["shards"] == {"of-2": {"found": [0], "missing": [1]}}
    assert main(["certify-merge", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert "INCOMPLETE: 6 of 12 requested samples have no verdict" in out and "%" not in out
    certify(small_net(), (x, labels), 0.05, out_dir=tmp_path, settings=FAST, shard="1/2")
    assert merge(tmp_path).summary["complete"] is True


# ----------------------------------------------------------------------------------------------
# cross-check before writing


def test_a_certified_record_that_an_attack_breaks_never_reaches_disk(tmp_path, monkeypatch):
    """A broken stage that certifies everything: with cross_check the batch stops before any of
    its certified records is written; the wrong samples decided earlier may be on disk."""
    x, labels = data(8)

    def certify_all(self, ctx, samples):
        return Outcome([Decision(position, "certified", 1.0) for position in range(len(samples))])

    monkeypatch.setattr(STAGES.get("ibp"), "run", certify_all)
    settings = dataclasses.replace(FAST, cross_check=True)
    with pytest.raises(SoundnessError, match="were not recorded"):
        certify(small_net(), (x, labels), 0.5, out_dir=tmp_path, settings=settings)
    written = read_verdicts(tmp_path / "verdicts.jsonl")
    assert not any(v.certified for v in written)


# ----------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with an untrained CNN3 (the CLI's checks, not accuracy, are under test)."""
    config = config_from_dict(preset_data("mnist-mini-0.1/ibp"))
    torch.manual_seed(0)
    model = build_model_for(config, DATASETS.get("mnist").spec).eval()
    folder = tmp_path_factory.mktemp("run")
    torch.save({"config": config_to_dict(config), "model": model.state_dict()}, folder / "final.pt")
    return folder


@pytest.mark.parametrize("options, message", [
    (["--eps", "-0.1"], "eps must be >= 0"),
    (["--eps", "nan"], "expected a number or a fraction"),
    (["--count", "0"], "--count: must be at least 1"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--timeout", "0"], "--timeout: must be a finite number of seconds > 0"),
    (["--stages", "ibp,foo"], "unknown certification stage 'foo'"),
])
def test_cli_refuses_bad_certify_options(run_dir, options, message, capsys):
    try:
        code = main(["certify", str(run_dir), "--quiet", "--count", "2", *options])
    except SystemExit as exit_:  # argparse refuses before the command runs
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_accepts_a_fractional_eps(run_dir, tmp_path, capsys):
    assert main(["certify", str(run_dir), "--quiet", "--count", "2", "--stages", "ibp", "--eps", "8/255",
                 "--out", str(tmp_path / "v"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["eps"] == 8 / 255 and summary["samples"] == 2


# ----------------------------------------------------------------------------------------------
# MILP: a falsifier, never a certificate


def scaled_net(scale: float) -> nn.Sequential:
    model = small_net(5)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)
    return model


@pytest.mark.parametrize("scale", [1.0, 1.5e4 ** 2])
def test_milp_stage_falsifies_but_never_certifies(scale):
    """On a well-scaled net and on one whose logits reach ~1e10 (big-M constants where the
    solver's tolerances leak more than any margin), the milp stage leaves every robust sample
    open; it falsifies only samples that the cascade with an attack and bab falsifies, and on
    the well-scaled net all of them."""
    model = scaled_net(scale)
    x, _ = data(10, seed=7)
    labels = model(x).argmax(1)
    milp_only = certify(model, (x, labels), 0.05, settings=dataclasses.replace(FAST, stages=("milp",)))
    reference = certify(model, (x, labels), 0.05,
                        settings=dataclasses.replace(FAST, stages=("ibp", "crown-ibp", "attack", "bab")))
    assert not any(v.certified for v in milp_only.verdicts)
    assert any(v.certified for v in reference.verdicts) and any(v.falsified for v in reference.verdicts)
    for milp_verdict, verdict in zip(milp_only.verdicts, reference.verdicts):
        assert milp_verdict.falsified <= verdict.falsified
        assert milp_verdict.falsified == verdict.falsified or scale != 1.0
        if verdict.certified:
            assert milp_verdict.verdict == "unknown"


def test_milp_tolerance_shrinks_with_the_problem_scale():
    from ctbench.certify.milp import scaled_tolerance

    assert scaled_tolerance(0.5) == scaled_tolerance(1.0) == 1e-9
    assert scaled_tolerance(5.0) == pytest.approx(2e-10)
    assert scaled_tolerance(1e11) == 1e-10
