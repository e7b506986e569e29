"""Staged selection for the search: successive halving over the most recent trials.

Optuna's PercentilePruner compares a trial with every *completed* trial. In an evolutionary search
the children of the current best are nearly as good as it, so almost all of them beat that
historical percentile and run every stage: the multi-fidelity saving disappears exactly when the
search converges. Here a trial goes on to the next stage only when its value is among the best
`survivors` share of the last `window` trials that reached the same stage (any state, other
workers' included, all read from the study's storage), as in ASHA and EvoPress's staged selection.

A child of the evolution records its parent (user attribute `parent`, a trial number). Then the
comparison is EvoPress's paired one: the child goes on only while it is at least as good as its
parent was on the very same held-out windows (every complete trial reported every stage), which
removes the noise of comparing different candidates on a few tokens and stops most children after
the first stage (the time saved buys more generations).
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class StagePruner(optuna.pruners.BasePruner):
    """Prune unless the trial ranks in the best `survivors` share of its recent peers at this stage."""

    def __init__(self, survivors: float, window: int = 16, min_peers: int = 4, paired: bool = True) -> None:
        if not 0 < survivors <= 1:
            raise ValueError(f"survivors must be in (0, 1], got {survivors}")
        self.survivors = survivors
        self.window = window
        self.min_peers = min_peers
        self.paired = paired

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        parent = trial.user_attrs.get("parent") if self.paired else None
        if parent is not None:
            mine = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            ref = [t.intermediate_values.get(step) for t in mine if t.number == parent]
            if ref and ref[0] is not None:
                return value > ref[0]
        peers = [
            t.intermediate_values[step]
            for t in sorted(study.get_trials(deepcopy=False, states=_STATES), key=lambda t: t.number)
            if t.number != trial.number and step in t.intermediate_values
        ][-self.window :]
        if len(peers) < self.min_peers:
            return False
        better = sum(v < value for v in peers)  # the search minimises its proxy
        return better >= self.survivors * (len(peers) + 1)
