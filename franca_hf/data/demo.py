"""Embedded demo dataset for pretraining demos and tests: procedural, labelled, no download.

"Demo shapes": 32x32 RGB images, each holding one anti-aliased shape out of 10 classes (`DEMO_CLASSES`): disk, ring,
square, triangle, plus, cross (a 45-degree plus), diamond, hstripes and vstripes (a square of three bars), checker (a
3x3 checkerboard). Every shape is left-right symmetric, so horizontal flips keep the class.

Nuisances, drawn independently per image: the shape's half-extent (5-8 px), its position (anywhere it fits
entirely), a random hue shared by shape and background (saturation 0.5-0.8; background value 0.15-0.3, shape value
0.7-0.9, so the shape is always lighter), and Gaussian pixel noise (std 0.04). They are chosen to lie within what
DINO augmentations undo (random resized crop for position and scale, colour jitter with hue up to 0.5 for the hue,
brightness/contrast/saturation jitter for the value ranges, blur for the noise). Nuisances that the augmentations do
not undo (independent random shape/background colours, random polarity, rotation) stopped a short DINO run from
learning in the pilot; see docs/demo_dataset.md for the measured numbers and the recommended model scale
(patch 8, hidden size 128, 4 layers, 4 heads, layerscale 0.1) and training settings.

Generation is pure numpy (4x4 supersampling), deterministic in (seed, split): about 1.4 s for 5000 images.

Per-pixel masks for segmentation (`generate_demo_segmentation`, `load_demo_dataset(masks=True)`): 0 where the pixel
is background, 1 + the image's class where the shape covers at least half of it (`DEMO_SEGMENTATION_CLASSES`).
"""

import colorsys

import numpy as np

from ..errors import UsageError

DEMO_CLASSES = (
    "disk",
    "ring",
    "square",
    "triangle",
    "plus",
    "cross",
    "diamond",
    "hstripes",
    "vstripes",
    "checker",
)
DEMO_SEGMENTATION_CLASSES = ("background", *DEMO_CLASSES)
DEMO_IMAGE_SIZE = 32
DEMO_SPLITS = ("train", "test")

_SUPERSAMPLE = 4
_RADIUS = (5.0, 8.0)
_SATURATION = (0.5, 0.8)
_BACKGROUND_VALUE = (0.15, 0.3)
_SHAPE_VALUE = (0.7, 0.9)
_NOISE_STD = 0.04


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in its own frame: u, v in [-1, 1] span its box, v points down."""
    a, b = np.abs(u), np.abs(v)
    box = np.maximum(a, b)
    if name == "disk":
        return u * u + v * v <= 1.0
    if name == "ring":
        return (u * u + v * v <= 1.0) & (u * u + v * v >= 0.25)
    if name == "square":
        return box <= 0.85
    if name == "triangle":
        return (v <= 0.8) & (a <= (v + 1.0) / 1.8)
    if name == "plus":
        return (np.minimum(a, b) <= 0.3) & (box <= 1.0)
    if name == "cross":
        p, q = np.abs(u + v) / np.sqrt(2), np.abs(u - v) / np.sqrt(2)
        return (np.minimum(p, q) <= 0.25) & (np.maximum(p, q) <= 1.0)
    if name == "diamond":
        return a + b <= 1.0
    if name == "hstripes":
        return (box <= 0.9) & (np.floor((v + 0.9) / 0.36) % 2 == 0)
    if name == "vstripes":
        return (box <= 0.9) & (np.floor((u + 0.9) / 0.36) % 2 == 0)
    if name == "checker":
        return (box <= 0.9) & ((np.floor((u + 0.9) / 0.6) + np.floor((v + 0.9) / 0.6)) % 2 == 0)
    raise UsageError(f"Unknown demo class {name!r}; choose one of {DEMO_CLASSES}.")


def generate_demo_images(num_images: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(num_images, 32, 32, 3) uint8 images and (num_images,) int64 labels; balanced when `num_images % 10 == 0`.

    The output depends only on (num_images, seed, split); train and test of one seed never share a random stream.
    """
    images, labels, _ = generate_demo_segmentation(num_images, seed, split)
    return images, labels


def generate_demo_segmentation(
    num_images: int, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The images and labels of `generate_demo_images` and their (num_images, 32, 32) uint8 masks: 0 background,
    1 + label where the shape covers at least half of the pixel."""
    if split not in DEMO_SPLITS:
        raise UsageError(f"split must be one of {DEMO_SPLITS}, got {split!r}.", setting="split")
    if num_images < 0:
        raise UsageError(f"num_images must be >= 0, got {num_images}.")
    rng = np.random.default_rng([seed, DEMO_SPLITS.index(split)])
    size, n = DEMO_IMAGE_SIZE, num_images
    labels = rng.permutation(np.arange(n) % len(DEMO_CLASSES))
    radius = rng.uniform(*_RADIUS, n)
    centre = radius[:, None] + rng.uniform(0.0, 1.0, (n, 2)) * (size - 2 * radius[:, None])
    hue, saturation = rng.uniform(0.0, 1.0, n), rng.uniform(*_SATURATION, n)
    background_value, shape_value = rng.uniform(*_BACKGROUND_VALUE, n), rng.uniform(*_SHAPE_VALUE, n)
    noise = rng.normal(0.0, _NOISE_STD, (n, size, size, 3)).astype(np.float32)

    grid = (np.arange(size * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        u = (grid[None, :] - centre[i, 0]) / radius[i]
        v = (grid[:, None] - centre[i, 1]) / radius[i]
        mask = _shape_mask(DEMO_CLASSES[labels[i]], u, v).astype(np.float32)
        alpha = mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean((1, 3))[..., None]
        background = np.array(colorsys.hsv_to_rgb(hue[i], saturation[i], background_value[i]), np.float32)
        shape = np.array(colorsys.hsv_to_rgb(hue[i], 0.7 * saturation[i], shape_value[i]), np.float32)
        pixels = background * (1.0 - alpha) + shape * alpha + noise[i]
        images[i] = np.clip(pixels * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
        masks[i] = np.where(alpha[..., 0] >= 0.5, labels[i] + 1, 0)
    return images, labels.astype(np.int64), masks


def demo_split_size(split: str, max_images: int | None = None) -> int:
    """Images of a demo split to generate: 5000 train / 1000 test, or `max_images` when fewer (the first ones,
    class-balanced when a multiple of 10)."""
    size = 5000 if split == "train" else 1000
    return size if max_images is None else min(size, max_images)


def load_demo_dataset(split: str = "train", num_images: int | None = None, seed: int = 0, masks: bool = False):
    """The demo set as a `datasets.Dataset` with columns `image` (PIL RGB, 32x32) and `label` (ClassLabel), and with
    `masks` a `mask` column (PIL L, 32x32, values as `generate_demo_segmentation`).

    Defaults: 5000 train / 1000 test images. Same (split, num_images, seed) gives identical pixels.
    """
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    if num_images is None:
        num_images = demo_split_size(split)
    images, labels, pixel_labels = generate_demo_segmentation(num_images, seed=seed, split=split)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(DEMO_CLASSES))})
    data = {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()}
    if masks:
        features["mask"] = ImageFeature()
        data["mask"] = [Image.fromarray(mask) for mask in pixel_labels]
    return Dataset.from_dict(data, features=features, split=split)


__all__ = [
    "DEMO_CLASSES",
    "DEMO_IMAGE_SIZE",
    "DEMO_SEGMENTATION_CLASSES",
    "demo_split_size",
    "generate_demo_images",
    "generate_demo_segmentation",
    "load_demo_dataset",
]
