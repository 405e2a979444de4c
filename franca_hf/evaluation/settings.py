"""What the evaluation commands take: `KnnSettings` (`franca_hf.evaluation.nearest_neighbours.knn`), `LinearSettings`
(`run_linear_evaluation`) and `SegmentationSettings` (`run_segmentation_evaluation`). Cheap to import (no torch),
so that the command line answers usage errors before loading anything."""

import os
from dataclasses import dataclass

from ..errors import UsageError, require_at_least
from ..features.settings import ModelSpec
from ..io import check_file_out, picture_format


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


# The official grid (`eval/linear.py` defaults), before scaling by batch size / 256.
LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
N_LAST_BLOCKS = (1, 4)
# The official C grid of `eval/log_regression.py`, 10 ** linspace(-6, 5, 45).
C_VALUES = tuple(10 ** (-6 + 11 * i / 44) for i in range(45))


@dataclass(frozen=True)
class LinearSettings:
    """Linear probing: the model, the sources, where to cache features, and the protocol (defaults: the official
    ones, except `epochs`, counted in passes over the training rows rather than in official 1250-iteration epochs).

    The classifier (or C) is chosen on `val` when given, else on `held_out` of the train rows (a fixed random part,
    as the official log regression does), and scored on `test`. `features_dir` keeps the probe rows of each split
    as extract shards (`franca_hf.features.extract_to_folder`; reused and resumed by later runs); in memory when None.
    `model` is what `run_linear_evaluation` loads (`evaluate_linear` takes a loaded model and ignores it).
    """

    model: ModelSpec | None = None
    train: str = "demo"
    test: str = "demo"
    val: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    val_split: str = "validation"
    held_out: float = 0.1
    max_images: int | None = None  # per split
    demo_num_images: int | None = None  # images per split of "demo"; None: `demo_split_size(split, max_images)`
    features_dir: str | None = None
    logistic: bool = False  # the log-regression variant instead of the grid of linear classifiers
    epochs: int = 10
    batch_size: int = 128
    learning_rates: tuple[float, ...] = LEARNING_RATES
    n_last_blocks: tuple[int, ...] = N_LAST_BLOCKS
    c_values: tuple[float, ...] = C_VALUES
    seed: int = 0
    embed_batch_size: int = 64
    num_workers: int | None = 0

    def __post_init__(self) -> None:
        require_at_least(1, max_images=self.max_images, epochs=self.epochs, batch_size=self.batch_size)
        require_at_least(1, embed_batch_size=self.embed_batch_size, demo_num_images=self.demo_num_images)
        require_at_least(0, num_workers=self.num_workers)
        if not 0 < self.held_out < 1:
            raise UsageError(f"held_out is a fraction of the train images; got {self.held_out}.", setting="held_out")
        if self.features_dir is not None and os.path.exists(self.features_dir) and not os.path.isdir(self.features_dir):
            raise UsageError(
                f"features_dir={self.features_dir} is a file; give a folder (created if missing).",
                setting="features_dir",
            )


@dataclass(frozen=True)
class SegmentationSettings:
    """The dense evaluation: the model, sources, probe training, clustering; `show` test images drawn with their
    predictions into the picture `figure` (none when 0; None: segmentation.png; its suffix names its format). `model`
    is what `run_segmentation_evaluation` loads (`evaluate_segmentation` takes a loaded model and ignores it)."""

    model: ModelSpec | None = None
    train: str = "demo"
    test: str = "demo"
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None
    mask_column: str | None = None
    num_classes: int | None = None  # None: the source's class names, else the largest train mask value + 1
    image_size: int | None = None  # None: the model's config.image_size
    max_images: int | None = None  # per split
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-2
    clusters: tuple[int, ...] | None = None  # None: (C, 3C)
    seed: int = 0
    embed_batch_size: int = 32
    num_workers: int | None = 0
    show: int = 0
    figure: str | None = None

    def __post_init__(self) -> None:
        if self.figure is not None and not self.show:
            raise UsageError(
                f"figure={self.figure} names where show draws its figure; set show (images drawn) too.", "figure"
            )
        if self.show:  # before the evaluation, which the figure comes after
            picture_format(self.figure_path, "figure")
            check_file_out(self.figure_path, "figure")
        require_at_least(1, num_classes=self.num_classes, image_size=self.image_size, max_images=self.max_images)
        require_at_least(1, epochs=self.epochs, batch_size=self.batch_size, embed_batch_size=self.embed_batch_size)
        require_at_least(0, num_workers=self.num_workers, show=self.show)
        for clusters in self.clusters or ():
            require_at_least(1, clusters=clusters)

    @property
    def figure_path(self) -> str:
        """Where `show` draws: `figure`, or segmentation.png."""
        return self.figure or "segmentation.png"
