"""What the evaluation commands take: `KnnSettings` (`franca_hf.evaluation.knn.knn`), `LinearSettings`
(`run_linear_evaluation`) and `SegmentationSettings` (`run_segmentation_evaluation`). Cheap to import (no torch),
so that the command line answers usage errors before loading anything."""

from dataclasses import dataclass

from ..errors import UsageError, require_at_least
from ..features.settings import ModelSpec


@dataclass(frozen=True)
class KnnSettings:
    """k-NN accuracy of `model`'s CLS features at each Matryoshka dim (`franca-hf knn`).

    Attributes:
        model: any transformers backbone whose pooler_output is its CLS embedding (`ModelSpec`).
        train, test: labelled images: 'demo', a class-per-folder tree, or `hf:<dataset>` (with the splits).
        dims: CLS widths to evaluate, cut in the model's basis; None: its Matryoshka dims, else its full width.
        k, temperature: the DINO vote (k neighbours weighted by exp(similarity / temperature)).
        max_images: at most this many images per split (a fixed random subset); None: all.
        crop_size: resize + center-crop side in pixels instead of the model's preprocessing.
        batch_size: images per forward pass; num_workers: DataLoader workers (None: CPU cores - 1, at most 8).
    """

    model: ModelSpec
    train: str
    test: str
    train_split: str = "train"
    test_split: str = "test"
    dims: tuple[int, ...] | None = None
    k: int = 20
    temperature: float = 0.07
    max_images: int | None = None
    crop_size: int | None = None
    batch_size: int = 64
    num_workers: int | None = None

    def __post_init__(self) -> None:
        require_at_least(1, k=self.k, max_images=self.max_images, crop_size=self.crop_size, batch_size=self.batch_size)
        require_at_least(0, num_workers=self.num_workers)
        if not self.temperature > 0:
            raise UsageError(f"temperature must be positive; got {self.temperature}.", setting="temperature")
