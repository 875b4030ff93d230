"""Attack every sample a certification run certified: a sound verifier leaves PGD nothing to find.

    python benchmarks/soundness_check.py RUN_DIR [--steps 100] [--restarts 20] [--threads 2]

Reads RUN_DIR/certify/verdicts.jsonl, runs PGD (``ctbench.certify.audit``: margin loss, random
starts) with the model's population statistics on the certified samples, and reports how many of them PGD misclassifies
(must be 0) and the largest margin it reached. Progress is saved after every batch (atomically)
to soundness.json beside the verdicts file, and a stopped run continues from there ("seconds":
this call's time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch



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
    from ctbench.certify.audit import audit_certified
    from ctbench.cli import load_trained
    from ctbench.data import load_dataset

    model, config = load_trained(args.run)
    path = Path(args.verdicts or Path(args.run) / "certify" / "verdicts.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    eps = records[0]["eps"]
    certified = sorted(r["index"] for r in records if r["verdict"] == "certified")
    test = load_dataset(config.data.dataset).test
    started = time.time()

    def report(audit) -> None:
        print(f"attacked {audit.attacked}/{len(certified)}, counterexamples {len(audit.broken_indices)}",
              file=sys.stderr, flush=True)

    audit = audit_certified(model, test.images[certified], test.labels[certified], eps, certified, steps=args.steps,
                            restarts=args.restarts, batch=args.batch, progress_path=path.parent / "soundness.json",
                            on_batch=report)
    print(json.dumps({"run": args.run, "eps": eps, "certified_samples": len(certified), **audit.as_dict(),
                      "seconds": time.time() - started}))


if __name__ == "__main__":
    main()
