"""Secateur: structured pruning of decoder LLMs from declarative recipes.

Public API: `prune`, `load_model`, `load_pruned`, `save_pruned`, `apply_keep`, `LayerKeep`,
`build_graph`. `prune` is imported on first use (PEP 562): it pulls in the whole pipeline, which
`import secateur` should not pay for.
"""

from typing import Any

from secateur.graph.adapters import adapter_for, register, supported_model_types
from secateur.graph.build import build_graph
from secateur.graph.keep import LayerKeep
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import load_pruned, save_pruned
from secateur.runtime.store.loader import load_model

__version__ = "0.1.0"

__all__ = [
    "LayerKeep",
    "prune",
    "__version__",
    "adapter_for",
    "apply_keep",
    "build_graph",
    "load_model",
    "load_pruned",
    "register",
    "save_pruned",
    "supported_model_types",
]


def __getattr__(name: str) -> Any:
    if name == "prune":
        from secateur.api import prune

        return prune
    raise AttributeError(f"module 'secateur' has no attribute {name!r}")
