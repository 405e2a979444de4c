"""What model made a set of embeddings: `model_fingerprint(model)`, a short hash of everything that decides a model's
outputs, stored with extract folders and retrieval indexes so that a run with another model is refused.

The fingerprint covers:

* the model class and its architecture: every field its config class declares (not the generic `PreTrainedConfig`
  fields nor `auto_map`), except those that never change an output (`OUTPUT_NEUTRAL_FIELDS`: provenance,
  training-only and initialisation settings, the processor's nominal image size);
* every tensor of `model.state_dict()` by name, shape and value: the weights, the RASA position directions and the
  fitted Matryoshka basis (mean and rotation) alike.

Values are hashed at bfloat16 precision, so the same weights held in float32 or bfloat16 (on any device) share one
fingerprint: an index built on a GPU in bfloat16 serves queries embedded on a CPU in float32. A float16 or int8 copy
rounds differently (float16 also has a narrower range), so it has a fingerprint of its own. Weights that change by
more than bfloat16 rounding, any change of shape, name or architecture, and any other basis change the fingerprint.

The preprocessing (the image processor) is not part of it. Tensors are hashed one at a time, so memory stays at one
tensor's copy, and the time is one cast and one SHA-256 pass over the weights (about 0.5 s per 100 million weights
on one CPU core: seconds for ViT-g).
"""

import hashlib
import json

import torch

from .errors import UsageError

FINGERPRINT_SCHEME = "v1"  # changes when what is hashed changes, so that old fingerprints are recognisable
OUTPUT_NEUTRAL_FIELDS = frozenset(
    {
        "source_checkpoint",  # provenance: release name, file hashes, the data a basis was fitted on
        "drop_path_rate",  # training only
        "drop_path_mode",
        "initializer_range",  # initialisation only
        "layerscale_value",
        "image_size",  # the processor's nominal crop: metadata, the model takes any size
    }
)


def _declared_fields(config_class: type) -> set[str]:
    """The fields a config class and its mixins declare below `PreTrainedConfig` (`_out_features` as
    `out_features`), not the generic ones every config has nor keys `save_pretrained` adds (`auto_map`)."""
    from transformers import PreTrainedConfig

    fields = set()
    for cls in config_class.__mro__:
        if cls is PreTrainedConfig:
            break
        fields.update(name.lstrip("_") for name in getattr(cls, "__annotations__", {}))
    return fields


def architecture(model: torch.nn.Module) -> dict:
    """The part of the fingerprint that is not weights: the model class, its model type and the config fields of
    that type that change outputs (JSON-ready)."""
    config = model.config.to_dict()
    names = _declared_fields(type(model.config)) - OUTPUT_NEUTRAL_FIELDS
    fields = {name: config[name] for name in sorted(names) if name in config}
    return {"class": type(model).__name__, "model_type": config.get("model_type"), "config": fields}


def _canonical(value) -> list[torch.Tensor]:
    """The tensors a state-dict entry holds, as hashed: floats (and dequantised int8 weights) rounded to bfloat16,
    on the CPU; the tuples of packed int8 Linear layers give their tensors."""
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _canonical(item)]
    if not isinstance(value, torch.Tensor):
        return []  # e.g. the torch.dtype a quantised layer records beside its tensors
    tensor = value.detach()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    if tensor.is_floating_point():
        tensor = tensor.to("cpu", torch.bfloat16)
    return [tensor.cpu().contiguous()]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A stable identifier of a model's outputs: `"v1:"` and 32 hex digits (128 bits of a SHA-256).

    Equal for the same architecture and weights (rounded to bfloat16) whatever the dtype the model is held in, its
    device, the folder it was loaded from or its provenance metadata; different when a weight, the RASA directions,
    the Matryoshka basis or an output-changing config field differs. See the module docstring.
    """
    digest = hashlib.sha256(json.dumps(architecture(model), sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        for tensor in _canonical(state[name]):
            digest.update(f"\n{name} {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}\n".encode())
            # bytes through an integer view: numpy has no bfloat16
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()[:32]}"


class ModelMismatchError(UsageError):
    """Stored embeddings were made by another model than the one given (their fingerprints differ)."""


def check_same_model(
    stored: str | None, current: str, what: str, stored_model: str, current_model: str, allow_other_model: bool
) -> None:
    """Raise `ModelMismatchError` unless `current` (this run's model fingerprint) equals `stored` (the one recorded
    with `what`, e.g. "The extract folder photos_features"), or `allow_other_model`. `stored_model` and `current_model`
    say where each came from (paths or names). Nothing to check when `stored` is None (recorded before fingerprints).
    """
    if stored is None or stored == current or allow_other_model:
        return
    change = (
        f"the model there, as this run holds it, has fingerprint {current}: its weights, basis or architecture "
        "changed since, or this run holds it at another precision"
        if stored_model == current_model
        else f"this run's model {current_model} has fingerprint {current}: other weights, basis, architecture or "
        "precision"
    )
    raise ModelMismatchError(
        f"{what} holds embeddings of the model {stored_model} (fingerprint {stored}); {change} (a float16 or int8 "
        "copy has a fingerprint of its own), and the embeddings of the two do not mix. Use the model that made them, "
        "or set allow_other_model=True to use this one anyway.",
        setting="allow_other_model",
    )
