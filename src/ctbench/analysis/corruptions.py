"""Common corruptions for out-of-distribution evaluation: MNIST-C and CIFAR-10-C.

* MNIST-C (Mu & Gilmer 2019): 15 corruptions, each at the one fixed severity of the published
  data set (the default severity of each corruption in the MNIST-C generation code):
  shot_noise (Poisson, 3 photons per unit), impulse_noise (salt and pepper, 17% of pixels),
  glass_blur (sigma 0.7, swaps within 1 pixel, 2 passes), motion_blur (radius 10, sigma 3,
  random angle in [-45, 45] degrees), shear (0.4 rad), scale (to 70%), rotate (0.4 rad),
  brightness (+0.5 in HSV value), translate (3 pixels per axis), stripe (the outer quarter
  columns inverted), fog (plasma fractal, strength 3, decay 1.4), spatter (mud, severity 4),
  dotted_line, zigzag, canny_edges.
* CIFAR-10-C (Hendrycks & Dietterich 2019): the 18 corruptions of the paper's Figure 9, with
  the CIFAR-specific constants of the CIFAR-10-C generation script (five severities each;
  ``severity`` picks one, default 5). ImageNet-C constants (as in the ``imagecorruptions``
  package) are wrong for 32x32 images and are not used.

Generated, not the published files, so numbers can differ slightly from the published sets:

* motion blur: ImageMagick's motion blur is replaced by a one-sided line kernel with Gaussian
  weights exp(-t^2 / 2 sigma^2), t = 0..2 radius pixels, sampled bilinearly;
* frost: the published frost photographs are not available offline; a procedural texture
  (random thin bright crystal segments over a smooth haze, pale blue on colour images) is
  used with the published blending constants;
* fog: our own diamond-square plasma fractal (same strength and decay constants);
* spatter: the mud variant follows the published construction; the water variant (CIFAR
  severities 1-3) is simplified (no Canny/distance-transform shading: a blurred translucent
  pale-turquoise liquid layer);
* glass blur swaps each pixel with one up to ``delta`` pixels away in any direction;
* lines (dotted_line, zigzag) are anti-aliased segments of about one pixel half-width.

Every corruption is deterministic given ``seed`` (one numpy Generator per call, its stream
keyed by the seed and the corruption name). Images are uint8 (N, C, H, W) in and out.

``load_published`` reads the published .npy files when present (MNIST-C:
``<root>/mnist_c/<name>/test_images.npy`` and ``test_labels.npy``; CIFAR-10-C:
``<root>/CIFAR-10-C/<name>.npy`` and ``labels.npy``, 10,000 images per severity);
``corrupted_test_set`` prefers them and reports which source it used.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

# A corruption: (images float64 (N, H, W, C) in [0, 1], rng, severity 1..5) -> same shape.
CorruptionFn = Callable[[np.ndarray, np.random.Generator, int], np.ndarray]

DEFAULT_CIFAR_SEVERITY = 5

# ------------------------------------------------------------------------------------------------
# Constants

MNIST_C_CONSTANTS = {
    "shot_noise": 3.0,                          # photons per unit intensity
    "impulse_noise": 0.17,                      # fraction of pixels set to 0 or 1
    "glass_blur": (0.7, 1, 2),                  # sigma, max swap distance, passes
    "motion_blur": (10, 3.0),                   # radius, sigma
    "shear": 0.4,                               # radians, random sign
    "scale": 1 / 0.7,                           # inverse map: the digit shrinks to 70%
    "rotate": 0.4,                              # radians, random sign
    "brightness": 0.5,                          # added to the HSV value
    "translate": 3,                             # pixels per axis, random signs
    "fog": (3.0, 1.4),                          # strength, fractal decay
    "spatter": (0.65, 0.3, 1.0, 0.65, 1.5),     # loc, scale, sigma, threshold, mask sigma
}

# Hendrycks & Dietterich's CIFAR-10-C constants, severities 1..5.
CIFAR10_C_CONSTANTS = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, "water"), (0.65, 0.1, 0.8, 0.7, 0.5, "water"),
                (0.65, 0.3, 1, 0.69, 0.5, "water"), (0.65, 0.1, 0.7, 0.69, 0.6, "mud"),
                (0.65, 0.1, 0.5, 0.68, 0.6, "mud")],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    # (displacement scale, displacement smoothness, affine jitter) as fractions of the image size
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)],
}

# ------------------------------------------------------------------------------------------------
# Helpers (images are float64 (N, H, W, C) in [0, 1])


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    return rows, cols


def _fold_mirror(coords: np.ndarray, size: int) -> np.ndarray:
    """Mirror coordinates into [0, size - 1] without repeating the edge (d c b | a b c d)."""
    if size == 1:
        return np.zeros_like(coords)
    period = 2 * (size - 1)
    folded = np.mod(np.abs(coords), period)
    return np.where(folded > size - 1, period - folded, folded)


def _bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str = "constant") -> np.ndarray:
    """Sample images (N, H, W, C) at float coordinates rows/cols (N, h, w): bilinear, with
    zeros outside (``constant``), the nearest edge pixel (``nearest``) or mirrored (``mirror``)."""
    count, height, width, _ = images.shape
    if mode == "mirror":
        rows, cols = _fold_mirror(rows, height), _fold_mirror(cols, width)
    elif mode == "nearest":
        rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    elif mode != "constant":
        raise ValueError(f"unknown sampling mode {mode!r}")
    row0, col0 = np.floor(rows), np.floor(cols)
    row_frac, col_frac = rows - row0, cols - col0
    row0, col0 = row0.astype(np.int64), col0.astype(np.int64)
    sample = np.arange(count).reshape(-1, *([1] * (rows.ndim - 1)))
    out = np.zeros((*rows.shape, images.shape[-1]), dtype=np.float64)
    for d_row, w_row in ((0, 1 - row_frac), (1, row_frac)):
        for d_col, w_col in ((0, 1 - col_frac), (1, col_frac)):
            r, c = row0 + d_row, col0 + d_col
            inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            values = images[sample, np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)]
            out += (w_row * w_col * inside)[..., None] * values
    return out


def _affine_warp(images: np.ndarray, matrices: np.ndarray, shifts: np.ndarray, mode: str = "constant") -> np.ndarray:
    """Output pixel p (row, col) takes the input at M (p - centre) + centre + shift
    (an inverse map, as in scikit-image's ``warp``). matrices (N, 2, 2), shifts (N, 2)."""
    count, height, width, _ = images.shape
    rows, cols = _grid(height, width)
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    rel = np.stack([rows - centre[0], cols - centre[1]])  # (2, H, W)
    source = np.einsum("nij,jhw->nihw", matrices, rel) + (centre + shifts)[:, :, None, None]
    return _bilinear(images, source[:, 0], source[:, 1], mode)


def _gaussian_blur(images: np.ndarray, sigma: float, mode: str = "nearest") -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return images.copy()
    return gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode=mode)


def _segment_intensity(height: int, width: int, start: np.ndarray, end: np.ndarray,
                       half_width: float = 0.3, falloff: float = 1.2) -> np.ndarray:
    """Anti-aliased segments, one per sample: start/end (N, 2) as (row, col); returns (N, H, W)
    in [0, 1]: 1 within ``half_width`` of the segment, falling linearly to 0 over ``falloff``."""
    rows, cols = _grid(height, width)
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    direction = end - start
    length2 = np.maximum((direction ** 2).sum(-1), 1e-12)[:, None, None]
    rel_r = rows[None] - start[:, 0, None, None]
    rel_c = cols[None] - start[:, 1, None, None]
    t = np.clip((rel_r * direction[:, 0, None, None] + rel_c * direction[:, 1, None, None]) / length2, 0, 1)
    dist = np.hypot(rel_r - t * direction[:, 0, None, None], rel_c - t * direction[:, 1, None, None])
    return np.clip(1 - (dist - half_width) / falloff, 0, 1)


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) heightmap in [0, 1] by the diamond-square algorithm on a torus: each level
    sets midpoints to the mean of their neighbours plus uniform noise whose amplitude shrinks
    by decay^2 per level (rougher for small ``decay``). ``size`` is a power of two."""
    if size & (size - 1):
        raise ValueError("plasma fractal size must be a power of two")
    grid = np.zeros((size, size))
    step, amplitude = size, 1.0
    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        right, down = np.roll(corners, -1, axis=1), np.roll(corners, -1, axis=0)
        diagonal = np.roll(down, -1, axis=1)
        centres = (corners + right + down + diagonal) / 4 + amplitude * rng.uniform(-1, 1, corners.shape)
        grid[half::step, half::step] = centres
        up_centres, left_centres = np.roll(centres, 1, axis=0), np.roll(centres, 1, axis=1)
        grid[0::step, half::step] = ((corners + right + centres + up_centres) / 4
                                     + amplitude * rng.uniform(-1, 1, corners.shape))
        grid[half::step, 0::step] = ((corners + down + centres + left_centres) / 4
                                     + amplitude * rng.uniform(-1, 1, corners.shape))
        step = half
        amplitude /= decay ** 2
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def _to_hsv(images: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hsv

    return rgb2hsv(images)


def _from_hsv(images: np.ndarray) -> np.ndarray:
    from skimage.color import hsv2rgb

    return hsv2rgb(images)


def _pil_roundtrip(images: np.ndarray, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Apply a PIL transform per image (uint8 L or RGB) and return floats in [0, 1]."""
    data = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    out = np.empty_like(images)
    for i, image in enumerate(data):
        pil = Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 else Image.fromarray(image, mode="RGB")
        result = np.asarray(transform(pil), dtype=np.float64) / 255.0
        out[i] = result.reshape(image.shape)
    return out


# ------------------------------------------------------------------------------------------------
# Corruption kernels (parameterized; the registries below bind the constants)


def gaussian_noise(x, rng, sigma):
    return x + rng.normal(scale=sigma, size=x.shape)


def shot_noise(x, rng, photons):
    return rng.poisson(x * photons) / photons


def impulse_noise(x, rng, amount):
    """Salt and pepper: a fraction ``amount`` of the values becomes 0 or 1 (half each)."""
    out = x.copy()
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def speckle_noise(x, rng, sigma):
    return x + x * rng.normal(scale=sigma, size=x.shape)


def gaussian_blur(x, rng, sigma):
    return _gaussian_blur(x, sigma)


def glass_blur(x, rng, sigma, delta, passes, swap_probability=1.0):
    """Blur, swap each pixel with a random neighbour within ``delta`` (bottom-right to top-left,
    each swap taken with ``swap_probability``), blur again."""
    out = _gaussian_blur(x, sigma)
    count, height, width, _ = out.shape
    samples = np.arange(count)
    for _ in range(passes):
        for row in range(height - 1 - delta, delta - 1, -1):
            for col in range(width - 1 - delta, delta - 1, -1):
                offsets = rng.integers(-delta, delta + 1, size=(count, 2))
                chosen = samples[rng.random(count) < swap_probability]
                if chosen.size == 0:
                    continue
                other_row, other_col = row + offsets[chosen, 0], col + offsets[chosen, 1]
                kept = out[chosen, row, col].copy()
                out[chosen, row, col] = out[chosen, other_row, other_col]
                out[chosen, other_row, other_col] = kept
    return _gaussian_blur(out, sigma)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    extent = 8 if radius <= 8 else int(np.ceil(radius))
    coords = np.arange(-extent, extent + 1)
    rr, cc = np.meshgrid(coords, coords, indexing="ij")
    disk = (rr ** 2 + cc ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    kernel = gaussian_filter(disk, alias_blur, mode="mirror", truncate=1.0 / max(alias_blur, 1e-6))
    keep = np.nonzero(kernel.sum(1) > 1e-12)[0]
    low, high = keep.min(), keep.max() + 1
    return kernel[low:high, low:high]


def defocus_blur(x, rng, radius, alias_blur):
    """Convolution with an anti-aliased disk (mirrored borders)."""
    from scipy.ndimage import convolve

    kernel = _disk_kernel(radius, alias_blur)
    return convolve(x, kernel[None, :, :, None], mode="mirror")


def motion_blur(x, rng, radius, sigma):
    """One-sided line kernel along a random angle in [-45, 45] degrees with Gaussian weights
    (stand-in for ImageMagick's motion blur)."""
    count, height, width, _ = x.shape
    angle = np.deg2rad(rng.uniform(-45, 45, size=count))
    d_row, d_col = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    rows, cols = _grid(height, width)
    taps = np.arange(0, 2 * int(np.ceil(radius)) + 1, dtype=np.float64)
    weights = np.exp(-taps ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    out = np.zeros_like(x)
    for tap, weight in zip(taps, weights):
        out += weight * _bilinear(x, rows[None] + tap * d_row, cols[None] + tap * d_col, mode="nearest")
    return out


def zoom_blur(x, rng, factors):
    """Mean of the image and its centred zooms by each factor."""
    count, height, width, _ = x.shape
    rows, cols = _grid(height, width)
    centre_r, centre_c = (height - 1) / 2, (width - 1) / 2
    out = x.copy()
    for factor in factors:
        source_r = np.broadcast_to(centre_r + (rows - centre_r) / factor, (count, height, width))
        source_c = np.broadcast_to(centre_c + (cols - centre_c) / factor, (count, height, width))
        out += _bilinear(x, source_r, source_c, mode="nearest")
    return out / (len(factors) + 1)


def fog(x, rng, strength, decay, map_size=None):
    """Add a plasma fractal (one per image), then rescale so the brightest pixel keeps its
    value: x <- (x + s fractal) max(x) / (max(x) + s)."""
    count, height, width, _ = x.shape
    size = map_size or 1 << int(np.ceil(np.log2(max(height, width))))
    layers = np.stack([_plasma_fractal(size, decay, rng)[:height, :width] for _ in range(count)])
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + strength * layers[..., None]) * peak / (peak + strength)


def _frost_texture(count: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural frost (N, H, W) in [0, 1]: thin bright crystal segments over a smooth haze."""
    from scipy.ndimage import gaussian_filter

    crystals = np.zeros((count, height, width))
    for _ in range(max(8, height * width // 40)):
        start = rng.uniform(0, 1, size=(count, 2)) * [height - 1, width - 1]
        angle = rng.uniform(0, 2 * np.pi, size=count)
        length = rng.uniform(2, max(3.0, height / 4), size=count)
        end = start + length[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
        brightness = rng.uniform(0.5, 1.0, size=(count, 1, 1))
        crystals = np.maximum(crystals, brightness * _segment_intensity(height, width, start, end, 0.2, 0.8))
    haze = gaussian_filter(rng.random((count, height, width)), sigma=(0, 1.5, 1.5), mode="wrap")
    haze -= haze.min(axis=(1, 2), keepdims=True)
    haze /= np.maximum(haze.max(axis=(1, 2), keepdims=True), 1e-12)
    return np.clip(0.6 * crystals + 0.5 * haze, 0, 1)


def frost(x, rng, image_weight, frost_weight):
    """x <- a x + b frost, frost a procedural texture (pale blue on colour images)."""
    count, height, width, channels = x.shape
    texture = _frost_texture(count, height, width, rng)[..., None]
    tint = np.array([0.85, 0.93, 1.0]) if channels == 3 else np.ones(channels)
    return image_weight * x + frost_weight * texture * tint


def spatter(x, rng, loc, scale, sigma, threshold, mask_sigma, kind="mud", color=None):
    """A thresholded, blurred random liquid layer: mud covers the image with an opaque colour,
    water (simplified) adds a translucent pale-turquoise layer."""
    count, height, width, channels = x.shape
    liquid = rng.normal(loc=loc, scale=scale, size=(count, height, width))
    liquid = _gaussian_blur(liquid[..., None], sigma)[..., 0]
    liquid[liquid < threshold] = 0
    if kind == "mud":
        mask = _gaussian_blur((liquid > threshold).astype(np.float64)[..., None], mask_sigma)[..., 0]
        mask[mask < 0.8] = 0
        if color is None:
            color = np.array([63, 42, 20]) / 255 if channels == 3 else np.full(channels, 63 / 255)
        return x * (1 - mask[..., None]) + mask[..., None] * color
    layer = _gaussian_blur(liquid[..., None], 1.0)[..., 0]
    layer /= np.maximum(layer.max(axis=(1, 2), keepdims=True), 1e-12)
    turquoise = np.array([175, 238, 238]) / 255 if channels == 3 else np.full(channels, 220 / 255)
    return x + mask_sigma * layer[..., None] * turquoise


def contrast(x, rng, factor):
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * factor + means


def brightness(x, rng, amount):
    if x.shape[-1] != 3:
        return x + amount  # grey: the HSV value is the intensity itself
    hsv = _to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + amount, 0, 1)
    return _from_hsv(hsv)


def saturate(x, rng, factor, offset):
    if x.shape[-1] != 3:
        return x.copy()
    hsv = _to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor + offset, 0, 1)
    return _from_hsv(hsv)


def jpeg_compression(x, rng, quality):
    def roundtrip(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        return Image.open(buffer).convert(image.mode)

    return _pil_roundtrip(x, roundtrip)


def pixelate(x, rng, factor):
    """Box-downsample to ``factor`` of the size, then box-upsample back."""
    height, width = x.shape[1:3]
    small = (max(1, int(width * factor)), max(1, int(height * factor)))
    return _pil_roundtrip(x, lambda image: image.resize(small, Image.BOX).resize((width, height), Image.BOX))


def elastic_transform(x, rng, displacement, smoothness, jitter):
    """A random affine map (three control points jittered by up to ``jitter`` x size), then a
    smooth random displacement field (uniform noise blurred with sigma ``smoothness`` x size,
    scaled by ``displacement`` x size); mirrored borders."""
    from scipy.ndimage import gaussian_filter

    count, height, width, _ = x.shape
    size = min(height, width)
    centre = np.array([height // 2, width // 2], dtype=np.float64)
    half = size // 3
    control = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])  # (3, 2)
    moved = control[None] + rng.uniform(-jitter * size, jitter * size, size=(count, 3, 2))
    # forward map p -> A p + t with A control + t = moved; the output samples the input at the inverse
    homogeneous = np.concatenate([control, np.ones((3, 1))], axis=1)  # (3, 3)
    solution = np.linalg.solve(homogeneous[None], moved)  # (N, 3, 2): rows of [A^T; t]
    linear, translation = np.transpose(solution[:, :2], (0, 2, 1)), solution[:, 2]
    inverse = np.linalg.inv(linear)
    rows, cols = _grid(height, width)
    rel = np.stack([rows, cols])[None] - translation[:, :, None, None]
    source = np.einsum("nij,njhw->nihw", inverse, rel)
    out = _bilinear(x, source[:, 0], source[:, 1], mode="mirror")
    if displacement > 0 and smoothness > 0:
        sigma = smoothness * size
        fields = [gaussian_filter(rng.uniform(-1, 1, size=(count, height, width)), sigma=(0, sigma, sigma),
                                  mode="reflect", truncate=3) * displacement * size for _ in range(2)]
        out = _bilinear(out, rows[None] + fields[1], cols[None] + fields[0], mode="mirror")
    return out


def _random_signs(rng, count, columns=1):
    return rng.choice([-1.0, 1.0], size=(count, columns))


def shear(x, rng, amount):
    count = len(x)
    s = amount * _random_signs(rng, count)[:, 0]
    matrices = np.zeros((count, 2, 2))
    matrices[:, 0, 0] = np.cos(s)
    matrices[:, 1, 0] = -np.sin(s)
    matrices[:, 1, 1] = 1.0
    return _affine_warp(x, matrices, np.zeros((count, 2)))


def rotate(x, rng, angle):
    count = len(x)
    a = angle * _random_signs(rng, count)[:, 0]
    matrices = np.stack([np.stack([np.cos(a), np.sin(a)], -1), np.stack([-np.sin(a), np.cos(a)], -1)], 1)
    return _affine_warp(x, matrices, np.zeros((count, 2)))


def scale(x, rng, inverse_factor):
    count = len(x)
    matrices = np.broadcast_to(np.eye(2) * inverse_factor, (count, 2, 2))
    return _affine_warp(x, matrices, np.zeros((count, 2)))


def translate(x, rng, pixels):
    count = len(x)
    shifts = pixels * _random_signs(rng, count, 2)
    return _affine_warp(x, np.broadcast_to(np.eye(2), (count, 2, 2)), shifts)


def stripe(x, rng):
    """Invert the outer quarter of the columns on each side."""
    out = x.copy()
    quarter = x.shape[2] // 4
    out[:, :, :quarter] = 1 - out[:, :, :quarter]
    out[:, :, x.shape[2] - quarter:] = 1 - out[:, :, x.shape[2] - quarter:]
    return out


def dotted_line(x, rng):
    """A line across the image between random rows of the first and last columns, drawn only in
    every other pair of columns."""
    count, height, width, _ = x.shape
    ends = rng.integers(0, height - 1, size=(count, 2)).astype(np.float64)
    start = np.stack([ends[:, 0], np.zeros(count)], 1)
    end = np.stack([ends[:, 1], np.full(count, width - 1.0)], 1)
    line = _segment_intensity(height, width, start, end)
    line[:, :, (np.arange(width) // 2) % 2 == 0] = 0
    return x + line[..., None]


def zigzag(x, rng, period=2.0, amplitude=2.0):
    """A zigzag (vertices alternately ``amplitude`` above and below a random line, ``period``
    apart along it) from column 2 to column W - 3."""
    count, height, width, _ = x.shape
    first_col, last_col = 2.0, width - 3.0
    row0 = rng.integers(0, height - 1, size=count).astype(np.float64)
    row1 = row0 + rng.integers(-5, 5, size=count)
    theta = np.arctan((row1 - row0) / (last_col - first_col))
    length = (last_col - first_col) / np.cos(theta)
    steps = int(np.ceil(length.max() / (2 * period))) + 1
    along = [np.zeros(count)]
    across = [np.zeros(count)]
    for i in range(steps):
        position = (2 * i + 1) * period
        past = position >= length
        along.append(np.where(past, length, position))
        across.append(np.where(past, 0.0, (-1) ** i * amplitude))
    along.append(length)
    across.append(np.zeros(count))
    along, across = np.stack(along, 1), np.stack(across, 1)  # (N, V) in the line's frame
    cols = first_col + along * np.cos(theta)[:, None] - across * np.sin(theta)[:, None]
    rows = row0[:, None] + along * np.sin(theta)[:, None] + across * np.cos(theta)[:, None]
    drawing = np.zeros((count, height, width))
    for v in range(1, rows.shape[1]):
        segment = _segment_intensity(height, width, np.stack([rows[:, v - 1], cols[:, v - 1]], 1),
                                     np.stack([rows[:, v], cols[:, v]], 1))
        drawing = np.maximum(drawing, segment)
    return x + drawing[..., None]


def canny_edges(x, rng, sigma=1.0):
    """The binary Canny edge map of the (grey) image, edges white."""
    from skimage.feature import canny

    grey = x.mean(axis=-1)
    edges = np.stack([canny(image, sigma=sigma) for image in grey]).astype(np.float64)
    return np.repeat(edges[..., None], x.shape[-1], axis=-1)


# ------------------------------------------------------------------------------------------------
# Registries: name -> function(images (N, H, W, C) float in [0, 1], rng, severity)

_M = MNIST_C_CONSTANTS  # short aliases for the registry tables below
MNIST_C: dict[str, CorruptionFn] = {
    "shot_noise": lambda x, rng, s: shot_noise(x, rng, _M["shot_noise"]),
    "impulse_noise": lambda x, rng, s: impulse_noise(x, rng, _M["impulse_noise"]),
    "glass_blur": lambda x, rng, s: glass_blur(x, rng, *_M["glass_blur"], swap_probability=0.5),
    "motion_blur": lambda x, rng, s: motion_blur(x, rng, *_M["motion_blur"]),
    "shear": lambda x, rng, s: shear(x, rng, _M["shear"]),
    "scale": lambda x, rng, s: scale(x, rng, _M["scale"]),
    "rotate": lambda x, rng, s: rotate(x, rng, _M["rotate"]),
    "brightness": lambda x, rng, s: brightness(x, rng, _M["brightness"]),
    "translate": lambda x, rng, s: translate(x, rng, _M["translate"]),
    "stripe": lambda x, rng, s: stripe(x, rng),
    "fog": lambda x, rng, s: fog(x, rng, *_M["fog"], map_size=256),
    "spatter": lambda x, rng, s: spatter(x, rng, *_M["spatter"], kind="mud"),
    "dotted_line": lambda x, rng, s: dotted_line(x, rng),
    "zigzag": lambda x, rng, s: zigzag(x, rng),
    "canny_edges": lambda x, rng, s: canny_edges(x, rng),
}

_C = CIFAR10_C_CONSTANTS


def _cifar(kernel, key: str, unpack: bool = False) -> CorruptionFn:
    def apply(x, rng, severity):
        value = _C[key][severity - 1]
        return kernel(x, rng, *value) if unpack else kernel(x, rng, value)

    return apply


CIFAR10_C: dict[str, CorruptionFn] = {
    "brightness": _cifar(brightness, "brightness"),
    "contrast": _cifar(contrast, "contrast"),
    "defocus_blur": _cifar(defocus_blur, "defocus_blur", unpack=True),
    "elastic_transform": _cifar(elastic_transform, "elastic_transform", unpack=True),
    "fog": _cifar(fog, "fog", unpack=True),
    "frost": _cifar(frost, "frost", unpack=True),
    "gaussian_blur": _cifar(gaussian_blur, "gaussian_blur"),
    "gaussian_noise": _cifar(gaussian_noise, "gaussian_noise"),
    "glass_blur": _cifar(glass_blur, "glass_blur", unpack=True),
    "impulse_noise": _cifar(impulse_noise, "impulse_noise"),
    "jpeg_compression": _cifar(jpeg_compression, "jpeg_compression"),
    "motion_blur": _cifar(motion_blur, "motion_blur", unpack=True),
    "pixelate": _cifar(pixelate, "pixelate"),
    "saturate": _cifar(saturate, "saturate", unpack=True),
    "shot_noise": _cifar(shot_noise, "shot_noise"),
    "spatter": lambda x, rng, s: spatter(x, rng, *_C["spatter"][s - 1][:5], kind=_C["spatter"][s - 1][5]),
    "speckle_noise": _cifar(speckle_noise, "speckle_noise"),
    "zoom_blur": _cifar(zoom_blur, "zoom_blur"),
}

CORRUPTIONS: dict[str, dict[str, CorruptionFn]] = {"mnist": MNIST_C, "cifar10": CIFAR10_C}


def _registry(dataset: str) -> dict[str, CorruptionFn]:
    try:
        return CORRUPTIONS[dataset]
    except KeyError:
        raise KeyError(f"no corruption suite for dataset {dataset!r}; known: {', '.join(CORRUPTIONS)}") from None


def corruption_names(dataset: str = "mnist") -> list[str]:
    """The corruptions of a dataset's suite (MNIST-C: 15, CIFAR-10-C: 18), in the paper's order."""
    return list(_registry(dataset))


def corrupt(images: np.ndarray, name: str, dataset: str = "mnist", seed: int = 0, severity: int | None = None,
            ) -> np.ndarray:
    """Apply one corruption to uint8 images (N, C, H, W); returns uint8 (N, C, H, W).

    ``severity`` (1..5, default 5) applies to CIFAR-10-C; MNIST-C has one fixed severity per
    corruption. Deterministic given ``seed``."""
    registry = _registry(dataset)
    if name not in registry:
        raise KeyError(f"unknown {dataset} corruption {name!r}; known: {', '.join(registry)}")
    severity = DEFAULT_CIFAR_SEVERITY if severity is None else int(severity)
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"need uint8 images (N, C, H, W), got {array.dtype} {array.shape}")
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    x = np.transpose(array, (0, 2, 3, 1)).astype(np.float64) / 255.0
    out = registry[name](x, rng, severity)
    out = np.clip(np.rint(np.clip(out, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.transpose(out, (0, 3, 1, 2)))


# ------------------------------------------------------------------------------------------------
# Published data sets


def published_paths(root: str | Path, dataset: str, name: str) -> tuple[Path, Path]:
    """(images, labels) paths of a published corruption file under ``root``."""
    root = Path(root)
    if dataset == "mnist":
        folder = root / "mnist_c" / name
        return folder / "test_images.npy", folder / "test_labels.npy"
    if dataset == "cifar10":
        for folder in (root / "CIFAR-10-C", root / "cifar10_c", root / "cifar-10-c"):
            if (folder / f"{name}.npy").exists():
                return folder / f"{name}.npy", folder / "labels.npy"
        return root / "CIFAR-10-C" / f"{name}.npy", root / "CIFAR-10-C" / "labels.npy"
    raise KeyError(f"no published corruption layout for dataset {dataset!r}")


def load_published(root: str | Path | None, dataset: str, name: str, severity: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """The published corrupted test set as uint8 (N, C, H, W), int64 labels and its path, or
    None when the files are not there. CIFAR-10-C files hold severities 1..5 in blocks of
    10,000; ``severity`` (default 5) picks one."""
    if root is None:
        return None
    images_path, labels_path = published_paths(root, dataset, name)
    if not (images_path.exists() and labels_path.exists()):
        return None
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(labels_path, mmap_mode="r")
    if dataset == "cifar10":
        severity = DEFAULT_CIFAR_SEVERITY if severity is None else int(severity)
        block = len(images) // 5
        images = images[(severity - 1) * block:severity * block]
        labels = labels[(severity - 1) * block:severity * block] if len(labels) == 5 * block else labels[:block]
    if images.ndim == 3:
        images = images[..., None]
    return (np.ascontiguousarray(np.transpose(np.asarray(images, dtype=np.uint8), (0, 3, 1, 2))),
            np.asarray(labels, dtype=np.int64).reshape(-1), images_path)


@dataclass(frozen=True, eq=False)
class CorruptedSet:
    """A corrupted test set: uint8 images (N, C, H, W), labels, and where it came from
    ("published: <path>" or "generated (seed S[, severity V])")."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    source: str


def corrupted_test_set(images: np.ndarray, labels: np.ndarray, name: str, dataset: str = "mnist", *,
                       root: str | Path | None = None, seed: int = 0, severity: int | None = None,
                       prefer_published: bool = True) -> CorruptedSet:
    """The corrupted version of the first ``len(images)`` test samples: the published files
    under ``root`` when present (their first N samples, assumed in test-set order), else
    generated from ``images`` (uint8 (N, C, H, W))."""
    count = len(images)
    if prefer_published:
        published = load_published(root, dataset, name, severity)
        if published is not None:
            corrupted, published_labels, path = published
            if len(corrupted) >= count:
                return CorruptedSet(name, corrupted[:count], published_labels[:count], f"published: {path}")
    generated = corrupt(np.asarray(images), name, dataset, seed, severity)
    detail = f"generated (seed {seed}"
    detail += f", severity {severity or DEFAULT_CIFAR_SEVERITY})" if dataset != "mnist" else ")"
    return CorruptedSet(name, generated, np.asarray(labels, dtype=np.int64), detail)
