"""franca_hf: Franca vision foundation models in Hugging Face transformers.

Importing the package registers the "franca" model type with `AutoConfig`, `AutoModel` and `AutoBackbone`, and
marks the classes for remote code so that every folder saved with `save_pretrained` also works with
`trust_remote_code=True` where franca_hf is not installed. The registration (`franca_hf.modeling`) happens as soon as
transformers is imported, before or after this package, so that a process that never imports it, such as
`franca-hf --help`, does not pay for torch and transformers.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(
    __name__, {"modeling": ("FrancaBackbone", "FrancaConfig", "FrancaModel", "FrancaModelOutput")}
)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Imports `franca_hf.modeling` (which registers the classes) right after the module `transformers` runs."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenImportModeling(spec.loader)
        return spec


class _ThenImportModeling(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        # within an import of franca_hf.modeling itself this returns the partly run module, which registers at its end
        importlib.import_module(".modeling", __name__)


if "transformers" in sys.modules:
    importlib.import_module(".modeling", __name__)
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())

__all__ = ["FrancaBackbone", "FrancaConfig", "FrancaModel", "FrancaModelOutput", "__version__"]
