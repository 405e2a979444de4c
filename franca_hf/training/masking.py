"""CyclicMask (Franca's iBOT masking) and the multi-crop collate function.

A CyclicMask of n masked patches on an H x W grid keeps c = max(1, H*W - n) patches visible as ONE rectangle (aspect
ratio h/w log-uniform in [0.3, 1/0.3], clipped so that the rectangle fits), keeps exactly c of its patches in raster
order, rolls the result by a uniform random (dy, dx) with wrap-around (so the visible block may straddle the borders)
and masks everything else. The official code draws the rectangle's top-left corner before rolling; a uniform roll
makes that draw irrelevant, so the rectangle starts at the origin here.

All randomness comes from an explicit `random.Random`, so masks are reproducible.
"""

import math
import random
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import TypedDict

import torch

MASK_RATIO_RANGE = (0.1, 0.65)
MASK_PROBABILITY = 0.5


class CyclicMaskGenerator:
    """Draws CyclicMasks on a fixed patch grid.

    Args:
        grid_size: patches per side, or (rows, columns) for a non-square grid.
        min_aspect, max_aspect: range of the visible block's rows/columns ratio (max defaults to 1 / min_aspect).
    """

    def __init__(self, grid_size: int | tuple[int, int], min_aspect: float = 0.3, max_aspect: float | None = None):
        rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if rows < 1 or cols < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}.")
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"Need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}.")
        self.rows, self.cols = rows, cols
        self.min_aspect, self.max_aspect = min_aspect, max_aspect

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    def __call__(self, num_masked: int, rng: random.Random) -> torch.Tensor:
        """A (rows, cols) bool mask (True = masked) with exactly min(num_masked, rows * cols - 1) masked patches."""
        if not 0 <= num_masked <= self.num_patches:
            raise ValueError(f"num_masked must be in [0, {self.num_patches}], got {num_masked}.")
        if num_masked == 0:
            return torch.zeros(self.rows, self.cols, dtype=torch.bool)
        visible = max(1, self.num_patches - num_masked)
        # Aspect ratios for which a block of `visible` patches fits: visible / cols**2 <= h / w <= rows**2 / visible.
        low = min(max(self.min_aspect, visible / self.cols**2), self.rows**2 / visible)
        high = max(min(self.max_aspect, self.rows**2 / visible), visible / self.cols**2)
        aspect = math.exp(rng.uniform(math.log(low), math.log(high)))
        # Only the block's width matters once it is filled in raster order (the official height is >= the rows
        # used); it is clamped so that ceil(visible / width) rows fit.
        width = min(self.cols, max(-(-visible // self.rows), math.ceil(math.sqrt(visible / aspect))))
        position = torch.arange(visible)
        keep = torch.zeros(self.rows, self.cols, dtype=torch.bool)
        keep[position // width, position % width] = True
        shift = (rng.randrange(self.rows), rng.randrange(self.cols))
        return ~torch.roll(keep, shifts=shift, dims=(0, 1))


class MaskedCrops(TypedDict):
    """A collated multi-crop batch with the iBOT masks of its global crops (`collate_masked_crops`). The crops are
    crop-major (all first crops, then all second ...); M is the number of masked tokens."""

    global_crops: torch.Tensor  # (2B, C, H, W)
    local_crops: torch.Tensor  # (LB, C, h, w); (0, C, H, W) without local crops
    masks: torch.Tensor  # (2B, T) bool, True = masked
    mask_indices: torch.Tensor  # (M,) indices of the masked tokens in the flattened masks
    mask_weights: torch.Tensor  # (M,) 1 / masked tokens of the token's image


def mask_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """(N, T) bool masks -> (number of masked tokens,) weights 1 / (masked tokens of the token's image)."""
    counts = masks.sum(dim=-1, keepdim=True).clamp(min=1)
    return (1.0 / counts).expand_as(masks)[masks]


def _crops(sample: Mapping | Sequence) -> Mapping:
    # A dataset may return the augmentation dict alone or an (augmentation dict, label) pair.
    return sample if isinstance(sample, Mapping) else sample[0]


def stack_crop_major(crops: Sequence[Mapping], key: str) -> torch.Tensor | None:
    """Crop i of every sample, for i = 0, 1, ...; None when the samples have no such crop."""
    num_crops = len(crops[0][key])
    return torch.stack([sample[key][i] for i in range(num_crops) for sample in crops]) if num_crops else None


def collate_masked_crops(
    samples: Sequence[Mapping | Sequence],
    mask_generator: CyclicMaskGenerator,
    rng: random.Random,
    mask_probability: float = MASK_PROBABILITY,
    mask_ratio_range: tuple[float, float] = MASK_RATIO_RANGE,
) -> MaskedCrops:
    """Stack multi-crop samples crop-major and draw the iBOT masks of the global crops.

    `int(N * mask_probability)` of the N = 2 * B global crops are masked; masked crop i draws its ratio uniformly in
    the i-th interval of `linspace(*mask_ratio_range, n + 1)` and masks `int(T * ratio)` patches; the list of masks
    (masked ones, then empty ones) is shuffled before it is assigned to the crops.

    Args:
        samples: B items, each `{"global_crops": [C, H, W] x 2, "local_crops": [C, h, w] x L}` (or a tuple whose first
            element is that dict).
        mask_generator: grid of the global crops (global size // patch size).
        rng: source of the mask ratios, the masks and the shuffle.
    Returns:
        `MaskedCrops`: the crops (local crops empty when L = 0), the masks and the masked tokens' indices and weights.
    """
    if not samples:
        raise ValueError("Cannot collate an empty batch.")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}.")
    low, high = mask_ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask_ratio_range must satisfy 0 <= low <= high <= 1, got {mask_ratio_range}.")
    crops = [_crops(sample) for sample in samples]
    global_crops = stack_crop_major(crops, "global_crops")
    local_crops = stack_crop_major(crops, "local_crops")
    if global_crops is None:
        raise ValueError("Every sample needs at least one global crop.")
    if local_crops is None:
        local_crops = global_crops.new_empty((0, *global_crops.shape[1:]))
    num_images = global_crops.shape[0]
    num_tokens = mask_generator.num_patches
    num_masked_images = int(num_images * mask_probability)
    bounds = torch.linspace(low, high, num_masked_images + 1).tolist()
    masks = [
        mask_generator(int(num_tokens * rng.uniform(lower_ratio, upper_ratio)), rng).flatten()
        for lower_ratio, upper_ratio in pairwise(bounds)
    ]
    masks += [torch.zeros(num_tokens, dtype=torch.bool)] * (num_images - num_masked_images)
    rng.shuffle(masks)
    masks = torch.stack(masks)
    return MaskedCrops(
        global_crops=global_crops,
        local_crops=local_crops,
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=mask_token_weights(masks),
    )
