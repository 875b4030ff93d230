"""Attack every sample a certification run certified: a sound verifier leaves PGD nothing to find.

    python benchmarks/soundness_check.py RUN_DIR [--steps 100] [--restarts 20] [--threads 2]

Reads RUN_DIR/certify/verdicts.jsonl, runs PGD (margin loss, random starts) with the model's
population statistics on the certified samples, and reports how many of them PGD misclassifies
(must be 0) and the largest margin it reached. Progress is saved after every batch (atomically)
to soundness.json beside the verdicts file, and a stopped run continues from there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ctbench.io import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--verdicts", help="verdicts file (default RUN/certify/verdicts.jsonl)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from ctbench.attacks import PGDSettings, margin_loss, pgd_attack
    from ctbench.bounds import linf_box
    from ctbench.cli import load_trained
    from ctbench.data import load_dataset
    from ctbench.models.ops import lower_network, run_ops

    model, config = load_trained(args.run)
    path = Path(args.verdicts or Path(args.run) / "certify" / "verdicts.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    eps = records[0]["eps"]
    certified = sorted(r["index"] for r in records if r["verdict"] == "certified")
    test = load_dataset(config.data.dataset).test
    ops = lower_network(model, detach=True)
    settings = PGDSettings(steps=args.steps, restarts=args.restarts, step_size=0.1, decay_at=(0.5, 0.75))
    progress_path = path.parent / "soundness.json"
    state = {"run": args.run, "eps": eps, "certified_samples": len(certified), "pgd_steps": args.steps,
             "pgd_restarts": args.restarts, "attacked": 0, "counterexamples_found": 0, "broken_indices": [],
             "max_margin_reached": float("-inf"), "seconds": 0.0}
    if progress_path.exists():
        saved = json.loads(progress_path.read_text())
        if all(saved.get(key) == state[key] for key in ("eps", "certified_samples", "pgd_steps", "pgd_restarts")):
            state = saved
    started = time.time() - state["seconds"]
    for start in range(state["attacked"], len(certified), args.batch):
        index = torch.tensor(certified[start:start + args.batch])
        images = test.images[index].float() / 255
        labels = test.labels[index]
        box = linf_box(images, eps)
        point = pgd_attack(lambda z: run_ops(ops, z), box, labels, settings, loss_fn=margin_loss)
        with torch.no_grad():
            margins = margin_loss(model(point), labels)
        state["max_margin_reached"] = max(state["max_margin_reached"], margins.max().item())
        state["broken_indices"] += index[margins > 0].tolist()
        state["counterexamples_found"] = len(state["broken_indices"])
        state["attacked"] = min(start + args.batch, len(certified))
        state["seconds"] = time.time() - started
        atomic_write_json(progress_path, state)
        print(f"attacked {state['attacked']}/{len(certified)}, counterexamples {state['counterexamples_found']}",
              file=sys.stderr, flush=True)
    print(json.dumps(state))


if __name__ == "__main__":
    main()
