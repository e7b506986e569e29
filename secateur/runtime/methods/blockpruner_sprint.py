"""Sublayer removal: BlockPruner and SPRINT remove whole attention / MLP branches greedily.

BlockPruner (Zhong et al., 2024): at every step, score each remaining candidate (the attention
or MLP branch of an eligible layer; both at once with `targets.blocks`) by the quality of the
model without it on held-out windows (disjoint from calibration), remove the best one
physically, repeat until the parameter budget is met. Quality is the mean KL divergence to
the next-token distribution of the model entering the stage (default), or perplexity with
`importance.metric: ppl_delta`.

SPRINT: the same greedy loop, but a candidate's score is its quality increase divided by the
latency it saves, read from a per-sublayer latency table measured once on this device and
cached as JSON. After each removal the following sublayers' consumers (o_proj, down_proj) are
refitted by least squares against the dense model (the model entering the stage, run in
lockstep on calibration windows): each consumer's new output should equal the dense
consumer's output plus the gap between the dense and pruned residual streams it adds into
(see `Restorer`), a training-free stand-in for the paper's quick tuning. A refit is kept only
when it lowers the held-out proxy; otherwise the previous weights are put back.

Cost: the hidden states entering every layer on the held-out windows are kept for the current
model, so scoring a candidate in layer i runs only layers i..L-1, the final norm and the LM
head (half a forward on average). Removing a candidate temporarily swaps modules (no weight
copies) and puts the originals back. After a removal only layers from the removed one on are
re-run to refresh the cached hidden states.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from secateur.graph.adapters import ModelAdapter
from secateur.graph.keep import LayerKeep
from secateur.recipe.schema import Stage
from secateur.runtime.allocation.proxy import HeldoutScorer, dense_reference
from secateur.runtime.methods.registry import register_method
from secateur.runtime.prune.branch_latency import LatencyTable, latency_table
from secateur.runtime.prune.branches import Candidate, branch_params, candidates, without
from secateur.runtime.prune.refit import Restorer
from secateur.runtime.prune.sequential import LayerLog, PruneResult
from secateur.runtime.prune.stage import CheckContext, StageContext
from secateur.runtime.prune.surgery import apply_keep

BATCH_SIZE = 4  # held-out windows per forward while scoring
REFERENCE_MB = 256  # dense reference kept in full below this size, else as top-k log-probabilities
REFERENCE_TOPK = 256
RESTORE_WINDOWS = 16  # calibration windows used by SPRINT's least-squares restoration


def _where(stage: Stage) -> str:
    """'stage passes.1' for a pass, 'top-level stage' for a recipe without passes."""
    path = getattr(stage, "path", ())
    return "stage " + ".".join(str(p) for p in path) if path else "top-level stage"


def check_budget(
    model: nn.Module,
    adapter: ModelAdapter,
    method: str,
    stage: Stage,
    params_to_remove: int,
    layers: list[int],
) -> int:
    """Fail early (from group sizes, no data touched) when sublayer removal cannot meet the budget.

    Returns the parameters removable as whole sublayers in the eligible layers.
    """
    where = _where(stage)
    t = stage.targets
    if not (t.sublayers or t.blocks):
        raise ValueError(
            f"{method} ({where}): targets.sublayers and targets.blocks are both false, so there is "
            f"nothing this method can remove; set targets.sublayers: true (attention and MLP branches) or "
            f"targets.blocks: true (whole layers)"
        )
    removable = sum(sum(branch_params(model, adapter, i).values()) for i in layers)
    if params_to_remove > removable:
        share = " or this pass's share" if where.startswith("stage passes") else ""
        raise ValueError(
            f"{method} ({where}): budget.params asks this stage to remove {params_to_remove:,} parameters, "
            f"but removing every remaining attention and MLP sublayer of its {len(layers)} eligible layers "
            f"removes only {removable:,}; lower budget.params{share} or widen targets.layers / targets.protect"
        )
    return removable


# ---- the greedy loop ----------------------------------------------------------------------------


@dataclass
class _Step:
    cand: Candidate
    params: int
    proxy: float
    score: float
    seconds: float
    restore_s: float = 0.0
    kept_restoration: bool = False
    errors: dict[str, dict[str, float]] = field(default_factory=dict)


class _Greedy:
    """One BlockPruner / SPRINT stage: setup in the constructor, then a method per phase of a step."""

    def __init__(self, ctx: StageContext, method: str, latency_aware: bool) -> None:
        """Setup: budget check, metric, phase timers, the extra's header and the per-step accumulators."""
        self.t0 = time.perf_counter()
        self.ctx, self.method, self.latency_aware = ctx, method, latency_aware
        self.model, self.adapter, self.stage = ctx.model, ctx.adapter, ctx.stage
        removable = check_budget(
            self.model, self.adapter, method, self.stage, int(ctx.params_to_remove), ctx.layers
        )
        self.kind = "ppl" if self.stage.importance.metric == "ppl_delta" else "kl"
        self.n_layers = self.adapter.num_layers
        self.phases = {
            "latency": 0.0,
            "reference": 0.0,
            "capture": 0.0,
            "scoring": 0.0,
            "removal": 0.0,
            "restoration": 0.0,
        }
        self.extra: dict[str, Any] = {
            "method": method,
            "metric": self.kind,
            "params_to_remove": int(ctx.params_to_remove),
            "removable_params": int(removable),
            "heldout": f"{ctx.heldout.shape[0]} x {ctx.heldout.shape[1]}",
        }
        self.table: LatencyTable | None = None
        self.restorer: Restorer | None = None
        if ctx.params_to_remove > 0:
            self._prepare()
        self.keep: dict[int, LayerKeep] = {}
        self.logs: list[LayerLog] = []
        self.steps: list[_Step] = []
        self.removed = 0
        self.n_evals, self.eval_s, self.depth = 0, 0.0, 0.0

    def _prepare(self) -> None:
        """Latency table (SPRINT), dense reference, restorer (SPRINT), scorer and the starting proxy."""
        ctx, model, adapter, stage = self.ctx, self.model, self.adapter, self.stage
        if self.latency_aware:
            self.table = table = latency_table(model, adapter, ctx.cache_dir)
            self.phases["latency"] = table.seconds
            where = "read from" if table.cached else "measured and written to"
            ctx.log(f"{self.method}: latency table {where} {table.path}")
        t = time.perf_counter()
        ref = (
            dense_reference(model, ctx.heldout, BATCH_SIZE, REFERENCE_MB, REFERENCE_TOPK)
            if self.kind == "kl"
            else None
        )
        self.phases["reference"] = time.perf_counter() - t
        if self.latency_aware and stage.restore.method == "least_squares":
            t = time.perf_counter()
            self.restorer = Restorer(
                model, adapter, ctx.calib[:RESTORE_WINDOWS], stage.restore.damping, BATCH_SIZE
            )
            self.phases["restoration"] += time.perf_counter() - t
        t = time.perf_counter()
        self.scorer = HeldoutScorer(model, adapter, ctx.heldout, ref, self.kind)
        self.current = self.scorer.value(self.n_layers)
        self.phases["capture"] = time.perf_counter() - t

    def step(self) -> None:
        """One greedy step: score every remaining candidate, remove the best, restore, refresh, log."""
        t_step = time.perf_counter()
        cands = candidates(self.model, self.adapter, self.ctx.layers, self.stage.targets)
        if not cands:  # cannot happen after check_budget; kept as a guard against surprises
            raise ValueError(
                f"{self.method} ({_where(self.stage)}): no sublayer left to remove at {self.removed:,} params"
            )
        score, v, c = self._best(cands)
        self.phases["scoring"] += time.perf_counter() - t_step
        step = self._remove(c, v, score)
        self.current = v  # the candidate's own score is the model's proxy now
        if self.restorer is not None:
            self._restore(step, v, self.restorer)
        t = time.perf_counter()
        if self.restorer is None or not step.kept_restoration:
            self.scorer.refresh(c.layer)
        step.proxy = self.current
        self.phases["capture"] += time.perf_counter() - t
        step.seconds = time.perf_counter() - t_step
        self.steps.append(step)
        self.logs.append(LayerLog(c.layer, step.seconds, c.keep().to_dict(), step.errors))
        self._log(step, v)

    def _best(self, cands: list[Candidate]) -> tuple[float, float, Candidate]:
        """Score every candidate (proxy without it, per latency saved for SPRINT); the lowest wins."""
        best: tuple[float, float, Candidate] | None = None
        bar = tqdm(
            cands,
            desc=f"{self.method} step {len(self.steps) + 1}",
            unit="cand",
            leave=False,
            disable=not self.ctx.progress,
        )
        for c in bar:
            tc = time.perf_counter()
            with without(self.model, self.adapter, c):
                v = self.scorer.value(c.layer)
            self.eval_s += time.perf_counter() - tc
            self.n_evals += 1
            self.depth += (self.n_layers - c.layer) / self.n_layers
            score = (v - self.current) / self.table.saved(c) if self.table is not None else v
            if best is None or score < best[0]:
                best = (score, v, c)
                bar.set_postfix({"best": f"{c.name}@{c.layer}", self.kind: f"{v:.4g}"})
        assert best is not None
        return best

    def _remove(self, c: Candidate, v: float, score: float) -> _Step:
        """Remove the chosen candidate physically and record it in the stage's keep-sets."""
        t = time.perf_counter()
        params = sum(
            n for b, n in branch_params(self.model, self.adapter, c.layer).items() if b in c.branches
        )
        apply_keep(self.model, self.adapter, {c.layer: c.keep()})
        lk = self.keep.setdefault(c.layer, LayerKeep())
        lk.drop_attn |= "attn" in c.branches
        lk.drop_mlp |= "mlp" in c.branches
        self.removed += params
        self.phases["removal"] += time.perf_counter() - t
        return _Step(c, params, v, score, 0.0)

    def _restore(self, step: _Step, v: float, restorer: Restorer) -> None:
        """SPRINT's least-squares refit after a removal, kept only when it lowers the held-out proxy."""
        t = time.perf_counter()
        c = step.cand
        step.errors = restorer.restore(c)
        self.scorer.refresh(c.layer)
        v_restored = self.scorer.value(self.n_layers)
        # least squares on calibration windows can still hurt the held-out proxy (outlier channels
        # dominate squared errors): keep the refit only when it helps there
        step.kept_restoration = v_restored < v
        if step.kept_restoration:
            self.current = v_restored
        else:
            restorer.revert()
        step.restore_s = time.perf_counter() - t
        self.phases["restoration"] += step.restore_s

    def _log(self, step: _Step, v: float) -> None:
        """The step's log line: what went, the budget so far, the proxy and the restoration's verdict."""
        c, kind = step.cand, self.kind
        restored = ""
        if self.restorer is not None:
            fits = " ".join(f"{k} {e['pruned']:.3f}->{e['restored']:.3f}" for k, e in step.errors.items())
            verdict = "kept" if step.kept_restoration else f"reverted ({kind} {v:.4f} without it)"
            restored = f", restoration {fits or '(nothing after it)'} {verdict}"
        self.ctx.log(
            f"{self.method} step {len(self.steps)}: removed layers.{c.layer}.{c.name} ({step.params:,} params, "
            f"{self.removed:,}/{int(self.ctx.params_to_remove):,} so far), {kind} {self.current:.4f}{restored}, "
            f"{step.seconds:.1f}s"
        )

    def result(self) -> PruneResult:
        """The stage's keep-sets, layer logs, phases and extra (removals, costs, SPRINT's details)."""
        steps, n_evals = self.steps, self.n_evals
        self.phases["total"] = time.perf_counter() - self.t0
        extra = self.extra
        extra.update(
            {
                "removed": [[b, s.cand.layer] for s in steps for b in s.cand.branches],
                "removed_params": int(self.removed),
                "removed_params_per_step": [int(s.params) for s in steps],
                "proxy_per_step": [float(s.proxy) for s in steps],
                "steps": len(steps),
                "candidate_evals": n_evals,
                "seconds_per_candidate": self.eval_s / n_evals if n_evals else 0.0,
                "seconds_per_step": statistics.fmean(s.seconds for s in steps) if steps else 0.0,
                # what a candidate evaluation runs: this share of the decoder layers (+ final norm and LM head)
                "forward_fraction_per_candidate": self.depth / n_evals if n_evals else 0.0,
            }
        )
        if n_evals:
            extra["step_cost"] = (
                f"{n_evals / len(steps):.1f} candidates per step, each running {extra['forward_fraction_per_candidate']:.2f} "
                f"of the decoder layers + LM head on {extra['heldout']} held-out tokens "
                f"({extra['seconds_per_candidate']:.3g} s per candidate)"
            )
        if self.latency_aware:
            self._sprint_extra()
        return PruneResult(self.keep, self.logs, self.phases, None, extra)

    def _sprint_extra(self) -> None:
        """SPRINT's entries in the extra: restoration per step and the latency table used."""
        extra, stage, steps, table = self.extra, self.stage, self.steps, self.table
        extra["restore"] = stage.restore.method if stage.restore.method == "least_squares" else "none"
        extra["restoration_s"] = self.phases["restoration"]
        extra["restoration_s_per_step"] = [float(s.restore_s) for s in steps]
        extra["restoration_kept_per_step"] = [bool(s.kept_restoration) for s in steps]
        extra["restore_windows"] = self.restorer.windows if self.restorer is not None else 0
        if table is not None:
            extra["latency_table"] = {
                str(i): {k: float(v) for k, v in d.items()} for i, d in table.per_layer.items()
            }
            extra["latency_cache"] = str(table.path)
            extra["latency_cached"] = table.cached
            extra["latency_seqlen"] = table.seqlen


def greedy_removal(ctx: StageContext, method: str, latency_aware: bool) -> PruneResult:
    """BlockPruner (latency_aware=False) or SPRINT (True) on `ctx.model`, in place."""
    run = _Greedy(ctx, method, latency_aware)
    while run.removed < ctx.params_to_remove:
        run.step()
    return run.result()


def _check(method: str):
    def check(ctx: CheckContext) -> None:
        check_budget(ctx.model, ctx.adapter, method, ctx.stage, ctx.params_to_remove, ctx.layers)

    return check


@register_method("blockpruner", check=_check("blockpruner"))
def blockpruner(ctx: StageContext) -> PruneResult:
    """BlockPruner: greedy removal of the attention / MLP sublayer that hurts held-out quality least."""
    return greedy_removal(ctx, "blockpruner", latency_aware=False)


@register_method("sprint", check=_check("sprint"))
def sprint(ctx: StageContext) -> PruneResult:
    """SPRINT: greedy removal by quality lost per latency saved, least-squares restoration after each step."""
    return greedy_removal(ctx, "sprint", latency_aware=True)
