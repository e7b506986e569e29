"""Pruning methods, one module each (BlockPruner and SPRINT share one greedy engine).

Importing this package registers every method; see `registry` for the lookup and
docs/ADD_A_METHOD.md for adding one.
"""

from secateur.runtime.methods import blockpruner_sprint, bonsai, cfsp, fasp, flap  # noqa: F401
from secateur.runtime.methods.registry import Method, get_method, method_names, register_method

__all__ = ["Method", "get_method", "method_names", "register_method"]
