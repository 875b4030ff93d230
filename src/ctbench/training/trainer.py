"""The one training loop for every method.

A run folder holds ``config.yaml`` (the resolved config), ``checkpoint.pt`` (written atomically
after every epoch: weights, optimizer, SWA average, best-so-far), ``best.pt`` (the weights
selected on the validation split), ``final.pt`` (the model the run hands on: the best epoch, or
the SWA average), ``metrics.jsonl`` (one line per epoch) and ``results.json`` (test numbers).
Every epoch seeds its own random streams from (seed, epoch), so a run resumed from its last
checkpoint ends exactly where an uninterrupted one would. A new run that fails before its first
checkpoint removes what it wrote; a diverging run (``OptimConfig``) stops and keeps its last checkpoint.

Under torchrun (``distributed``) every rank runs this loop on its part of each global batch;
rank 0 alone reads and writes the run folder.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..attacks import PGDSettings
from ..config import ConfigError, TrainConfig, config_to_dict, dump_yaml, saved_config_from_dict
from ..data import Dataset, Split, iterate_batches, load_dataset, num_batches, split_validation
from ..evaluation import EvaluationResult, evaluate
from ..io import atomic_write_json, atomic_write_text
from ..methods import METHODS, Method
from ..models import build_model, initialize
from .batchnorm import recompute_population_statistics
from .checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from .distributed import DataParallel, evaluate_sharded
from .divergence import DivergenceError, DivergenceMonitor
from .schedules import eps_at, lr_at
from .step import StepSettings, training_step

ProgressFactory = Callable[[Iterable, int, str], Iterable]


def available_devices() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """The device for "auto" (CUDA if there is one, else the CPU) or a name available on this
    machine, with ctbench's precision rules in force (``use_exact_float32``)."""
    use_exact_float32()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    if name not in available:
        raise ConfigError(f"device {name!r} is not available; use auto, cpu, cuda, cuda:N or mps "
                          f"(available here: {', '.join(available)})")
    return torch.device(name)


def use_exact_float32() -> None:
    """float32 matmuls and convolutions in full float32: TF32 (10-bit mantissa) would loosen
    bounds and certificates on CUDA. cuDNN picks deterministic algorithms, without benchmarking."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def make_method(config: TrainConfig) -> Method:
    return METHODS.get(config.method.name)(config.method.options, config)


def build_model_for(config: TrainConfig, dataset_spec) -> nn.Sequential:
    if not config.data.normalize:  # the first layer stays, as the identity, so checkpoints keep one layout
        dataset_spec = dataclasses.replace(dataset_spec, mean=(0.0,) * dataset_spec.channels,
                                           std=(1.0,) * dataset_spec.channels)
    return build_model(config.model.architecture, dataset_spec, config.model.batch_norm)


def init_name(config: TrainConfig, method: Method) -> str:
    if config.model.init != "auto":
        return config.model.init
    return "ibp" if method.certified else "kaiming"


def selection_metric(config: TrainConfig, method: Method) -> str:
    if config.evaluation.selection != "auto":
        return config.evaluation.selection
    if config.data.validation_size == 0:  # nothing to select on: hand on the last epoch
        return "last"
    if config.method.name == "standard":
        return "natural"
    return "certified" if method.certified else "adversarial"


def _as_dict(result: EvaluationResult | None) -> dict | None:
    return None if result is None else result.as_dict()


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63)


@dataclass
class _Average:
    """Running mean of the model's parameters and buffers (SWA)."""

    state: dict[str, torch.Tensor] | None = None
    count: int = 0

    def update(self, model: nn.Module) -> None:
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.state is None:
            self.state, self.count = current, 1
            return
        self.count += 1
        for key, value in current.items():
            if value.is_floating_point():
                self.state[key] += (value - self.state[key]) / self.count


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: Path, progress: ProgressFactory | None = None,
                 dataset: Dataset | None = None, final_test: bool = True,
                 parallel: DataParallel | None = None) -> None:
        """``final_test``: evaluate the handed-on model on the test set at the end (results.json
        "test"); a hyper-parameter sweep passes False, so that it never sees the test set.
        ``parallel`` (``start_data_parallel``): train as one rank of a data-parallel job, on its device."""
        self.config = config
        self.run_dir = Path(run_dir)
        self.final_test = final_test
        self.parallel = parallel
        self.progress = progress or (lambda iterable, total, description: iterable)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = parallel.device if parallel else resolve_device(config.device)
        self.method = make_method(config)
        data = config.data
        self.dataset = dataset or load_dataset(data.dataset, data.data_dir, data.download)
        train = self._training_images()
        self.train_split, self.validation_split = split_validation(train, data.validation_size, config.seed)
        self.augmentation = dataclasses.replace(self.dataset.augmentation, padding_mode=data.padding_mode)
        torch.manual_seed(config.seed)
        self.model = build_model_for(config, self.dataset.spec).to(self.device)
        initialize(self.model, init_name(config, self.method))
        if parallel:
            parallel.broadcast_module(self.model)
        self.memory_format = torch.channels_last if config.memory_format == "channels_last" else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr)
        self.selection = selection_metric(config, self.method)
        self.divergence = DivergenceMonitor(config.optim.divergence_factor)
        self._created_run_dir = False

    def _training_images(self) -> Split:
        """The first train_subset + validation_size training images (all of them without a subset)."""
        data, train = self.config.data, self.dataset.train
        if data.train_subset is None:
            return train
        wanted = data.train_subset + data.validation_size
        if wanted > len(train):
            raise ConfigError(f"data.train_subset={data.train_subset} plus data.validation_size={data.validation_size} "
                              f"is more than the {len(train)} training images of {data.dataset}; lower either")
        return train.head(wanted)

    # -- run folder -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def is_main(self) -> bool:
        """Whether this process reads and writes the run folder (rank 0, or the only process)."""
        return self.parallel is None or self.parallel.is_main

    def _on_main(self, produce: Callable[[], object]) -> object:
        """``produce()`` run by the main process; its value (or its error) reaches every rank."""
        return produce() if self.parallel is None else self.parallel.from_main(produce)

    def _start(self, resume: bool) -> tuple[int, dict, _Average]:
        """(first epoch to run, best-so-far record, SWA average) for a new or resumed run; under
        torchrun rank 0 reads the checkpoint and every rank loads it."""
        state = self._on_main(lambda: self._open_run_folder(resume))
        if state is None:
            return 0, {"epoch": None, "value": float("-inf")}, _Average()
        load_model_state(self.model, state["model"], str(self.checkpoint_path))
        self.optimizer.load_state_dict(state["optimizer"])
        average = _Average(state["swa"]["state"], state["swa"]["count"])
        return state["epoch"] + 1, state["best"], average

    def _open_run_folder(self, resume: bool) -> dict | None:
        """Start a new run folder (None), or read the checkpoint of the run to resume."""
        if not resume:
            if self.checkpoint_path.exists():
                raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                      "or choose another --out folder")
            self._created_run_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.config, self.run_dir / "config.yaml")
            atomic_write_text(self.run_dir / "metrics.jsonl", "")
            return None
        if not self.checkpoint_path.exists():
            raise CheckpointError(f"cannot resume: no checkpoint.pt in {self.run_dir}")
        state = load_checkpoint(self.checkpoint_path)
        # compare as typed configs, so keys added with defaults since the run started do not count
        if saved_config_from_dict(state.get("config", {})) != self.config:
            raise CheckpointError(f"cannot resume {self.run_dir}: its config differs from the one given; "
                                  "resume with the run's own config (ctbench train --resume RUN_DIR)")
        self._truncate_metrics(state["epoch"])
        return state

    def _truncate_metrics(self, last_epoch: int) -> None:
        """Drop log lines of epochs after the checkpoint (a run killed between the two writes)."""
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= last_epoch]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        first_epoch, best, average = self._start(resume)
        try:
            return self._run_epochs(first_epoch, best, average)
        except BaseException:
            if self.is_main and not self.checkpoint_path.exists():
                self._remove_unstarted_run()
            raise

    def _remove_unstarted_run(self) -> None:
        """A new run that failed before its first checkpoint leaves no half-made run folder."""
        for name in ("config.yaml", "metrics.jsonl", "best.pt"):
            (self.run_dir / name).unlink(missing_ok=True)
        if self._created_run_dir and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()

    def _run_epochs(self, first_epoch: int, best: dict, average: _Average) -> dict:
        config = self.config
        for epoch in range(first_epoch, config.optim.epochs):
            record = self._train_epoch(epoch, average)
            self._recompute_population_statistics()
            if self._swa_active(epoch) and config.swa.every_steps is None:
                average.update(self.model)
            validation = self._validate()
            record["validation"] = _as_dict(validation)
            value = self._selection_value(validation) if validation is not None else 0.0
            eligible = epoch + 1 >= config.eps.ramp_end_epoch  # only models trained at the full eps
            if eligible and (self.selection == "last" or value >= best["value"]):
                best = {"epoch": epoch, "value": value}
                self._save(self.run_dir / "best.pt", self._model_record(epoch))
            record["selected"] = best["epoch"] == epoch
            self._save(self.checkpoint_path, {
                "format": 1, "epoch": epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "best": best,
                "swa": {"state": average.state, "count": average.count}, "config": config_to_dict(config)})
            self._on_main(lambda: self._append_metrics(record))
        return self._finish(best, average)

    def _save(self, path: Path, state: dict) -> None:
        """Write a checkpoint (atomically) from the main process; an error reaches every rank."""
        self._on_main(lambda: save_checkpoint(path, state))

    def _append_metrics(self, record: dict) -> None:
        """Add the epoch's line to metrics.jsonl, rewriting the file atomically."""
        path = self.run_dir / "metrics.jsonl"
        atomic_write_text(path, (path.read_text() if path.exists() else "") + json.dumps(record) + "\n")

    def _recompute_population_statistics(self) -> None:
        config = self.config
        recompute_population_statistics(self.model, self.train_split, config.evaluation.batch_size, self.device,
                                        config.evaluation.population_batches, self.parallel)

    def _swa_active(self, epoch: int) -> bool:
        return self.config.swa.start_epoch is not None and epoch >= self.config.swa.start_epoch

    def _swa_snapshot_due(self, epoch: int, iteration: int, batches: int) -> bool:
        """Every swa.every_steps optimizer steps, counted from the start of training (the reference)."""
        every = self.config.swa.every_steps
        return self._swa_active(epoch) and every is not None and (epoch * batches + iteration + 1) % every == 0

    def _train_epoch(self, epoch: int, average: _Average) -> dict:
        """One epoch. The permutation and augmentation come from (seed, epoch), the same on every
        rank, and each rank trains on its part of every batch; attacks draw from each rank's own stream."""
        config = self.config
        rank, world_size = self.parallel.shard if self.parallel else (0, 1)
        torch.manual_seed((_epoch_seed(config.seed, epoch) + rank) % (2 ** 63))
        generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(config.optim, epoch)
        batches = num_batches(len(self.train_split), config.optim.batch_size, parts=world_size)
        iterator = iterate_batches(self.train_split, config.optim.batch_size, self.device, shuffle=True,
                                   generator=generator, augmentation=self.augmentation, shard=(rank, world_size))
        totals: dict[str, float] = {}
        started = time.perf_counter()
        self.model.train()
        bar = self.progress(iterator, batches, f"epoch {epoch + 1}/{config.optim.epochs}")
        for iteration, (images, labels) in enumerate(bar):
            eps = eps_at(config.eps, epoch, iteration, batches)
            settings = StepSettings(eps=eps, eps_target=config.eps.train_eps, num_classes=self.dataset.spec.classes)
            images = images.contiguous(memory_format=self.memory_format)
            metrics = training_step(self.model, self.method, self.optimizer, config, settings, images, labels,
                                    self.parallel)
            self._check_divergence(metrics, epoch, iteration, batches, eps)
            if self._swa_snapshot_due(epoch, iteration, batches):
                average.update(self.model)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{metrics.get('robust_loss', metrics['natural_loss']):.3f}", eps=f"{eps:.3f}")
        self.model.eval()
        return {"epoch": epoch, "lr": lr_at(config.optim, epoch), "eps": eps,
                "train": {k: v / batches for k, v in totals.items()},
                "train_seconds": time.perf_counter() - started}

    def _check_divergence(self, metrics: dict, epoch: int, iteration: int, batches: int, eps: float) -> None:
        """Stop on a diverged step (DivergenceMonitor) before anything of it is saved."""
        problem = self.divergence.problem(metrics)
        if problem is None:
            return
        config = self.config
        kept = (f"The last good checkpoint (epoch {epoch}) is kept in {self.checkpoint_path}."
                if self.checkpoint_path.exists() else "No checkpoint was written yet, so the run's files are removed.")
        raise DivergenceError(
            f"training diverged at epoch {epoch + 1}/{config.optim.epochs}, step {iteration + 1}/{batches} "
            f"(lr {self.optimizer.param_groups[0]['lr']:g}, eps {eps:.4g}): {problem}. Likely causes: optim.lr too "
            f"high, eps.train_eps too large for this model, or a method setting; lower optim.lr and train anew "
            f"(optim.divergence_factor: null turns the loss limit off). {kept}")

    def _attack_settings(self) -> PGDSettings:
        evaluation = self.config.evaluation
        return PGDSettings(steps=evaluation.attack_steps, restarts=evaluation.attack_restarts)

    def _validate(self) -> EvaluationResult | None:
        if not len(self.validation_split):
            return None
        attack = self._attack_settings() if self.selection == "adversarial" else None
        return self._evaluate(self.validation_split, attack, None, self.selection == "certified")

    def _evaluate(self, split: Split, attack: PGDSettings | None, count: int | None,
                  crown_ibp: bool) -> EvaluationResult:
        """``evaluate`` at the test eps; under torchrun each rank takes a part and the counts are summed."""
        arguments = (self.config.eps.test_eps, self.device, self.config.evaluation.batch_size)
        if self.parallel is None:
            return evaluate(self.model, split, *arguments, attack=attack, count=count, crown_ibp=crown_ibp)
        return evaluate_sharded(self.parallel, self.model, split.head(count), *arguments, attack=attack,
                                crown_ibp=crown_ibp)

    def _selection_value(self, result: EvaluationResult) -> float:
        if self.selection == "certified":  # certified by IBP or CROWN-IBP; natural accuracy breaks ties
            return result.crown_ibp_certified_accuracy + 1e-6 * result.natural_accuracy
        if self.selection == "adversarial":
            return result.adversarial_accuracy
        return result.natural_accuracy

    def _model_record(self, epoch: int) -> dict:
        return {"format": 1, "epoch": epoch, "model": self.model.state_dict(),
                "config": config_to_dict(self.config)}

    def _finish(self, best: dict, average: _Average) -> dict:
        config = self.config
        if average.state is not None:
            self.model.load_state_dict(average.state)
            self._recompute_population_statistics()
            source = f"SWA of {average.count} snapshots over epochs {config.swa.start_epoch}-{config.optim.epochs - 1}"
        elif best["epoch"] is not None:
            state = self._on_main(lambda: load_checkpoint(self.run_dir / "best.pt")["model"])
            load_model_state(self.model, state, "best.pt")
            source = (f"epoch {best['epoch']} (the last)" if self.selection == "last"
                      else f"epoch {best['epoch']} (best validation {self.selection})")
        else:
            source = "last epoch"
        self._save(self.run_dir / "final.pt", {**self._model_record(best["epoch"]), "source": source})
        test = self._evaluate_test() if self.final_test else None
        results = {"model": source, "test": _as_dict(test), "validation": _as_dict(self._validate()),
                   "method": config.method.name, "dataset": config.data.dataset}
        self._on_main(lambda: atomic_write_json(self.run_dir / "results.json", results))
        return results

    def _evaluate_test(self) -> EvaluationResult:
        """The final numbers: the first evaluation.final_test_count test samples."""
        return self._evaluate(self.dataset.test, self._attack_settings(), self.config.evaluation.final_test_count,
                              self.method.certified)
