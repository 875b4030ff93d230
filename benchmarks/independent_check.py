"""Natural, IBP- and CROWN-IBP-certified accuracy of CNN3 run folders, measured without ctbench.

A second opinion on the figures of the results database: this script imports nothing from
ctbench. It reads the MNIST test set from the gzip IDX files with its own parser, rebuilds CNN3-BN
(the literature's CNN3: conv 16 5x5 stride 2 pad 2, conv 32 4x4 stride 2 pad 1, linear) from the
weights in ``final.pt``, and bounds the margins y - j in float64 two ways:
- IBP: centre and radius through every affine layer, the margins folded into the last layer;
- CROWN-IBP: the IBP boxes of both pre-activation layers, then one backward pass of the margin
  rows to the input, with the chord above each unstable ReLU and below it the line of slope 1
  where u > -l, else 0 (CROWN's default).
A sample counts as certified by a bound when it is classified correctly and every margin's
lower bound exceeds ctbench's documented safety threshold, 1e-6 + 1e-5 x max_k |z_k(x)| (z: the
clean logits; ``--threshold 0`` counts every positive bound). "Cascade-certified" is IBP or
CROWN-IBP, as ctbench's cascade IBP -> CROWN-IBP certifies.

    python benchmarks/independent_check.py RUN [RUN ...] --eps 0.3 [--mnist FOLDER_OF_THE_IDX_FILES]
"""
from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BN_EPS = 1e-5


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


CNN3_BN_SHAPES = {"1.weight": (16, 1, 5, 5), "4.weight": (32, 16, 4, 4), "8.weight": (10, 1568)}


@dataclass
class ConvBn:
    """conv then BatchNorm (population statistics): a = scale * conv(h) + shift, per channel."""
    weight: torch.Tensor
    stride: int
    padding: int
    scale: torch.Tensor
    shift: torch.Tensor

    def centre(self, c: torch.Tensor) -> torch.Tensor:
        return F.conv2d(c, self.weight, None, self.stride, self.padding) * self.scale.view(1, -1, 1, 1) \
            + self.shift.view(1, -1, 1, 1)

    def radius(self, r: torch.Tensor) -> torch.Tensor:
        return F.conv2d(r, self.weight.abs(), None, self.stride, self.padding) * self.scale.abs().view(1, -1, 1, 1)

    def backward(self, rows: torch.Tensor, input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (n, k, C, H, W) on this layer's output -> (rows on its input, constant (n, k))."""
        n, k, channels, size = rows.shape[0], rows.shape[1], rows.shape[2], rows.shape[3]
        constant = (rows * self.shift.view(1, 1, -1, 1, 1)).sum((2, 3, 4))
        rows = (rows * self.scale.view(1, 1, -1, 1, 1)).reshape(n * k, channels, size, size)
        kernel = self.weight.shape[-1]
        extra = input_size - ((size - 1) * self.stride - 2 * self.padding + kernel)
        rows = F.conv_transpose2d(rows, self.weight, None, self.stride, self.padding, output_padding=extra)
        return rows.reshape(n, k, *rows.shape[1:]), constant


class Cnn3Bn:
    """CNN3-BN in float64 from a state dict: normalization, two conv-BN-ReLU blocks, linear."""

    def __init__(self, state: dict[str, torch.Tensor]):
        shapes = {key: tuple(state[key].shape) if key in state else None for key in CNN3_BN_SHAPES}
        if shapes != CNN3_BN_SHAPES or "2.running_var" not in state or "0.std" not in state:
            raise SystemExit(f"not a CNN3-BN state (MNIST): weight shapes {shapes}, expected {CNN3_BN_SHAPES} with "
                             f"BatchNorm at 2 and 5 and the normalization layer at 0; this check knows only CNN3-BN")
        s = {k: v.double() for k, v in state.items() if not k.endswith("num_batches_tracked")}
        self.mean, self.std = s["0.mean"], s["0.std"]
        self.blocks = []
        for conv, bn, stride, padding in (("1", "2", 2, 2), ("4", "5", 2, 1)):
            scale = s[f"{bn}.weight"] / torch.sqrt(s[f"{bn}.running_var"] + BN_EPS)
            shift = s[f"{bn}.bias"] + (s[f"{conv}.bias"] - s[f"{bn}.running_mean"]) * scale
            self.blocks.append(ConvBn(s[f"{conv}.weight"], stride, padding, scale, shift))
        self.weight, self.bias = s["8.weight"], s["8.bias"]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std
        for block in self.blocks:
            h = block.centre(h).clamp(min=0)
        return h.flatten(1) @ self.weight.T + self.bias

    def margin_rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The margins z_y - z_j as rows on the last hidden layer: (n, classes, features), (n, classes)."""
        rows = self.weight[labels][:, None, :] - self.weight[None, :, :]
        return rows, self.bias[labels][:, None] - self.bias[None, :]

    def ibp(self, lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor):
        """IBP margin lower bounds (n, classes) and the pre-activation boxes of both blocks."""
        c, r = ((upper + lower) / 2 - self.mean) / self.std, (upper - lower) / 2 / self.std.abs()
        boxes = []
        for block in self.blocks:
            c, r = block.centre(c), block.radius(r)
            boxes.append((c - r, c + r))
            low, high = (c - r).clamp(min=0), (c + r).clamp(min=0)
            c, r = (high + low) / 2, (high - low) / 2
        rows, constant = self.margin_rows(labels)
        centre = (rows @ c.flatten(1)[:, :, None]).squeeze(-1) + constant
        radius = (rows.abs() @ r.flatten(1)[:, :, None]).squeeze(-1)
        return centre - radius, boxes

    def crown_ibp(self, lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor, boxes) -> torch.Tensor:
        """CROWN margin lower bounds (n, classes) with the IBP pre-activation ``boxes``."""
        rows, constant = self.margin_rows(labels)
        low, high = boxes[-1]
        rows = rows.reshape(*rows.shape[:2], *low.shape[1:])
        sizes = [lower.shape[-1], boxes[0][0].shape[-1]]
        for block, (low, high), size in zip(reversed(self.blocks), reversed(boxes), reversed(sizes)):
            low, high = low[:, None], high[:, None]
            unstable = (low < 0) & (high > 0)
            active = (low >= 0).double()
            chord = torch.where(unstable, high / (high - low).clamp(min=1e-300), 0.0)
            upper_slope = torch.where(unstable, chord, active)
            lower_slope = torch.where(unstable, (high > -low).double(), active)
            positive, negative = rows.clamp(min=0), rows.clamp(max=0)
            constant = constant + (negative * (-chord * low)).sum((2, 3, 4))
            rows, shift = block.backward(positive * lower_slope + negative * upper_slope, size)
            constant = constant + shift
        # the normalization x -> (x - mean) / std
        rows = rows / self.std
        constant = constant - (rows * self.mean).sum((2, 3, 4))
        centre, radius = ((upper + lower) / 2)[:, None], ((upper - lower) / 2)[:, None]
        return (rows * centre).sum((2, 3, 4)) - (rows.abs() * radius).sum((2, 3, 4)) + constant


def check(run: Path, eps: float, images: np.ndarray, labels: np.ndarray, batch: int = 250,
          relative_threshold: float = 1e-5, absolute_threshold: float = 1e-6) -> dict:
    state = torch.load(run / "final.pt", map_location="cpu", weights_only=False)["model"]
    net = Cnn3Bn(state)
    natural = ibp_certified = crown_certified = cascade_certified = 0
    for start in range(0, len(labels), batch):
        x = torch.from_numpy(images[start:start + batch].astype(np.float64) / 255).unsqueeze(1)
        y = torch.from_numpy(labels[start:start + batch].astype(np.int64))
        lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        logits = net.logits(x)  # the clean input, not the clamped box's centre
        correct = logits.argmax(1) == y
        threshold = (absolute_threshold + relative_threshold * logits.abs().amax(1))[:, None]
        ibp, boxes = net.ibp(lower, upper, y)
        crown = net.crown_ibp(lower, upper, y, boxes)
        rows = torch.arange(len(y))
        ibp[rows, y] = crown[rows, y] = float("inf")
        by_ibp, by_crown = correct & (ibp > threshold).all(1), correct & (crown > threshold).all(1)
        natural += int(correct.sum())
        ibp_certified += int(by_ibp.sum())
        crown_certified += int(by_crown.sum())
        cascade_certified += int((by_ibp | by_crown).sum())
    n = len(labels)
    return {"run": str(run), "samples": n, "correct": natural, "ibp_certified_samples": ibp_certified,
            "crown_ibp_certified_samples": crown_certified, "cascade_certified_samples": cascade_certified,
            "natural": round(natural / n * 100, 2), "ibp_certified": round(ibp_certified / n * 100, 2),
            "cascade_certified": round(cascade_certified / n * 100, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parent.parent / "src" / "ctbench" / "data"
                        / "bundled" / "mnist", help="folder of t10k-*-ubyte.gz (default: the copy bundled with ctbench)")
    parser.add_argument("--threshold", type=float, default=1e-5,
                        help="relative safety threshold (x the largest |clean logit|, plus 1e-6 unless 0); 0: any positive bound")
    args = parser.parse_args()
    images = read_idx(args.mnist / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.mnist / "t10k-labels-idx1-ubyte.gz")
    absolute = 1e-6 if args.threshold > 0 else 0.0
    for run in args.runs:
        print(json.dumps(check(run, args.eps, images, labels, relative_threshold=args.threshold,
                               absolute_threshold=absolute)))


if __name__ == "__main__":
    main()
