"""Reading official Franca checkpoints and mapping their keys to FrancaModel.

Official layout (after stripping `module.` / `backbone.`): `cls_token`, `pos_embed`, `mask_token`,
`register_tokens`, `patch_embed.proj.*`, `norm.*` and per block `blocks.{i}.…` (flat) or `blocks.{chunk}.{i}.…`
(chunked, i global). RASA files hold `rasa_head.pre_pos_layers.{j}.weight` and `rasa_head.pos_pred.weight`.
"""

import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from ..modeling import FrancaConfig, preset_architecture

TRAINING_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
_BLOCK_KEY = re.compile(r"^blocks\.(?:(\d+)\.)?(\d+)\.(.+)$")

# official block suffix -> FrancaModel suffix (under encoder.layer.{i}.)
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attention.qkv.weight",
    "attn.qkv.bias": "attention.qkv.bias",
    "attn.proj.weight": "attention.proj.weight",
    "attn.proj.bias": "attention.proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.w12.weight": "mlp.w12.weight",
    "mlp.w12.bias": "mlp.w12.bias",
    "mlp.w3.weight": "mlp.w3.weight",
    "mlp.w3.bias": "mlp.w3.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


class CheckpointError(UsageError):
    """An official checkpoint that cannot be converted (unreadable, truncated, or with missing/unknown keys)."""


@dataclass
class ConversionReport:
    """What the key mapping did: converted tensors, skipped training heads, and the inferred architecture."""

    converted: int = 0
    skipped_heads: list[str] = field(default_factory=list)
    config_values: dict = field(default_factory=dict)


def load_torch_file(path: str | Path) -> dict:
    """`torch.load(path, weights_only=True)` on CPU with errors that say what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint {path} is a folder; give the checkpoint file in it (.pth). A folder with config.json is "
            "already an HF folder: load it as it is."
        )
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if not path.stat().st_size:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes); delete it and download it again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"Could not read {path} ({path.stat().st_size} bytes) as a torch checkpoint: {_first_line(error)}. "
            "The file is probably truncated or corrupt; delete it and download it again."
        ) from error
    except Exception as error:  # the unpickler raises a bare UnpicklingError for unsafe or damaged pickles
        raise CheckpointError(
            f"Could not safely load {path} with weights_only=True ({_first_line(error)}): it is not a torch "
            "checkpoint, or it holds Python objects besides tensors, which a safe load refuses."
        ) from error


def _first_line(error: Exception) -> str:
    """What stopped `torch.load`, in one line: the unpickler's own reason where torch wraps it in advice."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif not isinstance(error, pickle.UnpicklingError):
        text = f"{type(error).__name__}: {text}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the `module.` (DDP/FSDP) and `backbone.` (SSL meta-arch) prefixes wherever they lead a key."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "backbone.")):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def extract_teacher(checkpoint: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone state dict of an official file: `{"teacher": ...}`, `{"model": ...}` or a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a state dict.")
    for wrapper in ("teacher", "model", "state_dict"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict):
            checkpoint = checkpoint[wrapper]
            break
    state_dict = strip_prefixes(checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{source} is not a flat dict of tensors under 'teacher'.")
    return state_dict


def infer_config_values(
    state_dict: dict[str, torch.Tensor], num_heads: int | None = None, preset: str | None = None
) -> dict:
    """Architecture read off the weights: width, depth, FFN type, grid, registers, LayerScale.

    The head count cannot be read from weights: it is `hidden / 64` (every official preset) unless `preset`
    or `num_heads` says otherwise.
    """
    if "pos_embed" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        raise CheckpointError("Missing backbone keys: the checkpoint has no 'pos_embed' / 'patch_embed.proj.weight'.")
    hidden, channels, patch, _ = state_dict["patch_embed.proj.weight"].shape
    blocks = {int(m.group(2)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise CheckpointError("Missing backbone keys: the checkpoint has no 'blocks.*' tensors.")
    depth = max(blocks) + 1
    positions = state_dict["pos_embed"].shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(f"pos_embed has {positions} patch positions, which is not a square grid.")
    swiglu = any(k.endswith("mlp.w12.weight") for k in state_dict)
    first_block = _block_tensors(state_dict, 0)
    if swiglu:
        ffn_hidden = first_block["mlp.w3.weight"].shape[1]
    else:
        ffn_hidden = first_block["mlp.fc1.weight"].shape[0]
    values = {
        "hidden_size": hidden,
        "num_hidden_layers": depth,
        "num_attention_heads": hidden // 64 if hidden % 64 == 0 else 0,
        "patch_size": patch,
        "num_channels": channels,
        "position_grid_size": grid,
        "ffn_type": "swiglu" if swiglu else "mlp",
        "use_layerscale": "ls1.gamma" in first_block,
        "num_register_tokens": state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0,
        "qkv_bias": "attn.qkv.bias" in first_block,
        "proj_bias": "attn.proj.bias" in first_block,
        "ffn_bias": ("mlp.w12.bias" if swiglu else "mlp.fc1.bias") in first_block,
        "image_size": 224,
    }
    values["mlp_ratio"] = _mlp_ratio_for(hidden, ffn_hidden, swiglu)
    if preset is not None:
        try:
            preset_hidden, preset_depth, preset_heads = preset_architecture(preset)
        except ValueError as error:
            raise CheckpointError(str(error), setting="preset") from None
        if (preset_hidden, preset_depth) != (hidden, depth):
            raise CheckpointError(
                f"Preset {preset} is {preset_hidden} wide and {preset_depth} deep, but the weights are "
                f"{hidden} wide and {depth} deep."
            )
        values["num_attention_heads"] = preset_heads
    if num_heads is not None:
        values["num_attention_heads"] = num_heads
    if not values["num_attention_heads"]:
        raise CheckpointError(
            f"Cannot infer the head count of a {hidden}-wide model (official presets use heads of 64, and {hidden} "
            "is not a multiple of 64): set num_heads or preset.",
            setting="num_heads",
        )
    if hidden % values["num_attention_heads"]:
        raise CheckpointError(f"hidden size {hidden} is not divisible by {values['num_attention_heads']} heads.")
    return values


def _mlp_ratio_for(hidden: int, ffn_hidden: int, swiglu: bool) -> float:
    """The mlp_ratio that reproduces the stored FFN width (4 for every official model)."""
    ratio = 4.0 if swiglu else ffn_hidden / hidden
    probe = FrancaConfig(
        hidden_size=hidden, num_attention_heads=1, ffn_type="swiglu" if swiglu else "mlp", mlp_ratio=ratio
    )
    if probe.ffn_hidden_size != ffn_hidden:
        raise CheckpointError(
            f"FFN width {ffn_hidden} does not match a SwiGLU of mlp_ratio 4 for hidden size {hidden} "
            f"(expected {probe.ffn_hidden_size})."
        )
    return ratio


def _block_tensors(state_dict: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {m.group(3): v for k, v in state_dict.items() if (m := _BLOCK_KEY.match(k)) and int(m.group(2)) == index}


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], expected_keys: set[str]
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename an official backbone state dict to FrancaModel keys, accounting for every key.

    Args:
        state_dict: prefix-stripped official tensors (training heads allowed).
        expected_keys: the backbone keys of the target FrancaModel (RASA keys excluded).
    Raises:
        CheckpointError naming every unknown key and every missing backbone key.
    """
    report = ConversionReport()
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(TRAINING_HEAD_PREFIXES):
            report.skipped_heads.append(key)
            continue
        match = _BLOCK_KEY.match(key)
        if match and match.group(3) in _BLOCK_RENAMES:
            new_key = f"encoder.layer.{int(match.group(2))}.{_BLOCK_RENAMES[match.group(3)]}"
        elif key in _TOP_RENAMES:
            new_key = _TOP_RENAMES[key]
        else:
            unknown.append(key)
            continue
        if new_key in converted:
            raise CheckpointError(f"Two checkpoint keys map to {new_key}; the block layout is inconsistent.")
        converted[new_key] = value
    missing = sorted(expected_keys - converted.keys())
    extra = sorted(set(converted) - expected_keys)
    problems = []
    if unknown:
        problems.append(
            f"unknown keys (after unwrapping 'teacher'/'model'/'state_dict' and removing module./backbone. prefixes): {sorted(unknown)}"
        )
    if extra:
        problems.append(f"keys this architecture does not have: {extra}")
    if missing:
        problems.append(
            f"missing backbone keys (official name <- FrancaModel name): {_official_names(missing, state_dict)}"
        )
    if problems:
        raise CheckpointError("The checkpoint does not match a Franca backbone; " + "; ".join(problems))
    report.converted = len(converted)
    return converted, report


def _official_names(keys: list[str], state_dict: dict[str, torch.Tensor]) -> list[str]:
    """`"blocks.2.attn.proj.bias <- encoder.layer.2.attention.proj.bias"` for each FrancaModel key, in the block
    layout (flat, or `blocks.{chunk}.{i}`) of the checkpoint's other keys."""
    top = {new: old for old, new in _TOP_RENAMES.items()}
    block = {new: old for old, new in _BLOCK_RENAMES.items()}
    chunks = {int(m.group(2)): m.group(1) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    named = []
    for key in keys:
        layer = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key)
        if layer and layer.group(2) in block:
            index = int(layer.group(1))
            chunk = f"{chunks[index]}." if chunks.get(index) is not None else ""
            named.append(f"blocks.{chunk}{index}.{block[layer.group(2)]} <- {key}")
        else:
            named.append(f"{top.get(key, '?')} <- {key}")
    return named


def load_rasa_weights(path_or_state_dict: str | Path | dict, hidden_size: int | None = None) -> torch.Tensor:
    """Stack an official RASA head into (S, 2, D): `pre_pos_layers.0 .. n-1`, then `pos_pred` (training order)."""
    source = path_or_state_dict if isinstance(path_or_state_dict, dict) else load_torch_file(path_or_state_dict)
    if not isinstance(source, dict):
        raise CheckpointError(
            f"{path_or_state_dict} is not a RASA head: it holds a {type(source).__name__}, not a state dict of tensors."
        )
    if isinstance(source.get("state_dict"), dict):
        source = source["state_dict"]
    weights = {}
    for key, value in source.items():
        while key.startswith(("module.", "rasa_head.", "head.")):
            key = key.split(".", 1)[1]
        weights[key] = value
    if "pos_pred.weight" not in weights:
        raise CheckpointError(f"Not a RASA head: no 'rasa_head.pos_pred.weight' among {sorted(weights)[:5]}...")
    pre = sorted(int(k.split(".")[1]) for k in weights if re.fullmatch(r"pre_pos_layers\.\d+\.weight", k))
    if pre != list(range(len(pre))):
        raise CheckpointError(f"RASA pre_pos_layers must be numbered 0..n-1 without gaps, got {pre}.")
    unknown = sorted(set(weights) - {"pos_pred.weight"} - {f"pre_pos_layers.{j}.weight" for j in pre})
    if unknown:
        raise CheckpointError(f"Unknown keys in the RASA head: {unknown}.")
    ordered = [weights[f"pre_pos_layers.{j}.weight"] for j in pre] + [weights["pos_pred.weight"]]
    shapes = [tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__ for value in ordered]
    width = hidden_size or (shapes[-1][-1] if isinstance(shapes[-1], tuple) and shapes[-1] else "D")
    if any(shape != (2, width) for shape in shapes):
        raise CheckpointError(f"RASA weights must be (2, {width}) each (pre_pos_layers..., pos_pred); got {shapes}.")
    return torch.stack(ordered).float()
