"""Coupled groups: which slices of which parameters one prunable unit owns.

A unit (an MLP channel, a KV group, a query head) owns a contiguous block of `width`
indices along one axis of every site it touches. Surgery, scoring and parameter counting
all read these sites, so coupling knowledge lives here once, derived from the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .adapters import ModelAdapter

UNIT_KINDS = (
    "mlp_channel",
    "kv_group",
    "q_head",
    "v_channel",
    "attn_sublayer",
    "mlp_sublayer",
    "block",
    "residual",
)


@dataclass(frozen=True)
class Site:
    """One (module, parameter, axis) slot; unit u owns indices [u*width, (u+1)*width).

    With `fanout` > 1 a unit owns one index in each of `fanout` consecutive blocks of `block`
    indices (a value channel c of KV group g touches column c of every query head of g):
    unit u = g*block + c owns g*block*fanout + c + j*block for j < fanout.
    """

    module: str
    param: str
    axis: int
    width: int
    block: int = 0
    fanout: int = 1

    def indices(self, unit: int) -> range | list[int]:
        if self.fanout == 1:
            return range(unit * self.width, (unit + 1) * self.width)
        g, c = divmod(unit, self.block)
        return [g * self.block * self.fanout + c + j * self.block for j in range(self.fanout)]

    @property
    def per_unit(self) -> int:
        """Indices one unit owns along the axis."""
        return self.width * self.fanout


@dataclass
class Group:
    """A coupled set of units in one layer (or the whole model for the residual stream)."""

    name: str
    kind: str
    layer: int | None
    n_units: int
    sites: tuple[Site, ...]
    params_per_unit: int
    # units must be kept in equal numbers per partition (q heads per KV group under GQA)
    partitions: int = 1
    # modules touched but never sliced by this unit kind (shared head_dim norms)
    shared: tuple[str, ...] = field(default_factory=tuple)

    @property
    def params(self) -> int:
        return self.n_units * self.params_per_unit


SKIPPED_MARKER = "secateur_skipped"  # class attribute of the modules that stand in for removed branches


def is_skipped(module: nn.Module) -> bool:
    """Whether `module` stands in for a removed attention or MLP branch."""
    return bool(getattr(module, SKIPPED_MARKER, False))


def has_submodule(model: nn.Module, path: str) -> bool:
    """Whether `path` names a submodule (sublayers may have been removed)."""
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _sites(model: nn.Module, specs: list[tuple]) -> tuple[Site, ...]:
    """Weight sites plus the bias site of every row-sliced linear that has a bias.

    A spec is (module, axis, width) or (module, axis, width, block, fanout)."""
    out: list[Site] = []
    for module, axis, width, *strided in specs:
        out.append(Site(module, "weight", axis, width, *strided))
        if axis == 0 and getattr(model.get_submodule(module), "bias", None) is not None:
            out.append(Site(module, "bias", 0, width, *strided))
    return tuple(out)


def _count(model: nn.Module, sites: tuple[Site, ...]) -> int:
    """Parameters owned by one unit across its sites."""
    total = 0
    for s in sites:
        t = getattr(model.get_submodule(s.module), s.param)
        other = t.numel() // t.shape[s.axis] if t.dim() > 1 else 1
        total += other * s.per_unit
    return total


def layer_shapes(model: nn.Module, adapter: ModelAdapter, i: int) -> dict[str, int | bool]:
    """Current shapes of layer i, read from the modules themselves (they may differ per layer)."""
    p = adapter.layer_prefix(i)
    attn = model.get_submodule(f"{p}.{adapter.attn}")
    skipped_attn = bool(is_skipped(attn))
    d = adapter.head_dim
    if skipped_attn:
        n_q = n_kv = 0
        dv = d
    else:
        q = model.get_submodule(f"{p}.{adapter.q}")
        k = model.get_submodule(f"{p}.{adapter.k}")
        v = model.get_submodule(f"{p}.{adapter.v}")
        n_q = q.out_features // d
        n_kv = k.out_features // d
        dv = v.out_features // n_kv if n_kv else d
    skipped_mlp = False
    if adapter.mlp_module is not None:
        skipped_mlp = bool(is_skipped(model.get_submodule(f"{p}.{adapter.mlp_module}")))
    n_mlp = 0 if skipped_mlp else model.get_submodule(f"{p}.{adapter.mlp_out}").in_features
    if not skipped_mlp and n_mlp == 0:
        skipped_mlp = True
    return {
        "num_heads": n_q,
        "num_kv_heads": n_kv,
        "head_dim": d,
        "v_head_dim": dv,
        "intermediate_size": n_mlp,
        "skip_attention": skipped_attn,
        "skip_mlp": skipped_mlp,
    }


def layer_groups(model: nn.Module, adapter: ModelAdapter, i: int) -> list[Group]:
    """The coupled groups of decoder layer i at its current shapes."""
    p = adapter.layer_prefix(i)
    sh = layer_shapes(model, adapter, i)
    groups: list[Group] = []
    if not sh["skip_mlp"]:
        sites = _sites(
            model, [(f"{p}.{m}", 0, 1) for m in adapter.mlp_in] + [(f"{p}.{adapter.mlp_out}", 1, 1)]
        )
        groups.append(
            Group(
                f"layers.{i}.mlp", "mlp_channel", i, int(sh["intermediate_size"]), sites, _count(model, sites)
            )
        )
    if not sh["skip_attention"]:
        n_q, n_kv, d, dv = (int(sh[k]) for k in ("num_heads", "num_kv_heads", "head_dim", "v_head_dim"))
        r = n_q // n_kv
        shared = tuple(f"{p}.{n}" for n in adapter.head_norms if has_submodule(model, f"{p}.{n}"))
        kv_sites = _sites(
            model,
            [
                (f"{p}.{adapter.q}", 0, r * d),
                (f"{p}.{adapter.k}", 0, d),
                (f"{p}.{adapter.v}", 0, dv),
                (f"{p}.{adapter.o}", 1, r * dv),
            ],
        )
        groups.append(
            Group(
                f"layers.{i}.attn.kv", "kv_group", i, n_kv, kv_sites, _count(model, kv_sites), shared=shared
            )
        )
        q_sites = _sites(model, [(f"{p}.{adapter.q}", 0, d), (f"{p}.{adapter.o}", 1, dv)])
        groups.append(
            Group(
                f"layers.{i}.attn.q",
                "q_head",
                i,
                n_q,
                q_sites,
                _count(model, q_sites),
                partitions=n_kv,
                shared=shared,
            )
        )
        v_sites = _sites(model, [(f"{p}.{adapter.v}", 0, 1), (f"{p}.{adapter.o}", 1, 1, dv, r)])
        groups.append(
            Group(
                f"layers.{i}.attn.v",
                "v_channel",
                i,
                n_kv * dv,
                v_sites,
                _count(model, v_sites),
                partitions=n_kv,
                shared=shared,
            )
        )
    return groups


def sublayer_groups(model: nn.Module, adapter: ModelAdapter, i: int) -> list[Group]:
    """Whole residual branches and the block of layer i, each a single unit."""
    p = adapter.layer_prefix(i)
    sh = layer_shapes(model, adapter, i)
    layer = adapter.layers(model)[i]
    out: list[Group] = []
    attn_params = (
        0 if sh["skip_attention"] else sum(t.numel() for t in layer.get_submodule(adapter.attn).parameters())
    )
    attn_params += sum(
        w.numel()
        for n in adapter.attn_branch_norms
        if has_submodule(layer, n) and (w := getattr(layer.get_submodule(n), "weight", None)) is not None
    )
    mlp_params = 0
    if not sh["skip_mlp"]:
        mlp_params = sum(
            t.numel() for m in (*adapter.mlp_in, adapter.mlp_out) for t in layer.get_submodule(m).parameters()
        )
        mlp_params += sum(
            w.numel()
            for n in adapter.mlp_branch_norms
            if has_submodule(layer, n) and (w := getattr(layer.get_submodule(n), "weight", None)) is not None
        )
    if not sh["skip_attention"]:
        out.append(Group(f"layers.{i}.attn", "attn_sublayer", i, 1, (), attn_params))
    if not sh["skip_mlp"]:
        out.append(Group(f"layers.{i}.mlp_branch", "mlp_sublayer", i, 1, (), mlp_params))
    out.append(Group(f"layers.{i}", "block", i, 1, (), sum(t.numel() for t in layer.parameters())))
    del p
    return out


def residual_group(model: nn.Module, adapter: ModelAdapter) -> Group:
    """The hidden-size dimension: every site that reads or writes the residual stream."""
    specs: list[Site] = [Site(adapter.embed_path, "weight", 1, 1)]
    for i in range(adapter.num_layers):
        p = adapter.layer_prefix(i)
        sh = layer_shapes(model, adapter, i)
        if not sh["skip_attention"]:
            specs += [Site(f"{p}.{m}", "weight", 1, 1) for m in (adapter.q, adapter.k, adapter.v)]
            specs += list(_sites(model, [(f"{p}.{adapter.o}", 0, 1)]))
        if not sh["skip_mlp"]:
            specs += [Site(f"{p}.{m}", "weight", 1, 1) for m in adapter.mlp_in]
            specs += list(_sites(model, [(f"{p}.{adapter.mlp_out}", 0, 1)]))
        for name, mod in adapter.layers(model)[i].named_modules():
            if name and "norm" in type(mod).__name__.lower() and name.count(".") == 0:
                specs += [Site(f"{p}.{name}", pn, 0, 1) for pn, _ in mod.named_parameters(recurse=False)]
    fn = model.get_submodule(adapter.final_norm_path)
    specs += [Site(adapter.final_norm_path, pn, 0, 1) for pn, _ in fn.named_parameters(recurse=False)]
    lm = model.get_submodule(adapter.lm_head_path)
    if lm.weight is not model.get_submodule(adapter.embed_path).weight:
        specs.append(Site(adapter.lm_head_path, "weight", 1, 1))
    sites = tuple(specs)
    return Group("residual", "residual", None, adapter.hidden_size, sites, _count(model, sites))


def all_groups(model: nn.Module, adapter: ModelAdapter) -> list[Group]:
    """Every group of the model: per-layer units, sublayers, blocks and the residual width."""
    out: list[Group] = []
    for i in range(adapter.num_layers):
        out += layer_groups(model, adapter, i)
        out += sublayer_groups(model, adapter, i)
    out.append(residual_group(model, adapter))
    return out
