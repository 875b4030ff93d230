"""Time IBP, CROWN-IBP, CROWN and alpha-CROWN on one batch of MNIST-shaped inputs.

    python benchmarks/bound_time.py                 # CNN7-BN, batch 32, eps 0.1, 2 threads
    python benchmarks/bound_time.py --model cnn3 --batch 16 --json

The network has IBP-initialized random weights (``initialize(model, 'ibp')``) and random
BatchNorm statistics and affine parameters (seeded); the inputs are the first images of the
bundled MNIST test set with their labels. Every method runs in a fresh child process, so its
peak memory (growth of the process's peak RSS over the state after building the problem; on
CUDA, torch's peak allocation) is its own. Reported per method: the batch it ran on, the median
time over the repeats, the mean lower bound of the margins z_y - z_i (i != y) and, for
comparison on the same samples, IBP's and CROWN-IBP's. With 2 threads on a shared machine
small ops suffer from thread contention: timings are noisy, compare within one run.

Full CROWN bounds each ReLU input by CROWN (one backward pass per unstable neuron and sign, in
chunks), which on wide conv layers is far beyond a CPU (cnn7 on MNIST: ~2 x 22k unstable
neurons per conv layer, each a backward pass through up to 4 convs): by default
(``--crown-layers auto``) it is used for every ReLU of cnn3/cnn5 but only for the dense ReLU of
cnn7 (its conv ReLUs keep IBP). Per-model sub-batches (the first samples; ``--crown-batch``,
``--alpha-batch``) keep the default run within a few minutes on 2 CPU cores: cnn7 runs full
CROWN on 8 and alpha-CROWN on 16 samples, cnn5 full CROWN on 8; the table says what was done.
alpha-CROWN optimizes per-neuron, per-margin slopes on top of CROWN-IBP's intermediate (IBP)
boxes.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ctbench.bounds import Box, ibp_margin_lower, linf_box
from ctbench.bounds.crown import (
    crown_ibp_margin_lower, crown_margin_lower, ibp_is_exact, intermediate_bounds, relu_indices,
)
from ctbench.data.mnist import BUNDLED, read_idx
from ctbench.models import InputSpec, build_model, initialize
from ctbench.models.ops import ChannelAffineOp, LinearOp, lower_network

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
MNIST = InputSpec(channels=1, size=28, classes=10, mean=(0.0,), std=(1.0,))

# Sub-batches and CROWN layers that keep the default run within a few minutes on 2 CPU cores.
AUTO = {
    "cnn3": {"crown_batch": None, "alpha_batch": None, "crown_layers": "all"},
    "cnn5": {"crown_batch": 8, "alpha_batch": None, "crown_layers": "all"},
    "cnn7": {"crown_batch": 8, "alpha_batch": 16, "crown_layers": "dense"},
}


@dataclass(frozen=True)
class Problem:
    ops: tuple
    box: Box
    labels: torch.Tensor


def build_problem(args) -> Problem:
    torch.manual_seed(args.seed)
    model = build_model(args.model, MNIST, batch_norm=True)
    initialize(model, "ibp")
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                size = layer.num_features
                layer.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                layer.weight.copy_(1 + torch.randn(size, generator=generator) * 0.1)
                layer.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    model = model.eval().to(args.device)
    images = torch.from_numpy(read_idx(BUNDLED / "t10k-images-idx3-ubyte.gz")[: args.batch].copy())
    labels = torch.from_numpy(read_idx(BUNDLED / "t10k-labels-idx1-ubyte.gz")[: args.batch].astype("int64"))
    x = (images.float() / 255).unsqueeze(1).to(args.device)
    return Problem(lower_network(model, detach=True), linf_box(x, args.eps), labels.to(args.device))


def sub_batch(problem: Problem, count: int | None) -> Problem:
    if count is None or count >= problem.labels.shape[0]:
        return problem
    box = Box(problem.box.lower[:count], problem.box.upper[:count])
    return Problem(problem.ops, box, problem.labels[:count])


def crown_layers(ops, choice: str) -> list[int]:
    relus = relu_indices(ops)
    if choice == "all":
        return relus
    if choice == "none":
        return []
    # "dense": the ReLUs whose input comes from a Linear layer (possibly through BatchNorm).
    dense = []
    for index in relus:
        previous = index - 1
        while previous >= 0 and isinstance(ops[previous], ChannelAffineOp):
            previous -= 1
        if previous >= 0 and isinstance(ops[previous], LinearOp):
            dense.append(index)
    return dense


def resolve(args) -> dict:
    auto = AUTO.get(args.model, {"crown_batch": None, "alpha_batch": None, "crown_layers": "all"})
    return {
        "crown_batch": auto["crown_batch"] if args.crown_batch is None else args.crown_batch,
        "alpha_batch": auto["alpha_batch"] if args.alpha_batch is None else args.alpha_batch,
        "crown_layers": auto["crown_layers"] if args.crown_layers == "auto" else args.crown_layers,
    }


def run_method(method: str, problem: Problem, args, plan: dict) -> tuple[torch.Tensor, str]:
    ops, box, labels = problem.ops, problem.box, problem.labels
    classes = MNIST.classes
    if method == "ibp":
        return ibp_margin_lower(ops, box, labels)[0], "last-layer elision"
    if method == "crown-ibp":
        return crown_ibp_margin_lower(ops, box, labels, classes), "IBP intermediates"
    if method == "crown":
        layers = crown_layers(ops, plan["crown_layers"])
        intermediate = intermediate_bounds(ops, box, "crown", crown_layers=layers)
        lower = crown_margin_lower(ops, box, labels, classes, intermediate)
        exact = [i for i in layers if ibp_is_exact(ops[:i])]
        crowned = [i for i in layers if i not in exact]
        skipped = [i for i in relu_indices(ops) if i not in layers]
        note = f"CROWN intermediates at ReLU ops {crowned}"
        if exact:
            note += f", IBP exact at {exact}"
        if skipped:
            note += f", IBP at {skipped} (too costly)"
        return lower, note
    if method == "alpha-crown":
        lower = crown_margin_lower(ops, box, labels, classes, mode="crown-ibp", alpha_iterations=args.alpha_iterations)
        return lower, f"{args.alpha_iterations} Adam steps, IBP intermediates"
    raise ValueError(method)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(method: str, args, plan: dict, queue) -> None:
    try:
        torch.set_num_threads(args.threads)
        full = build_problem(args)
        batch = {"crown": plan["crown_batch"], "alpha-crown": plan["alpha_batch"]}.get(method)
        problem = sub_batch(full, batch)
        repeats = args.repeats if method in ("ibp", "crown-ibp") else args.slow_repeats
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        baseline = peak_rss_mb()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad() if method != "alpha-crown" else torch.enable_grad():
                lower, note = run_method(method, problem, args, plan)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        memory = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb() - baseline
        others = torch.ones_like(lower, dtype=torch.bool).scatter(1, problem.labels.unsqueeze(1), False)
        per_sample = (lower.masked_fill(~others, 0).sum(1) / others.sum(1)).tolist()
        queue.put({"method": method, "batch": problem.labels.shape[0], "repeats": repeats,
                   "median_s": statistics.median(times), "times_s": times,
                   "mean_margin_lower": sum(per_sample) / len(per_sample), "per_sample_margin": per_sample,
                   "peak_memory_mb": memory, "memory_kind": "cuda peak allocated" if cuda else "peak RSS growth",
                   "note": note})
    except Exception as error:  # reported in the table rather than lost in a child
        queue.put({"method": method, "error": f"{type(error).__name__}: {error}"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn7", choices=sorted(AUTO))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of IBP and CROWN-IBP (median reported)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="runs of CROWN and alpha-CROWN")
    parser.add_argument("--alpha-iterations", type=int, default=20)
    parser.add_argument("--crown-batch", type=int, default=None, help="sub-batch for full CROWN (default: per model)")
    parser.add_argument("--alpha-batch", type=int, default=None, help="sub-batch for alpha-CROWN (default: per model)")
    parser.add_argument("--crown-layers", default="auto", choices=("auto", "all", "dense", "none"),
                        help="ReLUs whose input bounds full CROWN computes by CROWN (others: IBP)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    plan = resolve(args)

    context = multiprocessing.get_context("spawn")
    results = []
    for method in methods:
        queue = context.Queue()
        process = context.Process(target=child, args=(method, args, plan, queue))
        process.start()
        result = queue.get()
        process.join()
        results.append(result)

    for reference in ("ibp", "crown-ibp"):
        found = next((r for r in results if r["method"] == reference and "error" not in r), None)
        for result in results:
            if found is not None and "error" not in result:
                same = found["per_sample_margin"][: result["batch"]]
                result[f"{reference}_mean_margin_lower_same_samples"] = sum(same) / len(same)

    setup = {"model": f"{args.model}-BN", "input": "1x28x28 (MNIST test images)", "batch": args.batch,
             "eps": args.eps, "threads": args.threads, "device": args.device, "torch": torch.__version__,
             "init": "ibp, random BN statistics", "plan": plan}
    if args.json:
        print(json.dumps({"setup": setup, "results": results}, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in setup.items() if k != "plan"))
    header = (f"{'method':<12} {'batch':>5} {'median s':>9} {'s/sample':>9} {'mean lb':>9} {'IBP lb':>9} "
              f"{'C-IBP lb':>9} {'peak MB':>8}  notes")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['method']:<12} failed: {r['error']}")
            continue
        reduced = " (sub-batch)" if r["batch"] < args.batch else ""
        print(f"{r['method']:<12} {r['batch']:>5} {r['median_s']:>9.3f} {r['median_s'] / r['batch']:>9.4f} "
              f"{r['mean_margin_lower']:>9.4f} {r.get('ibp_mean_margin_lower_same_samples', float('nan')):>9.4f} "
              f"{r.get('crown-ibp_mean_margin_lower_same_samples', float('nan')):>9.4f} "
              f"{r['peak_memory_mb']:>8.0f}  {r['note']}{reduced}; {r['repeats']} run(s)")
    print("mean lb: mean lower bound of z_y - z_i over i != y; IBP lb / C-IBP lb: IBP's / CROWN-IBP's on the "
          "same samples; sub-batch: the first samples of the batch; "
          f"peak MB: {results[0].get('memory_kind', '')} during the method")
    return 0


if __name__ == "__main__":
    sys.exit(main())
