"""franca_hf: Franca vision foundation models in Hugging Face transformers.

Importing the package registers the "franca" model type with `AutoConfig`, `AutoModel` and `AutoBackbone`, and
marks the classes for remote code so that every folder saved with `save_pretrained` also works with
`trust_remote_code=True` where franca_hf is not installed.
"""

from transformers import AutoBackbone, AutoConfig, AutoModel

from .modeling import FrancaBackbone, FrancaConfig, FrancaModel, FrancaModelOutput

__version__ = "0.1.0"

AutoConfig.register(FrancaConfig.model_type, FrancaConfig, exist_ok=True)
AutoModel.register(FrancaConfig, FrancaModel, exist_ok=True)
AutoBackbone.register(FrancaConfig, FrancaBackbone, exist_ok=True)
FrancaConfig.register_for_auto_class("AutoConfig")
FrancaModel.register_for_auto_class("AutoModel")

__all__ = ["FrancaBackbone", "FrancaConfig", "FrancaModel", "FrancaModelOutput", "__version__"]
