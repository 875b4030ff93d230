"""Train every method on the CPU-scale MNIST-mini setting and tabulate the test results.

Runs go to runs/mnist-mini-<eps>/<method> and are resumed (or skipped when finished), so the
script can be stopped and started again. Each finished run's results.json holds natural,
IBP-certified, IBP-or-CROWN-IBP-certified and PGD (20 steps, 3 restarts) accuracy on the full
test set. The table is written to results/mnist-mini.md and results/mnist-mini.json.

    python benchmarks/mnist_mini.py [--runs mnist-mini-0.1/ibp,mnist-mini-0.3/ibp,...] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_RUNS = ("mnist-mini-0.1/ibp,mnist-mini-0.3/ibp,mnist-mini-0.1/sabr,mnist-mini-0.1/mtl_ibp,"
                "mnist-mini-0.1/crown_ibp,mnist-mini-0.1/pgd,mnist-mini-0.1/taps,mnist-mini-0.1/staps,"
                "mnist-mini-0.1/edac,mnist-mini-0.1/standard")


def train(preset: str, threads: int) -> dict:
    import torch

    from ctbench.cli import _progress
    from ctbench.presets import load_config, preset_names
    from ctbench.training import Trainer

    torch.set_num_threads(threads)
    run_dir = Path("runs") / preset
    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    setting, method = preset.split("/")
    overrides = [] if preset in preset_names() else [f"method.name={method}"]
    config = load_config(preset if preset in preset_names() else f"{setting}/ibp", overrides)
    return Trainer(config, run_dir, progress=_progress).fit(resume=(run_dir / "checkpoint.pt").exists())


def seconds_per_epoch(preset: str) -> float:
    lines = (Path("runs") / preset / "metrics.jsonl").read_text().splitlines()
    return sorted(json.loads(line)["train_seconds"] for line in lines)[len(lines) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for preset in args.runs.split(","):
        started = time.time()
        results = train(preset, args.threads)
        test = results["test"]
        rows.append({"preset": preset, **test, "train_seconds_per_epoch_median": seconds_per_epoch(preset),
                     "model": results["model"], "wall_seconds_this_call": time.time() - started})
        print(json.dumps(rows[-1]), flush=True)
    Path("results").mkdir(exist_ok=True)
    Path("results/mnist-mini.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| preset | natural | IBP-certified | IBP/CROWN-IBP-certified | PGD (20x3) | train s/epoch (median) | model |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        crown = row.get("crown_ibp_certified_accuracy")
        lines.append(f"| {row['preset']} | {100 * row['natural_accuracy']:.2f}% | {100 * row['certified_accuracy']:.2f}% | "
                     + (f"{100 * crown:.2f}%" if crown is not None else "-")
                     + f" | {100 * row['adversarial_accuracy']:.2f}% | {row['train_seconds_per_epoch_median']:.1f} | {row['model']} |")
    Path("results/mnist-mini.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
