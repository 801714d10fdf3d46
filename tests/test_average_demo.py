"""The averaging demo stage's table helper."""

from __future__ import annotations

from lmalloy.demo.stage_averaging import first_step_below


def test_first_step_below():
    evals = [{"step": s, "eval": {"raw": {"loss": l1}, "lawa": {"loss": l2}}}
             for s, l1, l2 in [(10, 5.0, 5.2), (20, 4.5, 4.4), (30, 4.2, 4.1)]]
    assert first_step_below(evals, "raw", 4.5) == 20
    assert first_step_below(evals, "lawa", 4.45) == 20
    assert first_step_below(evals, "lawa", 4.0) is None
    assert first_step_below(evals, "ema", 9.0) is None
