"""RASA directions for any ViT: read final-normed patch tokens, store and apply learned position directions.

FrancaModel keeps its directions as model weights (`debiased_patch_tokens`). For other backbones
(transformers' `Dinov2Model`, `Dinov2WithRegistersModel`), `franca-hf rasa` writes `rasa_directions.safetensors`,
and `RasaDirections` applies it:

```python
from transformers import AutoModel
from franca_hf.rasa import RasaDirections, patch_tokens

model = AutoModel.from_pretrained("facebook/dinov2-base")
directions = RasaDirections.load("runs/dinov2_rasa/rasa_directions.safetensors")
tokens, grid = patch_tokens(model, pixel_values)  # (B, N, D) final-normed patches, (rows, cols)
debiased = directions(tokens)                      # position directions removed
```
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import write_file_atomically
from ..modeling import FrancaModel, orthonormalize_rasa_weights, remove_position_directions

DIRECTIONS_FILE = "rasa_directions.safetensors"


def patch_tokens(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Final-normed patch tokens (B, N, D) of a FrancaModel or a transformers DINOv2 model (with or without
    registers), before any RASA step, and the (rows, cols) patch grid."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, FrancaModel) and model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(
            f"Unsupported backbone {type(model).__name__}: RASA works with FrancaModel, Dinov2Model and "
            "Dinov2WithRegistersModel."
        )
    patch = model.config.patch_size
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    if isinstance(model, FrancaModel):
        return model(pixel_values).patch_tokens, grid
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    return model(pixel_values=pixel_values).last_hidden_state[:, prefix:], grid


class RasaDirections:
    """A chain of RASA steps, each a (2, D) position predictor in training order; applied with the official
    per-step projection (see `franca_hf.modeling.remove_position_directions`)."""

    def __init__(self, weights: torch.Tensor, metadata: dict | None = None):
        if weights.ndim != 3 or weights.shape[1] != 2:
            raise ValueError(f"RASA weights must be (steps, 2, D), got {tuple(weights.shape)}.")
        self.weights = weights.float()
        self.basis = orthonormalize_rasa_weights(self.weights)
        self.metadata = metadata or {}

    def __len__(self) -> int:
        return self.weights.shape[0]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) tokens with every step's directions removed."""
        if tokens.shape[-1] != self.weights.shape[-1]:
            raise ValueError(f"Tokens have width {tokens.shape[-1]}, the directions {self.weights.shape[-1]}.")
        return remove_position_directions(tokens, self.basis)

    def save(self, path: str | Path) -> Path:
        """Write the weights and metadata (JSON) to a safetensors file, atomically."""
        tensors, header = {"weights": self.weights.contiguous()}, {"rasa": json.dumps(self.metadata)}
        return write_file_atomically(path, lambda staging: save_file(tensors, staging, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> "RasaDirections":
        path = Path(path)
        if path.is_dir():
            path = path / DIRECTIONS_FILE
        with safe_open(path, "pt") as handle:
            return cls(handle.get_tensor("weights"), json.loads((handle.metadata() or {}).get("rasa", "{}")))
