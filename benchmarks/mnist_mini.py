"""Train methods of the CPU-scale MNIST-mini setting over seeds and config arms; tabulate mean +- std.

Every job is (preset, arm, seed); its run folder is ROOT/<setting>/<method>/<arm>/seed<k>. A
finished job (results.json) is skipped, a stopped one resumes from its last checkpoint, so the
script can be stopped and started again, and several copies can share the work (each takes the
jobs whose position modulo --of equals --part). An arm is a name and config overrides, e.g.
``--arm pixel-shi:regularization.shi_input_space=pixel``; the arm "default" has none.

Each results.json holds natural, IBP-certified, IBP-or-CROWN-IBP-certified and PGD (20 steps,
3 restarts) accuracy on the full test set. The table (mean +- sample std over seeds, with the
reference implementation's figures of ../shared/REFERENCE.md beside ours) goes to --table.

    python benchmarks/mnist_mini.py --runs mnist-mini-0.1/ibp --seeds 0,1,2 \\
        --arm default --arm pixel-shi:regularization.shi_input_space=pixel [--part 0 --of 2] [--threads 1]
    python benchmarks/mnist_mini.py --runs ... --seeds ... --arm ... --table-only
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# The reference implementation on mnist-mini (REFERENCE.md): mean over its seeds 123, 0, 1 for
# IBP, seed 123 alone for SABR and MTL-IBP; natural, IBP-, CROWN-IBP-certified, PGD (percent).
REFERENCE = {
    "mnist-mini-0.1/ibp": {"seeds": "123,0,1", "natural": 94.35, "ibp": 91.34, "crown_ibp": None, "pgd": None},
    "mnist-mini-0.3/ibp": {"seeds": "123,0,1", "natural": 91.36, "ibp": 75.92, "crown_ibp": None, "pgd": None},
    "mnist-mini-0.1/sabr": {"seeds": "123", "natural": 96.23, "ibp": 92.75, "crown_ibp": 93.22, "pgd": 93.87},
    "mnist-mini-0.1/mtl_ibp": {"seeds": "123", "natural": 97.62, "ibp": 88.37, "crown_ibp": 94.21, "pgd": 95.00},
}
METRICS = (("natural", "natural_accuracy"), ("ibp", "certified_accuracy"),
           ("crown_ibp", "crown_ibp_certified_accuracy"), ("pgd", "adversarial_accuracy"))


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [item for item in overrides.split(",") if item]


def run_dir(root: Path, preset: str, arm: str, seed: int) -> Path:
    setting, method = preset.split("/")
    return root / setting / method / arm / f"seed{seed}"


def train(preset: str, overrides: list[str], seed: int, folder: Path) -> dict:
    from ctbench.presets import load_config
    from ctbench.training import Trainer

    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text())
    config = load_config(preset, [*overrides, f"seed={seed}"])
    return Trainer(config, folder).fit(resume=(folder / "checkpoint.pt").exists())


def seconds_per_epoch(folder: Path) -> float:
    values = sorted(json.loads(line)["train_seconds"] for line in (folder / "metrics.jsonl").read_text().splitlines())
    return values[len(values) // 2]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def table(root: Path, presets: list[str], arms: list[str], seeds: list[int]) -> str:
    lines = ["| preset | arm | seeds | natural | IBP-certified | IBP/CROWN-IBP-certified | PGD (20x3) | "
             "train s/epoch | reference (seeds): natural / IBP / CROWN-IBP / PGD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        for arm in arms:
            done = [run_dir(root, preset, arm, s) for s in seeds if (run_dir(root, preset, arm, s) / "results.json").exists()]
            tests = [json.loads((folder / "results.json").read_text())["test"] for folder in done]
            cells = [mean_std([100 * t[key] for t in tests if t.get(key) is not None]) for _, key in METRICS]
            speed = statistics.median(seconds_per_epoch(folder) for folder in done) if done else None
            reference = REFERENCE.get(preset)
            ref = ("-" if reference is None else f"({reference['seeds']}) " + " / ".join(
                "-" if reference[name] is None else f"{reference[name]:.2f}" for name, _ in METRICS))
            lines.append(f"| {preset} | {arm} | {len(done)} | " + " | ".join(cells)
                         + f" | {'-' if speed is None else f'{speed:.1f}'} | {ref} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated presets")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--arm", action="append", default=[], help="NAME[:KEY=VALUE,...] (repeatable)")
    parser.add_argument("--root", default="runs/mnist-mini")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--table", help="write the table here (Markdown)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    presets = args.runs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = dict(parse_arm(text) for text in (args.arm or ["default"]))
    root = Path(args.root)
    jobs = [(p, a, s) for p in presets for a in arms for s in seeds]
    if not args.table_only:
        for position, (preset, arm, seed) in enumerate(jobs):
            if position % args.of != args.part:
                continue
            started = time.time()
            results = train(preset, arms[arm], seed, run_dir(root, preset, arm, seed))
            print(json.dumps({"preset": preset, "arm": arm, "seed": seed, **results["test"],
                              "wall_seconds_this_call": round(time.time() - started, 1)}), flush=True)
    text = table(root, presets, list(arms), seeds)
    if args.table:
        Path(args.table).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
