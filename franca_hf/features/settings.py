"""What the commands that run a model take: cheap to import (no torch), so that the command line answers usage
errors before loading anything. Messages name the settings (`batch_size`), never a command-line flag."""

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..conversion.dtypes import check_weight_dtype
from ..errors import UsageError, require_at_least

FEATURE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """Which model a command runs, and how: a model folder, Hub id or official release name (converted on first
    use); `device` (default: this process's accelerator, or the CPU); the weights' `dtype` (one of
    `WEIGHT_DTYPE_NAMES`); `int8` (CPU only: int8 dynamically quantised Linear layers of a float32 model)."""

    name_or_path: str
    device: str | None = None
    dtype: str = "float32"
    int8: bool = False

    def __post_init__(self) -> None:
        check_weight_dtype(self.dtype)
        if self.int8 and self.dtype != "float32":
            raise UsageError(f"int8 quantises a float32 model; got dtype={self.dtype}.", setting="int8")

    def load(self, check=None):
        """`(model, image_processor)`, the model in eval mode on its device (`load_model_and_processor`); `check`,
        given the model's config before its weights are read, raises on a request the model cannot serve."""
        from ..conversion.export import WEIGHT_DTYPES
        from .extraction import load_model_and_processor

        return load_model_and_processor(
            self.name_or_path, device=self.device, dtype=WEIGHT_DTYPES[self.dtype], int8=self.int8, check=check
        )


def check_dense_request(dense: bool, debiased: bool) -> None:
    """The one request of dense features that is wrong whatever the model: RASA-debiased CLS embeddings."""
    if debiased and not dense:
        raise UsageError("debiased applies to dense patch features; set dense as well.", setting="debiased")


@dataclass(frozen=True)
class ExtractSettings:
    """What `franca_hf.features.extract` (`franca-hf extract`) embeds, with which model, and where it writes.

    Attributes:
        images: image files and folders (searched recursively), or one `hf:<dataset>` spec (a saved folder or a Hub
            name; with `split` and `image_column`).
        out: the output folder: created, or resumed when it holds a partial extraction with the same settings.
        model: the model (`ModelSpec`).
        dim: Matryoshka width, cut in the model's basis (one of the model's `matryoshka_dims`); None: full width.
        dense: (D, h, w) patch feature maps instead of (D,) CLS embeddings; `debiased`: with `dense`, the RASA
            position directions removed (the model needs RASA weights).
        normalize: L2-normalise CLS embeddings after the cut (dense maps are never normalised).
        features_dtype: the stored float type, "float32" or "float16".
        batch_size: images per forward pass; num_workers: DataLoader workers decoding images (None: CPU cores - 1,
            at most 8); shard_size: rows per Parquet shard (None: up to 1024, at most 256 MiB).
        allow_other_model: resume a folder begun by a model with another fingerprint.
    """

    images: Sequence[str | os.PathLike]
    out: str | os.PathLike
    model: ModelSpec
    dim: int | None = None
    dense: bool = False
    debiased: bool = False
    normalize: bool = True
    features_dtype: str = "float32"
    split: str = "train"
    image_column: str | None = None
    batch_size: int = 32
    num_workers: int | None = None
    shard_size: int | None = None
    allow_other_model: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.images, (str, os.PathLike)) or not self.images:
            raise UsageError(f"images takes a list of image files, folders or one hf:<dataset>; got {self.images!r}.")
        if str(self.out).endswith(".safetensors"):
            raise UsageError(
                f"out={self.out} names a file; extract writes a folder (Parquet shards and an index) there.",
                setting="out",
            )
        if self.features_dtype not in FEATURE_DTYPES:
            raise UsageError(
                f"features_dtype={self.features_dtype!r} is not one of {list(FEATURE_DTYPES)}.",
                setting="features_dtype",
            )
        check_dense_request(self.dense, self.debiased)
        require_at_least(1, batch_size=self.batch_size, shard_size=self.shard_size)
        require_at_least(0, num_workers=self.num_workers)
