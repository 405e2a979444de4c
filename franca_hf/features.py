"""Feature extraction from image files: CLS embeddings (Matryoshka-truncated) or dense patch features.

Used by `franca-hf extract` and by the retrieval index. Unreadable images are reported and skipped, never fatal.
"""

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel

from .conversion.convert import resolve_model
from .io import write_file_atomically

logger = logging.getLogger(__name__)
# What opening a damaged, truncated, unsupported or absurdly large (decompression bomb) image file raises.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


@dataclass
class ExtractedFeatures:
    """Features of the images that could be read, in input order, and the ones that could not.

    Attributes:
        features: (n, d) embeddings, or (n, d, h, w) dense maps.
        paths: the n image paths, aligned with `features`.
        failed: (path, reason) for every skipped image.
    """

    features: torch.Tensor
    paths: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)


def collect_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted). Errors on missing inputs."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder.")
    if not paths:
        raise ValueError(f"No image files found in {[str(i) for i in inputs]} (suffixes: {sorted(IMAGE_SUFFIXES)}).")
    return paths


def read_images(paths: Sequence[Path], batch_size: int) -> Iterator[tuple[list[Path], list[Image.Image], list]]:
    """Yield (paths, RGB images, failures) batches of up to `batch_size` readable images."""
    batch_paths, batch_images, failures = [], [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                batch_images.append(image.convert("RGB"))
            batch_paths.append(path)
        except DECODE_ERRORS as error:
            logger.warning("Skipping unreadable image %s: %s", path, error)
            failures.append((str(path), f"{type(error).__name__}: {error}"))
        if len(batch_images) == batch_size:
            yield batch_paths, batch_images, failures
            batch_paths, batch_images, failures = [], [], []
    if batch_images or failures:
        yield batch_paths, batch_images, failures


@torch.inference_mode()
def extract_features(
    model,
    image_processor,
    paths: Sequence[str | Path],
    dim: int | None = None,
    dense: bool = False,
    debiased: bool = False,
    normalize: bool = True,
    batch_size: int = 32,
    progress: bool = True,
) -> ExtractedFeatures:
    """Embed image files with a FrancaModel on the model's device and dtype.

    Args:
        dim: Matryoshka prefix length (one of `model.config.matryoshka_dims`); full width when None.
        dense: return (n, d, h, w) patch feature maps instead of (n, d) CLS embeddings.
        debiased: with `dense`, remove the RASA position directions (the model needs RASA weights).
        normalize: L2-normalise CLS embeddings after truncation (ignored for dense maps).
    """
    if debiased and not dense:
        raise ValueError("debiased=True applies to dense patch features; pass dense=True as well.")
    if debiased and not getattr(model, "has_rasa", False):
        raise ValueError("This model has no RASA weights, so debiased features are unavailable.")
    model.eval()
    outputs, kept, failed = [], [], []
    paths = [Path(p) for p in paths]
    with tqdm(total=len(paths), desc="extract", unit="img", disable=not progress) as bar:
        for batch_paths, images, failures in read_images(paths, batch_size):
            failed.extend(failures)
            bar.update(len(batch_paths) + len(failures))
            if not images:
                continue
            pixels = image_processor(images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
            if dense:
                features = model.get_dense_features(pixels, debiased=debiased, dim=dim)
            else:
                features = model.get_image_embeddings(pixels, dim=dim, normalize=normalize)
            outputs.append(features.float().cpu())
            kept.extend(str(p) for p in batch_paths)
    if not outputs:
        raise ValueError(f"None of the {len(paths)} images could be read: {failed[:3]}...")
    return ExtractedFeatures(features=torch.cat(outputs), paths=kept, failed=failed)


def save_features(result: ExtractedFeatures, out_file: str | Path, metadata: dict | None = None) -> Path:
    """Write `features` to a safetensors file whose metadata holds the image paths (JSON), failures and settings."""
    header = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    header.update(paths=json.dumps(result.paths), failed=json.dumps(result.failed))
    tensors = {"features": result.features.contiguous()}
    return write_file_atomically(out_file, lambda staging: save_file(tensors, staging, metadata=header))


def load_model_and_processor(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None):
    """A FrancaModel and its image processor from a folder, a Hub id, or an official release name."""
    path = resolve_model(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    return model, AutoImageProcessor.from_pretrained(path)
