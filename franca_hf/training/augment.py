"""DINOv2 multi-crop augmentation (as used by Franca): the official pipeline's random draws, computed faster.

Each image gives 2 global crops (RandomResizedCrop 224, scale (0.32, 1)) and L local crops (98, scale (0.05, 0.32)),
bicubic, horizontal flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, Gaussian blur (kernel 9,
sigma 0.1-2), solarisation 0.2 on global crop 2 only, ImageNet normalisation.

Blur probabilities (global 1, global 2, local):

* `PAPER_BLUR_PROBABILITIES` = (1.0, 0.1, 0.5), the DINOv2 recipe the configs ask for and the paper describes
  (default here; `crops.blur: paper`).
* `OFFICIAL_BLUR_PROBABILITIES` = (0.0, 0.9, 0.5), what the official Franca code actually applies: its GaussianBlur
  passes `1 - p` to RandomApply, so it blurs with probability 1 - p (never for global 1, 90 % for global 2; 0.5 is
  unaffected). The release recipes select it (`crops.blur: official`) to train as the released runs did.

Every random choice is drawn from torch's global generator with the calls, in the order, of the official
torchvision (v1) pipeline (`DataAugmentationDINO`), so a seed gives the official pipeline's crop boxes, flips, jitter
orders and factors, grayscale, blur sigmas and solarisation. The pixels are computed differently, for speed
(docs/pretraining.md has the measured differences):

* the image is converted to a uint8 tensor once, and each crop is resized by torch's uint8 bicubic antialiased
  kernel instead of Pillow's (the same filter and pass order; at most 2 levels apart, on about 0.3 % of values);
* the colour jitter and grayscale use torchvision's own PIL functions on the resized crop (identical);
* the blur is separable (two 1-D passes of the same kernel) and the crops of an image are blurred, solarised and
  normalised together (`franca_hf.training.photometric`); rounding ties make a blurred value 1 level apart at times.

With `photometric_on_device=True` the images stop after the crop: uint8 crops plus each crop's parameter row, which
`franca_hf.training.photometric.finish_on_device` turns into the very same normalised crops on the accelerator.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as v2_functional

from ..modeling.image_processing_franca import IMAGENET_MEAN, IMAGENET_STD
from .photometric import blur_solarize_normalize, finish_on_device

COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
ASPECT_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default, as in the official pipeline
FLIP_PROBABILITY = 0.5
JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2
_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


class BlurProbabilities(NamedTuple):
    """Probability of blurring global crop 1, global crop 2 and each local crop."""

    global_1: float
    global_2: float
    local: float


PAPER_BLUR_PROBABILITIES = BlurProbabilities(1.0, 0.1, 0.5)
OFFICIAL_BLUR_PROBABILITIES = BlurProbabilities(0.0, 0.9, 0.5)


class CropKind(NamedTuple):
    """One of the three kinds of crop (global 1, global 2, local): output side, area scale, blur and solarisation
    probabilities (None: no solarisation step, hence no random draw for it)."""

    size: int
    scale: tuple[float, float]
    blur_probability: float
    solarize_probability: float | None


class CropParameters(NamedTuple):
    """The random choices of one crop, as the official pipeline draws them."""

    box: tuple[int, int, int, int]  # top, left, height, width in the source image
    flip: bool
    jitter_order: tuple[int, ...] | None  # order of (brightness, contrast, saturation, hue); None: no colour jitter
    jitter_factors: tuple[float | None, ...]  # brightness, contrast, saturation, hue (None: that part is off)
    grayscale: bool
    blur_sigma: float | None  # None: not blurred
    solarize: bool

    def photometric_row(self) -> list[float]:
        """The row of `franca_hf.training.photometric.PHOTOMETRIC_FIELDS` values of this crop."""
        order = self.jitter_order or (0, 1, 2, 3)
        factors = [math.nan if f is None else f for f in self.jitter_factors]
        return [
            float(self.jitter_order is not None),
            *map(float, order),
            *factors,
            float(self.grayscale),
            self.blur_sigma or 0.0,
            float(self.solarize),
        ]


def _check_scale(name: str, scale: Sequence[float]) -> None:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {scale}.")


def _from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) in channels-last memory (a view of one copy of its bytes)."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1)


def _to_pil(crop: torch.Tensor) -> Image.Image:
    return Image.fromarray(crop.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _uint8_chw(image) -> torch.Tensor:
    """PIL image, HWC ndarray or CHW tensor (uint8 or float in [0, 1]; grayscale or RGB) -> uint8 (3, H, W)."""
    if isinstance(image, Image.Image):
        return _from_pil(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image.copy())
        image = image.permute(2, 0, 1) if image.ndim == 3 else image
    pixels = v2_functional.to_dtype(image, torch.uint8, scale=True)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return pixels


class MultiCropAugmentation:
    """Image (PIL, ndarray or tensor; grayscale is made RGB) -> {"global_crops": [2 x (3, G, G)], "local_crops": [L x (3, l, l)]}.

    `color_jitter` is (brightness, contrast, saturation, hue) of the colour jitter applied with p 0.8; the blur
    kernel size and sigma range default to DINOv2's (9, (0.1, 2.0)), which suit 224-px crops.

    The crops are fp32, normalised. Randomness comes from torch's global generator (seeded per sample by the data
    pipeline). With `photometric_on_device`, the crops are uint8 and the dict also holds "global_photometric" and
    "local_photometric": one row of `PHOTOMETRIC_FIELDS` per crop, for `photometric.finish_on_device`.
    """

    def __init__(
        self,
        global_crop_size: int = 224,
        local_crop_size: int = 98,
        global_crop_scale: tuple[float, float] = (0.32, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.32),
        num_local_crops: int = 8,
        blur_probabilities: Sequence[float] = PAPER_BLUR_PROBABILITIES,
        solarize_probability: float = 0.2,
        color_jitter: Sequence[float] = COLOR_JITTER,
        blur_kernel_size: int = 9,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        photometric_on_device: bool = False,
    ):
        _check_scale("global_crop_scale", global_crop_scale)
        _check_scale("local_crop_scale", local_crop_scale)
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}.")
        blur = BlurProbabilities(*blur_probabilities)
        if not all(0.0 <= p <= 1.0 for p in (*blur, solarize_probability)):
            raise ValueError(f"Probabilities must be in [0, 1], got blur {blur} and solarize {solarize_probability}.")
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd and positive, got {blur_kernel_size}.")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {blur_sigma}.")
        smallest = min(global_crop_size, local_crop_size if num_local_crops else global_crop_size)
        if blur_kernel_size // 2 >= smallest:
            raise ValueError(f"blur_kernel_size {blur_kernel_size} is too large for {smallest}-px crops.")
        self.num_local_crops = num_local_crops
        self.blur_probabilities = blur
        self.jitter = v1.ColorJitter(*color_jitter)  # validates the ranges and holds them as torchvision does
        self.blur_kernel_size, self.blur_sigma = blur_kernel_size, tuple(blur_sigma)
        self.mean, self.std = tuple(mean), tuple(std)
        self.photometric_on_device = photometric_on_device
        self.global_1 = CropKind(global_crop_size, tuple(global_crop_scale), blur.global_1, None)
        self.global_2 = CropKind(global_crop_size, tuple(global_crop_scale), blur.global_2, solarize_probability)
        self.local = CropKind(local_crop_size, tuple(local_crop_scale), blur.local, None)

    def draw(self, kind: CropKind, height: int, width: int) -> CropParameters:
        """One crop's random choices for an image of `height` x `width`, with the torch RNG calls of the official
        pipeline's transforms in its order: RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter),
        RandomGrayscale, RandomApply(GaussianBlur) and, for global crop 2, RandomSolarize."""
        # get_params reads only the image's size: an empty tensor of that shape stands for it
        box = tuple(v1.RandomResizedCrop.get_params(torch.empty(0, height, width), kind.scale, ASPECT_RATIO))
        flip = bool(torch.rand(1) < FLIP_PROBABILITY)
        order, factors = None, (None, None, None, None)
        if not JITTER_PROBABILITY < torch.rand(1):  # RandomApply's test
            jitter = self.jitter
            permutation, *factors = v1.ColorJitter.get_params(
                jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
            )
            order = tuple(permutation.tolist())
        grayscale = bool(torch.rand(1) < GRAYSCALE_PROBABILITY)
        sigma = None
        if not kind.blur_probability < torch.rand(1):
            sigma = v1.GaussianBlur.get_params(*self.blur_sigma)
        solarize = kind.solarize_probability is not None and torch.rand(1).item() < kind.solarize_probability
        return CropParameters(box, flip, order, tuple(factors), grayscale, sigma, solarize)

    def sample(self, height: int, width: int) -> list[CropParameters]:
        """The parameters of all crops of one image: global 1, global 2, then the local crops."""
        kinds = [self.global_1, self.global_2] + [self.local] * self.num_local_crops
        return [self.draw(kind, height, width) for kind in kinds]

    @staticmethod
    def crop(pixels: torch.Tensor, parameters: CropParameters, size: int) -> torch.Tensor:
        """uint8 (3, H, W) -> the uint8 (3, size, size) crop: bicubic with antialiasing, then the flip.

        torch's uint8 kernel resizes rows first, then columns, each pass rounded to uint8, as Pillow does, except
        that Pillow resizes columns first when the height shrinks by more than twice as many pixels as the width
        (`ImagingResampleInner`, Pillow 13); such crops are resized transposed, so that both round the same passes."""
        top, left, height, width = parameters.box
        region = pixels[None, :, top : top + height, left : left + width]
        columns_first = 0 < height - size and height - size > 2 * (width - size)
        if columns_first:
            region = region.transpose(-1, -2)
        # channels-last memory in and out: faster, and the crop is an HWC array for Pillow without a copy
        region = region.contiguous(memory_format=torch.channels_last)
        crop = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)[0]
        if columns_first:
            crop = crop.transpose(-1, -2)
        return crop.flip(-1) if parameters.flip else crop

    @staticmethod
    def jitter_and_grayscale(crop: torch.Tensor, parameters: CropParameters) -> torch.Tensor:
        """Colour jitter and grayscale of one uint8 crop, with torchvision's PIL functions (the official ones)."""
        if parameters.jitter_order is None and not parameters.grayscale:
            return crop
        image = _to_pil(crop)
        for operation in parameters.jitter_order or ():
            factor = parameters.jitter_factors[operation]
            if factor is not None:
                image = _ADJUST[operation](image, factor)
        if parameters.grayscale:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        return _from_pil(image)

    def finish(self, crops: list[torch.Tensor], parameters: list[CropParameters]) -> list[torch.Tensor]:
        """uint8 crops of one size -> normalised float32 crops (colour on each, then blur etc. on all together)."""
        if not crops:
            return []
        coloured = torch.stack([self.jitter_and_grayscale(c, p) for c, p in zip(crops, parameters, strict=True)])
        rows = torch.tensor([p.photometric_row() for p in parameters], dtype=torch.float32)
        finished = blur_solarize_normalize(coloured.float(), rows, self.blur_kernel_size, self.mean, self.std)
        return list(finished.unbind())

    def __call__(self, image) -> dict[str, list[torch.Tensor]]:
        pixels = _uint8_chw(image)
        parameters = self.sample(*pixels.shape[-2:])
        sizes = [self.global_1.size] * 2 + [self.local.size] * self.num_local_crops
        crops = [self.crop(pixels, p, size) for p, size in zip(parameters, sizes, strict=True)]
        if self.photometric_on_device:
            rows = torch.tensor([p.photometric_row() for p in parameters], dtype=torch.float32)
            return {
                "global_crops": crops[:2],
                "local_crops": crops[2:],
                "global_photometric": list(rows[:2]),
                "local_photometric": list(rows[2:]),
            }
        return {
            "global_crops": self.finish(crops[:2], parameters[:2]),
            "local_crops": self.finish(crops[2:], parameters[2:]),
        }

    def finish_on_device(self, crops: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """Batched `photometric.finish_on_device` with this augmentation's blur kernel and normalisation."""
        return finish_on_device(crops, parameters, self.blur_kernel_size, self.mean, self.std)
