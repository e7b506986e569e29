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
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import decoder_linear_params
from secateur.graph.groups import layer_groups, layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.graph.plan import Plan, min_units
from secateur.recipe.schema import Targets
from secateur.runtime.allocation.proxy import mean_loss
from secateur.runtime.methods.registry import register_method
from secateur.runtime.prune.regression import (
    Variable,
    column_masks,
    consumer_statistics,
    fit_importance,
    layer_variables,
    select_global,
    select_plan,
)
from secateur.runtime.prune.sequential import LayerLog, PruneResult, restore_layer, write_consumers
from secateur.runtime.prune.stage import StageContext, check_plan_shapes, plan_for_stage
from secateur.runtime.prune.surgery import apply_keep

SCORE_WINDOWS = 2  # held-out windows (of up to 256 tokens) each sub-model is scored on
STATS_TOKENS = 4096  # calibration tokens of each round's statistics pass
CANDIDATE_FACTOR = 2.0  # candidates per layer and kind: this many times the units the round removes
KINDS = ("mlp", "q_head", "kv_group")


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


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


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


def _kinds(targets: Targets) -> list[str]:
    """The unit kinds the stage's targets prune: "mlp" and / or the attention kind."""
    kinds = (["mlp"] if targets.mlp else []) + ([targets.attention] if targets.attention != "none" else [])
    if not kinds:
        raise ValueError(
            "bonsai prunes MLP channels and attention heads: set targets.mlp or targets.attention"
        )
    return kinds


def _consumer_names(
    model: nn.Module, adapter: ModelAdapter, layers: list[int], kinds: list[str]
) -> list[str]:
    """The consumers (down_proj / fc2, o_proj) whose input statistics every round collects."""
    names: list[str] = []
    for i in layers:
        g = {x.kind for x in layer_groups(model, adapter, i)}
        p = adapter.layer_prefix(i)
        if "mlp" in kinds and "mlp_channel" in g:
            names.append(f"{p}.{adapter.mlp_out}")
        if kinds[-1] in ("q_head", "kv_group") and "kv_group" in g:
            names.append(f"{p}.{adapter.o}")
    return names


@dataclass
class _Round:
    """One round's variables, candidates, removal limits and sampled sub-model losses."""

    r: int  # 0-based
    stats: dict | None  # consumer statistics, dropped once the restoration has used them
    forced: dict[int, list[int]] = field(default_factory=dict)  # MLP channels removed outright
    variables: dict[tuple[int, str], list[Variable]] = field(default_factory=dict)
    todo: dict[tuple[int, str], float] = field(default_factory=dict)  # removals scheduled per key
    cands: list[Variable] = field(default_factory=list)
    others: list[Variable] = field(default_factory=list)  # variables that are not candidates
    limit: dict[tuple[int, str], int] = field(default_factory=dict)  # most removals per key
    kept_rows: list[torch.Tensor] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    base: float = float("nan")  # loss of the unmasked model

    @property
    def n_vars(self) -> int:
        return sum(len(vs) for vs in self.variables.values())


class _Bonsai:
    """One Bonsai stage: the setup in the constructor, a method per phase of a round, the result."""

    def __init__(
        self, ctx: StageContext, use_prior: bool, loss: str | None, score_windows: int, stats_tokens: int
    ) -> None:
        """Setup: kinds, allocation mode, plan, layer state, consumers, score / stats windows, reference."""
        self.t0 = time.perf_counter()
        self.ctx, self.use_prior = ctx, use_prior
        self.opts = ctx.stage.importance.bonsai
        self.loss = loss or getattr(self.opts, "loss", "nll")  # a recipe option once the schema has it
        self.model, self.adapter = ctx.model, ctx.adapter
        budget = ctx.recipe.budget
        self.m, self.min_keep = int(budget.multiple_of), float(budget.min_keep)
        self.kinds = _kinds(ctx.stage.targets)
        self.mode = "global" if ctx.recipe.allocation.method == "global" else "plan"
        # validates the budget; the per-layer widths in plan mode, the uniform shares in global mode
        self.plan = plan_for_stage(ctx, "uniform" if self.mode == "global" else None)
        self.restore = ctx.stage.restore.method == "least_squares"
        self.phases = {"statistics": 0.0, "sampling": 0.0, "regression": 0.0, "pruning": 0.0}
        self.dev = next(self.model.parameters()).device
        self.gen = torch.Generator().manual_seed(int(ctx.recipe.calibration.seed))
        self.layers = sorted(ctx.layers)
        self.state = {i: _layer_state(self.model, self.adapter, i, self.plan, self.m) for i in self.layers}
        self.names = _consumer_names(self.model, self.adapter, self.layers, self.kinds)
        self.score_ids = ctx.heldout[: max(1, score_windows)].to(self.dev)
        seqlen = int(ctx.calib.shape[1])
        self.stats_ids = ctx.calib[: max(1, min(ctx.calib.shape[0], stats_tokens // max(seqlen, 1)))]
        self.n_samples, self.forward_passes = 0, 0
        self.reference = self._reference()
        self.goal = int(ctx.params_to_remove)
        self.rounds: list[dict] = []
        self.removed_total = 0

    def _reference(self) -> torch.Tensor | None:
        """The dense model's next-token log-probabilities on the score windows when the loss is KL."""
        if self.loss == "kl":
            with torch.inference_mode():
                logits = self.model(self.score_ids, use_cache=False).logits
                reference = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            self.forward_passes += 1
            return reference
        if self.loss != "nll":
            raise ValueError(f"bonsai loss must be 'nll' or 'kl', got {self.loss!r}")
        return None

    def run_round(self, r: int) -> None:
        """One round: statistics, candidates, sampling, regression and choice, removal, record."""
        t_round = time.perf_counter()
        t = time.perf_counter()
        stats = consumer_statistics(self.model, self.adapter, self.stats_ids, self.names, self.restore)
        self.phases["statistics"] += time.perf_counter() - t
        rnd = self._round_variables(r, stats)
        del stats  # the round holds the statistics until the removal has used them
        self._select_candidates(rnd)
        t = time.perf_counter()
        self._sample(rnd)
        self.phases["sampling"] += time.perf_counter() - t
        t = time.perf_counter()
        chosen = self._choose(rnd)
        self.phases["regression"] += time.perf_counter() - t
        t = time.perf_counter()
        removed_round = self._remove(rnd, chosen)
        self.phases["pruning"] += time.perf_counter() - t
        self._record(rnd, removed_round, t_round)

    def _round_variables(self, r: int, stats: dict) -> _Round:
        """Every layer's variables and forced MLP channels, and the removals scheduled for the round."""
        rnd = _Round(r, stats)
        for i in self.layers:
            st = self.state[i]
            odd = st.odd if r == 0 else 0
            f, per_kind = layer_variables(
                self.model, self.adapter, i, self.kinds, stats, self.m, self.use_prior, odd
            )
            if f:
                rnd.forced[i] = f
            for kind, vs in per_kind.items():
                key = (i, kind)
                rnd.variables[key] = vs
                total = st.target.get(kind, 0)
                if self.mode == "plan":
                    rnd.todo[key] = _scheduled(total, r, self.opts.steps) - st.removed.get(kind, 0)
                else:
                    rnd.todo[key] = total / self.opts.steps  # the uniform share, to size the candidate set
        return rnd

    def _select_candidates(self, rnd: _Round) -> None:
        """The lowest-prior variables of each layer and kind become candidates, within removal limits."""
        for key, vs in rnd.variables.items():
            i, kind = key
            lim = _limit(self.state[i], kind, len(vs), len(rnd.forced.get(i, [])), self.m, self.min_keep)
            want = rnd.todo[key]
            rnd.limit[key] = lim if self.mode == "global" else min(lim, max(0, int(want)))
            if want <= 0 or lim == 0:
                continue
            n_c = min(lim, math.ceil(CANDIDATE_FACTOR * want - 1e-9)) if self.use_prior else len(vs)
            rnd.cands += vs[:n_c]
            rnd.others += vs[n_c:]

    def _sample(self, rnd: _Round) -> None:
        """Losses of masked sub-models in antithetic pairs (a random mask, then its complement)."""
        cands, c, opts = rnd.cands, len(rnd.cands), self.opts
        if c < 2 or opts.samples < 2:
            return
        prob = min(max(opts.drop_fraction * rnd.n_vars / c, 1.0 / c), 0.5)  # p and 1 - p: same pairs
        with column_masks(self.model, sorted({v.consumer for v in cands})) as masks:
            rnd.base = mean_loss(self.model, self.score_ids, self.reference)
            self.forward_passes += 1
            bar = tqdm(
                range(opts.samples),
                desc=f"bonsai round {rnd.r + 1}/{opts.steps}",
                unit="sample",
                disable=not self.ctx.progress,
            )
            drop = torch.zeros(c, dtype=torch.bool)
            for s in bar:
                drop = torch.rand(c, generator=self.gen) < prob if s % 2 == 0 else ~drop
                for mk in masks.values():
                    mk.fill_(1)
                for j in drop.nonzero().flatten().tolist():
                    masks[cands[j].consumer][cands[j].cols.to(self.dev)] = 0
                rnd.losses.append(mean_loss(self.model, self.score_ids, self.reference))
                rnd.kept_rows.append(~drop)
                bar.set_postfix(loss=f"{rnd.losses[-1]:.4f}")
        self.forward_passes += len(rnd.losses)
        self.n_samples += len(rnd.losses)

    def _choose(self, rnd: _Round) -> list[Variable]:
        """Regress the losses on the masks (or fall back to the prior), then pick the round's removals."""
        cands, c = rnd.cands, len(rnd.cands)
        if rnd.losses:
            kept = torch.stack(rnd.kept_rows).float()
            coef = fit_importance(kept, torch.tensor(rnd.losses), float(self.opts.ridge))
            score = {j: float(coef[j]) for j in range(c)}
        else:  # too few candidates to regress: the prior decides
            score = {j: cands[j].prior for j in range(c)}
        if self.mode == "plan":
            return select_plan(cands, score, rnd.limit)
        forced_params = sum(
            len(f) * _params_per_channel(self.model, self.adapter, i) for i, f in rnd.forced.items()
        )
        quota = _scheduled(self.goal, rnd.r, self.opts.steps) - self.removed_total - forced_params
        return select_global(cands, rnd.others, score, quota, rnd.limit, rnd.r == self.opts.steps - 1)

    def _round_keep(self, rnd: _Round, chosen: list[Variable]) -> dict[int, LayerKeep]:
        """The round's keep-sets (current numbering) from the forced and chosen units; counts removals."""
        removal: dict[int, dict[str, set[int]]] = {}
        for i, f in rnd.forced.items():
            removal.setdefault(i, {}).setdefault("mlp", set()).update(f)
        for v in chosen:
            removal.setdefault(v.layer, {}).setdefault(v.kind, set()).update(v.units)
            self.state[v.layer].removed[v.kind] = self.state[v.layer].removed.get(v.kind, 0) + 1
        keep: dict[int, LayerKeep] = {}
        for i, rem in sorted(removal.items()):
            sh = layer_shapes(self.model, self.adapter, i)
            lk = LayerKeep()
            if rem.get("mlp"):
                lk.mlp = [u for u in range(int(sh["intermediate_size"])) if u not in rem["mlp"]]
            if rem.get("q_head"):
                lk.q_heads = [h for h in range(int(sh["num_heads"])) if h not in rem["q_head"]]
            if rem.get("kv_group"):
                lk.kv_heads = [g for g in range(int(sh["num_kv_heads"])) if g not in rem["kv_group"]]
            keep[i] = lk
        return keep

    def _restore(
        self, rnd: _Round, keep: dict[int, LayerKeep]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Least-squares refits of the changed layers' consumers from the round's statistics."""
        new_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if not self.restore:
            return new_weights
        for i, lk in keep.items():
            tl = time.perf_counter()
            w, errors = restore_layer(
                self.model, self.adapter, i, lk, rnd.stats, self.ctx.stage.restore.damping, "least_squares"
            )
            new_weights.update(w)
            self.state[i].errors.update({f"{k}@{rnd.r + 1}": v for k, v in errors.items()})
            self.state[i].seconds += time.perf_counter() - tl
        return new_weights

    def _remove(self, rnd: _Round, chosen: list[Variable]) -> int:
        """Physical removal (one apply_keep) with restoration of the consumers; returns params removed."""
        model, adapter = self.model, self.adapter
        before = decoder_linear_params(model, adapter, self.layers)
        keep = self._round_keep(rnd, chosen)
        new_weights = self._restore(rnd, keep)
        rnd.stats = None  # frees the statistics (Gram matrices) before the surgery
        apply_keep(model, adapter, keep)
        with torch.no_grad():
            write_consumers(model, new_weights)
        for i, lk in keep.items():
            _track(self.state[i], lk)
        removed_round = before - decoder_linear_params(model, adapter, self.layers)
        self.removed_total += removed_round
        return removed_round

    def _record(self, rnd: _Round, removed_round: int, t_round: float) -> None:
        """The round's entry in extra["rounds"] and its log line."""
        losses, c, steps = rnd.losses, len(rnd.cands), self.opts.steps
        avg_loss = sum(losses) / len(losses) if losses else float("nan")
        self.rounds.append(
            {
                "round": rnd.r + 1,
                "candidates": c,
                "variables": rnd.n_vars,
                "samples": len(losses),
                "loss_before": round(rnd.base, 6),
                "mean_sample_loss": round(avg_loss, 6),
                "removed_params": int(removed_round),
                "removed_total": int(self.removed_total),
                "seconds": round(time.perf_counter() - t_round, 3),
            }
        )
        self.ctx.log(
            f"bonsai round {rnd.r + 1}/{steps}: {len(losses)} samples over {c} candidates, "
            f"loss {rnd.base:.4f} before, mean sample loss {avg_loss:.4f}, "
            f"removed {self.removed_total:,} of {self.goal:,} parameters"
        )

    def result(self) -> PruneResult:
        """Kept units of every changed layer in the starting numbering, layer logs, phases and extra."""
        result_keep: dict[int, LayerKeep] = {}
        logs: list[LayerLog] = []
        for i in self.layers:
            st = self.state[i]
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
        self.phases["total"] = time.perf_counter() - self.t0
        extra = {
            "method": "bonsai",
            "allocation": self.mode,
            "loss": self.loss,
            "score_windows": int(self.score_ids.shape[0]),
            "score_tokens": int(self.score_ids.numel()),
            "statistics_tokens": int(self.stats_ids.numel()),
            "rounds": self.rounds,
            "samples_per_round": int(self.opts.samples),
            "forward_passes": int(self.forward_passes),
            "seconds_per_sample": round(self.phases["sampling"] / max(self.n_samples, 1), 4),
            "removed_params": int(self.removed_total),
        }
        if self.mode == "plan":
            extra["plan"] = self.plan.to_dict()
        return PruneResult(result_keep, logs, self.phases, None, extra)


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
    run = _Bonsai(ctx, use_prior, loss, score_windows, stats_tokens)
    for r in range(run.opts.steps):
        run.run_round(r)
    return run.result()


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
