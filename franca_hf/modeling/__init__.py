"""Pure model code: the transformers configuration and model classes of Franca."""

from .configuration_franca import (
    FRANCA_PRESETS,
    FrancaConfig,
    FrancaPreset,
    check_nested_dims,
    default_matryoshka_dims,
    matryoshka_dim_problem,
    matryoshka_dims_of,
    preset_architecture,
)
from .modeling_franca import (
    FrancaBackbone,
    FrancaModel,
    FrancaModelOutput,
    FrancaPreTrainedModel,
    FrancaRASA,
    interpolate_position_table,
    normalized_prefix,
    orthonormalize_rasa_weights,
    remove_position_directions,
)

__all__ = [
    "FRANCA_PRESETS",
    "FrancaPreset",
    "preset_architecture",
    "FrancaBackbone",
    "FrancaConfig",
    "FrancaModel",
    "FrancaModelOutput",
    "FrancaPreTrainedModel",
    "FrancaRASA",
    "check_nested_dims",
    "default_matryoshka_dims",
    "interpolate_position_table",
    "matryoshka_dim_problem",
    "matryoshka_dims_of",
    "normalized_prefix",
    "orthonormalize_rasa_weights",
    "remove_position_directions",
]


def _register_with_auto_classes() -> None:
    """The "franca" model type for `AutoConfig`, `AutoModel` and `AutoBackbone`, and the classes' remote code."""
    from transformers import AutoBackbone, AutoConfig, AutoModel

    AutoConfig.register(FrancaConfig.model_type, FrancaConfig, exist_ok=True)
    AutoModel.register(FrancaConfig, FrancaModel, exist_ok=True)
    AutoBackbone.register(FrancaConfig, FrancaBackbone, exist_ok=True)
    FrancaConfig.register_for_auto_class("AutoConfig")
    FrancaModel.register_for_auto_class("AutoModel")
    FrancaBackbone.register_for_auto_class("AutoBackbone")


_register_with_auto_classes()
