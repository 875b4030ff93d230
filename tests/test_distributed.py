"""Data-parallel training (torchrun): two gloo ranks on the CPU against one process.

The ranks are spawned once per module (``two_ranks``) and run every step case; the one-process
references run here. Steps run in float64, so the only differences left are summation orders.
"""
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
import torch.multiprocessing as mp

from ctbench.config import apply_overrides, config_from_dict
from ctbench.data import Augmentation, Split, iterate_batches, load_dataset, num_batches
from ctbench.models import initialize
from ctbench.models.ops import batch_statistics
from ctbench.presets import load_config, preset_data
from ctbench.training import StepSettings, Trainer, build_model_for, make_method, training_step
from ctbench.attacks import PGDSettings
from ctbench.evaluation import evaluate
from ctbench.training.batchnorm import recompute_population_statistics
from ctbench.training.distributed import DataParallel, evaluate_sharded, start_data_parallel, stop_data_parallel

WORLD_SIZE = 2
BATCH = 128  # the global batch: 64 samples on each rank
TOLERANCE = 1e-9  # on parameters after the step and on gradients (float64)


@dataclass(frozen=True)
class Case:
    method: str
    accumulation_steps: int = 1
    eps: float = 0.2  # the presets' train eps: past the warm-up, no Shi regularizer

    @property
    def name(self) -> str:
        return f"{self.method}-accumulation{self.accumulation_steps}-eps{self.eps}"


STEPS = [Case("ibp"), Case("sabr"), Case("mtl_ibp")]
ACCUMULATED = [Case("ibp", 2), Case("sabr", 2), Case("mtl_ibp", 2)]
WARMUP = Case("ibp", eps=0.1)  # eps below the train eps: Shi et al.'s regularizer is on
CASES = [*STEPS, *ACCUMULATED, WARMUP]
LOCAL_STATISTICS = "ibp with per-rank BatchNorm statistics"


class LocalStatistics(DataParallel):
    """The wrong rule: each rank normalizes with the statistics of its own part of the batch."""

    def batch_statistics(self, x):
        return batch_statistics(x)


@lru_cache(maxsize=None)
def mnist():
    return load_dataset("mnist")


def one_step(case: Case, parallel: DataParallel | None = None) -> dict:
    """One training step of the mnist-mini-0.1 preset (float64, attacks starting at the box
    centre, so one restart does what all would) on the first BATCH training images, or on this
    rank's part of them."""
    config = load_config(f"mnist-mini-0.1/{case.method}", [
        "attack.random_start=center", "attack.restarts=1", f"optim.accumulation_steps={case.accumulation_steps}",
        f"optim.batch_size={BATCH}"])
    dataset = mnist()
    torch.manual_seed(0)
    model = build_model_for(config, dataset.spec).double()
    initialize(model, "ibp")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    images = dataset.train.images[:BATCH].double() / 255
    labels = dataset.train.labels[:BATCH]
    part = parallel.part(BATCH) if parallel else slice(None)
    settings = StepSettings(case.eps, config.eps.train_eps, dataset.spec.classes)
    metrics = training_step(model, make_method(config), optimizer, config, settings, images[part], labels[part],
                            parallel)
    return {"parameters": [p.detach().clone() for p in model.parameters()],
            "gradients": [p.grad.clone() for p in model.parameters()], "metrics": metrics}


@lru_cache(maxsize=None)
def one_process_step(case: Case) -> dict:
    return one_step(case)


def population_model(parallel: DataParallel | None = None) -> torch.nn.Module:
    """A CNN3-BN with the population statistics of 100 training images in batches of 32 (4 batches)."""
    config = load_config("mnist-mini-0.1/ibp")
    torch.manual_seed(1)
    model = build_model_for(config, mnist().spec)
    initialize(model, "ibp")
    recompute_population_statistics(model, mnist().train.head(100), 32, "cpu", parallel=parallel)
    return model.eval()


def evaluation(model: torch.nn.Module, parallel: DataParallel | None = None) -> dict:
    """Evaluation of 45 test images (parts of 23 and 22 on two ranks), CROWN-IBP and a 2-step attack."""
    arguments = (model, mnist().test.head(45), 0.1, "cpu", 16)
    options = {"attack": PGDSettings(steps=2, restarts=1, random_start="center"), "crown_ibp": True}
    result = evaluate_sharded(parallel, *arguments, **options) if parallel else evaluate(*arguments, **options)
    return result.as_dict()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def join_as_rank(rank: int, port: int) -> DataParallel:
    """What torchrun sets up for a rank, then ctbench's own start."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return start_data_parallel(torch.device("cpu"))


def step_rank(rank: int, port: int, out: str) -> None:
    parallel = join_as_rank(rank, port)
    try:
        results = {case.name: one_step(case, parallel) for case in CASES}
        results[LOCAL_STATISTICS] = one_step(STEPS[0], LocalStatistics(parallel.rank, parallel.world_size,
                                                                       parallel.device))
        model = population_model(parallel)
        results["population"] = {key: value for key, value in model.state_dict().items() if "running" in key}
        results["evaluation"] = evaluation(model, parallel)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        stop_data_parallel()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(step_rank, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def max_difference(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def assert_equivalent(case: Case, ranks: list) -> None:
    reference = one_process_step(case)
    result = ranks[0][case.name]
    parameters = max_difference(result["parameters"], reference["parameters"])
    gradients = max_difference(result["gradients"], reference["gradients"])
    print(f"{case.name}: max |parameter difference| {parameters:.3g}, max |gradient difference| {gradients:.3g}")
    assert parameters < TOLERANCE and gradients < TOLERANCE, (parameters, gradients)
    assert result["metrics"] == pytest.approx(reference["metrics"], rel=1e-9, abs=1e-12)


def test_every_rank_ends_the_step_with_the_same_parameters(two_ranks):
    for name in [case.name for case in CASES] + [LOCAL_STATISTICS]:
        result = two_ranks[0][name]
        assert all(torch.equal(a, b) for a, b in zip(result["parameters"], two_ranks[1][name]["parameters"])), name


@pytest.mark.parametrize("case", STEPS, ids=lambda case: case.method)
def test_two_rank_step_equals_the_one_process_step_on_the_whole_batch(case, two_ranks):
    assert_equivalent(case, two_ranks)


@pytest.mark.parametrize("case", ACCUMULATED, ids=lambda case: case.method)
def test_two_rank_step_with_two_sub_batches_per_rank_equals_the_whole_batch(case, two_ranks):
    assert_equivalent(case, two_ranks)


def test_warmup_regularizer_is_that_of_the_global_batch(two_ranks):
    assert "shi_penalty" in two_ranks[0][WARMUP.name]["metrics"]
    assert_equivalent(WARMUP, two_ranks)


def test_per_rank_batchnorm_statistics_would_give_another_step(two_ranks):
    """The equivalence tests can fail: statistics of each rank's own half of the batch change
    the step far beyond the tolerance."""
    reference = one_process_step(STEPS[0])
    wrong = two_ranks[0][LOCAL_STATISTICS]
    parameters = max_difference(wrong["parameters"], reference["parameters"])
    gradients = max_difference(wrong["gradients"], reference["gradients"])
    print(f"per-rank statistics: max |parameter difference| {parameters:.3g}, gradients {gradients:.3g}")
    assert parameters > 1e4 * TOLERANCE and gradients > 1e4 * TOLERANCE


SMALL_RUN = ["data.train_subset=256", "data.validation_size=128", "optim.batch_size=64", "optim.epochs=2",
             "eps.ramp_end_epoch=1", "optim.lr_milestones=[1]", "attack.steps=2", "evaluation.batch_size=64",
             "evaluation.final_test_count=128", "evaluation.attack_steps=2", "evaluation.attack_restarts=1",
             "model.architecture=cnn3", "device=cpu", "threads=1"]


class Interrupt(Exception):
    pass


def interrupt_in_second_epoch(iterable, total, description):
    for index, item in enumerate(iterable):
        if description.startswith("epoch 2/") and index == 2:
            raise Interrupt
        yield item


def train_rank(rank: int, port: int, out: str) -> None:
    """Rank 0 trains in ``out``; rank 1 is given a folder of its own, which must stay unwritten."""
    parallel = join_as_rank(rank, port)
    root = os.path.join(out, "run" if rank == 0 else "rank1-never-written")
    config = config_from_dict(apply_overrides(preset_data("mnist-0.1/ibp"), SMALL_RUN))
    try:
        straight = Trainer(config, os.path.join(root, "straight"), dataset=mnist(), parallel=parallel).fit()
        try:
            Trainer(config, os.path.join(root, "killed"), progress=interrupt_in_second_epoch, dataset=mnist(),
                    parallel=parallel).fit()
        except Interrupt:
            pass
        resumed = Trainer(config, os.path.join(root, "killed"), dataset=mnist(), parallel=parallel).fit(resume=True)
        try:
            Trainer(config, os.path.join(root, "missing"), dataset=mnist(), parallel=parallel).fit(resume=True)
            error = None
        except Exception as raised:  # rank 0's CheckpointError, raised on every rank
            error = f"{type(raised).__name__}: {raised}"
        with open(os.path.join(out, f"rank{rank}.json"), "w") as record:
            json.dump({"straight": straight, "resumed": resumed, "error": error}, record)
    finally:
        stop_data_parallel()


def test_two_rank_run_is_written_by_rank_0_resumes_and_agrees_on_every_rank(tmp_path):
    mp.spawn(train_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert ranks[0] == ranks[1]  # evaluations and population statistics agree on every rank
    assert ranks[0]["resumed"] == ranks[0]["straight"]
    assert ranks[0]["error"].startswith("CheckpointError: cannot resume: no checkpoint.pt")
    assert not (tmp_path / "rank1-never-written").exists()
    straight, killed = tmp_path / "run" / "straight", tmp_path / "run" / "killed"
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "best.pt", "final.pt", "results.json"):
        assert (straight / name).exists() and (killed / name).exists(), name
    assert [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a = torch.load(straight / "final.pt", weights_only=False)["model"]
    b = torch.load(killed / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_torchrun_runs_python_dash_m_ctbench_train_and_only_rank_0_reports(tmp_path):
    overrides = [override for override in SMALL_RUN if not override.startswith(("optim.epochs", "data."))]
    overrides += ["optim.epochs=1", "data.train_subset=128", "data.validation_size=0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}",
               "-m", "ctbench", "train", "mnist-0.1/ibp", "--out", str(tmp_path / "run"), "--json", "--quiet",
               *(f"--set={override}" for override in overrides)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, done.stdout
    assert json.loads(reports[0])["test"]["samples"] == 128
    assert (tmp_path / "run" / "final.pt").exists() and (tmp_path / "run" / "results.json").exists()


def test_ranks_train_on_disjoint_parts_of_the_same_permutation_and_augmentation():
    """Concatenated over the ranks, every batch (augmented) is the one-process batch; a last
    batch smaller than the number of ranks is left out."""
    generator = torch.Generator().manual_seed(3)
    split = Split(torch.randint(0, 256, (23, 3, 6, 6), generator=generator, dtype=torch.uint8),
                  torch.arange(23))
    augmentation = Augmentation(crop_padding=2, horizontal_flip=True)

    def batches(shard):
        return list(iterate_batches(split, 10, "cpu", shuffle=True, generator=torch.Generator().manual_seed(7),
                                    augmentation=augmentation, shard=shard))

    whole = batches((0, 1))
    for parts in (2, 3, 4):
        ranks = [batches((rank, parts)) for rank in range(parts)]
        kept = whole if parts <= 3 else whole[:2]  # the last batch has 3 samples
        assert all(len(rank) == len(kept) == num_batches(23, 10, parts=parts) for rank in ranks)
        for index, (images, labels) in enumerate(kept):
            assert torch.equal(torch.cat([rank[index][0] for rank in ranks]), images)
            assert torch.equal(torch.cat([rank[index][1] for rank in ranks]), labels)


def test_parts_of_a_batch_are_contiguous_disjoint_and_cover_it():
    for size in (0, 1, 7, 64):
        parts = [DataParallel(rank, 3, torch.device("cpu")).part(size) for rank in range(3)]
        assert [index for part in parts for index in range(size)[part]] == list(range(size))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_population_statistics_and_evaluation_are_computed_sharded_and_agree_with_one_process(two_ranks):
    model = population_model()
    for key, value in two_ranks[0]["population"].items():
        assert torch.allclose(value, model.state_dict()[key], rtol=1e-5, atol=1e-6), key
        assert torch.equal(value, two_ranks[1]["population"][key])
    assert two_ranks[0]["evaluation"] == two_ranks[1]["evaluation"] == evaluation(model)
