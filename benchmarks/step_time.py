"""Seconds per training step of every method, next to a plain PyTorch step of the same network.

Each row runs in its own process (so rows cannot disturb each other and peak memory is that
row's own): CNN7-BN on MNIST, batch 256, the MNIST 0.1 preset's settings (attack steps and
restarts included), eps at its full training value unless the row says warm-up. The plain step
(forward, cross-entropy, backward, Adam) is measured before and after the method rows; ratios
are against their mean.

A row ``METHOD:floor`` times only the passes the method's attacks cannot avoid, in the row's
attack precision (as the attacks run: autocast on the input, iterates and ops cast on the
latent points): the forward pass and input gradient (plain autograd on the ops as the
attacks rewrite them, ``attacks.input_ops``; no projection or bookkeeping) of the network on the batch, attack steps x restarts times (SABR, PGD, EDAC,
MTL-IBP, STAPS: the input attack), and of the head on the batch's K-1 latent points per sample,
latent steps x restarts times (TAPS, STAPS).
The method's step cannot be faster than that plus its bound pass (the IBP row).

    python benchmarks/step_time.py [--steps 5] [--threads 2] [--methods ibp,pgd,staps:floor] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
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
    if phase == "floor":  # in the trainer's memory format, as the method rows
        if config.memory_format == "channels_last":
            model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        step = attack_passes(model, make_method(config), config, images, labels, dataset.spec.classes)
    elif method_name == "plain":
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


INPUT_ATTACK_METHODS = ("sabr", "pgd", "edac", "mtl_ibp", "staps")
LATENT_ATTACK_METHODS = ("taps", "staps")


def attack_passes(model, method, config, images, labels, classes):
    """A step of only the forward passes and input gradients of the method's attacks (see the
    module docstring), on the network lowered with the batch's BatchNorm statistics."""
    import torch
    import torch.nn.functional as F

    from ctbench.attacks.input_ops import flatten_in_memory_order, input_attack_ops, phase_space_conv
    from ctbench.attacks.margin_pgd import op_in_dtype
    from ctbench.attacks.pgd import resolve_precision
    from ctbench.bounds import interval_bounds
    from ctbench.bounds.box import Box, box_memory_format
    from ctbench.methods.taps import split_index
    from ctbench.models.ops import clean_forward, lower_network, run_ops

    name, attack = config.method.name, config.attack
    if name not in INPUT_ATTACK_METHODS + LATENT_ATTACK_METHODS:
        raise SystemExit(f"floor rows are for attack-based methods ({', '.join(INPUT_ATTACK_METHODS + LATENT_ATTACK_METHODS)}), "
                         f"not {name}")
    with torch.no_grad():
        _, stats = clean_forward(model, images)
    ops = lower_network(model, stats.detached(), detach=True)

    precision = resolve_precision(attack.precision, images.device)
    autocast = (torch.autocast(images.device.type, dtype=getattr(torch, precision)) if precision != "float32"
                else contextlib.nullcontext())  # the precision the method's attacks run in

    def passes(function, points, count, autocast=autocast):
        for _ in range(count):
            points.requires_grad_(True)
            with autocast:
                value = function(points).float().sum()
            gradient, = torch.autograd.grad(value, points)
            points = points.detach() + 0.01 * gradient.sign()  # new points for the next pass

    def step():
        if name in INPUT_ATTACK_METHODS:
            input_ops = input_attack_ops(ops, images[:2])
            passes(lambda x: F.cross_entropy(run_ops(input_ops, x), labels, reduction="none"), images.clone(),
                   attack.steps * attack.restarts)
        if name in LATENT_ATTACK_METHODS:
            split = split_index(ops, method.options.classifier_size)
            eps = config.eps.train_eps
            with torch.no_grad():
                latent = interval_bounds(ops[:split], Box((images - eps).clamp(0, 1), (images + eps).clamp(0, 1)))[-1]
                points = latent.lower.repeat_interleave(classes - 1, dim=0)
            head = tuple(ops[split:])
            phase_conv = phase_space_conv(head[0], points.shape) if points.device.type == "cpu" else None
            if phase_conv is not None:  # as margin_pgd runs it: on the phases of the points
                points = F.pixel_unshuffle(points, head[0].stride[0]).contiguous(memory_format=box_memory_format(points))
                head = (phase_conv, *head[1:])
            if precision != "float32":  # as margin_pgd runs it: iterates and ops in the attack precision
                dtype = getattr(torch, precision)
                points, head = points.to(dtype), tuple(op_in_dtype(op, dtype) for op in head)
            head = flatten_in_memory_order(head, points[:2])
            # which class each row's margin follows does not change the cost
            targets = torch.arange(classes, device=points.device).repeat(labels.shape[0])[:points.shape[0]]
            passes(lambda z: run_ops(head, z).gather(1, targets[:, None]), points,
                   attack.steps * attack.restarts, contextlib.nullcontext())
    return step


def cpu_line() -> str:
    """The CPU's name and whether it has fast bfloat16 (what attack.precision: auto chooses)."""
    from ctbench.attacks.pgd import fast_bfloat16
    from ctbench.environment import cpu_name

    fast = fast_bfloat16("cpu")
    return (f"CPU: {cpu_name()}; fast bfloat16 (avx512_bf16 or amx_bf16): "
            f"{'yes' if fast else 'no'}, so attack.precision auto = {'bfloat16' if fast else 'float32'}")


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
    if args.device == "cpu":
        print(cpu_line())
    width = max(len(row["method"]) for row in table)
    print(f"{'step':{width}s} {'seconds':>9s} {'ratio':>7s} {'peak MB':>9s}")
    for row in table:
        print(f"{row['method']:{width}s} {row['seconds']:9.3f} {row['ratio_to_standard']:7.2f} {row['peak_memory_mb']:9.0f}")


if __name__ == "__main__":
    main()
