"""`franca-hf visualize`: the 3-component PCA map of patch features, raw next to RASA-debiased.

Each panel maps the first three principal components of one image's patch features to RGB. Under each panel: the
R² of a linear position probe, i.e. how much absolute position the features still encode. With a single image the
probe uses the 16 leading principal components, is fitted on a random half of the patches and scored on the other
half (ridge-regularised), so it measures generalisation, not memorisation.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .io import write_file_atomically
from .training.rasa import grid_coordinates, linear_probe_r2

PANEL_SIDE = 320
PROBE_COMPONENTS = 16


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


@torch.no_grad()
def render_comparison(model, pixel_values: torch.Tensor) -> tuple[Image.Image, dict[str, float]]:
    """Two PCA panels (raw, debiased) for one (1, 3, H, W) image and the probe R² of each."""
    if not getattr(model, "has_rasa", False):
        raise ValueError(
            "The comparison needs RASA weights; this model has none (convert with --rasa, or train "
            "them with `franca-hf rasa`)."
        )
    out = model(pixel_values)
    rows, cols = (side // model.config.patch_size for side in pixel_values.shape[-2:])
    panels = {
        "raw": out.patch_tokens[0].float().cpu(),
        "RASA-debiased": out.debiased_patch_tokens[0].float().cpu(),
    }
    r2 = {name: single_image_probe_r2(features, rows, cols) for name, features in panels.items()}
    margin, caption = 12, 40
    canvas = Image.new("RGB", (2 * PANEL_SIDE + 3 * margin, PANEL_SIDE + 2 * margin + caption), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (name, features) in enumerate(panels.items()):
        panel = pca_image(features, rows, cols).resize((PANEL_SIDE, PANEL_SIDE * rows // cols), Image.NEAREST)
        left = margin + column * (PANEL_SIDE + margin)
        canvas.paste(panel, (left, margin))
        draw.text((left, margin + PANEL_SIDE + 6), f"{name}: position-probe R2 {r2[name]:.2f}", fill="black")
    return canvas, r2


def visualize(model, image_processor, image_path: str | Path, out_file: str | Path) -> dict[str, float]:
    """Write the comparison PNG for an image file; returns the probe R² of the raw and debiased features."""
    with Image.open(image_path) as image:
        pixels = image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    canvas, r2 = render_comparison(model, pixels.to(model.device, model.dtype))
    write_file_atomically(out_file, lambda staging: canvas.save(staging, format="PNG"))
    return r2
