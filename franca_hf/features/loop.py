"""The one loop that runs a model over images, and the one call to the model for features.

`run_model(model, source, processor, forward)` reads any `ImageSource` through a DataLoader whose workers decode
and preprocess while the model runs, moves each batch to the model's device and dtype, calls `forward(model,
pixel_values)` under `torch.inference_mode()`, and yields `(positions, outputs)` per batch. Unreadable images are
skipped and recorded in a `SkipCounter` (logged once each); nothing else in the package decodes images for a model.

`embed_batch(model, pixel_values, ...)` is the only place that asks a model for features (extract, index, search,
k-NN all use it).
"""

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.sources import DECODE_ERRORS, ImageSource, SkipCounter
from ..modeling import normalized_prefix

Output = TypeVar("Output")


def default_num_workers() -> int:
    """DataLoader workers for decoding: all CPU cores but one (the model's), at most 8; 0 on a single core."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def input_device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a model takes its pixels: those of its first floating-point parameter (int8
    dynamically quantised models keep float32 embeddings and norms, so this holds for them too)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameter to infer its input device and dtype.")


def embed_batch(
    model,
    pixel_values: torch.Tensor,
    dim: int | None = None,
    dense: bool = False,
    debiased: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """Features of a batch of images (B, 3, H, W), already on the model's device and dtype.

    CLS: (B, dim) L2-normalised Matryoshka embedding (full width when `dim` is None). The full-width rows are the
    model's Matryoshka embedding, such that truncating one to m channels and renormalising gives its embedding at
    m (`FrancaModel.get_image_embeddings`: cut in the model's basis, prefix or fitted PCA). Another transformers
    model (a `Dinov2Model`, say) gives its `pooler_output` cut to `dim`, normalised. Dense (`dense=True`): (B, dim, h, w) final-normed patch maps, RASA-debiased
    with `debiased`.
    """
    if dense:
        return model.get_dense_features(pixel_values, debiased=debiased, dim=dim)
    if hasattr(model, "get_image_embeddings"):
        return model.get_image_embeddings(pixel_values, dim=dim, normalize=normalize)
    pooled = model(pixel_values).pooler_output
    width = dim or pooled.shape[-1]
    return normalized_prefix(pooled, width) if normalize else pooled[:, :width]


class PreprocessedImages(Dataset):
    """Item i: (position, pixel_values (3, H, W) or None, why the image could not be read or None) for the image at
    `positions[i]` of `source`. Runs in DataLoader workers."""

    def __init__(self, source: ImageSource, image_processor, positions: Sequence[int]):
        self.source, self.image_processor, self.positions = source, image_processor, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor | None, str | None]:
        position = self.positions[item]
        try:
            image = self.source.load(position)
        except DECODE_ERRORS as error:
            return position, None, f"{type(error).__name__}: {error}"
        return position, self.image_processor(image, return_tensors="pt")["pixel_values"][0], None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    readable = [(position, pixels) for position, pixels, _ in items if pixels is not None]
    failed = [(position, reason) for position, pixels, reason in items if pixels is None]
    pixels = torch.stack([p for _, p in readable]) if readable else None
    return [position for position, _ in readable], pixels, failed


def run_model(
    model: torch.nn.Module,
    source: ImageSource,
    image_processor,
    forward: Callable[[torch.nn.Module, torch.Tensor], Output],
    positions: Sequence[int] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    skips: SkipCounter | None = None,
    progress: bool = True,
    desc: str = "embed",
) -> Iterator[tuple[list[int], Output]]:
    """Yield `(positions, forward(model, pixel_values))` for batches of the readable images of `source`, in order.

    Args:
        forward: the per-batch model call, e.g. `lambda model, pixels: embed_batch(model, pixels, dim=64)`; gets
            pixels on the model's device and dtype, runs under `torch.inference_mode()` with the model in eval
            mode (its training mode is restored afterwards).
        positions: the images to run (indices into `source`); all of them when None.
        num_workers: DataLoader workers decoding and preprocessing; `default_num_workers()` when None, 0 decodes
            in this process.
        skips: records the unreadable images (by id, `source.describe`); a fresh one when None.
    """
    positions = range(len(source)) if positions is None else positions
    skips = SkipCounter() if skips is None else skips
    num_workers = default_num_workers() if num_workers is None else num_workers
    device, dtype = input_device_and_dtype(model)
    loader = DataLoader(
        PreprocessedImages(source, image_processor, positions),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(positions), desc=desc, unit="img", disable=not progress) as bar:
            for batch_positions, pixels, failed in loader:
                for position, reason in failed:
                    skips.record(source.describe(position), reason)
                bar.update(len(batch_positions) + len(failed))
                if pixels is None:
                    continue
                with torch.inference_mode():
                    outputs = forward(model, pixels.to(device, dtype, non_blocking=True))
                yield batch_positions, outputs
    finally:
        model.train(was_training)
