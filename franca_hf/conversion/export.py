"""Writing a FrancaModel as a self-contained Hugging Face folder, atomically.

A folder holds `config.json` (with `auto_map` for AutoConfig, AutoModel and AutoBackbone), `model.safetensors`,
`preprocessor_config.json` (the authors' eval transform), the remote-code files `configuration_franca.py` and
`modeling_franca.py` copied from this package by transformers, and a model card `README.md`.
"""

from pathlib import Path

import torch
from transformers import BitImageProcessor

from ..io import MODEL_FOLDER, write_folder_atomically
from ..modeling import FrancaModel
from ..modeling.image_processing_franca import make_image_processor
from .dtypes import WEIGHT_DTYPE_NAMES
from .model_card import render_model_card

# Torch dtypes by the names the command line and the converter accept.
WEIGHT_DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPE_NAMES}


def fill_model_folder(
    folder: Path,
    model: FrancaModel,
    image_processor: BitImageProcessor | None = None,
    card_text: str | None = None,
) -> None:
    """Write weights, config (with its auto_map: `FrancaPreTrainedModel.save_pretrained`), processor config, remote code
    and model card into `folder`."""
    # transformers 5 writes nothing from a process of rank > 0 once torch.distributed is initialised, while a node
    # other than rank 0's converts a release into its own cache from such a process: this process writes here
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(folder)
    finally:
        del model.should_save_on_this_rank
    (image_processor or make_image_processor(model.config.image_size)).save_pretrained(folder)
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
        out_dir, lambda folder: fill_model_folder(folder, model, image_processor, card_text), MODEL_FOLDER, overwrite
    )
