"""What `franca_hf.visualize.visualize_image` (`franca-hf visualize`) takes: cheap to import (no torch), so that the
command line refuses a bad image file before loading anything."""

import os
from dataclasses import dataclass

from PIL import Image

from .data.sources import read_image
from .errors import require_at_least
from .features.settings import ModelSpec
from .io import check_file_out, picture_format


@dataclass(frozen=True)
class VisualizeSettings:
    """Draw `image` and the PCA maps of its patch features under `model` into the picture `out`.

    Attributes:
        image: an image file (decoded once here, a few milliseconds, so that a bad file is refused before the
            model loads) or a PIL image.
        out: the picture written, in the format its suffix names (.png, .jpg, .webp, ...).
        size: resize + center-crop side in pixels, at least 2 patches; None: the model's image processor.
    """

    image: str | os.PathLike | Image.Image
    out: str | os.PathLike
    model: ModelSpec
    size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, Image.Image):
            read_image(self.image)
        require_at_least(1, size=self.size)
        picture_format(self.out)
        check_file_out(self.out)
