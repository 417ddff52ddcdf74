"""Training methods, one per file, each registered by name with `@register_method`.

Importing this package imports every method module, which is what registers them; the contract
test runs every registered method through one step, so a new file here is tested automatically.
"""

import importlib
import pkgutil

from pipeline.methods.base import METHODS, Method, find_method, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "find_method", "register_method"]
