"""Natural and IBP-certified accuracy of CNN3 run folders, measured without ctbench.

A second opinion on the figures of the results database: this script imports nothing from
ctbench. It reads the MNIST test set from the gzip IDX files with its own parser, rebuilds CNN3-BN
(the literature's CNN3: conv 16 5x5 stride 2 pad 2, conv 32 4x4 stride 2 pad 1, linear) from the
weights in ``final.pt``, and bounds it with its own interval arithmetic in float64: centre and
radius through every affine layer, the margins y - j folded into the last layer. A sample counts
as IBP-certified when it is classified correctly and every margin's lower bound is positive.

    python benchmarks/independent_check.py RUN [RUN ...] --eps 0.3 [--mnist FOLDER_OF_THE_IDX_FILES]
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CONVS = {"1": (2, 2), "4": (2, 1)}  # CNN3 conv layer index in the Sequential -> (stride, padding)
BN_EPS = 1e-5


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


CNN3_BN_SHAPES = {"1.weight": (16, 1, 5, 5), "4.weight": (32, 16, 4, 4), "8.weight": (10, 1568)}


def network(state: dict[str, torch.Tensor]):
    """The CNN3-BN forward map on (centre, radius) pairs, in float64."""
    shapes = {key: tuple(state[key].shape) if key in state else None for key in CNN3_BN_SHAPES}
    if shapes != CNN3_BN_SHAPES or "2.running_var" not in state or "0.std" not in state:
        raise SystemExit(f"not a CNN3-BN state (MNIST): weight shapes {shapes}, expected {CNN3_BN_SHAPES} with "
                         f"BatchNorm at 2 and 5 and the normalization layer at 0; this check knows only CNN3-BN")
    s = {k: v.double() for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def affine_bn(prefix: str, c, r):
        scale = s[f"{prefix}.weight"] / torch.sqrt(s[f"{prefix}.running_var"] + BN_EPS)
        shift = s[f"{prefix}.bias"] - s[f"{prefix}.running_mean"] * scale
        view = (1, -1, 1, 1) if c.dim() == 4 else (1, -1)
        return c * scale.view(view) + shift.view(view), r * scale.abs().view(view)

    def relu(c, r):
        lower, upper = (c - r).clamp(min=0), (c + r).clamp(min=0)
        return (upper + lower) / 2, (upper - lower) / 2

    def forward(c, r, labels):
        c, r = (c - s["0.mean"]) / s["0.std"], r / s["0.std"].abs()
        for conv, bn in (("1", "2"), ("4", "5")):
            stride, padding = CONVS[conv]
            weight = s[f"{conv}.weight"]
            c = F.conv2d(c, weight, s[f"{conv}.bias"], stride, padding)
            r = F.conv2d(r, weight.abs(), None, stride, padding)
            c, r = relu(*affine_bn(bn, c, r))
        c, r = c.flatten(1), r.flatten(1)
        weight, bias = s["8.weight"], s["8.bias"]
        logits = c @ weight.T + bias
        # margins y - j: rows W_y - W_j applied to the penultimate box
        diff = weight[labels][:, None, :] - weight[None, :, :]  # (n, classes, features)
        centre = (diff @ c[:, :, None]).squeeze(-1) + (bias[labels][:, None] - bias[None, :])
        radius = (diff.abs() @ r[:, :, None]).squeeze(-1)
        return logits, centre - radius

    return forward


def check(run: Path, eps: float, images: np.ndarray, labels: np.ndarray) -> dict:
    state = torch.load(run / "final.pt", map_location="cpu", weights_only=False)["model"]
    forward = network(state)
    natural = certified = 0
    for start in range(0, len(labels), 1000):
        x = torch.from_numpy(images[start:start + 1000].astype(np.float64) / 255).unsqueeze(1)
        y = torch.from_numpy(labels[start:start + 1000].astype(np.int64))
        lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        logits, _ = forward(x, torch.zeros_like(x), y)  # the clean input, not the clamped box's centre
        _, margin_lower = forward((upper + lower) / 2, (upper - lower) / 2, y)
        correct = logits.argmax(1) == y
        margin_lower[torch.arange(len(y)), y] = float("inf")
        natural += int(correct.sum())
        certified += int((correct & (margin_lower > 0).all(1)).sum())
    return {"run": str(run), "samples": len(labels), "correct": natural, "ibp_certified_samples": certified,
            "natural": round(natural / len(labels) * 100, 2), "ibp_certified": round(certified / len(labels) * 100, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parent.parent / "src" / "ctbench" / "data"
                        / "bundled" / "mnist", help="folder of t10k-*-ubyte.gz (default: the copy bundled with ctbench)")
    args = parser.parse_args()
    images = read_idx(args.mnist / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.mnist / "t10k-labels-idx1-ubyte.gz")
    for run in args.runs:
        print(json.dumps(check(run, args.eps, images, labels)))


if __name__ == "__main__":
    main()
