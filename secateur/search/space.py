"""Sampling a search space with Optuna: one keep fraction per searched parameter.

The space itself (slots, knots, budget projection) is recipe arithmetic in `runtime.allocation.space`;
this module only asks a trial for values.
"""

from __future__ import annotations

import optuna

from secateur.runtime.allocation.space import Fractions, SearchSpace


def suggest(space: SearchSpace, trial: optuna.Trial) -> Fractions:
    """Sample the parameters in the space's range and expand them to one fraction per slot."""
    lo, hi = space.sample_range
    return space.expand({n: trial.suggest_float(n, lo, hi) for n in space.param_names})
