"""The one training loop for every method.

A run folder holds ``config.yaml`` (the resolved config), ``checkpoint.pt`` (written atomically
after every epoch: weights, optimizer, SWA average, best-so-far), ``best.pt`` (the weights
selected on the validation split), ``final.pt`` (the model the run hands on: the best epoch, or
the SWA average), ``results.json`` (test numbers) and the logs of ``runlog`` (metrics.jsonl and
metrics.csv, one row per epoch, TensorBoard scalars, environment.json). Epochs are counted from
1 in everything a person reads (logs, messages, results); the config's epoch keys
(lr_milestones, eps ramp, swa.start_epoch) and the checkpoints' "epoch" count from 0.
Every epoch seeds its own random streams from (seed, epoch), so a run resumed from its last
checkpoint ends exactly where an uninterrupted one would. A new run that fails before its first
checkpoint removes what it wrote; a diverging run (``OptimConfig``) stops and keeps its last checkpoint.
A resumed run must have the config it was started with, except the keys of ``SAFE_CHANGES``
with ``allow_change`` (more epochs, evaluation and runtime settings).

The Trainer prints nothing: ``progress`` may wrap the batches of each epoch, validation and test
(a progress bar), and ``on_epoch`` receives each epoch's record (the command line prints it).

Under torchrun (``distributed``) every rank runs this loop on its part of each global batch;
rank 0 alone reads and writes the run folder.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..attacks import PGDSettings
from ..attacks.pgd import resolve_precision
from ..config import (
    SAFE_CHANGES, ConfigError, TrainConfig, config_changes, config_to_dict, dump_yaml, saved_config_from_dict,
)
from ..data import Dataset, Split, iterate_batches, load_data, num_batches, split_validation
from ..evaluation import EvaluationResult, evaluate
from ..io import atomic_write_json
from ..methods import METHODS, Method
from ..models import build_model, initialize
from .batchnorm import recompute_population_statistics
from .checkpoint import (
    CheckpointError, checkpoint_file, load_checkpoint, load_model_state, model_weights, save_checkpoint,
)
from .distributed import DataParallel, evaluate_sharded
from .divergence import DivergenceError, DivergenceMonitor
from .runlog import CSV_FILE, ENVIRONMENT_FILE, METRICS_FILE, TENSORBOARD_DIR, TensorBoardLog, append_metrics
from .runlog import finish_session, keep_metrics_until, start_session
from .schedules import eps_at, lr_at
from .step import StepSettings, training_step

ProgressFactory = Callable[[Iterable, int, str], Iterable]
EpochCallback = Callable[[dict], None]


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


def _change_problem(key: str, value, epochs_done: int) -> str | None:
    """Why a resume may not change ``key`` to ``value``, or None when it may (``SAFE_CHANGES``)."""
    if key not in SAFE_CHANGES:
        return "a resume may not change it: the run would train under two configs"
    if key == "optim.epochs" and value < epochs_done:
        return f"fewer than the {epochs_done} epochs already trained"
    return None


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
                 parallel: DataParallel | None = None, model: nn.Sequential | None = None,
                 init_from: str | Path | None = None, on_epoch: EpochCallback | None = None,
                 allow_change: bool = False) -> None:
        """``final_test``: evaluate the handed-on model on the test set at the end (results.json
        "test"); a hyper-parameter sweep passes False, so that it never sees the test set.
        ``parallel`` (``start_data_parallel``): train as one rank of a data-parallel job, on its device.
        ``model``: train this network, in place, instead of building config.model.architecture;
        model.init initializes it ("keep": train it from the weights it has).
        ``init_from``: a new run starts from these weights (``checkpoint_file``: a run folder,
        a ctbench checkpoint or a saved state_dict). ``on_epoch(record)``: called with each
        epoch's metrics.jsonl record. ``allow_change``: a resume may change ``SAFE_CHANGES``."""
        self.config = config
        self.run_dir = Path(run_dir)
        self.final_test = final_test
        self.parallel = parallel
        self.progress = progress or (lambda iterable, total, description: iterable)
        self.on_epoch = on_epoch
        self.allow_change = allow_change
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = parallel.device if parallel else resolve_device(config.device)
        self.method = make_method(config)
        data = config.data
        self.dataset = dataset or load_data(data)
        train = self._training_images()
        self.train_split, self.validation_split = split_validation(train, data.validation_size, config.seed)
        self.augmentation = dataclasses.replace(self.dataset.augmentation, padding_mode=data.padding_mode)
        torch.manual_seed(config.seed)
        self.custom_model = model is not None
        self.model = (model if model is not None else build_model_for(config, self.dataset.spec)).to(self.device)
        if init_name(config, self.method) != "keep":
            initialize(self.model, init_name(config, self.method))
        self.init_from = None if init_from is None else checkpoint_file(init_from)
        if self.init_from is not None:
            self._load_initial_weights(self.init_from)
        if parallel:
            parallel.broadcast_module(self.model)
        self.memory_format = torch.channels_last if config.memory_format == "channels_last" else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr)
        self.selection = selection_metric(config, self.method)
        self.divergence = DivergenceMonitor(config.optim.divergence_factor)
        self._created_run_dir = False
        self.tensorboard: TensorBoardLog | None = None

    def _load_initial_weights(self, path: Path) -> None:
        """Set the model's weights to those of ``path`` (read by the main process); a network of
        another shape is an error that names the first differing tensor."""
        weights = self._on_main(lambda: model_weights(load_checkpoint(path), path))
        load_model_state(self.model, weights, f"the initial weights {path}")

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
            keep_metrics_until(self.run_dir, 0)
            start_session(self.run_dir, self._session_details(first_epoch=1))
            return None
        if self.init_from is not None:
            raise ConfigError("init_from starts a new run from trained weights and resume continues a run from its "
                              "own checkpoint: use one of them (--init-from or --resume)")
        if not self.checkpoint_path.exists():
            raise CheckpointError(f"cannot resume: no checkpoint.pt in {self.run_dir}")
        state = load_checkpoint(self.checkpoint_path)
        if state.get("custom_model") and not self.custom_model:
            raise CheckpointError(f"cannot resume {self.run_dir}: it trains a network given to ctbench.train, "
                                  "which its config cannot rebuild; resume it with ctbench.train(..., "
                                  "model=that network, resume=True)")
        epochs_done = state["epoch"] + 1
        # compare as typed configs, so keys added with defaults since the run started do not count
        changes = self._allowed_changes(saved_config_from_dict(state.get("config", {})), epochs_done)
        if changes:
            dump_yaml(self.config, self.run_dir / "config.yaml")
        keep_metrics_until(self.run_dir, epochs_done)
        start_session(self.run_dir, self._session_details(first_epoch=epochs_done + 1, changed=changes))
        return state

    def _allowed_changes(self, saved: TrainConfig, epochs_done: int) -> dict[str, list]:
        """{key: [run's value, given value]} for the keys the given config changes; an error that
        names every changed key unless each is in SAFE_CHANGES and ``allow_change`` is set."""
        changes = config_changes(saved, self.config)
        if not changes:
            return {}
        problems = {key: _change_problem(key, new, epochs_done) for key, (_, new) in changes.items()}
        if any(problems.values()) or not self.allow_change:
            lines = [f"{key}: {old!r} in the run, {new!r} given ({problems[key] or 'may change with --allow-change'})"
                     for key, (old, new) in changes.items()]
            fix = ("resume with the run's own config (ctbench train RUN_DIR --resume), or start a new run from its "
                   "weights (--init-from RUN_DIR)" if any(problems.values())
                   else "pass --allow-change (allow_change=True) to resume with these changes")
            raise CheckpointError(f"cannot resume {self.run_dir}: its config differs from the one given in "
                                  f"{len(changes)} key(s): " + "; ".join(lines) + f". To go on, {fix}")
        return {key: list(values) for key, values in changes.items()}

    def _session_details(self, first_epoch: int, changed: dict | None = None) -> dict:
        """What environment.json records of this session besides the environment."""
        world_size = self.parallel.shard[1] if self.parallel else 1
        # "auto" resolves per machine, so each session records what its training attacks ran in
        attack_precision = resolve_precision(self.config.attack.precision, self.device)
        return {"device": str(self.device), "world_size": world_size, "first_epoch": first_epoch,
                "attack_precision": attack_precision,
                "model": "given by the caller" if self.custom_model else self.config.model.architecture,
                "dataset": self.dataset.name, "init_from": None if self.init_from is None else str(self.init_from),
                "changed": changed or {}}

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train (a new run, or the rest of the run in the folder with ``resume``); returns
        results.json's content."""
        first_epoch, best, average = self._start(resume)
        if self.is_main:
            self.tensorboard = TensorBoardLog(self.run_dir, first_epoch + 1)
        try:
            return self._run_epochs(first_epoch, best, average)
        except BaseException:
            self._close_tensorboard()
            if self.is_main and not self.checkpoint_path.exists():
                self._remove_unstarted_run()
            raise
        finally:
            self._close_tensorboard()

    def _close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _remove_unstarted_run(self) -> None:
        """A new run that failed before its first checkpoint leaves no half-made run folder."""
        for name in ("config.yaml", METRICS_FILE, CSV_FILE, ENVIRONMENT_FILE, "best.pt"):
            (self.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
        if self._created_run_dir and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()

    def _run_epochs(self, first_epoch: int, best: dict, average: _Average) -> dict:
        config = self.config
        for epoch in range(first_epoch, config.optim.epochs):
            record = self._train_epoch(epoch, average)
            self._recompute_population_statistics()
            if self._swa_active(epoch) and config.swa.every_steps is None:
                average.update(self.model)
            started = time.perf_counter()
            validation = self._validate()
            record["validation"] = _as_dict(validation)
            record["validation_seconds"] = time.perf_counter() - started
            value = self._selection_value(validation) if validation is not None else 0.0
            eligible = epoch + 1 >= config.eps.ramp_end_epoch  # only models trained at the full eps
            if eligible and (self.selection == "last" or value >= best["value"]):
                best = {"epoch": epoch, "value": value}
                self._save(self.run_dir / "best.pt", self._model_record(epoch))
            record["selected"] = best["epoch"] == epoch
            self._save(self.checkpoint_path, {
                "format": 1, "epoch": epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "best": best,
                "swa": {"state": average.state, "count": average.count}, "config": config_to_dict(config),
                **self._model_origin()})
            self._on_main(lambda: self._log_epoch(record))
        return self._finish(best, average)

    def _save(self, path: Path, state: dict) -> None:
        """Write a checkpoint (atomically) from the main process; an error reaches every rank."""
        self._on_main(lambda: save_checkpoint(path, state))

    def _log_epoch(self, record: dict) -> None:
        """The epoch's record to metrics.jsonl, metrics.csv, TensorBoard and ``on_epoch``."""
        append_metrics(self.run_dir, record)
        if self.tensorboard is not None:
            self.tensorboard.add(record)
        if self.on_epoch is not None:
            self.on_epoch(record)

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
        return {"epoch": epoch + 1, "lr": lr_at(config.optim, epoch), "eps": eps,
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
        return self._evaluate(self.validation_split, attack, None, self.selection == "certified", "validation")

    def _evaluate(self, split: Split, attack: PGDSettings | None, count: int | None,
                  crown_ibp: bool, description: str) -> EvaluationResult:
        """``evaluate`` at the test eps; under torchrun each rank takes a part and the counts are summed."""
        arguments = (self.config.eps.test_eps, self.device, self.config.evaluation.batch_size)
        if self.parallel is None:
            return evaluate(self.model, split, *arguments, attack=attack, count=count, crown_ibp=crown_ibp,
                            progress=self.progress, description=description)
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
                "config": config_to_dict(self.config), **self._model_origin()}

    def _model_origin(self) -> dict:
        """Marks the weights of a network given by the caller: the config cannot rebuild it."""
        return {"custom_model": True} if self.custom_model else {}

    def _finish(self, best: dict, average: _Average) -> dict:
        config = self.config
        if average.state is not None:
            self.model.load_state_dict(average.state)
            self._recompute_population_statistics()
            snapshots = f"{average.count} snapshot" + ("" if average.count == 1 else "s")
            source = f"SWA of {snapshots} over epochs {config.swa.start_epoch + 1}-{config.optim.epochs}"
        elif best["epoch"] is not None:
            state = self._on_main(lambda: load_checkpoint(self.run_dir / "best.pt")["model"])
            load_model_state(self.model, state, "best.pt")
            source = (f"epoch {best['epoch'] + 1} (the last)" if self.selection == "last"
                      else f"epoch {best['epoch'] + 1} (best validation {self.selection})")
        else:
            source = "last epoch"
        self._save(self.run_dir / "final.pt", {**self._model_record(best["epoch"]), "source": source})
        test = self._evaluate_test() if self.final_test else None
        results = {"model": source, "test": _as_dict(test), "validation": _as_dict(self._validate()),
                   "method": config.method.name, "dataset": self.dataset.name}
        self._on_main(lambda: atomic_write_json(self.run_dir / "results.json", results))
        self._on_main(lambda: finish_session(self.run_dir))
        return results

    def _evaluate_test(self) -> EvaluationResult:
        """The final numbers: the first evaluation.final_test_count test samples."""
        return self._evaluate(self.dataset.test, self._attack_settings(), self.config.evaluation.final_test_count,
                              self.method.certified, "test")
