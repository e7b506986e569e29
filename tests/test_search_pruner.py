"""The search's staged selection (search/pruner.py) on a real Optuna study."""

from __future__ import annotations

import optuna
import pytest

from secateur.search.pruner import StagePruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    return optuna.create_study(direction="minimize", pruner=pruner)


def _run(study: optuna.Study, values: list[float]) -> list[bool]:
    """One trial per value: report it at step 2048 and record whether the pruner stops it there."""
    out = []
    for v in values:
        t = study.ask()
        t.report(v, 2048)
        stop = t.should_prune()
        out.append(stop)
        study.tell(t, state=optuna.trial.TrialState.PRUNED) if stop else study.tell(t, v)
    return out


def test_first_trials_go_on_then_only_the_best_share_of_recent_peers() -> None:
    study = _study(StagePruner(0.25, window=8, min_peers=4))
    assert _run(study, [5.0, 4.0, 3.0, 2.0]) == [False] * 4  # fewer than min_peers before each
    # peers now 5, 4, 3, 2: a value better than all goes on, one worse than three of them stops
    assert _run(study, [1.0]) == [False]
    assert _run(study, [3.5]) == [True]


def test_recent_peers_set_the_bar_not_the_whole_history() -> None:
    """A converged search: old trials were bad, the last ones are all good. A child as good as the
    median of the history but worse than the recent ones is stopped (PercentilePruner over completed
    trials would let it go on)."""
    study = _study(StagePruner(0.25, window=8, min_peers=4))
    _run(study, [10.0 + i for i in range(16)])
    _run(study, [1.0 + 0.01 * i for i in range(8)])
    assert _run(study, [5.0]) == [True]
    assert _run(study, [0.5]) == [False]


def test_stages_are_compared_only_with_trials_that_reached_them() -> None:
    study = _study(StagePruner(0.5, window=8, min_peers=2))
    for v in (1.0, 2.0, 3.0):  # three trials reached the second stage with these values
        t = study.ask()
        t.report(9.0, 2048)
        t.report(v, 8192)
        study.tell(t, v)
    t = study.ask()
    t.report(9.0, 2048)  # ties the others at the first stage: goes on
    assert not t.should_prune()
    t.report(2.5, 8192)  # worse than 2 of the 3 peers at the second stage: stops
    assert t.should_prune()


def test_survivors_are_checked() -> None:
    with pytest.raises(ValueError, match="survivors"):
        StagePruner(0.0)
