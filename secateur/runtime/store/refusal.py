"""Why plain transformers refuses a pruned folder it cannot load exactly, through every entry point.

Transformers re-initialises what it cannot place and only warns, so a folder with per-layer widths,
removed branches, added biases or narrow value heads would load as a different model. Each entry point
is closed separately:
- `AutoConfig` / `AutoModelForCausalLM` read `model_type`: config.json carries `NOT_PLAIN_TYPE`, whose
  text tells the user to call `secateur.load_pruned` (the real type is kept in `secateur_model_type`).
- Engines and pipelines pick a class by `architectures`: it names `SecateurPruned<Class>`, which no
  transformers class claims.
- Concrete classes (`LlamaForCausalLM.from_pretrained`) read neither. Per-layer widths are stored at
  their real sizes beside a config of dense sizes (a size mismatch, which transformers raises on); a
  removed branch has no tensors at all, so it leaves an empty `[hidden, 0]` tensor under its output
  projection (`branch_markers`) that raises the same size mismatch. Readers skip the markers.
A model `load_pruned` returns keeps all of this through `model.save_pretrained` (`refuse_plain_load`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.graph.groups import layer_shapes

NOT_PLAIN_TYPE = (
    "secateur-pruned-{base} (per-layer shapes plain transformers cannot load exactly: "
    "use secateur.load_pruned(path); see the Secateur README)"
)
REFUSED_ARCH_PREFIX = "SecateurPruned"  # no transformers class carries this name


def refused_architectures(names: list[str] | None) -> list[str]:
    """`architectures` no transformers class claims (pipelines and engines pick their class by it)."""
    return [n if n.startswith(REFUSED_ARCH_PREFIX) else REFUSED_ARCH_PREFIX + n for n in names or []]


def branch_markers(
    model: nn.Module, adapter: ModelAdapter, layers: list[int] | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """An empty `[hidden, 0]` tensor under the output projection of every removed branch that has
    no tensor there: a concrete transformers class then fails with a size mismatch instead of
    loading random weights for the branch (it only warns about missing tensors)."""
    dtype = dtype or next(model.parameters()).dtype
    out: dict[str, torch.Tensor] = {}
    for i in range(adapter.num_layers) if layers is None else layers:
        shapes = layer_shapes(model, adapter, i)
        have = set(adapter.layers(model)[i].state_dict())
        for skip, proj in (("skip_attention", adapter.o), ("skip_mlp", adapter.mlp_out)):
            if shapes[skip] and f"{proj}.weight" not in have:
                out[f"{adapter.layer_prefix(i)}.{proj}.weight"] = torch.empty(
                    adapter.hidden_size, 0, dtype=dtype
                )
    return out


def without_markers(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop `branch_markers` (empty tensors the model has no place for) from loaded weights."""
    return {k: v for k, v in state.items() if v.numel() or k in expected}


_REFUSING: dict[type, type] = {}


def _refusing_class(base: type) -> type:
    """A subclass of config class `base` that serialises the refused model_type (and keeps the real
    one in `secateur_model_type`); in memory its model_type stays the real one, for PEFT and others."""
    if getattr(base, "secateur_refuses_plain_load", False):
        return base
    if base not in _REFUSING:

        def to_dict(self: Any) -> dict[str, Any]:
            out = base.to_dict(self)
            out["secateur_model_type"] = base.model_type
            out["model_type"] = NOT_PLAIN_TYPE.format(base=base.model_type)
            out["architectures"] = refused_architectures(out.get("architectures"))
            return out

        name = f"SecateurPruned{base.__name__}"
        cls = type(
            name, (base,), {"to_dict": to_dict, "secateur_refuses_plain_load": True, "__module__": __name__}
        )
        globals()[name] = cls  # found by name, so such configs pickle
        _REFUSING[base] = cls
    return _REFUSING[base]


def _save_with_branch_markers(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """`save_pretrained` that also writes `branch_markers`, so concrete classes refuse the folder."""
    if kwargs.get("state_dict") is None:
        kwargs["state_dict"] = {**self.state_dict(), **branch_markers(self, adapter_for(self.config))}
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


_save_with_branch_markers.__name__ = "save_pretrained"  # a pickled model resolves the class's own


def refuse_plain_load(model: nn.Module) -> None:
    """Make `model.save_pretrained` write a folder plain transformers refuses (for models it could
    not load exactly): a refused config, and the branch markers; nothing changes in memory."""
    model.config.__class__ = _refusing_class(type(model.config))
    if branch_markers(model, adapter_for(model.config)):
        model.save_pretrained = types.MethodType(_save_with_branch_markers, model)
