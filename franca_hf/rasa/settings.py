"""The settings of `franca-hf rasa` (`python -m franca_hf.cli rasa`) and their command-line arguments: cheap to
import, for the command line's help and usage errors (the training itself: `franca_hf.rasa.train`)."""

import argparse
import dataclasses
from dataclasses import dataclass, field

from omegaconf import MISSING

from ..errors import UsageError

DESCRIPTION = """RASA post-training: learn the directions that carry absolute patch position and remove them, on a frozen ViT.

    franca-hf rasa model=runs/demo/teacher data=demo out=runs/demo/teacher_rasa steps=8
    accelerate launch -m franca_hf.cli rasa model=facebook/dinov2-base data=/voc out=dinov2_rasa

Step t trains a fresh bias-free Linear(D, 2) + sigmoid on the currently debiased final-normed patch tokens to regress
the normalised grid coordinates (row / (rows - 1), col / (cols - 1)) with MSE (AdamW without weight decay, cosine lr
to 0), then freezes it into the chain. After every step a fresh linear probe, fitted on half of the held-out images
and scored on the other half, gives the R² of position still linearly decodable; the mean cosine similarity between
raw and debiased tokens shows how much else changed. Progress is saved after every step; a rerun resumes.

Output: for a FrancaModel, an HF folder whose `debiased_patch_tokens` use the whole chain; for DINOv2 models, a
`rasa_directions.safetensors` file to use with `franca_hf.rasa.RasaDirections`.
"""


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
        for name in ("steps", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if patch_size is not None and self.resolution is not None:
            if self.resolution % patch_size or self.resolution < 2 * patch_size:
                suggestion = max(2, round(self.resolution / patch_size)) * patch_size
                raise UsageError(
                    f"resolution={self.resolution} must be a multiple of the model's patch size ({patch_size}) of at "
                    f"least 2 patches, e.g. resolution={suggestion}."
                )
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise UsageError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}.")
        for name in ("jitter_probability", "grayscale_probability", "blur_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.held_out_images < 4:
            raise UsageError(
                f"held_out_images must be >= 4 (two halves for the position probe), got {self.held_out_images}."
            )

    def for_model(self, config) -> "RasaSettings":
        """These settings with the resolution resolved for a model config and checked against its patch size: the
        native size of a FrancaConfig's position table, or the config's `image_size` (DINOv2: 518)."""
        native = getattr(config, "position_grid_size", None)
        resolution = self.resolution or (native * config.patch_size if native else config.image_size)
        resolved = dataclasses.replace(self, resolution=resolution)
        resolved.validate(config.patch_size)
        return resolved


@dataclass
class RasaRunSettings(RasaSettings):
    """`franca-hf rasa key=value ...`: the model, the images and the output folder, with the training settings."""

    model: str = MISSING  # a Franca folder, Hub id or release name, or a DINOv2 model
    data: str = MISSING  # "demo", an image folder, or hf:<dataset>
    out: str = MISSING  # the output folder
    split: str = "train"
    overwrite: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `franca-hf rasa` (and `python -m franca_hf.cli rasa`)."""
    parser.epilog = (
        "Settings (key=value): "
        + ", ".join(f.name for f in dataclasses.fields(RasaRunSettings))
        + ". model, data and out are required."
    )
    parser.add_argument("--config", help="a YAML file of settings (key: value), applied before the key=value ones")
    parser.add_argument("settings", nargs="*", help="key=value, e.g. model=runs/demo/teacher data=demo out=rasa")
