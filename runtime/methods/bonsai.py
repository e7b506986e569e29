"""Bonsai: structured pruning from forward passes only (Dery et al., 2024, "Everybody Prune Now:
Structured Pruning of LLMs with only Forward Passes").

The stage's budget is removed in `steps` rounds. In a round:

1. Statistics: one forward pass over a few calibration windows (at most `STATS_TOKENS` tokens)
   collects the input statistics of the consumers (down_proj / fc2, o_proj) of every eligible
   layer: column norms for the prior and, with `restore.method: least_squares`, Gram matrices.
2. Variables: the regression's players. MLP channels are sorted by their prior (the FASP / Wanda
   column score ||W[:, j]||_1 * ||X_j||_2) and grouped into blocks of `budget.multiple_of`, lowest
   first, so a block is a set of similar channels and widths stay multiples of `multiple_of`.
   With `targets.attention: q_head` a variable is a *slot*: the j-th lowest-prior query head of
   every KV group, so removing it keeps GQA uniform; with `kv_group` a variable is one KV group.
3. Candidates (the paper's informative prior, as in the reference code): in every layer only the
   lowest-prior variables, `CANDIDATE_FACTOR` (2) times as many as the round removes there, take
   part; the others are kept this round.
4. Sampling: `samples` sub-models in antithetic pairs (a random mask and its complement over the
   candidates, a foldover design that keeps main effects clear of pairwise interactions). The
   first of a pair masks each candidate with the probability that makes the expected number of
   masked variables `drop_fraction` of all remaining variables (at most 1/2: p and 1 - p give
   the same pairs). Masking zeroes the consumer's
   input columns with a forward pre-hook (no weight copies) and a sub-model is scored by its mean
   next-token NLL on the first `SCORE_WINDOWS` held-out windows (disjoint from calibration).
5. Regression: ridge regression (closed form, penalty `ridge`, intercept not penalised) of
   -loss on the 0/1 "kept" masks; a variable's coefficient estimates the loss its removal costs.
6. Removal: the lowest-coefficient candidates are removed physically (one `apply_keep` over all
   layers), with least-squares restoration of the consumers from the round's Gram matrices when
   the stage restores.

Allocation: with `allocation.method` uniform (the default) or table, every layer ends exactly at
the widths the FASP compiler plans (`methods.plan_for_stage`, so the budget, multiple_of,
min_keep and max_keep behave as in FASP) and Bonsai decides *which* units go; each round removes
its share of every layer's count. With `global`, the regression also allocates: candidates are
ranked across layers by coefficient per parameter and removed until the round's parameter quota
is met (within half the smallest block), respecting min_keep.

No gradients anywhere (inference mode). `PruneResult.keep` holds the kept units of each layer in
the numbering the layer had when the stage started (the union of all rounds), so applying it to
the stage's input model with `apply_keep` gives the same shapes; `extra["rounds"]` logs each round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import decoder_linear_params
from secateur.graph.groups import layer_groups, layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.graph.plan import Plan, min_units
from secateur.runtime.capture import base_model
from secateur.runtime.methods.registry import register_method
from secateur.runtime.proxy import mean_loss
from secateur.runtime.score import column_scores
from secateur.runtime.sequential import LayerLog, PruneResult, restore_layer, write_consumers
from secateur.runtime.stage import StageContext, check_plan_shapes, plan_for_stage
from secateur.runtime.stats import collect_inputs
from secateur.runtime.surgery import apply_keep

SCORE_WINDOWS = 2  # held-out windows (of up to 256 tokens) each sub-model is scored on
STATS_TOKENS = 4096  # calibration tokens of each round's statistics pass
STATS_BATCH = 4
CANDIDATE_FACTOR = 2.0  # candidates per layer and kind: this many times the units the round removes
KINDS = ("mlp", "q_head", "kv_group")


@dataclass
class Variable:
    """One regression variable: units of one layer that are masked, scored and removed together."""

    layer: int
    kind: str  # mlp | q_head | kv_group
    units: tuple[int, ...]  # current indices: MLP channels, query heads or KV groups
    consumer: str  # module whose input columns the units own (down_proj / fc2 / o_proj)
    cols: torch.Tensor  # those columns, current numbering
    params: int
    prior: float


@dataclass
class _Layer:
    """A layer's units in the stage's starting numbering, tracked across rounds."""

    mlp: list[int]
    q: list[int]
    kv: list[int]
    n0: dict[str, int]  # starting widths: mlp channels, query heads per group, KV groups
    target: dict[str, int] = field(default_factory=dict)  # units (blocks/slots/groups) the plan removes
    odd: int = 0  # lowest-prior MLP channels removed in round 1 so widths become multiples
    removed: dict[str, int] = field(default_factory=dict)  # units removed so far, per kind
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


class _ColumnNorms:
    """Squared column norms of a linear layer's input (the prior needs nothing more)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.sq = torch.zeros(dim, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.reshape(-1, x.shape[-1]).to(torch.float32).pow(2).sum(0)

    @property
    def col_norm(self) -> torch.Tensor:
        return self.sq.sqrt()


@contextmanager
def _column_norms(modules: dict[str, nn.Linear]) -> Iterator[dict[str, _ColumnNorms]]:
    stats = {n: _ColumnNorms(m.in_features, m.weight.device) for n, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: stats[n].add(args[0])) for n, m in modules.items()
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def column_masks(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """0/1 masks multiplying the inputs of the named linear layers while active (a virtual sub-model)."""
    masks: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        mod = model.get_submodule(n)
        masks[n] = torch.ones(mod.in_features, dtype=mod.weight.dtype, device=mod.weight.device)
        handles.append(mod.register_forward_pre_hook(lambda _m, args, n=n: (args[0] * masks[n], *args[1:])))
    try:
        yield masks
    finally:
        for h in handles:
            h.remove()


def fit_importance(kept: torch.Tensor, loss: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge regression of -loss on 0/1 kept masks [samples, variables], intercept unpenalised.

    Returns one coefficient per variable: the loss increase its removal is estimated to cause.
    Uses the dual form when there are fewer samples than variables.
    """
    x = kept.to(torch.float64)
    y = -loss.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean()
    s, c = x.shape
    if s < c:
        a = x @ x.T + ridge * torch.eye(s, dtype=x.dtype)
        alpha = torch.linalg.pinv(a) @ y if ridge == 0 else torch.linalg.solve(a, y)
        return x.T @ alpha
    a = x.T @ x + ridge * torch.eye(c, dtype=x.dtype)
    b = x.T @ y
    return torch.linalg.pinv(a) @ b if ridge == 0 else torch.linalg.solve(a, b)


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@torch.inference_mode()
def _statistics(
    model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, names: list[str], gram: bool
) -> dict:
    """One forward pass of the decoder (no LM head) over `ids`, collecting consumer statistics."""
    modules = {n: model.get_submodule(n) for n in names}
    dev = next(model.parameters()).device
    ctx = collect_inputs(modules) if gram else _column_norms(modules)
    with ctx as stats:
        for s in range(0, ids.shape[0], STATS_BATCH):
            base_model(model, adapter)(input_ids=ids[s : s + STATS_BATCH].to(dev), use_cache=False)
    return stats


def _variables(
    model: nn.Module,
    adapter: ModelAdapter,
    i: int,
    kinds: list[str],
    stats: dict,
    m: int,
    use_prior: bool,
    odd: int,
) -> tuple[list[int], dict[str, list[Variable]]]:
    """Layer i's variables per kind, lowest prior first, and MLP channels to remove outright."""
    p = adapter.layer_prefix(i)
    groups = {g.kind: g for g in layer_groups(model, adapter, i)}
    out: dict[str, list[Variable]] = {}
    forced: list[int] = []
    if "mlp" in kinds and "mlp_channel" in groups:
        g = groups["mlp_channel"]
        name = f"{p}.{adapter.mlp_out}"
        score = column_scores(model.get_submodule(name).weight, stats[name], "fasp").cpu()
        order = (
            sorted(range(g.n_units), key=lambda j: (float(score[j]), j))
            if use_prior
            else list(range(g.n_units))
        )
        forced, order = sorted(order[:odd]), order[odd:]
        out["mlp"] = [
            Variable(
                i,
                "mlp",
                tuple(sorted(blk)),
                name,
                torch.tensor(sorted(blk)),
                m * g.params_per_unit,
                float(score[blk].sum()),
            )
            for blk in (order[b * m : (b + 1) * m] for b in range(len(order) // m))
        ]
    if ("q_head" in kinds or "kv_group" in kinds) and "kv_group" in groups:
        name = f"{p}.{adapter.o}"
        sh = layer_shapes(model, adapter, i)
        n_q, n_kv, dv = int(sh["num_heads"]), int(sh["num_kv_heads"]), int(sh["v_head_dim"])
        r = n_q // n_kv
        col = column_scores(model.get_submodule(name).weight, stats[name], "fasp").cpu()
        head = col.reshape(n_q, dv).sum(1)

        def cols(heads: list[int]) -> torch.Tensor:
            return torch.tensor([c for h in sorted(heads) for c in range(h * dv, (h + 1) * dv)])

        if "q_head" in kinds:
            per = groups["q_head"].params_per_unit
            ranked = [
                sorted(range(g * r, (g + 1) * r), key=lambda h: (float(head[h]), h) if use_prior else h)
                for g in range(n_kv)
            ]
            slots = [[ranked[g][j] for g in range(n_kv)] for j in range(r)]
            vs = [
                Variable(i, "q_head", tuple(sorted(s)), name, cols(s), n_kv * per, float(head[s].sum()))
                for s in slots
            ]
        else:
            per = groups["kv_group"].params_per_unit
            vs = [
                Variable(
                    i,
                    "kv_group",
                    (g,),
                    name,
                    cols(list(range(g * r, (g + 1) * r))),
                    per,
                    float(head[g * r : (g + 1) * r].sum()),
                )
                for g in range(n_kv)
            ]
            if use_prior:
                vs.sort(key=lambda v: (v.prior, v.units))
        out["q_head" if "q_head" in kinds else "kv_group"] = vs
    return forced, out


def _layer_state(model: nn.Module, adapter: ModelAdapter, i: int, plan: Plan, m: int) -> _Layer:
    sh = layer_shapes(model, adapter, i)
    n_q, n_kv, n_mlp = int(sh["num_heads"]), int(sh["num_kv_heads"]), int(sh["intermediate_size"])
    r = n_q // n_kv if n_kv else 0
    st = _Layer(
        list(range(n_mlp)), list(range(n_q)), list(range(n_kv)), {"mlp": n_mlp, "q_head": r, "kv_group": n_kv}
    )
    lp = plan.layers.get(i)
    if lp is None:
        return st
    if lp.mlp is not None and not sh["skip_mlp"] and lp.mlp < n_mlp:
        drop = n_mlp - lp.mlp
        st.odd = n_mlp % m if m < n_mlp else 0
        st.target["mlp"] = (drop - st.odd) // m
    if lp.q_per_group is not None and r and lp.q_per_group < r:
        st.target["q_head"] = r - lp.q_per_group
    if lp.kv_groups is not None and n_kv and lp.kv_groups < n_kv:
        st.target["kv_group"] = n_kv - lp.kv_groups
    return st


def _limit(st: _Layer, kind: str, n_vars: int, n_forced: int, m: int, min_keep: float) -> int:
    """Variables of a kind layer may still lose without going below budget.min_keep."""
    if kind == "mlp":
        return max(0, min(n_vars, (len(st.mlp) - n_forced - _mlp_floor(st, m, min_keep)) // m))
    return max(0, n_vars - min_units(st.n0[kind], min_keep))


def _scheduled(total: int, r: int, steps: int) -> int:
    """Units removed by the end of round r (0-based) when `total` are removed over `steps` rounds."""
    return _half_up(total * (r + 1) / steps)


def _select_global(
    cands: list[Variable],
    others: list[Variable],
    score: dict[int, float],
    quota: int,
    limit: dict[tuple[int, str], int],
    last: bool,
) -> list[Variable]:
    """Candidates by coefficient per parameter until the quota is met (rounded to the nearest unit)."""
    chosen: list[Variable] = []
    used: dict[tuple[int, str], int] = {}
    removed = 0
    order = sorted(range(len(cands)), key=lambda j: (score[j] / cands[j].params, cands[j].prior, j))
    pools = [[cands[j] for j in order]] + ([others] if last else [])
    for pool in pools:  # the last round falls back to the prior order if candidates run out
        for v in pool:
            key = (v.layer, v.kind)
            if quota - removed >= v.params / 2 and used.get(key, 0) < limit.get(key, 0):
                chosen.append(v)
                used[key] = used.get(key, 0) + 1
                removed += v.params
    return chosen


def bonsai_prune(
    ctx: StageContext,
    *,
    use_prior: bool = True,
    loss: str | None = None,
    score_windows: int = SCORE_WINDOWS,
    stats_tokens: int = STATS_TOKENS,
) -> PruneResult:
    """Bonsai on one stage (see the module docstring).

    `use_prior=False` makes every variable a candidate and groups channels by index (pure
    regression, for experiments and tests). `loss`: "nll" (the paper's sub-model perplexity) or
    "kl" (mean KL from the dense model's next-token distributions on the same windows: >= 0 and
    second order in the perturbation, so it does not carry the NLL's first-order noise); None
    reads `importance.bonsai.loss` when the schema has it, else "nll"."""
    t0 = time.perf_counter()
    opts = ctx.stage.importance.bonsai
    loss = loss or getattr(opts, "loss", "nll")  # a recipe option once the schema has it
    model, adapter = ctx.model, ctx.adapter
    budget = ctx.recipe.budget
    m, min_keep = int(budget.multiple_of), float(budget.min_keep)
    targets = ctx.stage.targets
    kinds = (["mlp"] if targets.mlp else []) + ([targets.attention] if targets.attention != "none" else [])
    if not kinds:
        raise ValueError(
            "bonsai prunes MLP channels and attention heads: set targets.mlp or targets.attention"
        )
    mode = "global" if ctx.recipe.allocation.method == "global" else "plan"
    # validates the budget; the per-layer widths in plan mode, the uniform shares in global mode
    plan = plan_for_stage(ctx, "uniform" if mode == "global" else None)
    restore = ctx.stage.restore.method == "least_squares"
    phases = {"statistics": 0.0, "sampling": 0.0, "regression": 0.0, "pruning": 0.0}
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(ctx.recipe.calibration.seed))

    layers = sorted(ctx.layers)
    state = {i: _layer_state(model, adapter, i, plan, m) for i in layers}
    names: list[str] = []
    for i in layers:
        g = {x.kind for x in layer_groups(model, adapter, i)}
        p = adapter.layer_prefix(i)
        if "mlp" in kinds and "mlp_channel" in g:
            names.append(f"{p}.{adapter.mlp_out}")
        if kinds[-1] in ("q_head", "kv_group") and "kv_group" in g:
            names.append(f"{p}.{adapter.o}")
    score_ids = ctx.heldout[: max(1, score_windows)].to(dev)
    seqlen = int(ctx.calib.shape[1])
    stats_ids = ctx.calib[: max(1, min(ctx.calib.shape[0], stats_tokens // max(seqlen, 1)))]
    n_samples, forward_passes = 0, 0
    reference = None
    if loss == "kl":
        with torch.inference_mode():
            reference = torch.log_softmax(model(score_ids, use_cache=False).logits[:, :-1].float(), dim=-1)
        forward_passes += 1
    elif loss != "nll":
        raise ValueError(f"bonsai loss must be 'nll' or 'kl', got {loss!r}")

    goal = int(ctx.params_to_remove)
    rounds: list[dict] = []
    removed_total = 0
    for r in range(opts.steps):
        t_round = time.perf_counter()
        t = time.perf_counter()
        stats = _statistics(model, adapter, stats_ids, names, restore)
        phases["statistics"] += time.perf_counter() - t

        # variables, candidates and removals scheduled for this round
        forced: dict[int, list[int]] = {}
        variables: dict[tuple[int, str], list[Variable]] = {}
        todo: dict[tuple[int, str], int] = {}
        for i in layers:
            st = state[i]
            odd = st.odd if r == 0 else 0
            f, per_kind = _variables(model, adapter, i, kinds, stats, m, use_prior, odd)
            if f:
                forced[i] = f
            for kind, vs in per_kind.items():
                key = (i, kind)
                variables[key] = vs
                total = st.target.get(kind, 0)
                if mode == "plan":
                    todo[key] = _scheduled(total, r, opts.steps) - st.removed.get(kind, 0)
                else:
                    todo[key] = total / opts.steps  # the uniform share, to size the candidate set
        cands: list[Variable] = []
        others: list[Variable] = []
        limit: dict[tuple[int, str], int] = {}
        for key, vs in variables.items():
            i, kind = key
            lim = _limit(state[i], kind, len(vs), len(forced.get(i, [])), m, min_keep)
            want = todo[key]
            limit[key] = lim if mode == "global" else min(lim, max(0, int(want)))
            if want <= 0 or lim == 0:
                continue
            n_c = min(lim, math.ceil(CANDIDATE_FACTOR * want - 1e-9)) if use_prior else len(vs)
            cands += vs[:n_c]
            others += vs[n_c:]
        # samples: antithetic pairs of masks over the candidates
        t = time.perf_counter()
        c = len(cands)
        n_vars = sum(len(vs) for vs in variables.values())
        kept_rows: list[torch.Tensor] = []
        losses: list[float] = []
        base = float("nan")
        if c >= 2 and opts.samples >= 2:
            prob = min(max(opts.drop_fraction * n_vars / c, 1.0 / c), 0.5)  # p and 1 - p: same pairs
            with column_masks(model, sorted({v.consumer for v in cands})) as masks:
                base = mean_loss(model, score_ids, reference)
                forward_passes += 1
                bar = tqdm(
                    range(opts.samples),
                    desc=f"bonsai round {r + 1}/{opts.steps}",
                    unit="sample",
                    disable=not ctx.progress,
                )
                drop = torch.zeros(c, dtype=torch.bool)
                for s in bar:
                    drop = torch.rand(c, generator=gen) < prob if s % 2 == 0 else ~drop
                    for mk in masks.values():
                        mk.fill_(1)
                    for j in drop.nonzero().flatten().tolist():
                        masks[cands[j].consumer][cands[j].cols.to(dev)] = 0
                    losses.append(mean_loss(model, score_ids, reference))
                    kept_rows.append(~drop)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
            forward_passes += len(losses)
            n_samples += len(losses)
        phases["sampling"] += time.perf_counter() - t

        t = time.perf_counter()
        if losses:
            coef = fit_importance(torch.stack(kept_rows).float(), torch.tensor(losses), float(opts.ridge))
            score = {j: float(coef[j]) for j in range(c)}
        else:  # too few candidates to regress: the prior decides
            score = {j: cands[j].prior for j in range(c)}
        if mode == "plan":
            chosen = []
            by_key: dict[tuple[int, str], list[int]] = {}
            for j, v in enumerate(cands):
                by_key.setdefault((v.layer, v.kind), []).append(j)
            for key, js in by_key.items():
                js.sort(key=lambda j: (score[j], cands[j].prior, j))
                chosen += [cands[j] for j in js[: limit[key]]]
        else:
            forced_params = sum(len(f) * _params_per_channel(model, adapter, i) for i, f in forced.items())
            quota = _scheduled(goal, r, opts.steps) - removed_total - forced_params
            chosen = _select_global(cands, others, score, quota, limit, r == opts.steps - 1)
        phases["regression"] += time.perf_counter() - t

        # physical removal (one apply_keep), with least-squares restoration of the consumers
        t = time.perf_counter()
        before = decoder_linear_params(model, adapter, layers)
        removal: dict[int, dict[str, set[int]]] = {}
        for i, f in forced.items():
            removal.setdefault(i, {}).setdefault("mlp", set()).update(f)
        for v in chosen:
            removal.setdefault(v.layer, {}).setdefault(v.kind, set()).update(v.units)
            state[v.layer].removed[v.kind] = state[v.layer].removed.get(v.kind, 0) + 1
        keep: dict[int, LayerKeep] = {}
        for i, rem in sorted(removal.items()):
            sh = layer_shapes(model, adapter, i)
            lk = LayerKeep()
            if rem.get("mlp"):
                lk.mlp = [u for u in range(int(sh["intermediate_size"])) if u not in rem["mlp"]]
            if rem.get("q_head"):
                lk.q_heads = [h for h in range(int(sh["num_heads"])) if h not in rem["q_head"]]
            if rem.get("kv_group"):
                lk.kv_heads = [g for g in range(int(sh["num_kv_heads"])) if g not in rem["kv_group"]]
            keep[i] = lk
        new_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for i, lk in keep.items():
            if not restore:
                continue
            tl = time.perf_counter()
            w, errors = restore_layer(
                model, adapter, i, lk, stats, ctx.stage.restore.damping, "least_squares"
            )
            new_weights.update(w)
            state[i].errors.update({f"{k}@{r + 1}": v for k, v in errors.items()})
            state[i].seconds += time.perf_counter() - tl
        del stats
        apply_keep(model, adapter, keep)
        with torch.no_grad():
            write_consumers(model, new_weights)
        for i, lk in keep.items():
            _track(state[i], lk)
        removed_round = before - decoder_linear_params(model, adapter, layers)
        removed_total += removed_round
        phases["pruning"] += time.perf_counter() - t

        avg_loss = sum(losses) / len(losses) if losses else float("nan")
        rounds.append(
            {
                "round": r + 1,
                "candidates": c,
                "variables": n_vars,
                "samples": len(losses),
                "loss_before": round(base, 6),
                "mean_sample_loss": round(avg_loss, 6),
                "removed_params": int(removed_round),
                "removed_total": int(removed_total),
                "seconds": round(time.perf_counter() - t_round, 3),
            }
        )
        ctx.log(
            f"bonsai round {r + 1}/{opts.steps}: {len(losses)} samples over {c} candidates, "
            f"loss {base:.4f} before, mean sample loss {avg_loss:.4f}, "
            f"removed {removed_total:,} of {goal:,} parameters"
        )

    result_keep: dict[int, LayerKeep] = {}
    logs: list[LayerLog] = []
    for i in layers:
        st = state[i]
        lk = LayerKeep()
        if len(st.mlp) < st.n0["mlp"]:
            lk.mlp = sorted(st.mlp)
        if len(st.kv) < st.n0["kv_group"]:
            lk.kv_heads = sorted(st.kv)
        elif len(st.q) < st.n0["q_head"] * st.n0["kv_group"]:
            lk.q_heads = sorted(st.q)
        if lk.to_dict():
            result_keep[i] = lk
            logs.append(LayerLog(i, st.seconds, lk.to_dict(), st.errors))
    phases["total"] = time.perf_counter() - t0
    extra = {
        "method": "bonsai",
        "allocation": mode,
        "loss": loss,
        "score_windows": int(score_ids.shape[0]),
        "score_tokens": int(score_ids.numel()),
        "statistics_tokens": int(stats_ids.numel()),
        "rounds": rounds,
        "samples_per_round": int(opts.samples),
        "forward_passes": int(forward_passes),
        "seconds_per_sample": round(phases["sampling"] / max(n_samples, 1), 4),
        "removed_params": int(removed_total),
    }
    if mode == "plan":
        extra["plan"] = plan.to_dict()
    return PruneResult(result_keep, logs, phases, None, extra)


def _mlp_floor(st: _Layer, m: int, min_keep: float) -> int:
    """The fewest MLP channels a layer may keep: min_keep of its starting width, a multiple of m."""
    n0 = st.n0["mlp"]
    return min(n0, max(math.ceil(min_units(n0, min_keep) / m) * m, m))


def _params_per_channel(model: nn.Module, adapter: ModelAdapter, i: int) -> int:
    g = next(x for x in layer_groups(model, adapter, i) if x.kind == "mlp_channel")
    return g.params_per_unit


def _track(st: _Layer, lk: LayerKeep) -> None:
    """Map a round's keep-set (current numbering) onto the stage's starting numbering."""
    if lk.mlp is not None:
        st.mlp = [st.mlp[j] for j in sorted(lk.mlp)]
    if lk.kv_heads is not None:
        r = len(st.q) // len(st.kv)
        kept = sorted(lk.kv_heads)
        st.q = [st.q[g * r + j] for g in kept for j in range(r)]
        st.kv = [st.kv[g] for g in kept]
    if lk.q_heads is not None:
        st.q = [st.q[h] for h in sorted(lk.q_heads)]


@register_method("bonsai", check=check_plan_shapes)
def bonsai(ctx: StageContext) -> PruneResult:
    """Bonsai: forward-only perturbative regression of sub-model losses on unit masks."""
    return bonsai_prune(ctx)
