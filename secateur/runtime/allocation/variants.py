"""The variant database: each structure of each layer pruned and restored at given kept counts, on disk.

A variant is one structure of one layer (its MLP channels, its KV groups or its query heads per
group) pruned to a kept count with the DENSE model's calibration statistics of that layer (one
shot, as EvoPress does): the kept unit indices and the restored consumer (down_proj / o_proj).
Variants of different layers do not depend on each other, so any allocation is assembled by
stitching stored variants into the dense model, with no pruning per candidate, and the compiled
model (`prune_stitched`) is the very model a search evaluated. Count 0 removes the whole branch.

One safetensors file per (layer, structure, count) lives under a folder named by a digest of
everything that shapes the variants (format, dense weights, calibration windows, metric,
restoration, damping, dtype, device type): when any of them changes the folder is another one,
so a stale variant is never read, and an unchanged setup reuses what earlier searches built.
Several processes may fill one folder at once: each file is built under its own file lock,
written to a temporary name and renamed into place. Each file carries the sha256 of its tensors in
its metadata, checked on every read: a truncated or edited file is rebuilt (with a warning naming
it), never stitched into a candidate.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_groups
from secateur.graph.keep import LayerKeep
from secateur.graph.plan import LayerPlan, Plan
from secateur.runtime.allocation.dense import dense_statistics
from secateur.runtime.allocation.stats_spill import StatsSpill
from secateur.runtime.prune.score import unit_scores
from secateur.runtime.prune.select import by_score, select_units
from secateur.runtime.prune.sequential import restore_layer, write_consumers
from secateur.runtime.prune.stats import InputStats
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.atomic import atomic_write_text, replacing
from secateur.runtime.store.fingerprint import ids_fingerprint, model_fingerprint, tensor_fingerprint
from secateur.runtime.store.leftovers import partial_file

FORMAT = 2  # 2: every file carries the sha256 of its tensors (format 1 folders are not read)
KINDS = ("mlp", "kv_groups", "q_per_group")  # the LayerPlan field each structure's count lives in
STATS_BATCH = 8  # batch size of the dense statistics pass (fixed: it shapes the float sums)

Weights = dict[str, tuple[torch.Tensor, torch.Tensor | None]]
VariantId = tuple[int, str, int]  # (layer, kind, kept count)


@dataclass
class LayerStats:
    """Dense statistics of one layer: consumer input statistics, unit scores and unit counts."""

    stats: dict[str, InputStats]  # consumer module name -> input statistics
    scores: dict[str, torch.Tensor]  # "mlp_channel" / "kv_group" / "q_head" -> one score per unit
    n_units: dict[str, int]


def layer_stats(
    model: nn.Module, adapter: ModelAdapter, i: int, stats: dict[str, InputStats], metric: str
) -> LayerStats:
    """Unit scores of layer i from its dense consumer statistics (computed on the weights it has now)."""
    p = adapter.layer_prefix(i)
    groups = {g.kind: g for g in layer_groups(model, adapter, i)}
    scores: dict[str, torch.Tensor] = {}
    mlp_name, o_name = f"{p}.{adapter.mlp_out}", f"{p}.{adapter.o}"
    if mlp_name in stats and "mlp_channel" in groups:
        scores["mlp_channel"] = unit_scores(model, groups["mlp_channel"], stats[mlp_name], metric).cpu()
    if o_name in stats and "kv_group" in groups:
        for kind in ("kv_group", "q_head"):
            scores[kind] = unit_scores(model, groups[kind], stats[o_name], metric).cpu()
    return LayerStats(dict(stats), scores, {k: g.n_units for k, g in groups.items()})


def dense_layer_stats(
    model: nn.Module,
    adapter: ModelAdapter,
    calib_ids: torch.Tensor,
    layers: list[int],
    mlp: bool,
    attention: bool,
    metric: str,
) -> tuple[dict[int, LayerStats], dict[int, float]]:
    """One dense calibration pass: every listed layer's statistics and scores, and block angular distances."""
    dense = dense_statistics(model, adapter, calib_ids, layers, mlp, attention, STATS_BATCH)
    out = {i: layer_stats(model, adapter, i, st, metric) for i, st in dense.stats.items()}
    return out, dense.angular


def variant_plan(kind: str, count: int) -> LayerPlan:
    """The one-structure plan of a variant; count 0 removes the whole branch."""
    if kind == "mlp":
        return LayerPlan(mlp=0, drop_mlp=True) if count == 0 else LayerPlan(mlp=count)
    if kind == "kv_groups":
        return LayerPlan(kv_groups=0, drop_attn=True) if count == 0 else LayerPlan(kv_groups=count)
    if kind == "q_per_group":
        if count == 0:
            raise ValueError("q_per_group: a variant keeps at least one query head per group")
        return LayerPlan(q_per_group=count)
    raise ValueError(f"variant kind {kind!r}: expected one of {', '.join(KINDS)}")


def plan_variants(plan: Plan) -> list[VariantId]:
    """The variants a plan is stitched from: one per pruned structure of every layer."""
    out: list[VariantId] = []
    for i, lp in sorted(plan.layers.items()):
        for kind in KINDS:
            count = getattr(lp, kind)
            if count is not None:
                out.append((i, kind, int(count)))
        if lp.v_per_group is not None:
            raise ValueError(f"layer {i}: value channels (v_per_group) have no stored variants")
    return out


@dataclass
class Variant:
    """One pruned structure of one layer: what to keep and the restored consumer weights."""

    keep: LayerKeep
    weights: Weights


def make_variant(
    model: nn.Module,
    adapter: ModelAdapter,
    i: int,
    ls: LayerStats,
    kind: str,
    count: int,
    restore: str,
    damping: float,
) -> Variant:
    """Select by the dense scores and restore from the dense statistics (layer i must be dense now)."""
    lk = select_units(variant_plan(kind, count), ls.n_units, by_score(lambda k: ls.scores[k]))
    weights, _ = restore_layer(model, adapter, i, lk, ls.stats, damping, restore, errors=False)
    return Variant(lk, {k: (w.detach().contiguous(), b) for k, (w, b) in weights.items()})


def merge_keeps(parts: Iterable[LayerKeep]) -> LayerKeep:
    """One layer's keep-set from its structures' variants (each sets only its own fields)."""
    out = LayerKeep()
    for lk in parts:
        for name, value in lk.__dict__.items():
            if value not in (None, False):
                setattr(out, name, value)
    return out


def stitch(
    model: nn.Module, adapter: ModelAdapter, variants: dict[int, list[Variant]]
) -> dict[int, LayerKeep]:
    """Swap the variants into the model (dense in those layers): slice, then write restored consumers."""
    keep: dict[int, LayerKeep] = {}
    for i, vs in sorted(variants.items()):
        lk = merge_keeps(v.keep for v in vs)
        if lk == LayerKeep():
            continue
        apply_keep(model, adapter, {i: lk})
        with torch.no_grad():
            for v in vs:
                write_consumers(model, v.weights)  # sliced tensors are fresh, never the dense ones
        keep[i] = lk
    return keep


_KEEP_FIELDS = ("mlp", "kv_heads", "q_heads", "v_channels")


def _to_tensors(v: Variant) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for name in _KEEP_FIELDS:
        idx = getattr(v.keep, name)
        if idx is not None:
            tensors[f"keep.{name}"] = torch.tensor(idx, dtype=torch.int64)
    for mod, (w, b) in v.weights.items():
        tensors[f"weight.{mod}"] = w.cpu().contiguous()
        if b is not None:
            tensors[f"bias.{mod}"] = b.detach().cpu().contiguous()
    meta = {
        "format": str(FORMAT),
        "drop_mlp": str(int(v.keep.drop_mlp)),
        "drop_attn": str(int(v.keep.drop_attn)),
    }
    meta["sha256"] = _checksum(tensors, meta)
    return tensors, meta


def _checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of a variant file's tensors and metadata: a changed or damaged file is never stitched."""
    fields = sorted((k, v) for k, v in meta.items() if k != "sha256")
    return tensor_fingerprint([*sorted(tensors.items()), ("meta", torch.tensor(list(str(fields).encode())))])


def _from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], device: torch.device) -> Variant:
    lk = LayerKeep(drop_mlp=meta.get("drop_mlp") == "1", drop_attn=meta.get("drop_attn") == "1")
    for name in _KEEP_FIELDS:
        if f"keep.{name}" in tensors:
            setattr(lk, name, [int(x) for x in tensors[f"keep.{name}"].tolist()])
    weights: Weights = {}
    for key, t in tensors.items():
        if key.startswith("weight."):
            mod = key[len("weight.") :]
            b = tensors.get(f"bias.{mod}")
            weights[mod] = (t.to(device), b.to(device) if b is not None else None)
    return Variant(lk, weights)


def default_variants_dir() -> Path:
    """$SECATEUR_VARIANTS, else $XDG_CACHE_HOME/secateur/variants, else ~/.cache/secateur/variants."""
    if os.environ.get("SECATEUR_VARIANTS"):
        return Path(os.environ["SECATEUR_VARIANTS"])
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "secateur" / "variants"


def store_key(
    model: nn.Module,
    calib_ids: torch.Tensor,
    metric: str,
    restore: str,
    damping: float,
    weights_fp: str | None = None,
) -> dict[str, object]:
    """Everything that shapes a variant; `weights_fp` saves re-hashing weights the caller already hashed."""
    p = next(model.parameters())
    return {
        "format": FORMAT,
        "model": weights_fp or model_fingerprint(model),
        "calibration": ids_fingerprint(calib_ids),
        "stats_batch": STATS_BATCH,
        "metric": metric,
        "restore": restore,
        "damping": float(damping),
        "dtype": str(p.dtype),
        "device": p.device.type,
        "torch": torch.__version__.split("+")[0],
    }


class VariantStore:
    """Variants on disk under `root/<digest of key>/`, with an in-memory LRU of `memo_mb`."""

    def __init__(self, root: str | os.PathLike[str], key: dict[str, object], memo_mb: int = 512) -> None:

        self.key = json.loads(json.dumps(key, sort_keys=True))
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root).expanduser().resolve() / digest
        self.memo_mb = memo_mb
        self._memo: OrderedDict[VariantId, Variant] = OrderedDict()
        self._memo_bytes = 0
        self.built = 0  # variants this process built (the rest were read or memoised)

    def _ensure_folder(self) -> None:
        if (self.folder / "key.json").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.key, indent=2, sort_keys=True) + "\n"
        atomic_write_text(self.folder / "key.json", text, tmp=self.folder / f"key.json.tmp.{os.getpid()}")

    def path(self, i: int, kind: str, count: int) -> Path:
        return self.folder / f"layer{i:03d}-{kind}-{count}.safetensors"

    def has(self, i: int, kind: str, count: int) -> bool:
        return (i, kind, count) in self._memo or self.path(i, kind, count).exists()

    def _remember(self, vid: VariantId, v: Variant) -> None:
        size = sum(
            t.numel() * t.element_size() for w, b in v.weights.values() for t in (w, b) if t is not None
        )
        if size > self.memo_mb * 2**20:
            return
        self._memo[vid] = v
        self._memo_bytes += size
        while self._memo_bytes > self.memo_mb * 2**20:
            _, old = self._memo.popitem(last=False)
            self._memo_bytes -= sum(
                t.numel() * t.element_size() for w, b in old.weights.values() for t in (w, b) if t is not None
            )

    def has_valid(self, i: int, kind: str, count: int) -> bool:
        """Whether variant (i, kind, count) is stored intact (read and checked; a damaged file is not)."""
        path = self.path(i, kind, count)
        if (i, kind, count) in self._memo:
            return True
        return path.exists() and self._read(path, torch.device("cpu"), warn=False) is not None

    def _read(self, path: Path, device: torch.device, warn: bool = True) -> Variant | None:
        """The stored variant, or None (with a warning naming the file) when it is damaged or changed."""

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own types for truncated or foreign files
            why = f"unreadable ({type(e).__name__}: {e})"
        else:
            if meta.get("sha256") == _checksum(tensors, meta):
                return _from_tensors(tensors, meta, device)
            why = "its checksum does not match its contents (changed since it was written)"
        if warn:
            warnings.warn(f"variant database: {path} is {why}; rebuilding it", stacklevel=3)
        return None

    def get(
        self,
        i: int,
        kind: str,
        count: int,
        build: Callable[[], Variant],
        device: torch.device | str = "cpu",
        remember: bool = True,
    ) -> Variant:
        """The stored variant, else `build()` it under the file's lock and store it (write, then rename);
        a damaged or changed file is rebuilt, never stitched. `remember`: keep it in the in-memory LRU
        (a build pass that only stores variants does not)."""
        vid = (i, kind, count)
        hit = self._memo.get(vid)
        if hit is not None:
            self._memo.move_to_end(vid)
            return hit
        path = self.path(*vid)
        dev = torch.device(device)
        v = self._read(path, dev) if path.exists() else None
        if v is None:
            self._ensure_folder()
            with FileLock(str(path) + ".lock", timeout=600):
                # another process may have built (or rebuilt) it while this one waited
                v = self._read(path, dev) if path.exists() else None
                if v is None:
                    v = build()
                    tensors, meta = _to_tensors(v)
                    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
                    # a killed run's is removed later
                    with partial_file(tmp, "variant database"), replacing(path, tmp):
                        save_file(tensors, str(tmp), metadata=meta)
                    self.built += 1
        if remember:
            self._remember(vid, v)
        return v


class VariantSource:
    """Variants of one dense model for a search's trials: read from the store, else built from the
    layer's dense statistics, read back from `spill` (`stats` holds each layer's unit scores only:
    `variant_build.build_variants` measured them and built the level variants in its one pass)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        store: VariantStore,
        stats: dict[int, LayerStats],
        spill: StatsSpill,
        restore: str,
        damping: float,
    ) -> None:
        self.model, self.adapter, self.store = model, adapter, store
        self.stats, self.spill, self.restore, self.damping = stats, spill, restore, damping

    def get(self, i: int, kind: str, count: int) -> Variant:
        """Variant (i, kind, count); layer i of the model must be dense when it has to be built."""

        dev = next(self.model.parameters()).device

        def build() -> Variant:
            kept = self.stats[i]
            ls = LayerStats(self.spill.get(i, dev), kept.scores, kept.n_units)
            return make_variant(self.model, self.adapter, i, ls, kind, count, self.restore, self.damping)

        return self.store.get(i, kind, count, build, dev)

    def variants_of(self, plan: Plan) -> dict[int, list[Variant]]:
        """Every variant `plan` is stitched from, grouped by layer (built where missing)."""
        out: dict[int, list[Variant]] = {}
        for i, kind, count in plan_variants(plan):
            out.setdefault(i, []).append(self.get(i, kind, count))
        return out
