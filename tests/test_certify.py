"""The certification cascade: complete verification against exact answers, float64 soundness,
verdict invariants, resume, shards and merge, APGD, ONNX / VNN-LIB export.

Exact answers come from enumerating the linear regions of tiny dense networks (one LP per
activation pattern that meets the box, written here with scipy, independent of the library)
and, for a tiny conv net, from the library's MILP (itself checked against the enumeration)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from ctbench.bounds.box import linf_box
from ctbench.bounds.crown import alpha_crown, crown_bounds, intermediate_bounds
from ctbench.bounds.ibp import ibp_margin_lower
from ctbench.certify import (
    BabSettings, BranchAndBound, CertifySettings, InvalidCounterexample, InvalidVerdict, Provenance,
    ProvenanceMismatch, SafetyMargin, Shard, Verdict, VerdictBook, VerdictConflict, certify, check_counterexample, falsified_verdict, merge, read_verdicts,
)
from ctbench.certify.milp import highspy_available, network_milp, solve
from ctbench.certify.soundness import float64_box, float64_ops, margin_rows, min_other
from ctbench.certify.stages import AlphaCrownSettings, AttackSettings
from ctbench.models.ops import lower_network

from helpers import conv_net

scipy_optimize = pytest.importorskip("scipy.optimize")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# tiny networks


def dense_net(seed: int, widths: tuple[int, ...], inputs: int = 5, classes: int = 3) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = inputs
    for hidden in widths:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = 1.5 * parameter.shape[-1] ** -0.5 if parameter.dim() > 1 else 0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def sample(seed: int, shape) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(1000 + seed))


def exact_min_margin(model: nn.Sequential, x: torch.Tensor, label: int, eps: float) -> float:
    """min over the box of min_{t != y} z_y - z_t for a dense ReLU net, by enumerating the
    activation patterns that meet the box (depth-first, one sign per neuron, pruned by LP
    feasibility) and solving one LP per pattern and target."""
    linears = [(layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy())
               for layer in model if isinstance(layer, nn.Linear)]
    x = x.double().numpy()
    lower, upper = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    bounds = list(zip(lower, upper))
    best = [math.inf]

    def interval(row, constant):
        low = np.where(row >= 0, row * lower, row * upper).sum() + constant
        high = np.where(row >= 0, row * upper, row * lower).sum() + constant
        return low, high

    def feasible(A, b):
        if not len(A):
            return True
        result = scipy_optimize.linprog(np.zeros(len(x)), A_ub=np.array(A), b_ub=np.array(b), bounds=bounds,
                                        method="highs")
        return result.status == 0

    def layer(k, M, c, A, b):
        W, bias = linears[k]
        pre_M, pre_c = W @ M, W @ c + bias
        if k == len(linears) - 1:
            for target in range(len(pre_c)):
                if target == label:
                    continue
                objective = pre_M[label] - pre_M[target]
                constant = pre_c[label] - pre_c[target]
                result = scipy_optimize.linprog(objective, A_ub=np.array(A) if A else None,
                                                b_ub=np.array(b) if b else None, bounds=bounds, method="highs")
                assert result.status == 0
                best[0] = min(best[0], result.fun + constant)
            return

        def neuron(j, A, b, mask):
            if j == len(pre_c):
                D = np.array(mask, dtype=float)
                layer(k + 1, D[:, None] * pre_M, D * pre_c, A, b)
                return
            low, high = interval(pre_M[j], pre_c[j])
            for sign in (1, -1):
                if (sign > 0 and high < 0) or (sign < 0 and low > 0):
                    continue
                implied = (sign > 0 and low >= 0) or (sign < 0 and high <= 0)
                A2 = A if implied else A + [list(-sign * pre_M[j])]
                b2 = b if implied else b + [sign * pre_c[j]]
                if implied or feasible(A2, b2):
                    neuron(j + 1, A2, b2, mask + [sign > 0])

        neuron(0, A, b, [])

    layer(0, np.eye(len(x)), np.zeros(len(x)), [], [])
    return best[0]


def confirm_with(model, eps):
    def confirm(points, x, label):
        return torch.tensor([check_counterexample(model, x, label, eps, point).valid for point in points])

    return confirm


def run_bab(model, x, label, eps, **options):
    classes = model[-1].out_features
    settings = BabSettings(**{"timeout": 60, "attack_restarts": 0, **options})
    verifier = BranchAndBound(lower_network(model, detach=True), float64_ops(model), settings,
                              confirm=confirm_with(model, eps))
    return verifier.verify(x, label, eps, classes)


def milp_min_margin(model: nn.Sequential, x: torch.Tensor, label: int, eps: float) -> float:
    box = float64_box(x[None], eps, (0.0, 1.0))
    result = network_milp(float64_ops(model), box, label, model[-1].out_features)
    assert result.exact
    return result.minimum


# (seed, hidden widths, eps): the answers mix certified and falsified, several close to the
# boundary (|exact margin| between 0.01 and 0.15), so that branch and bound has to split.
# ENUMERATED: exact answer by enumeration (cheap there); MILP_CASES: by the MILP, which
# test_milp_agrees_with_enumeration checks against the enumeration.
ENUMERATED = [(0, (8, 8), 0.2), (3, (6, 6, 6), 0.1), (8, (6, 6, 6), 0.05), (4, (4, 8, 4), 0.05), (2, (4, 4), 0.2),
              (3, (4, 4), 0.2)]
MILP_CASES = [(0, (8, 8), 0.3), (5, (8, 8), 0.15), (5, (8, 8), 0.2), (5, (8, 8), 0.3), (6, (8, 8, 8), 0.2),
              (6, (8, 8, 8), 0.3), (8, (6, 6, 6), 0.1)]


def dense_case(seed, widths, eps):
    model = dense_net(seed, widths)
    x = sample(seed, (5,))
    return model, x, int(model(x[None]).argmax()), eps


@pytest.fixture(scope="module")
def dense_exact():
    """(model, x, label, eps, exact min margin, how) for every dense case."""
    cases = []
    for case in ENUMERATED:
        model, x, label, eps = dense_case(*case)
        cases.append((model, x, label, eps, exact_min_margin(model, x, label, eps), "enumeration"))
    for case in MILP_CASES:
        model, x, label, eps = dense_case(*case)
        cases.append((model, x, label, eps, milp_min_margin(model, x, label, eps), "milp"))
    return cases


# ----------------------------------------------------------------------------------------------
# complete verification


def test_bab_agrees_with_exact_answers_on_dense_nets(dense_exact):
    statuses, branched = [], 0
    for model, x, label, eps, exact, how in dense_exact:
        assert abs(exact) > 1e-3, "test case too close to the decision boundary"
        result = run_bab(model, x, label, eps)
        statuses.append(result.status)
        branched += result.domains > model[-1].out_features - 1
        if exact > 0:
            assert result.status == "certified", (how, eps, exact, result)
            assert 0 < result.margin_lower <= exact + 1e-6
        else:
            assert result.status == "falsified", (how, eps, exact, result)
            check = check_counterexample(model, x, label, eps, result.counterexample)
            assert check.valid and check.margin <= 0
    assert "certified" in statuses and "falsified" in statuses
    assert branched >= 3  # some cases needed real branching


def test_milp_agrees_with_enumeration(dense_exact):
    backends = ["scipy"] + (["highspy"] if highspy_available() else [])
    for model, x, label, eps, exact, how in dense_exact:
        if how != "enumeration":
            continue
        box = float64_box(x[None], eps, (0.0, 1.0))
        for backend in backends:
            result = network_milp(float64_ops(model), box, label, model[-1].out_features, backend=backend)
            assert result.exact
            assert result.minimum == pytest.approx(exact, abs=1e-6)


def test_bab_agrees_with_milp_on_a_conv_net():
    statuses = []
    for seed in range(3):
        model = conv_net(seed)
        x = sample(seed, (1, 5, 5))
        label = int(model(x[None]).argmax())
        for eps in (0.1, 0.25):
            exact = network_milp(float64_ops(model), float64_box(x[None], eps, (0.0, 1.0)), label, 3).minimum
            assert abs(exact) > 1e-3
            result = run_bab(model, x, label, eps)
            statuses.append(result.status)
            assert result.status == ("certified" if exact > 0 else "falsified"), (seed, eps, exact, result)
            if result.status == "falsified":
                assert check_counterexample(model, x, label, eps, result.counterexample).valid
    assert "certified" in statuses and "falsified" in statuses


@pytest.mark.parametrize("backend", ["scipy", "highspy"])
def test_bab_without_beta_closes_lp_leaves(dense_exact, monkeypatch, backend):
    """Without the split multipliers, bounds alone cannot close fully split domains: the LP
    leaves (Lagrangian and Farkas certificates) have to, and still give the exact answer."""
    from ctbench.certify import milp

    if backend == "highspy" and not highspy_available():
        pytest.skip("highspy is not installed (the certify extra)")
    calls = []
    original = milp.solve
    monkeypatch.setattr(milp, "solve", lambda *a, **k: calls.append(1) or original(*a, **{**k, "backend": backend}))
    model, x, label, eps, exact, _ = dense_exact[0]
    result = run_bab(model, x, label, eps, beta=False, batch_domains=8)
    assert result.status == ("certified" if exact > 0 else "falsified")
    assert calls


def test_bab_reports_unknown_on_timeout():
    model, x, label, eps = dense_case(5, (8, 8), 0.2)
    result = run_bab(model, x, label, eps, timeout=0.0)
    assert result.status == "unknown" and "timeout" in result.detail
    assert result.margin_lower < 0.0607  # a lower bound of the exact margin


# ----------------------------------------------------------------------------------------------
# bound ordering


def test_alpha_crown_beats_crown_beats_ibp_on_tiny_nets():
    for model in [dense_net(0, (8, 8)), dense_net(2, (6, 6, 6)), conv_net(0)]:
        ops = lower_network(model, detach=True)
        shape = (5,) if isinstance(model[0], nn.Linear) else (1, 5, 5)
        x = torch.stack([sample(s, shape) for s in range(4)])
        labels = model(x).argmax(1)
        box = linf_box(x, 0.1)
        ibp = intermediate_bounds(ops, box, "ibp")
        crown = intermediate_bounds(ops, box, "crown")
        for index in ibp:  # CROWN intermediate boxes lie inside IBP's
            assert (crown[index].lower >= ibp[index].lower - 1e-6).all()
            assert (crown[index].upper <= ibp[index].upper + 1e-6).all()
        spec = margin_rows(labels, 3, torch.float32)
        ibp_final = ibp_margin_lower(ops, box, labels)[0]
        ibp_rows = ibp_final.gather(1, spec.argmin(dim=2))  # the rows e_y - e_t, t != y
        crown_final = crown_bounds(ops, box, spec, crown)
        alpha_final = alpha_crown(ops, box, spec, crown, iterations=30).lower
        assert (crown_final >= ibp_rows - 1e-5).all()
        assert (alpha_final >= crown_final - 1e-6).all()


# ----------------------------------------------------------------------------------------------
# floating-point soundness and verdict invariants


def tiny_margin_model() -> nn.Sequential:
    """Two inputs, two logits, z_0 - z_1 = 1e-8 everywhere (float32: 9.99999994e-09)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1e-8, 0.0]))
    return model.eval()


def test_float32_epsilon_margin_is_never_certified():
    model = tiny_margin_model()
    x, y = torch.full((3, 2), 0.5), torch.zeros(3, dtype=torch.long)
    ops = lower_network(model, detach=True)
    margins32, _ = ibp_margin_lower(ops, linf_box(x, 0.1), y)
    assert (min_other(margins32, y) > 0).all()  # float32 alone would certify
    assert SafetyMargin().threshold(torch.tensor([[1e-8, 0.0]], dtype=torch.float64))[0] > 1e-8
    result = certify(model, (x, y), 0.1, stages="ibp,crown-ibp,attack,alpha-crown,bab",
                     settings=CertifySettings(bab=BabSettings(timeout=5, attack_restarts=1)))
    assert [v.verdict for v in result.verdicts] == ["unknown"] * 3
    assert result.summary["certified_accuracy"] == 0.0


def test_verdict_invariants():
    with pytest.raises(InvalidVerdict):
        Verdict(index=0, verdict="certified", stage="ibp", margin_lower=0.5, counterexample=[0.1])
    with pytest.raises(InvalidVerdict):
        Verdict(index=0, verdict="certified", stage="ibp", margin_lower=-0.5)
    with pytest.raises(InvalidVerdict):
        Verdict(index=0, verdict="falsified", stage="attack")
    with pytest.raises(InvalidVerdict):
        Verdict(index=0, verdict="maybe", stage="ibp")
    record = Verdict(index=3, verdict="certified", stage="bab", margin_lower=0.25, times={"bab": 1.0})
    assert Verdict.from_json(json.loads(json.dumps(record.to_json()))) == record
    book = VerdictBook([record])
    assert not book.add(Verdict(index=3, verdict="certified", stage="ibp", margin_lower=0.1))  # agrees: kept once
    with pytest.raises(VerdictConflict):  # a sample is never both certified and falsified
        book.add(Verdict(index=3, verdict="falsified", stage="attack", counterexample=[0.5]))


def test_falsified_verdict_requires_a_confirmed_counterexample():
    model = dense_net(1, (8, 8))
    x = sample(1, (5,))
    label = int(model(x[None]).argmax())
    with pytest.raises(InvalidCounterexample):  # the clean input is classified correctly
        falsified_verdict(model, 0, x, label, 0.3, x.clone(), "attack")
    wrong = (x + 0.5).clamp(0, 1)
    if int(model(wrong[None]).argmax()) != label:
        with pytest.raises(InvalidCounterexample):  # misclassified but outside the box
            falsified_verdict(model, 0, x, label, 0.05, wrong, "attack")
    model, x, label, eps = dense_net(3, (6, 6, 6)), sample(3, (5,)), None, 0.3
    label = int(model(x[None]).argmax())
    result = run_bab(model, x, label, eps)
    if result.status == "falsified":
        verdict = falsified_verdict(model, 0, x, label, eps, result.counterexample, "bab")
        assert verdict.falsified and verdict.predicted != label


# ----------------------------------------------------------------------------------------------
# the cascade: files, resume, shards, merge


CASCADE_EPS = 0.3  # with cascade_data: 15 of 24 samples robust, some within 0.01 of the boundary


def cascade_data(count: int = 24):
    model = dense_net(12, (8, 8))
    x = torch.rand(count, 5, generator=torch.Generator().manual_seed(5))
    labels = model(x).argmax(1)
    labels[::6] = (labels[::6] + 1) % 3  # a few wrong samples
    return model, x, labels


FAST = CertifySettings(batch_size=8, attack=AttackSettings(pgd_steps=10, pgd_restarts=2),
                       alpha=AlphaCrownSettings(iterations=10), bab=BabSettings(timeout=20, attack_restarts=1))


def comparable(summary: dict) -> dict:
    return {key: value for key, value in summary.items()
            if "seconds" not in key and key not in ("shards", "shard", "provenance")}


def test_cascade_verdicts_are_exact_and_consistent(tmp_path):
    model, x, labels = cascade_data()
    settings = CertifySettings(**{**FAST.__dict__, "cross_check": True})
    result = certify(model, (x, labels), CASCADE_EPS, out_dir=tmp_path, settings=settings)
    assert [v.index for v in result.verdicts] == list(range(len(labels)))  # one verdict per sample
    kinds = {v.verdict for v in result.verdicts}
    assert {"certified", "falsified", "wrong"} <= kinds and "unknown" not in kinds
    for verdict in result.verdicts:
        xi, yi = x[verdict.index], int(labels[verdict.index])
        if verdict.verdict == "wrong":
            assert int(model(xi[None]).argmax()) != yi
            continue
        exact = milp_min_margin(model, xi, yi, CASCADE_EPS)
        assert abs(exact) > 1e-4
        assert (verdict.verdict == "certified") == (exact > 0), (verdict, exact)
        if verdict.falsified:
            point = torch.tensor(verdict.counterexample)
            assert check_counterexample(model, xi, yi, CASCADE_EPS, point).valid
    on_disk = read_verdicts(tmp_path / "verdicts.jsonl")
    assert sorted(on_disk, key=lambda v: v.index) == result.verdicts
    summary = json.loads((tmp_path / "summary.json").read_text())
    counts = summary["counts"]
    assert summary["natural_accuracy"] == pytest.approx(1 - counts["wrong"] / len(labels))
    assert summary["adversarial_accuracy"] == pytest.approx((len(labels) - counts["wrong"] - counts["falsified"])
                                                            / len(labels))
    assert sum(summary["certified_by_stage"].values()) == counts["certified"]


def test_resume_skips_done_indices_and_tolerates_a_partial_line(tmp_path):
    model, x, labels = cascade_data(12)
    first = certify(model, (x, labels), CASCADE_EPS, indices=range(6), out_dir=tmp_path, settings=FAST)
    path = tmp_path / "verdicts.jsonl"
    done = path.read_text()
    with open(path, "a") as stream:
        stream.write('{"index": 7, "verdict": "cert')  # a write cut short
    second = certify(model, (x, labels), CASCADE_EPS, out_dir=tmp_path, settings=FAST)
    text = path.read_text()
    assert text.startswith(done)  # the first six records were kept as they were, not recomputed
    assert [v.index for v in second.verdicts] == list(range(12))
    assert second.verdicts[:6] == first.verdicts
    assert all(line.startswith("{") and line.endswith("}") for line in text.splitlines())
    with pytest.raises(ProvenanceMismatch, match="eps: 0.1 here, 0.3 there"):  # another eps, same folder
        certify(model, (x, labels), 0.1, out_dir=tmp_path, settings=FAST)


def test_shards_merge_into_the_same_summary(tmp_path):
    model, x, labels = cascade_data()
    single = certify(model, (x, labels), CASCADE_EPS, out_dir=tmp_path / "one", settings=FAST)
    for k in range(3):
        certify(model, (x, labels), CASCADE_EPS, out_dir=tmp_path / "shards", settings=FAST, shard=f"{k}/3")
    assert sorted(p.name for p in (tmp_path / "shards").glob("verdicts-shard-*")) == [
        f"verdicts-shard-{k}-of-3.jsonl" for k in range(3)]
    merged = merge(tmp_path / "shards")
    assert comparable(merged.summary) == comparable(single.summary)
    assert merged.summary["shards"] == {"of-3": {"found": [0, 1, 2], "missing": []}}
    assert [(v.index, v.verdict, v.stage) for v in merged.verdicts] == [
        (v.index, v.verdict, v.stage) for v in single.verdicts]
    assert json.loads((tmp_path / "shards" / "summary.json").read_text())["samples"] == len(labels)
    assert Shard.parse("1/3").select(range(7)) == [1, 4]


def test_conflicting_merge_raises(tmp_path):
    provenance = Provenance(model="0" * 16, eps=0.1, data="mnist/test@" + "1" * 16, settings="2" * 12, version="x")
    certified = Verdict(index=4, verdict="certified", stage="ibp", margin_lower=0.5, provenance=provenance)
    falsified = Verdict(index=4, verdict="falsified", stage="attack", counterexample=[0.1, 0.2],
                        provenance=provenance)
    (tmp_path / "verdicts-shard-0-of-2.jsonl").write_text(json.dumps(certified.to_json()) + "\n")
    (tmp_path / "verdicts-shard-1-of-2.jsonl").write_text(json.dumps(falsified.to_json()) + "\n")
    with pytest.raises(VerdictConflict):
        merge(tmp_path)


# ----------------------------------------------------------------------------------------------
# attacks


def test_apgd_finds_counterexamples_that_stay_in_the_box():
    from ctbench.attacks.apgd import APGDSettings, apgd, apgd_checkpoints, autoattack_like

    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    model, x, labels = cascade_data(24)
    right = model(x).argmax(1) == labels
    x, labels = x[right], labels[right]
    eps = CASCADE_EPS
    settings = APGDSettings(iterations=30)
    points, fooled = apgd(model, x, labels, eps, settings=settings, seeds=range(len(labels)))
    box = linf_box(x, eps)
    assert box.contains(points).all()
    assert (model(points).argmax(1)[fooled] != labels[fooled]).all()
    points_again, fooled_again = apgd(model, x[:3], labels[:3], eps, settings=settings, seeds=range(3))
    assert torch.equal(fooled_again, fooled[:3])  # per-sample seeds: independent of the batch
    adversarial, robust = autoattack_like(model, x, labels, eps, ce=settings, targeted=APGDSettings(iterations=20),
                                          target_count=2)
    assert box.contains(adversarial).all()
    assert (~robust).sum() >= fooled.sum()
    assert (model(adversarial).argmax(1)[~robust] != labels[~robust]).all()
    exact = [milp_min_margin(model, xi, int(yi), eps) for xi, yi in zip(x, labels)]
    for is_robust, value in zip(robust.tolist(), exact):
        if value > 0:
            assert is_robust  # no attack can fool a provably robust sample


# ----------------------------------------------------------------------------------------------
# export


def parse_vnnlib(text: str):
    """A tiny VNN-LIB 1.0 reader for the form export writes: declarations, input bounds, one
    disjunction of (>= Y_i Y_j) terms."""
    inputs = set(int(i) for i in re.findall(r"\(declare-const X_(\d+) Real\)", text))
    outputs = set(int(i) for i in re.findall(r"\(declare-const Y_(\d+) Real\)", text))
    lower, upper = {}, {}
    for op, i, value in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-+0-9.eE]+)\)\)", text):
        (upper if op == "<=" else lower)[int(i)] = float(value)
    disjunction = re.search(r"\(assert \(or (.*)\)\)\s*$", text, re.S)
    terms = re.findall(r"\(and \(>= Y_(\d+) Y_(\d+)\)\)", disjunction.group(1))
    return inputs, outputs, lower, upper, [(int(a), int(b)) for a, b in terms]


def test_vnnlib_property_matches_the_box(tmp_path):
    from ctbench.certify.export import export_vnnlib

    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 0, 1])
    paths = export_vnnlib(images, labels, [0, 2], 0.1, tmp_path, 3)
    assert [p.name for p in paths] == ["prop_0.vnnlib", "prop_2.vnnlib"]
    inputs, outputs, lower, upper, terms = parse_vnnlib(paths[1].read_text())
    x = images[2].float().flatten() / 255
    assert inputs == set(range(16)) and outputs == {0, 1, 2}
    assert [lower[i] for i in range(16)] == (x.double() - 0.1).clamp(min=0).tolist()
    assert [upper[i] for i in range(16)] == (x.double() + 0.1).clamp(max=1).tolist()
    assert sorted(terms) == [(0, 1), (2, 1)]


def test_vnncomp_benchmark_folder_has_relative_paths_and_moves_as_a_whole(tmp_path):
    pytest.importorskip("onnx")
    from ctbench.certify.export import export_vnncomp_benchmark

    images = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    folder = tmp_path / "bench"
    instances = export_vnncomp_benchmark(conv_net(0), (1, 5, 5), images, labels, [1, 3], 0.05, folder, 3,
                                         name="net", timeout=60)
    assert instances == folder / "instances.csv"
    assert instances.read_text().splitlines() == ["onnx/net.onnx,vnnlib/prop_1.vnnlib,60",
                                                  "onnx/net.onnx,vnnlib/prop_3.vnnlib,60"]
    moved = folder.rename(tmp_path / "elsewhere")
    for line in (moved / "instances.csv").read_text().splitlines():
        onnx_file, property_file, _ = line.split(",")
        assert (moved / onnx_file).is_file() and (moved / property_file).is_file()


def test_onnx_export_matches_torch(tmp_path):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from ctbench.certify.export import export_onnx

    model = conv_net(0)
    path = export_onnx(model, tmp_path / "net.onnx", (1, 5, 5))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(7, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    (logits,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(logits, model(x).detach().numpy(), atol=1e-5, rtol=0)


def test_lp_solver_backends_agree():
    A = np.array([[1.0, 2.0], [-1.0, 1.0]])
    backends = ["scipy"] + (["highspy"] if highspy_available() else [])
    for backend in backends:
        solution = solve(np.array([1.0, 1.0]), A, np.array([1.0, -np.inf]), np.array([np.inf, 0.5]),
                         np.zeros(2), np.ones(2), backend=backend)
        assert solution.status == "optimal" and solution.objective == pytest.approx(0.5)
        assert solution.row_dual[0] == pytest.approx(0.5)
