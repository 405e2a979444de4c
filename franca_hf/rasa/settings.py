"""The settings of RASA post-training (`franca_hf.rasa.train`, `franca-hf rasa key=value ...`): cheap to import, for
the command line's help and usage errors before torch loads."""

import dataclasses
from dataclasses import dataclass, field

from omegaconf import MISSING

from ..errors import UsageError, require_at_least


@dataclass
class RasaSettings:
    """Defaults follow the paper (Franca §2.3, see docs/rasa.md): 8 steps of 5 epochs, lr 2e-3 (the official config
    says 2e-4), batch 128, random resized crops (scale 0.25-1) with colour jitter, grayscale and blur, at the model's
    native resolution (`resolution=None`: its position table's, 518 px for the 518-px releases and DINOv2)."""

    steps: int = 8
    epochs: int = 5
    lr: float = 2e-3
    batch_size: int = 128
    resolution: int | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    jitter_probability: float = 0.8  # colour jitter (0.32, 0.32, 0.32, 0.08)
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5  # Gaussian blur, kernel 9, sigma 0.1-2
    held_out_images: int = 64
    max_images: int | None = None
    orthogonal: bool = True  # False: the official steps (see fit_position_predictor)
    num_workers: int = 2
    seed: int = 0

    def validate(self, patch_size: int | None = None) -> None:
        """Checks with messages that name the setting, its value and what is allowed; the resolution against the
        model's `patch_size` when given."""
        require_at_least(
            1, steps=self.steps, epochs=self.epochs, batch_size=self.batch_size, max_images=self.max_images
        )
        require_at_least(0, num_workers=self.num_workers)
        if not self.lr > 0:
            raise UsageError(f"lr must be positive; got {self.lr}.", setting="lr")
        if self.resolution is not None and self.resolution < 1:
            raise UsageError(
                f"resolution must be a positive number of pixels (or null: the model's native size); got "
                f"{self.resolution}.",
                setting="resolution",
            )
        if patch_size is not None and self.resolution is not None:
            if self.resolution % patch_size or self.resolution < 2 * patch_size:
                suggestion = max(2, round(self.resolution / patch_size)) * patch_size
                raise UsageError(
                    f"resolution={self.resolution} must be a multiple of the model's patch size ({patch_size}) of at "
                    f"least 2 patches, e.g. resolution={suggestion}.",
                    setting="resolution",
                )
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise UsageError(
                f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}.",
                setting="crop_scale",
            )
        for name in ("jitter_probability", "grayscale_probability", "blur_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)}.", setting=name)
        if self.held_out_images < 4:
            raise UsageError(
                f"held_out_images must be >= 4 (two halves for the position probe), got {self.held_out_images}.",
                setting="held_out_images",
            )

    def for_model(self, config) -> "RasaSettings":
        """These settings with the resolution resolved for a model config and checked against its patch size: the
        native size of a FrancaConfig's position table, or the config's `image_size` (DINOv2: 518)."""
        native = getattr(config, "position_grid_size", None)
        native_size = native * config.patch_size if native else config.image_size
        resolution = native_size if self.resolution is None else self.resolution
        resolved = dataclasses.replace(self, resolution=resolution)
        resolved.validate(config.patch_size)
        return resolved


@dataclass
class RasaRunSettings(RasaSettings):
    """What `franca_hf.rasa.train.rasa` (`franca-hf rasa key=value ...`) takes: the model, the images and the output
    folder, with the training settings."""

    model: str = MISSING  # a Franca folder, Hub id or release name, or a DINOv2 model
    data: str = MISSING  # "demo", an image folder, or hf:<dataset>
    out: str = MISSING  # the output folder
    split: str = "train"
    overwrite: bool = False
