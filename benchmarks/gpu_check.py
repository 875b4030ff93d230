"""A GPU check that one GPU finishes in under 8 minutes; writes results/gpu_check_<gpu>.md.

* per-method CNN7-BN step time and peak memory at batch 256, with the MNIST 0.1 and CIFAR-10
  2/255 presets' settings (MNIST: the bundled images; CIFAR-10: random images of its shape, so
  no download is needed), attacks in float32 and, in the bf16 rows, under bfloat16 autocast;
* one IBP epoch of CNN7-BN on MNIST (mnist-0.1/ibp, eps ramped over the epoch), with the
  population statistics and a 1,000-sample test evaluation;
* a data-parallel step over all visible GPUs (nccl): the global batch of 256 split over the
  ranks, its step time, and its largest parameter and gradient differences from the
  one-process step on the whole batch.

Precision rules: ctbench's device setup (``resolve_device``) turns TF32 off for matmuls and
cuDNN, so bounds are float32; this script also asks torch for deterministic algorithms
(warn-only: the report lists the ops that have none). Rows that would run past ``--rows-budget``
seconds are skipped and marked so.

    python benchmarks/gpu_check.py                         # the GPU check
    python benchmarks/gpu_check.py --device cpu --quick    # seconds, tiny sizes: keeps the script working
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ctbench import __version__
from ctbench.data import DATASETS, load_dataset
from ctbench.io import atomic_write_text
from ctbench.models import initialize
from ctbench.presets import load_config, preset_names
from ctbench.training import StepSettings, Trainer, build_model_for, make_method, resolve_device, training_step
from ctbench.training.distributed import start_data_parallel, stop_data_parallel

SETTINGS = ("mnist-0.1", "cifar10-2_255")
EXTRA_ROWS = ("standard", "sabr+attack.precision=bfloat16", "mtl_ibp+attack.precision=bfloat16")
RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclass(frozen=True)
class Sizes:
    architecture: str
    batch: int
    steps: int  # timed steps per row (the median is reported)
    warmup: int
    train_subset: int | None  # images of the IBP epoch (None: all)
    test_count: int
    method_overrides: tuple[tuple[str, str], ...] = ()  # (method, KEY=VALUE) added to that method's rows


FULL = Sizes("cnn7", 256, 5, 2, None, 1000)
# CNN3 has 2 ReLU layers: TAPS' classifier (3 or 5 layers in the presets) must leave a feature extractor
QUICK = Sizes("cnn3", 8, 1, 0, 64, 16, (("taps", "method.classifier_size=1"),))


def set_up(device_name: str) -> torch.device:
    """ctbench's device setup (TF32 off), and deterministic algorithms where torch has them
    (cuBLAS reads its workspace setting when CUDA starts, after this)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = resolve_device(device_name)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def precision_rules() -> dict[str, object]:
    return {"torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32 matmul precision": torch.get_float32_matmul_precision(),
            "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def rows_of(setting: str) -> list[str]:
    methods = [name.split("/")[1] for name in preset_names() if name.startswith(f"{setting}/")]
    return methods + list(EXTRA_ROWS)


def row_config(setting: str, row: str, sizes: Sizes, device: torch.device, extra: tuple[str, ...] = ()):
    """The preset of ``METHOD[+key=value...]`` (standard: the setting's IBP preset, method swapped)."""
    method, *overrides = row.split("+")
    overrides += [f"model.architecture={sizes.architecture}", f"optim.batch_size={sizes.batch}",
                  f"device={device}", *extra, *(value for name, value in sizes.method_overrides if name == method)]
    if f"{setting}/{method}" not in preset_names():
        overrides.append(f"method.name={method}")
        method = "ibp"
    return load_config(f"{setting}/{method}", overrides)


def batch_of(config, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's first training images, else seeded random images of the data set's shape."""
    spec = DATASETS.get(config.data.dataset).spec
    if config.data.dataset == "mnist":
        train = load_dataset("mnist").train.head(size)
        images, labels = train.images, train.labels
    else:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (size, spec.channels, spec.size, spec.size), generator=generator,
                               dtype=torch.uint8)
        labels = torch.randint(0, spec.classes, (size,), generator=generator)
    return images.to(device).float() / 255, labels.to(device)


def fresh_model(config, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model_for(config, DATASETS.get(config.data.dataset).spec).to(device)
    initialize(model, "kaiming" if config.method.name in ("standard", "pgd", "edac") else "ibp")
    if config.memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(config, images, labels, device: torch.device, steps: int, warmup: int, parallel=None) -> list[float]:
    """Seconds of each of ``steps`` training steps at the full train eps, after ``warmup`` steps."""
    model = fresh_model(config, device)
    method, optimizer = make_method(config), torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    settings = StepSettings(config.eps.train_eps, config.eps.train_eps, DATASETS.get(config.data.dataset).spec.classes)
    if config.memory_format == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    times = []
    for index in range(warmup + steps):
        synchronize(device)
        started = time.perf_counter()
        training_step(model, method, optimizer, config, settings, images, labels, parallel)
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def measure_row(setting: str, row: str, sizes: Sizes, device: torch.device) -> dict:
    config = row_config(setting, row, sizes, device)
    images, labels = batch_of(config, sizes.batch, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_steps(config, images, labels, device, sizes.steps, sizes.warmup)
    return {"setting": setting, "row": row, "seconds": statistics.median(times), "peak_mb": peak_memory_mb(device)}


def measure_rows(sizes: Sizes, device: torch.device, budget: float, alerts: set[str]) -> list[dict]:
    """Every row of every setting, until ``budget`` seconds have passed; the rest are marked skipped.
    Warnings about ops without a deterministic implementation are collected into ``alerts``."""
    started, results = time.perf_counter(), []
    for setting in SETTINGS:
        for row in rows_of(setting):
            if time.perf_counter() - started > budget:
                results.append({"setting": setting, "row": row, "skipped": "time budget"})
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    results.append(measure_row(setting, row, sizes, device))
                except Exception as error:  # an OOM or a failure is a finding of the check, not its end
                    results.append({"setting": setting, "row": row, "error": f"{type(error).__name__}: {error}"})
            alerts.update(str(w.message).splitlines()[0] for w in caught if "determinis" in str(w.message))
    return results


def ibp_epoch(sizes: Sizes, device: torch.device) -> dict:
    """One epoch of mnist-0.1/ibp (eps ramped over it), timed by the trainer, in a scratch folder."""
    overrides = ["optim.epochs=1", "eps.ramp_end_epoch=1", "optim.lr_milestones=[]", "data.validation_size=0",
                 f"evaluation.final_test_count={sizes.test_count}", "evaluation.attack_steps=5",
                 "evaluation.attack_restarts=1"]
    if sizes.train_subset is not None:
        overrides.append(f"data.train_subset={sizes.train_subset}")
    config = row_config("mnist-0.1", "ibp", sizes, device, tuple(overrides))
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        results = Trainer(config, Path(folder) / "run").fit()
        total = time.perf_counter() - started
        record = json.loads((Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()[0])
    return {"train_seconds": record["train_seconds"], "total_seconds": total, "test": results["test"],
            "batch": sizes.batch, "images": sizes.train_subset or "all"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_parallel_rank(rank: int, world_size: int, port: int, device_name: str, sizes: Sizes, out: str) -> None:
    """One rank: the step's difference from the one-process step (rank 0), then timed steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel = start_data_parallel(set_up(device_name))
    try:
        config = row_config("mnist-0.1", "ibp", sizes, parallel.device)
        images, labels = batch_of(config, sizes.batch, parallel.device)
        part = parallel.part(sizes.batch)
        differences = step_differences(config, images, labels, part, parallel)
        times = timed_steps(config, images[part], labels[part], parallel.device, sizes.steps, sizes.warmup, parallel)
        if parallel.is_main:
            Path(out).write_text(json.dumps({"world_size": world_size, "seconds": statistics.median(times),
                                             "backend": torch.distributed.get_backend(), **differences}))
    finally:
        stop_data_parallel()


def step_differences(config, images, labels, part: slice, parallel) -> dict:
    """Largest |difference| of parameters and gradients after one data-parallel step and after
    the one-process step on the whole batch (computed by rank 0)."""
    def one_step(own_images, own_labels, group):
        model = fresh_model(config, parallel.device)
        settings = StepSettings(config.eps.train_eps, config.eps.train_eps, 10)
        training_step(model, make_method(config), torch.optim.Adam(model.parameters(), lr=config.optim.lr), config,
                      settings, own_images, own_labels, group)
        return [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]

    shared = one_step(images[part], labels[part], parallel)
    if not parallel.is_main:
        torch.distributed.barrier()
        return {}
    alone = one_step(images, labels, None)
    torch.distributed.barrier()
    return {"max_parameter_difference": max((a[0] - b[0]).abs().max().item() for a, b in zip(shared, alone)),
            "max_gradient_difference": max((a[1] - b[1]).abs().max().item() for a, b in zip(shared, alone)),
            "max_gradient": max(b[1].abs().max().item() for b in alone)}


def data_parallel_step(sizes: Sizes, device: torch.device) -> dict:
    """The data-parallel step over every visible GPU (nccl), or over 2 CPU processes (gloo)."""
    world_size = torch.cuda.device_count() if device.type == "cuda" else 2
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rank0.json"
        mp.spawn(data_parallel_rank, args=(world_size, free_port(), device.type, sizes, str(out)), nprocs=world_size)
        return json.loads(out.read_text())


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def file_name(device: torch.device) -> str:
    return "gpu_check_" + re.sub(r"[^a-z0-9]+", "_", device_label(device).lower()).strip("_") + ".md"


def row_line(result: dict) -> str:
    if "seconds" in result:
        return f"| {result['row']} | {result['seconds']:.4f} | {result['peak_mb']:.0f} |"
    return f"| {result['row']} | {result.get('error') or 'skipped: ' + result['skipped']} | |"


def report(device: torch.device, sizes: Sizes, rules: dict, rows: list[dict], epoch: dict, parallel: dict,
           alerts: set[str], seconds: float) -> str:
    memory = "peak allocated MiB" if device.type == "cuda" else "process peak RSS MiB"
    lines = [f"# GPU check: {device_label(device)}", "",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}), ctbench {__version__}, "
             f"{torch.cuda.device_count() if device.type == 'cuda' else 0} visible GPUs, "
             f"{sizes.architecture.upper()}-BN, batch {sizes.batch}, {seconds:.0f} s in all.", "",
             "## Precision rules", "", *(f"- {key}: {value}" for key, value in rules.items()), "",
             "Bounds run in float32 (TF32 off); the bf16 rows run only the attacks under bfloat16 autocast."]
    for setting in SETTINGS:
        lines += ["", f"## Step time, {setting} settings (median of {sizes.steps}, full train eps)", "",
                  f"| method | seconds/step | {memory} |", "|---|---|---|",
                  *(row_line(r) for r in rows if r["setting"] == setting)]
    lines += ["", f"## One IBP epoch, {sizes.architecture.upper()}-BN on MNIST (mnist-0.1/ibp, eps ramped)", "",
              f"{epoch['images']} training images, batch {epoch['batch']}: training {epoch['train_seconds']:.1f} s; "
              f"with population statistics and the {epoch['test']['samples']}-sample test, "
              f"{epoch['total_seconds']:.1f} s. "
              f"Test: {json.dumps(epoch['test'])}", "",
              f"## Data-parallel step ({parallel['world_size']} ranks, {parallel['backend']})", "",
              f"Global batch {sizes.batch} split over the ranks, mnist-0.1/ibp: {parallel['seconds']:.4f} s/step. "
              f"Against the one-process step on the whole batch (float32): max |gradient difference| "
              f"{parallel['max_gradient_difference']:.3g} (max |gradient| {parallel['max_gradient']:.3g}), "
              f"max |parameter difference| {parallel['max_parameter_difference']:.3g} (Adam's first step moves "
              f"each parameter by about lr x sign(gradient), so an entry whose gradient is near 0 may move by up "
              f"to 2 lr when rounding flips its sign).", "",
              "## Ops without a deterministic implementation", "",
              *([f"- {alert}" for alert in sorted(alerts)] or ["none met"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CNN3, batch 8): seconds on a CPU")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default: results/)")
    parser.add_argument("--rows-budget", type=float, default=240.0, help="seconds for the step-time rows")
    args = parser.parse_args()
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    device = set_up(args.device)
    alerts: set[str] = set()
    rows = measure_rows(sizes, device, args.rows_budget, alerts)
    epoch = ibp_epoch(sizes, device)
    parallel = data_parallel_step(sizes, device)
    text = report(device, sizes, precision_rules(), rows, epoch, parallel, alerts, time.perf_counter() - started)
    atomic_write_text(args.out / file_name(device), text)
    print(text)


if __name__ == "__main__":
    main()
