"""What `franca_hf.matryoshka.fit_pca` (`franca-hf fit-pca`) takes: cheap to import (no torch), so that the command
line answers usage errors before loading anything."""

import os
from dataclasses import dataclass

from .errors import require_at_least
from .features.settings import ModelSpec


@dataclass(frozen=True)
class FitPcaSettings:
    """Fit a Matryoshka PCA truncation basis of `model` on the images of `data`, and write the model with it to `out`.

    Attributes:
        model: a Franca model (`ModelSpec`: folder, Hub id or release name, converted on first use).
        data: 'demo', an image folder (searched recursively), or `hf:<dataset>` (with `split`, `image_column`).
        out: the new model folder (a complete one; may be the model's own folder, with `overwrite`).
        max_images: fit on at most this many images (a fixed random subset); None: all of them.
        overwrite_basis: refit a model that already has a fitted basis; overwrite: replace an existing `out`.
        batch_size: images per forward pass; num_workers: DataLoader workers (None: CPU cores - 1, at most 8).
    """

    model: ModelSpec
    data: str
    out: str | os.PathLike
    max_images: int | None = None
    split: str = "train"
    image_column: str | None = None
    overwrite_basis: bool = False
    overwrite: bool = False
    batch_size: int = 32
    num_workers: int | None = None

    def __post_init__(self) -> None:
        require_at_least(1, batch_size=self.batch_size, max_images=self.max_images)
        require_at_least(0, num_workers=self.num_workers)
