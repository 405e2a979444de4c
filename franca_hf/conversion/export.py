"""Writing a FrancaModel as a self-contained Hugging Face folder, atomically.

A folder holds `config.json` (with `auto_map` for AutoConfig, AutoModel and AutoBackbone), `model.safetensors`,
`preprocessor_config.json` (the authors' eval transform), the remote-code files `configuration_franca.py` and
`modeling_franca.py` copied from this package by transformers, and a model card `README.md`.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import BitImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..modeling import FrancaModel
from .model_card import render_model_card


def make_image_processor(crop_size: int = 224, resize_size: int | None = None) -> BitImageProcessor:
    """The authors' evaluation transform: resize the shorter side (bicubic), center crop, ImageNet mean/std.

    `resize_size` defaults to `crop_size * 256 / 224` (256 for 224-px crops).
    """
    resize_size = resize_size or round(crop_size * 256 / 224)
    return BitImageProcessor(
        size={"shortest_edge": resize_size},
        crop_size={"height": crop_size, "width": crop_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def write_atomically(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create folder `out_dir` by letting `fill` write into a hidden staging folder beside it, then renaming.

    A failure (or a kill) leaves no half-written `out_dir`; an existing one is only replaced with `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        fill(staging)
        _apply_umask(staging)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _apply_umask(folder: Path) -> None:
    """Give the staging folder (created 0700 by mkdtemp) and its files the permissions of ordinary new files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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
    return write_atomically(
        out_dir, lambda folder: fill_model_folder(folder, model, image_processor, card_text), overwrite=overwrite
    )
