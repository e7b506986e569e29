"""Pruning methods, one module each (BlockPruner and SPRINT share one greedy engine).

Importing this package imports every module in it, which registers every method against its
spec in recipe/methods.py; see `registry` for the lookup and docs/ADD_A_METHOD.md for adding one.
"""

import importlib
import pkgutil

from secateur.runtime.methods.registry import Method, get_method, method_names, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "get_method", "method_names", "register_method"]
