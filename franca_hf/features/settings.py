"""Settings shared by the commands that run a model: cheap to import (no torch), so that the command line answers
usage errors before loading anything."""

from dataclasses import dataclass

from ..conversion.dtypes import WEIGHT_DTYPE_NAMES
from ..errors import UsageError


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
        if self.dtype not in WEIGHT_DTYPE_NAMES:
            raise UsageError(f"dtype={self.dtype!r} is not one of {list(WEIGHT_DTYPE_NAMES)}.", setting="dtype")
        if self.int8 and self.dtype != "float32":
            raise UsageError(f"int8 quantises a float32 model; got dtype={self.dtype}.", setting="int8")

    def load(self):
        """`(model, image_processor)`, the model in eval mode on its device (`load_model_and_processor`)."""
        from ..conversion.export import WEIGHT_DTYPES
        from .extract import load_model_and_processor

        return load_model_and_processor(
            self.name_or_path, device=self.device, dtype=WEIGHT_DTYPES[self.dtype], int8=self.int8
        )
