"""The training loop of one mini run per method, from step times: before and after a change.

Reads the ``--json`` tables of ``benchmarks/step_time.py`` (rows METHOD and METHOD:warmup), run in
two trees of the code in alternation within one sitting, and prints, per method, the median step
of each tree and the loop of one run of the setting's schedule: its eps-ramp epochs at the
warm-up step, the rest at the full step, every epoch of ceil(images / batch) steps. What the
loop leaves out (the BatchNorm population pass after each epoch, validation, certification) is
the same work in both trees.

    python benchmarks/mini_run_time.py --before b1.json b2.json --after a1.json a2.json \\
        --setting mnist-mini-0.1 [--images 60000]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics


def median_seconds(files: list[str]) -> dict[str, float]:
    """Each row's median over the tables of ``files`` (seconds per step)."""
    seen: dict[str, list[float]] = {}
    for path in files:
        with open(path) as handle:
            for row in json.load(handle):
                seen.setdefault(row["method"], []).append(row["seconds"])
    return {method: statistics.median(values) for method, values in seen.items()}


def loop_seconds(seconds: dict[str, float], method: str, ramp_epochs: int, full_epochs: int, steps: int) -> float | None:
    if method not in seconds or f"{method}:warmup" not in seconds:
        return None
    return steps * (ramp_epochs * seconds[f"{method}:warmup"] + full_epochs * seconds[method])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", nargs="+", required=True, help="step_time.py --json tables of the tree before")
    parser.add_argument("--after", nargs="+", required=True, help="the same of the tree after")
    parser.add_argument("--setting", default="mnist-mini-0.1", help="the setting whose schedule a run follows")
    parser.add_argument("--images", type=int, default=60000, help="training images per epoch")
    args = parser.parse_args()

    from ctbench.presets import load_config

    config = load_config(f"{args.setting}/ibp")
    ramp_epochs = config.eps.ramp_end_epoch - config.eps.ramp_start_epoch
    full_epochs = config.optim.epochs - config.eps.ramp_end_epoch
    steps = math.ceil(args.images / config.optim.batch_size)
    before, after = median_seconds(args.before), median_seconds(args.after)
    methods = [m for m in after if ":" not in m and m != "plain" and f"{m}:warmup" in after]
    print(f"One {args.setting} run's training loop: {ramp_epochs} ramp epochs at the warm-up step, {full_epochs} "
          f"at the full step, {steps} steps each (batch {config.optim.batch_size}, {args.images} images); "
          f"medians over {len(args.before)} / {len(args.after)} tables before / after.")
    print()
    print("| method | before: warm-up / full s per step | after: warm-up / full s per step "
          "| before: run min | after: run min | speed-up |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        old = loop_seconds(before, method, ramp_epochs, full_epochs, steps)
        new = loop_seconds(after, method, ramp_epochs, full_epochs, steps)
        cells = [method, _steps_cell(before, method), _steps_cell(after, method),
                 f"{old / 60:.1f}" if old is not None else "–", f"{new / 60:.1f}",
                 f"{old / new:.2f}x" if old is not None else "–"]
        print("| " + " | ".join(cells) + " |")


def _steps_cell(seconds: dict[str, float], method: str) -> str:
    if method not in seconds or f"{method}:warmup" not in seconds:
        return "–"
    return f"{seconds[method + ':warmup']:.3f} / {seconds[method]:.3f}"

if __name__ == "__main__":
    main()
