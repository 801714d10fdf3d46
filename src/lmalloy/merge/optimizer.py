"""Gradient-free optimisation with nevergrad (Rapin & Teytaud 2018), for `merge lorahub`
and `merge search`: the one place lmalloy imports nevergrad and builds its optimizers.

An optimizer is built from a nevergrad parametrization and a budget, with one worker
(candidates are asked and told one at a time) and a seeded random state, so the same
seed asks the same candidates after the same answers: `merge search` replays a killed
search's log through `ask`/`tell` this way. `NGOpt`, nevergrad's default, picks an
algorithm from the budget and the space (dimension, bounds, discrete parts).
"""

from __future__ import annotations

import contextlib
import warnings

from lmalloy.errors import UserError, closest

EXAMPLES = ("NGOpt", "CMA", "TwoPointsDE", "OnePlusOne", "PSO", "Cobyla", "RandomSearch")


def nevergrad(command: str):
    """The nevergrad module, or a UserError that says how to install it."""
    try:
        import nevergrad as ng
    except ImportError:
        raise UserError(f"`{command}` needs nevergrad: pip install 'lmalloy[search]'"
                        ) from None
    return ng


def check_optimizer(ng, name: str, flag: str = "--optimizer") -> None:
    if name not in ng.optimizers.registry:
        raise UserError(f"`{flag}`: nevergrad has no optimizer `{name}`"
                        f"{closest(name, ng.optimizers.registry)}; e.g. {', '.join(EXAMPLES)}")


def optimizer(ng, parametrization, budget: int, name: str = "NGOpt", seed: int = 0):
    """A seeded, single-worker nevergrad optimizer over `parametrization`."""
    import numpy as np

    check_optimizer(ng, name)
    opt = ng.optimizers.registry[name](parametrization=parametrization, budget=budget,
                                       num_workers=1)
    opt.parametrization.random_state = np.random.RandomState(seed)
    return opt


@contextlib.contextmanager
def quiet():
    """Without the optimizers' warnings about their own settings (scipy's COBYLA on RHOEND,
    nevergrad on its choices): they concern nothing a user set."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(scipy|nevergrad|cma)")
        yield
