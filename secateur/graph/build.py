"""The dependency graph: groups and the concrete parameter sites they touch, in networkx.

Nodes are either groups (`kind` = a unit kind) or sites (`module`, `param`, `axis`);
an edge says "a unit of this group owns `width` indices of that site". Two groups that
share a site are coupled through it (a KV group and a query head share q_proj rows).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import networkx as nx
from torch import nn

from .adapters import ModelAdapter
from .groups import Group, all_groups


def build_graph(model: nn.Module, adapter: ModelAdapter) -> nx.DiGraph:
    """Build the group -> site graph of a model at its current shapes."""
    if not isinstance(model, nn.Module) or not isinstance(adapter, ModelAdapter):
        raise TypeError(
            "build_graph(model, adapter) takes a loaded model and its adapter (lm = secateur.load_model(ref); "
            f"build_graph(lm.model, lm.adapter)), got {type(model).__name__} and {type(adapter).__name__}"
        )
    g = nx.DiGraph(model_type=adapter.config.model_type, num_layers=adapter.num_layers)
    for grp in all_groups(model, adapter):
        g.add_node(
            grp.name,
            type="group",
            kind=grp.kind,
            layer=grp.layer,
            n_units=grp.n_units,
            params_per_unit=grp.params_per_unit,
            partitions=grp.partitions,
            group=grp,
        )
        for s in grp.sites:
            node = f"{s.module}:{s.param}:{s.axis}"
            g.add_node(node, type="site", module=s.module, param=s.param, axis=s.axis)
            g.add_edge(grp.name, node, width=s.per_unit)
        for m in grp.shared:
            g.add_node(m, type="shared")
            g.add_edge(grp.name, m, width=0)
    return g


def groups_of(g: nx.DiGraph, kind: str | None = None, layer: int | None = None) -> list[Group]:
    """Groups in the graph, optionally filtered by kind and layer."""
    out = []
    for _, d in g.nodes(data=True):
        if d.get("type") != "group":
            continue
        if kind is not None and d["kind"] != kind:
            continue
        if layer is not None and d["layer"] != layer:
            continue
        out.append(d["group"])
    return out


def coupled(g: nx.DiGraph, group_name: str) -> set[str]:
    """Groups that share at least one sliced site with `group_name`."""
    out: set[str] = set()
    for site in g.successors(group_name):
        if g.nodes[site].get("type") != "site":
            continue
        out |= {p for p in g.predecessors(site) if p != group_name}
    return out


def summarize(g: nx.DiGraph, model: nn.Module) -> dict[str, Any]:
    """Per-kind summary: units per layer, parameters per unit, totals (for `secateur graph`)."""
    kinds: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"units_per_layer": {}, "params_per_unit": {}, "total_units": 0, "total_params": 0}
    )
    for grp in groups_of(g):
        k = kinds[grp.kind]
        key = "all" if grp.layer is None else str(grp.layer)
        k["units_per_layer"][key] = grp.n_units
        k["params_per_unit"][key] = grp.params_per_unit
        k["total_units"] += grp.n_units
        k["total_params"] += grp.params
    total = sum(p.numel() for p in model.parameters())
    return {
        "model_type": g.graph["model_type"],
        "num_layers": g.graph["num_layers"],
        "total_params": total,
        "kinds": dict(kinds),
        "coupling_examples": {
            name: sorted(coupled(g, name)) for name in ("layers.0.attn.kv", "layers.0.attn.q") if name in g
        },
    }
