"""AdamW parameter groups of the official DINOv2/Franca trainer, for FrancaModel and the Matryoshka heads.

Rules, by parameter name (wrapper prefixes such as `module.`, `_orig_mod.`, `_fsdp_wrapped_module.` are ignored):

* weight decay x0 for names ending in `bias`, containing `norm`, or naming a LayerScale (`lambda1` here, `gamma` in
  the official code); CLS/mask/register tokens and position embeddings DO get weight decay (official rule), and so
  does the weight-norm gain `weight_g` of the prototypes;
* lr x`patch_embed_lr_mult` (0.2) for names containing `patch_embed` (`embeddings.patch_embeddings.*`);
* layer-wise lr decay: multiplier decay ** (L + 1 - layer) with layer 0 for `embeddings.*`, i + 1 for
  `encoder.layer.{i}.*` and L + 1 for everything else (final norm, heads). 1.0 for Franca, 0.9 for DINOv2;
* names containing `last_layer` (the prototypes) follow the last-layer lr schedule (frozen at the start).

Parameters sharing (lr multiplier, wd multiplier, last-layer flag) are fused into one group.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

_WRAPPER_PREFIXES = re.compile(r"(?:^|\.)(?:module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")
_BLOCK = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings\.")
_LAYER_SCALE = re.compile(r"(?:^|\.)(?:lambda1|gamma)$")


@dataclass(frozen=True)
class ParamGroupSettings:
    """Multipliers of one parameter: lr = schedule lr * lr_multiplier, wd = schedule wd * wd_multiplier."""

    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def _clean_name(name: str) -> str:
    return _WRAPPER_PREFIXES.sub("", name).lstrip(".")


def count_blocks(names: Iterable[str]) -> int:
    """Number of transformer blocks L, from the `encoder.layer.{i}.` parameter names (0 when there are none)."""
    indices = {int(match.group(1)) for name in names if (match := _BLOCK.search(_clean_name(name)))}
    return max(indices) + 1 if indices else 0


def param_group_settings(
    name: str, num_blocks: int, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 0.2
) -> ParamGroupSettings:
    """The optimizer settings of the parameter called `name` in a model with `num_blocks` transformer blocks."""
    name = _clean_name(name)
    if block := _BLOCK.search(name):
        layer = int(block.group(1)) + 1
    elif _EMBEDDINGS.search(name):
        layer = 0
    else:
        layer = num_blocks + 1
    lr_multiplier = layerwise_decay ** (num_blocks + 1 - layer)
    if "patch_embed" in name:
        lr_multiplier *= patch_embed_lr_mult
    no_decay = name.endswith("bias") or "norm" in name or bool(_LAYER_SCALE.search(name))
    return ParamGroupSettings(lr_multiplier, 0.0 if no_decay else 1.0, "last_layer" in name)


def build_param_groups(model: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 0.2) -> list[dict]:
    """Fused AdamW parameter groups for every trainable parameter of `model`.

    `model` is typically the student: an `nn.ModuleDict` of the backbone and the heads (names
    `backbone.encoder.layer.3.…`, `dino_head.last_layers.0.weight_g`, …), or any module using FrancaModel names.
    Returns:
        dicts with "params", "lr_multiplier", "wd_multiplier", "is_last_layer" (extra keys are kept by torch
        optimizers); set "lr" and "weight_decay" with `apply_schedule` before each step.
    """
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    num_blocks = count_blocks(name for name, _ in named)
    groups: dict[ParamGroupSettings, list[torch.nn.Parameter]] = {}
    for name, param in named:
        groups.setdefault(param_group_settings(name, num_blocks, layerwise_decay, patch_embed_lr_mult), []).append(
            param
        )
    return [
        {
            "params": params,
            "lr_multiplier": settings.lr_multiplier,
            "wd_multiplier": settings.wd_multiplier,
            "is_last_layer": settings.is_last_layer,
        }
        for settings, params in groups.items()
    ]


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr: float) -> None:
    """Write this step's lr and weight decay into every group built by `build_param_groups`."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]


def clip_grad_norm_per_module(modules: Mapping[str, nn.Module], max_norm: float = 3.0) -> dict[str, torch.Tensor]:
    """Clip the gradients of each sub-module (backbone, each head) separately, as the official trainer.

    Returns each module's total gradient norm before clipping (tensors: no host synchronisation). FSDP2's DTensor
    gradients work as they are: each module's norm is reduced over the shards (tests/training/test_fsdp.py clips
    under FSDP2 and DDP with equal losses).
    """
    return {name: torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm) for name, module in modules.items()}
