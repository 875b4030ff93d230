"""Seconds per training step of every method, next to a plain PyTorch step of the same network.

Each row runs in its own process (so rows cannot disturb each other and peak memory is that
row's own): CNN7-BN on MNIST, batch 256, the MNIST 0.1 preset's settings (attack steps and
restarts included), eps at its full training value unless the row says warm-up. The plain step
(forward, cross-entropy, backward, Adam) is measured before and after the method rows; ratios
are against their mean.

    python benchmarks/step_time.py [--steps 5] [--threads 2] [--methods ibp,pgd] [--json]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


DEFAULT_ROWS = ("standard,ibp,ibp:warmup,pgd,sabr,mtl_ibp,mtl_ibp+attack.steps=10+attack.step_size=0.25,"
                "staps,taps,crown_ibp,crown_ibp+method.loss_fusion=false,edac,"
                "sabr+attack.precision=bfloat16,mtl_ibp+attack.steps=10+attack.step_size=0.25+attack.precision=bfloat16,"
                "staps+attack.precision=bfloat16")


def measure(row: str, preset_setting: str, architecture: str, batch: int, steps: int, warmup: int,
            threads: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from ctbench.data import load_dataset
    from ctbench.presets import load_config, preset_names
    from ctbench.training import StepSettings, build_model_for, make_method, training_step
    from ctbench.models import initialize

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head, *row_overrides = row.split("+")
    method_name, _, phase = head.partition(":")
    overrides = [f"model.architecture={architecture}", f"optim.batch_size={batch}"]
    if f"{preset_setting}/{method_name}" in preset_names():
        preset = f"{preset_setting}/{method_name}"
    else:  # plain and standard: the setting's IBP preset with the method swapped
        preset = f"{preset_setting}/ibp"
        overrides.append(f"method.name={'standard' if method_name == 'plain' else method_name}")
    config = load_config(preset, overrides + row_overrides)
    dataset = load_dataset("mnist")
    images = dataset.train.images[:batch].to(device).float() / 255
    labels = dataset.train.labels[:batch].to(device)
    model = build_model_for(config, dataset.spec).to(device)
    initialize(model, "ibp")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    eps = config.eps.train_eps / 2 if phase == "warmup" else config.eps.train_eps
    if method_name == "plain":
        model.train()

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    else:  # ctbench's step, with the trainer's memory format
        if config.memory_format == "channels_last":
            model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        method = make_method(config)
        settings = StepSettings(eps=eps, eps_target=config.eps.train_eps, num_classes=dataset.spec.classes)

        def step():
            training_step(model, method, optimizer, config, settings, images, labels)
    times = []
    for index in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": row, "seconds": statistics.median(times), "peak_memory_mb": peak, "eps": eps,
            "steps_timed": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_ROWS,
                        help="comma-separated rows: METHOD[:warmup][+key=value...], e.g. "
                             "mtl_ibp+attack.steps=10 or sabr+attack.precision=bfloat16")
    parser.add_argument("--setting", default="mnist-0.1")
    parser.add_argument("--model", default="cnn7")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = [args.setting, args.model, args.batch, args.steps, args.warmup, args.threads, args.device]
    if args.row:
        print(json.dumps(measure(args.row, *common)))
        return

    def run(row: str) -> dict:
        command = [sys.executable, __file__, "--row", row, "--setting", args.setting, "--model", args.model,
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--device", args.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        print(f"  measured {json.dumps(result)}", file=sys.stderr, flush=True)
        return result

    before = run("plain")
    rows = [run(row) for row in args.methods.split(",")]
    after = run("plain")
    baseline = (before["seconds"] + after["seconds"]) / 2
    plain = {**before, "method": "plain", "seconds": baseline,
             "peak_memory_mb": max(before["peak_memory_mb"], after["peak_memory_mb"])}
    table = [plain] + rows
    for row in table:
        row["ratio_to_standard"] = row["seconds"] / baseline
    if args.json:
        print(json.dumps(table))
        return
    print(f"{args.model.upper()}-BN, MNIST, batch {args.batch}, {args.threads} threads, {args.device}, "
          f"{args.setting} settings; median of {args.steps} steps; plain step {before['seconds']:.3f} s before, "
          f"{after['seconds']:.3f} s after")
    width = max(len(row["method"]) for row in table)
    print(f"{'step':{width}s} {'seconds':>9s} {'ratio':>7s} {'peak MB':>9s}")
    for row in table:
        print(f"{row['method']:{width}s} {row['seconds']:9.3f} {row['ratio_to_standard']:7.2f} {row['peak_memory_mb']:9.0f}")


if __name__ == "__main__":
    main()
