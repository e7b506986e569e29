"""SPRINT's latency table: seconds each attention / MLP branch of each layer costs on this device,
measured once per distinct layer shape and cached as JSON."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_shapes
from secateur.runtime.measure.timing import sync
from secateur.runtime.prune.branches import BRANCHES, Candidate, branch_params, without
from secateur.runtime.prune.capture import LayerInputs, capture_inputs, run_layer
from secateur.runtime.store.atomic import atomic_write_text

LATENCY_SEQLEN = 512


LATENCY_REPEATS = 5


LATENCY_FLOOR_S = 1e-6  # a branch never counts as saving less than this (noise guard)


LATENCY_FORMAT = 1


def _signature(model: nn.Module, adapter: ModelAdapter, i: int) -> str:
    """What a layer's latency depends on: its shapes and attention type (sliding or full)."""
    sh = dict(layer_shapes(model, adapter, i))
    types = getattr(model.config, "layer_types", None)
    sh["type"] = types[i] if types is not None and i < len(types) else "full_attention"
    if sh["type"] == "sliding_attention":
        sh["window"] = getattr(model.config, "sliding_window", None)
    return json.dumps(sh, sort_keys=True)


def _device_tag(dev: torch.device) -> str:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return dev.type


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/secateur, else ~/.cache/secateur."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "secateur"


@dataclass
class LatencyTable:
    """Seconds each branch of each layer costs on [1, seqlen] hidden states, and where it is cached."""

    per_layer: dict[int, dict[str, float]]
    path: Path
    cached: bool
    seconds: float
    seqlen: int

    def saved(self, cand: Candidate) -> float:
        return sum(self.per_layer[cand.layer].get(b, 0.0) for b in cand.branches)


def _measure(
    model: nn.Module, adapter: ModelAdapter, i: int, inputs: LayerInputs, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of layer i's attention and MLP branches: layer with one branch minus layer with none,
    variants timed alternately round by round."""
    present = tuple(b for b in BRANCHES if b in branch_params(model, adapter, i))
    layer = adapter.layers(model)[i]
    dev = inputs.hidden[0].device
    variants = {b: tuple(o for o in present if o != b) for b in present}  # keep b only
    variants["none"] = present
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(warmup + repeats):
        for name, drop in variants.items():
            with without(model, adapter, Candidate(i, drop)) if drop else nullcontext():
                sync(dev)
                t = time.perf_counter()
                run_layer(layer, inputs.hidden, inputs.kwargs[i])
                sync(dev)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t)
    base = statistics.median(times["none"])
    return {b: max(statistics.median(times[b]) - base, LATENCY_FLOOR_S) for b in present}


def latency_table(
    model: nn.Module,
    adapter: ModelAdapter,
    cache_dir: str | Path | None = None,
    seqlen: int = LATENCY_SEQLEN,
    repeats: int = LATENCY_REPEATS,
) -> LatencyTable:
    """Per-layer branch latencies, measured once per distinct layer shape on this device and cached
    as JSON (`cache_dir`, else ~/.cache/secateur) under latency-<model_type>-<device>-<shape hash>.json."""
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = min(seqlen, int(getattr(model.config, "max_position_embeddings", seqlen) or seqlen))
    sigs = {i: _signature(model, adapter, i) for i in range(adapter.num_layers)}
    keys = {s: hashlib.sha1(s.encode()).hexdigest()[:12] for s in set(sigs.values())}
    ident = {
        "hidden_size": adapter.hidden_size,
        "dtype": str(dtype).replace("torch.", ""),
        "seqlen": n,
        "device": _device_tag(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "layers": sorted(keys.values()),
    }
    shape_hash = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_type = str(getattr(model.config, "model_type", "model"))
    path = folder / f"latency-{model_type}-{_device_tag(dev)}-{shape_hash}.json"
    entries: dict[str, dict[str, float]] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") == LATENCY_FORMAT and data.get("ident") == ident:
                entries = data["entries"]
        except (OSError, ValueError, KeyError):
            entries = {}
    missing = [s for s, k in keys.items() if k not in entries]
    if missing:
        ids = torch.randint(
            0, int(model.config.vocab_size), (1, n), generator=torch.Generator().manual_seed(0)
        ).to(dev)
        inputs = capture_inputs(model, adapter, ids, 1)
        for s in missing:
            rep = min(i for i, v in sigs.items() if v == s)
            entries[keys[s]] = _measure(model, adapter, rep, inputs, repeats)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"format": LATENCY_FORMAT, "model_type": model_type, "ident": ident, "entries": entries}
        atomic_write_text(path, json.dumps(doc, indent=2))
    per_layer = {i: dict(entries[keys[s]]) for i, s in sigs.items()}
    return LatencyTable(per_layer, path, not missing, time.perf_counter() - t0, n)
