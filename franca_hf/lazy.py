"""Package attributes imported when first read (PEP 562): importing a package costs nothing until one of its names
is used, so that `franca-hf --help` and the command line's usage errors come without importing torch."""

import importlib
from collections.abc import Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Callable, Callable]:
    """A package's `__getattr__` and `__dir__`: each name of `modules[submodule]` is read from
    `package.submodule`, which is imported then."""
    home = {name: submodule for submodule, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(home)

    return __getattr__, __dir__
