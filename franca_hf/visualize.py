"""`franca-hf visualize`: the input image, then the 3-component PCA map of its patch features, raw and (for models
with RASA weights) RASA-debiased.

Each map panel maps the first three principal components of one image's patch features to RGB. Under each panel: the
R² of a linear position probe, i.e. how much absolute position the features still encode. With a single image the
probe uses the 16 leading principal components, is fitted on a random half of the patches and scored on the other
half (ridge-regularised), so it measures generalisation, not memorisation. Below 8 x 8 patches there is too little
to fit and score: no R² is reported, with a warning.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .data.sources import read_image
from .errors import UsageError
from .io import picture_format, write_file_atomically
from .modeling.image_processing_franca import make_image_processor
from .rasa.probe import grid_coordinates, linear_probe_r2
from .visualize_settings import VisualizeSettings

logger = logging.getLogger(__name__)
PANEL_SIDE = 320
PROBE_COMPONENTS = 16
MIN_PROBE_GRID = 8
CAPTION_FONT_SIZE = 15  # Pillow's default font at its 10-px default runs words together


def pca_components(features: torch.Tensor, count: int) -> torch.Tensor:
    """(N, D) -> (N, count) projections on the leading principal components (centred, fp64 SVD)."""
    centred = features.double() - features.double().mean(0)
    _, _, vectors = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vectors[:count].T


def pca_image(features: torch.Tensor, rows: int, cols: int) -> Image.Image:
    """(N, D) patch features -> RGB image of the first 3 principal components, each min-max scaled."""
    rgb = pca_components(features, 3)
    rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values).clamp_min(1e-12)
    pixels = (rgb.reshape(rows, cols, 3) * 255).round().byte().numpy()
    return Image.fromarray(pixels, "RGB")


def single_image_probe_r2(features: torch.Tensor, rows: int, cols: int, seed: int = 0) -> float:
    """Position-probe R² from one image: PCA to 16 components, fit on a random half of the patches, score the rest."""
    reduced = pca_components(features, min(PROBE_COMPONENTS, features.shape[0] // 4))
    coords = grid_coordinates(rows, cols)
    order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
    fit, score = order[: len(order) // 2], order[len(order) // 2 :]
    return linear_probe_r2(reduced[fit], coords[fit], reduced[score], coords[score])


def probe_grid_problem(rows: int, cols: int, patch_size: int) -> str | None:
    """Why a `rows` x `cols` patch grid is too small for a meaningful single-image probe, or None."""
    if min(rows, cols) >= MIN_PROBE_GRID:
        return None
    side = MIN_PROBE_GRID * patch_size
    return (
        f"the patch grid is {rows}x{cols}; a position probe on one image needs at least {MIN_PROBE_GRID}x"
        f"{MIN_PROBE_GRID} patches to mean anything (use images of at least {side}x{side} pixels, e.g. size={side})"
    )


@torch.no_grad()
def render_comparison(
    model, pixel_values: torch.Tensor, image: Image.Image | None = None
) -> tuple[Image.Image, dict[str, float | None]]:
    """PCA panels of one (1, 3, H, W) image's patch features: raw, and RASA-debiased when the model has RASA
    weights, after the input image itself when given. Returns the figure and the probe R² per feature panel (None
    where the grid is too small to measure it, see `probe_grid_problem`)."""
    out = model(pixel_values)
    rows, cols = (side // model.config.patch_size for side in pixel_values.shape[-2:])
    panels = {"raw": out.patch_tokens[0].float().cpu()}
    if getattr(model, "has_rasa", False):
        panels["RASA-debiased"] = out.debiased_patch_tokens[0].float().cpu()
    problem = probe_grid_problem(rows, cols, model.config.patch_size)
    r2 = {name: None if problem else single_image_probe_r2(features, rows, cols) for name, features in panels.items()}
    height = PANEL_SIDE * rows // cols
    pictures = [("input", image.resize((PANEL_SIDE, height), Image.BICUBIC))] if image is not None else []
    for name, features in panels.items():
        caption = (
            f"{name}: position-probe R2 {r2[name]:.2f}" if r2[name] is not None else f"{name} (grid too small for R2)"
        )
        pictures.append((caption, pca_image(features, rows, cols).resize((PANEL_SIDE, height), Image.NEAREST)))
    margin, caption_height = 12, 40
    width = len(pictures) * PANEL_SIDE + (len(pictures) + 1) * margin
    canvas = Image.new("RGB", (width, height + 2 * margin + caption_height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(CAPTION_FONT_SIZE)
    for column, (caption, picture) in enumerate(pictures):
        left = margin + column * (PANEL_SIDE + margin)
        canvas.paste(picture, (left, margin))
        draw.text((left, margin + height + 6), caption, fill="black", font=font)
    return canvas, r2


def visualize(model, image_processor, image: Image.Image | str | Path, out_file: str | Path) -> dict[str, float | None]:
    """Write the figure for an image or image file (`read_image`): the processed input, then its PCA maps; returns the
    probe R² of each feature panel (None where the grid is too small, with a warning)."""
    if not isinstance(image, Image.Image):
        image = read_image(image)
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    shown = _as_picture(pixels[0], image_processor)
    problem = probe_grid_problem(
        *(side // model.config.patch_size for side in pixels.shape[-2:]), model.config.patch_size
    )
    if problem:
        logger.warning("No position-probe R²: %s.", problem)
    canvas, r2 = render_comparison(model, pixels.to(model.device, model.dtype), shown)
    write_file_atomically(out_file, lambda staging: canvas.save(staging, format=picture_format(out_file)))
    return r2


@dataclass
class VisualizeResult:
    """What `visualize_image` wrote: the PNG, and the position-probe R² of each feature panel ("raw", and
    "RASA-debiased" for models with RASA weights; None where the patch grid is too small to measure it)."""

    out: Path
    r2: dict[str, float | None]


def visualize_image(settings: VisualizeSettings) -> VisualizeResult:
    """What `franca-hf visualize` does: load the model (with an image processor of `settings.size` when given) and
    write the figure of `settings.image` to `settings.out` (`visualize`)."""

    def check_size(config) -> None:  # before the weights are read
        patch = config.patch_size
        if settings.size is not None and settings.size < 2 * patch:
            raise UsageError(
                f"size={settings.size} gives a {settings.size // patch} x {settings.size // patch} patch grid (patch "
                f"{patch} px); the PCA maps need at least 2 x 2 patches: give size >= {2 * patch}.",
                setting="size",
            )

    model, processor = settings.model.load(check=check_size)
    if settings.size:
        processor = make_image_processor(settings.size)
    return VisualizeResult(Path(settings.out), visualize(model, processor, settings.image, settings.out))


def _as_picture(pixels: torch.Tensor, image_processor) -> Image.Image:
    """The model's (3, H, W) input as the RGB picture it sees (normalisation undone)."""
    mean = torch.tensor(getattr(image_processor, "image_mean", (0.0, 0.0, 0.0))).view(3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", (1.0, 1.0, 1.0))).view(3, 1, 1)
    rgb = (pixels.float() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb, "RGB")
