"""The device photometric path (`data.augment_on_device`), run here on CPU tensors: Pillow's arithmetic reproduced
exactly, and crops finished in a batch bit-identical to the CPU path's."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from franca_hf.training.augment import OFFICIAL_BLUR_PROBABILITIES, MultiCropAugmentation
from franca_hf.training.photometric import (
    PHOTOMETRIC_FIELDS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    finish_on_device,
    gaussian_blur,
    gaussian_kernels,
    hsv_to_rgb,
    luma,
    rgb_to_hsv,
)

from ..conftest import EXAMPLE_IMAGES


def _tensor(image: Image.Image) -> torch.Tensor:
    """PIL (RGB or HSV) -> float32 (1, 3, H, W) of its uint8 values."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()


def _every_third_triple() -> Image.Image:
    """All (a, b, c) with a, b, c in {0, 3, ..., 255}: 86^3 triples as one 7396 x 86 image."""
    values = torch.arange(0, 256, 3, dtype=torch.uint8)
    grid = torch.stack(torch.meshgrid(values, values, values, indexing="ij"), dim=-1).reshape(-1, len(values), 3)
    return Image.fromarray(grid.numpy(), "RGB")


def test_hsv_conversions_are_pillows():
    """Pillow's 8-bit RGB <-> HSV (float and float64 steps, truncations, round half away from zero), value for value
    on a grid of 636k triples (the whole cube of 2^24 was checked once as well: no difference)."""
    triples = _every_third_triple()
    assert torch.equal(rgb_to_hsv(_tensor(triples)), _tensor(triples.convert("HSV")))
    as_hsv = Image.frombytes("HSV", triples.size, triples.tobytes())  # the same bytes read as H, S, V
    assert torch.equal(hsv_to_rgb(_tensor(triples)), _tensor(as_hsv.convert("RGB")))


@pytest.fixture(scope="module")
def crops():
    """Three 40 x 40 crops of the example photos, as PIL images."""
    photos = [Image.open(EXAMPLE_IMAGES / name).convert("RGB") for name in ("coffee.jpg", "astronaut.jpg")]
    return [photos[0].crop((100, 60, 140, 100)), photos[1].crop((150, 80, 190, 120)), photos[1].resize((40, 40))]


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 0.8731, 1.0, 1.2345, 1.4]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 0.91, 1.0, 1.3333, 1.4]),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.8, 1.0, 1.17, 1.2]),
        (adjust_hue, TF.adjust_hue, [-0.1, -0.0371, 0.0, 0.002, 0.05, 0.1, 0.5]),
    ],
)
def test_colour_operations_are_torchvisions_pil_functions(crops, ours, theirs, factors):
    batch = torch.cat([_tensor(crop) for crop in crops])
    for factor in factors:
        factor32 = float(torch.tensor(factor, dtype=torch.float32))  # the sampled factors are float32 values
        expected = torch.cat([_tensor(theirs(crop, factor32)) for crop in crops])
        got = ours(batch.clone(), torch.full((len(crops), 1, 1, 1), factor32))
        assert torch.equal(got, expected), (ours.__name__, factor, (got - expected).abs().max())


def test_grayscale_is_pillows_luma(crops):
    for crop in crops:
        expected = _tensor(TF.rgb_to_grayscale(crop, num_output_channels=3))
        assert torch.equal(luma(_tensor(crop)).expand(-1, 3, -1, -1), expected)


def test_separable_blur_against_torchvision(crops):
    """Two 1-D passes instead of torchvision's 2-D kernel: after rounding to uint8, a value moves by at most 1 level,
    where the float sums fall on different sides of .5."""
    batch = torch.cat([_tensor(crop) for crop in crops])
    sigmas = torch.tensor([0.1, 0.77, 2.0])
    ours = gaussian_blur(batch, gaussian_kernels(sigmas, 9)).round()
    expected = torch.cat(
        [_tensor(TF.gaussian_blur(crop, 9, [float(s)] * 2)) for crop, s in zip(crops, sigmas, strict=True)]
    )
    difference = (ours - expected).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(blur_probabilities=OFFICIAL_BLUR_PROBABILITIES),
        dict(color_jitter=(0.4, 0.0, 0.2, 0.0), num_local_crops=0),  # parts of the jitter off: no draw, NaN rows
    ],
)
def test_device_path_is_bit_identical_to_the_cpu_path(settings):
    """The same seeds through both modes: the worker's uint8 crops finished together (one batch of 12 images,
    crop-major as the trainer stacks them) equal the CPU path's crops exactly."""
    cpu = MultiCropAugmentation(64, 32, num_local_crops=settings.pop("num_local_crops", 3), **settings)
    device = MultiCropAugmentation(64, 32, num_local_crops=cpu.num_local_crops, photometric_on_device=True, **settings)
    photos = [Image.open(EXAMPLE_IMAGES / name).convert("RGB") for name in ("coffee.jpg", "astronaut.jpg")]
    expected, workers = [], []
    for seed in range(12):
        torch.manual_seed(seed)
        expected.append(cpu(photos[seed % 2]))
        torch.manual_seed(seed)
        workers.append(device(photos[seed % 2]))
    for kind in ("global", "local"):
        crops = [crop for sample in workers for crop in sample[f"{kind}_crops"]]
        if not crops:
            continue
        assert all(crop.dtype == torch.uint8 for crop in crops)
        rows = torch.stack([row for sample in workers for row in sample[f"{kind}_photometric"]])
        finished = device.finish_on_device(torch.stack(crops), rows)
        reference = torch.stack([crop for sample in expected for crop in sample[f"{kind}_crops"]])
        assert finished.dtype == torch.float32 and torch.equal(finished, reference), kind


def test_finish_on_device_rejects_mismatched_parameters():
    crops = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one row of 12 parameters per crop"):
        finish_on_device(crops, torch.zeros(3, len(PHOTOMETRIC_FIELDS)), 3, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="must stay on CPU"):
        finish_on_device(crops, torch.zeros(4, len(PHOTOMETRIC_FIELDS), device="meta"), 3, (0.5,) * 3, (0.5,) * 3)
