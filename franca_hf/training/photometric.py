"""The photometric half of multi-crop augmentation as batched tensor operations with per-crop parameters: colour
jitter, grayscale, Gaussian blur, solarisation and normalisation of uint8 crops, on any device.

`MultiCropAugmentation` draws every crop's parameters (`CropParameters.photometric_row`, columns
`PHOTOMETRIC_FIELDS`) in the DataLoader worker. On CPU it applies the colour operations to each crop with Pillow and
finishes the crops of an image together with `blur_solarize_normalize`; with `data.augment_on_device` the worker
stops after the (uint8) crop and the trainer calls `finish_on_device` on the whole batch on the accelerator.

The colour operations here reproduce Pillow's uint8 arithmetic, i.e. what torchvision's PIL functions (and so the
official pipeline) compute: `ImageEnhance` blends in float32 truncated to uint8, ITU-R 601-2 luma with Pillow's
fixed-point weights, and Pillow's 8-bit HSV conversions (their float64 steps in float64 here) for the hue. A crop
finished on the device is therefore bit-identical to the same crop finished on CPU
(tests/training/test_augment_device.py).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PHOTOMETRIC_FIELDS = (
    "jitter",  # 1: colour jitter applied (probability 0.8)
    "order_0",  # the order of the four jitter operations (0 brightness, 1 contrast, 2 saturation, 3 hue)
    "order_1",
    "order_2",
    "order_3",
    "brightness",  # factors; NaN where that part of the jitter is off (its jitter range is 0)
    "contrast",
    "saturation",
    "hue",
    "grayscale",  # 1: converted to grayscale (probability 0.2)
    "blur_sigma",  # Gaussian blur sigma in pixels; 0: not blurred
    "solarize",  # 1: solarised (threshold 128)
)
FIELD = {name: index for index, name in enumerate(PHOTOMETRIC_FIELDS)}
SOLARIZE_THRESHOLD = 128


def _divide(x: torch.Tensor, value: float) -> torch.Tensor:
    """x / value as a true division on every device: CUDA divides by a Python number by multiplying with its
    reciprocal, which can differ in the last bit (the divisor here is a tensor on x's device, made without a copy)."""
    return x / torch.full((), value, dtype=x.dtype, device=x.device)


def _to(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    return indices.to(device, non_blocking=True)


def _column(parameters: torch.Tensor, name: str, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One parameter per selected crop, shaped (n, 1, 1, 1) to broadcast over (n, C, H, W), on `device`."""
    return _to(parameters[indices, FIELD[name]], device).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's `Image.blend(degenerate, image, factor)` on uint8 values held in float32: the float32
    `degenerate + factor * (image - degenerate)`, truncated and clipped to [0, 255]."""
    return (degenerate + factor * (image - degenerate)).trunc_().clamp_(0, 255)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32. (N, 3, H, W) -> (N, 1, H, W)."""
    r, g, b = rgb.unbind(-3)
    return _divide(19595 * r + 38470 * g + 7471 * b + 32768, 65536).floor_().unsqueeze(-3)


def adjust_brightness(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(rgb), rgb, factor)


def adjust_contrast(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma, rounded to an integer as `ImageEnhance.Contrast` does (in float64)."""
    grey = luma(rgb).double()
    mean = (_divide(grey.sum((-3, -2, -1), keepdim=True), grey[0].numel()) + 0.5).floor_()
    return _blend(mean.float(), rgb, factor)


def adjust_saturation(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(luma(rgb), rgb, factor)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> HSV (8-bit H, S, V; its float and float64 steps kept). (N, 3, H, W) -> (N, 3, H, W)."""
    r, g, b = rgb.unbind(-3)
    high = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = high - low
    grey = chroma == 0
    chroma = torch.where(grey, 1.0, chroma)
    saturation = chroma / torch.where(high == 0, 1.0, high)
    rc, gc, bc = (high - r) / chroma, (high - g) / chroma, (high - b) / chroma
    hue = torch.where(
        r == high,
        bc - gc,
        torch.where(g == high, (2.0 + rc.double()) - bc.double(), (4.0 + gc.double()) - rc.double()).float(),
    )
    hue = torch.fmod(_divide(hue.double(), 6.0) + 1.0, 1.0).float()
    hue = torch.where(grey, 0.0, (hue.double() * 255.0).trunc_().clamp_(0, 255).float())
    saturation = torch.where(grey, 0.0, (saturation.double() * 255.0).trunc_().clamp_(0, 255).float())
    return torch.stack((hue, saturation, high), dim=-3)


# For each sector i of the hue circle, where R, G and B come from among (v, p, q, t) (Pillow's hsv2rgb).
_SECTOR_SOURCES = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Pillow's HSV -> RGB, with its float and float64 steps. (N, 3, H, W) -> (N, 3, H, W)."""
    hue, saturation, value = hsv.unbind(-3)
    position = _divide(hue.double() * 6.0, 255.0)
    sector = position.floor()
    fraction = (position - sector).float()
    scaled_saturation = _divide(saturation.double(), 255.0).float()
    v = value.double()
    # C's round() rounds halves away from zero, torch.round to even: none of the 2^24 inputs gives a half here
    p = (v * (1.0 - scaled_saturation.double())).round()
    q = (v * (1.0 - (scaled_saturation * fraction).double())).round()
    t = (v * (1.0 - scaled_saturation.double() * (1.0 - fraction.double()))).round()
    candidates = torch.stack((v, p, q, t)).clamp_(0, 255).float()  # (4, N, H, W)
    sources = _SECTOR_SOURCES.to(hue.device)[sector.long() % 6]  # (N, H, W, 3)
    rgb = candidates.gather(0, sources.permute(3, 0, 1, 2)).movedim(0, -3)
    return torch.where((saturation == 0).unsqueeze(-3), value.unsqueeze(-3), rgb)


def adjust_hue(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL hue: H += int(factor * 255) mod 256 in Pillow's 8-bit HSV."""
    shift = (factor.double() * 255).trunc_().remainder_(256).float()
    hsv = rgb_to_hsv(rgb)
    hsv[:, :1] = (hsv[:, :1] + shift).remainder_(256)
    return hsv_to_rgb(hsv)


_ADJUSTMENTS = (
    ("brightness", adjust_brightness),
    ("contrast", adjust_contrast),
    ("saturation", adjust_saturation),
    ("hue", adjust_hue),
)


def jitter_and_grayscale(crops: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """Colour jitter (each crop's four operations in its own order) then grayscale, in place on (N, 3, H, W) float32
    uint8 values. `parameters` (N, len(PHOTOMETRIC_FIELDS)) stays on CPU: the crops each operation applies to are
    found there, so the device never waits for the host."""
    device = crops.device
    jitter = parameters[:, FIELD["jitter"]] > 0
    for stage in range(4):
        order = parameters[:, FIELD[f"order_{stage}"]]
        for operation, (name, adjust) in enumerate(_ADJUSTMENTS):
            selected = jitter & (order == operation) & parameters[:, FIELD[name]].isfinite()
            indices = selected.nonzero().flatten()
            if len(indices):
                target = _to(indices, device)
                crops[target] = adjust(crops[target], _column(parameters, name, indices, device))
    indices = (parameters[:, FIELD["grayscale"]] > 0).nonzero().flatten()
    if len(indices):
        target = _to(indices, device)
        crops[target] = luma(crops[target]).expand(-1, 3, -1, -1)
    return crops


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(n,) sigmas -> (n, kernel_size) normalised 1-D Gaussian kernels, torchvision's GaussianBlur formula (computed
    on the CPU by the callers here, so that every device blurs with the same weights)."""
    half = (kernel_size - 1) * 0.5
    position = torch.linspace(-half, half, kernel_size, device=sigma.device)
    density = torch.exp(-0.5 * (position / sigma[:, None]).pow(2))
    return density / density.sum(-1, keepdim=True)


def gaussian_blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (n, C, H, W) float images, one 1-D kernel per image ((n, k), `gaussian_kernels`),
    with reflect padding: torchvision's 2-D convolution as two 1-D passes of shifted multiply-adds (2k instead of k^2
    operations per value). Products and sums are separate operations, so no device fuses them into a differently
    rounded multiply-add: every device computes the same values."""
    size = kernels.shape[1]
    half = size // 2
    weights = kernels.view(*kernels.shape, 1, 1, 1)
    padded = F.pad(images, (half, half, half, half), mode="reflect")
    height, width = images.shape[-2:]
    rows = padded[..., :width] * weights[:, 0]
    for i in range(1, size):
        rows += padded[..., i : i + width] * weights[:, i]
    out = rows[..., :height, :] * weights[:, 0]
    for i in range(1, size):
        out += rows[..., i : i + height, :] * weights[:, i]
    return out


def blur_solarize_normalize(
    crops: torch.Tensor,
    parameters: torch.Tensor,
    kernel_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Blur (rounded back to uint8 values, as the PIL pipeline), solarise, then scale to [0, 1] and normalise, as
    torchvision's ToTensor + Normalize. (N, 3, H, W) float32 uint8 values (modified in place) -> normalised float32."""
    device = crops.device
    indices = (parameters[:, FIELD["blur_sigma"]] > 0).nonzero().flatten()
    if len(indices):
        target = _to(indices, device)
        kernels = _to(gaussian_kernels(parameters[indices, FIELD["blur_sigma"]], kernel_size), device)
        crops[target] = gaussian_blur(crops[target], kernels).round_()
    indices = (parameters[:, FIELD["solarize"]] > 0).nonzero().flatten()
    if len(indices):
        target = _to(indices, device)
        selected = crops[target]
        crops[target] = torch.where(selected >= SOLARIZE_THRESHOLD, 255 - selected, selected)
    mean = torch.as_tensor(mean, dtype=crops.dtype, device=device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=crops.dtype, device=device).view(-1, 1, 1)
    return _divide(crops, 255).sub_(mean).div_(std)


def finish_on_device(
    crops: torch.Tensor,
    parameters: torch.Tensor,
    kernel_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 crops (N, 3, H, W) on any device and their CPU parameter rows (N, len(PHOTOMETRIC_FIELDS)) -> the
    normalised float32 crops the CPU path would have produced, bit for bit."""
    if parameters.device.type != "cpu":
        raise ValueError("The photometric parameters must stay on CPU (they pick the crops each operation applies to).")
    if crops.shape[0] != parameters.shape[0] or parameters.shape[1] != len(PHOTOMETRIC_FIELDS):
        raise ValueError(
            f"Expected one row of {len(PHOTOMETRIC_FIELDS)} parameters per crop, got {tuple(parameters.shape)} "
            f"for {crops.shape[0]} crops."
        )
    crops = jitter_and_grayscale(crops.float(), parameters)
    return blur_solarize_normalize(crops, parameters, kernel_size, mean, std)
