"""How much absolute position patch tokens still encode: linear position probes (R² of a ridge-regularised linear
map from tokens to grid coordinates), fitted on some tokens and scored on others. Used by RASA training (per step,
on held-out images) and by `franca-hf visualize` (on one image)."""

import math

import torch
import torch.nn.functional as F

from ..modeling import orthonormalize_rasa_weights, remove_position_directions

# Below these, a held-out probe's R² says more about the few images it saw than about position (`probe_r2` fits on
# half of the images and scores on the other half): images held out, and fitted tokens per probe parameter (D + 1).
MIN_PROBE_IMAGES = 16
MIN_TOKENS_PER_PARAMETER = 2


def grid_coordinates(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 2) normalised (row / (rows - 1), col / (cols - 1)) of each patch, row-major."""
    r, c = torch.meshgrid(torch.arange(rows) / max(rows - 1, 1), torch.arange(cols) / max(cols - 1, 1), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], dim=1)


def linear_probe_r2(
    fit_x: torch.Tensor, fit_y: torch.Tensor, score_x: torch.Tensor, score_y: torch.Tensor, ridge: float = 1e-3
) -> float:
    """R² of a ridge-regularised linear (with bias) probe fitted on (fit_x (n, D), fit_y (n, 2)), scored on
    (score_x, score_y): 1 - SS_res / SS_tot averaged over the two coordinates (1: fully linearly decodable)."""

    def design(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)

    fit, score = design(fit_x), design(score_x)
    gram = fit.T @ fit + ridge * fit.shape[0] * torch.eye(fit.shape[1], dtype=fit.dtype)
    solution = torch.linalg.solve(gram, fit.T @ fit_y.double())
    residual = ((score @ solution - score_y.double()) ** 2).sum(0)
    total = ((score_y.double() - score_y.double().mean(0)) ** 2).sum(0)
    return float((1 - residual / total).mean())


def probe_r2(tokens: torch.Tensor, coords: torch.Tensor, ridge: float = 1e-3) -> float:
    """Held-out position-probe R²: fitted on the first half of the images, scored on the second.

    Args:
        tokens: (images, N, D) patch tokens; coords: (N, 2) their grid coordinates.
    """
    half = tokens.shape[0] // 2
    if half < 1:
        raise ValueError("The probe needs at least 2 images.")
    rest = tokens.shape[0] - half
    return linear_probe_r2(
        tokens[:half].reshape(-1, tokens.shape[-1]),
        coords.repeat(half, 1),
        tokens[half:].reshape(-1, tokens.shape[-1]),
        coords.repeat(rest, 1),
        ridge,
    )


def probe_sample_problem(images: int, tokens_per_image: int, width: int) -> str | None:
    """Why `probe_r2` on `images` images of `tokens_per_image` D=`width` patch tokens measures little, with the
    number of images that would do; None when there are enough."""
    per_parameter = (images // 2) * tokens_per_image / (width + 1)
    if images >= MIN_PROBE_IMAGES and per_parameter >= MIN_TOKENS_PER_PARAMETER:
        return None
    needed = max(MIN_PROBE_IMAGES, 2 * math.ceil(MIN_TOKENS_PER_PARAMETER * (width + 1) / tokens_per_image))
    return (
        f"{images} held-out images fit the probe on {images // 2} ({per_parameter:.1f} tokens per parameter of a "
        f"{width}-dim probe); to say much about position it needs {MIN_PROBE_IMAGES} images or more and "
        f"{MIN_TOKENS_PER_PARAMETER} fitted tokens per parameter: {needed} images here"
    )


def evaluate_chain(tokens: torch.Tensor, coords: torch.Tensor, weights: torch.Tensor | None) -> tuple[float, float]:
    """(probe R², mean cosine similarity to the raw tokens) after removing the directions of `weights`."""
    if weights is None or len(weights) == 0:
        return probe_r2(tokens, coords), 1.0
    debiased = remove_position_directions(tokens, orthonormalize_rasa_weights(weights))
    return probe_r2(debiased, coords), F.cosine_similarity(debiased, tokens, dim=-1).mean().item()
