"""Multi-crop augmentation: crop sizes and counts, inputs, blur presets."""

import numpy as np
import pytest
import torch
from PIL import Image

from franca_hf.training import OFFICIAL_BLUR_PROBABILITIES, PAPER_BLUR_PROBABILITIES, MultiCropAugmentation
from franca_hf.training.augment import CropKind


def _blur_probability(kind: CropKind) -> float:
    return kind.blur_probability


def _solarizes(kind: CropKind) -> bool:
    return kind.solarize_probability is not None


def test_crops_from_pil_tensor_and_grayscale():
    torch.manual_seed(0)
    augmentation = MultiCropAugmentation(global_crop_size=56, local_crop_size=28, num_local_crops=3)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8))
    for image in (rgb, rgb.convert("L"), torch.rand(3, 64, 80)):
        crops = augmentation(image)
        assert [tuple(c.shape) for c in crops["global_crops"]] == [(3, 56, 56)] * 2
        assert [tuple(c.shape) for c in crops["local_crops"]] == [(3, 28, 28)] * 3
        for crop in crops["global_crops"] + crops["local_crops"]:
            assert type(crop) is torch.Tensor and crop.dtype == torch.float32
            # ImageNet-normalised values of [0, 1] pixels
            assert crop.min() >= (0 - 0.485) / 0.229 - 1e-4 and crop.max() <= (1 - 0.406) / 0.225 + 1e-4


def test_blur_presets():
    assert PAPER_BLUR_PROBABILITIES == (1.0, 0.1, 0.5)
    assert OFFICIAL_BLUR_PROBABILITIES == (0.0, 0.9, 0.5)
    for preset in (PAPER_BLUR_PROBABILITIES, OFFICIAL_BLUR_PROBABILITIES):
        augmentation = MultiCropAugmentation(blur_probabilities=preset)
        got = tuple(_blur_probability(p) for p in (augmentation.global_1, augmentation.global_2, augmentation.local))
        assert got == tuple(preset)
    default = MultiCropAugmentation()
    assert default.blur_probabilities == PAPER_BLUR_PROBABILITIES
    assert [_solarizes(p) for p in (default.global_1, default.global_2, default.local)] == [False, True, False]


def test_deterministic_given_the_torch_seed():
    image = torch.randint(0, 256, (3, 60, 60), dtype=torch.uint8)
    augmentation = MultiCropAugmentation(global_crop_size=28, local_crop_size=14, num_local_crops=1)
    torch.manual_seed(5)
    first = augmentation(image)
    torch.manual_seed(5)
    second = augmentation(image)
    assert all(torch.equal(a, b) for a, b in zip(first["global_crops"], second["global_crops"], strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(global_crop_scale=(0.5, 0.2)), "global_crop_scale"),
        (dict(local_crop_scale=(0.0, 0.3)), "local_crop_scale"),
        (dict(num_local_crops=-1), "num_local_crops"),
        (dict(blur_probabilities=(1.0, 1.5, 0.5)), "Probabilities"),
        (dict(blur_kernel_size=4), "blur_kernel_size must be odd"),
        (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (dict(global_crop_size=32, local_crop_size=8, blur_kernel_size=17), "too large for 8-px crops"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCropAugmentation(**kwargs)
