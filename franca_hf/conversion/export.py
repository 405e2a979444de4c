"""Writing a FrancaModel as a self-contained Hugging Face folder, atomically.

A folder holds `config.json` (with `auto_map` for AutoConfig, AutoModel and AutoBackbone), `model.safetensors`,
`preprocessor_config.json` (the authors' eval transform), the remote-code files `configuration_franca.py` and
`modeling_franca.py` copied from this package by transformers, and a model card `README.md`.
"""

import json
from pathlib import Path

import torch
from transformers import BitImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..io import write_folder_atomically
from ..modeling import FrancaModel
from .dtypes import WEIGHT_DTYPE_NAMES
from .model_card import render_model_card

# Torch dtypes by the names the command line and the converter accept.
WEIGHT_DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPE_NAMES}
# Crops below this side (the demo's 32-px synthetic images) are not given the 256/224 border: it would cut several
# of their few pixels, and the images were drawn at the crop size.
SMALL_CROP = 64


def make_image_processor(crop_size: int = 224, resize_size: int | None = None) -> BitImageProcessor:
    """The authors' evaluation transform: resize the shorter side (bicubic), center crop, ImageNet mean/std.

    `resize_size` defaults to `crop_size * 256 / 224` (256 for 224-px crops), and to `crop_size` itself for crops
    under `SMALL_CROP` pixels.
    """
    resize_size = resize_size or (crop_size if crop_size < SMALL_CROP else round(crop_size * 256 / 224))
    return BitImageProcessor(
        size={"shortest_edge": resize_size},
        crop_size={"height": crop_size, "width": crop_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def fill_model_folder(
    folder: Path,
    model: FrancaModel,
    image_processor: BitImageProcessor | None = None,
    card_text: str | None = None,
) -> None:
    """Write weights, config (with auto_map), processor config, remote code and model card into `folder`."""
    model.save_pretrained(folder)
    (image_processor or make_image_processor(model.config.image_size)).save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("auto_map", {})["AutoBackbone"] = "modeling_franca.FrancaBackbone"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(card_text if card_text is not None else render_model_card(model.config))


def save_model_folder(
    model: FrancaModel,
    out_dir: str | Path,
    overwrite: bool = False,
    image_processor: BitImageProcessor | None = None,
    card_text: str | None = None,
) -> Path:
    """Save `model` as a self-contained HF folder at `out_dir`, atomically (see `fill_model_folder`)."""
    return write_folder_atomically(
        out_dir, lambda folder: fill_model_folder(folder, model, image_processor, card_text), overwrite=overwrite
    )
