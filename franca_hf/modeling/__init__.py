"""Pure model code: the transformers configuration and model classes of Franca."""

from .configuration_franca import FRANCA_PRESETS, FrancaConfig, check_nested_dims, default_matryoshka_dims
from .modeling_franca import (
    FrancaBackbone,
    FrancaModel,
    FrancaModelOutput,
    FrancaPreTrainedModel,
    FrancaRASA,
    interpolate_position_table,
    orthonormalize_rasa_weights,
    remove_position_directions,
)

__all__ = [
    "FRANCA_PRESETS",
    "FrancaBackbone",
    "FrancaConfig",
    "FrancaModel",
    "FrancaModelOutput",
    "FrancaPreTrainedModel",
    "FrancaRASA",
    "check_nested_dims",
    "default_matryoshka_dims",
    "interpolate_position_table",
    "orthonormalize_rasa_weights",
    "remove_position_directions",
]
