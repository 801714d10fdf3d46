"""Intervals and verdicts of the demo's claims: computed, never written by hand.

Every claim of the report is a number with a 95% interval and a threshold that the paper
(or the project, where the paper gives none) sets; `verdict` turns them into *held* (the
whole interval is on the claim's side of the threshold), *did not hold* (the whole interval
is on the other side) or *inconclusive* (it straddles the threshold).

Intervals: `bootstrap` resamples independent units (validation windows, preference pairs,
token sequences, prompts) with replacement and takes the 2.5th and 97.5th percentiles of a
statistic; paired comparisons resample the same units for both sides, so the noise they
share cancels. `wilson` is the score interval of one proportion. The intervals cover the
evaluation's sampling noise, not the training's (one seed per model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE)
RESAMPLES = 2000


def verdict(lo: float, hi: float, threshold: float, higher: bool = True) -> str:
    """`higher`: the claim is value > threshold (else value < threshold)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if higher:
        return HELD if lo > threshold else NOT_HELD if hi <= threshold else INCONCLUSIVE
    return HELD if hi < threshold else NOT_HELD if lo >= threshold else INCONCLUSIVE


def all_of(verdicts: Sequence[str]) -> str:
    """A claim made of parts holds when every part holds and fails when any part fails."""
    if any(v == NOT_HELD for v in verdicts):
        return NOT_HELD
    return HELD if verdicts and all(v == HELD for v in verdicts) else INCONCLUSIVE


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (ties counted as halves may make k
    fractional)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def bootstrap(stat: Callable[[np.ndarray], float], n: int | Sequence[int],
              resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(statistic on all units, 2.5th, 97.5th percentile over resamples).

    `n`: the number of units, or one count per stratum (units resampled within each
    stratum, e.g. the windows of each domain); `stat` gets the chosen unit indices (into
    the concatenated strata) and returns one number. Non-finite resamples are dropped."""
    sizes = [n] if isinstance(n, int) else list(n)
    starts = np.cumsum([0, *sizes[:-1]])
    full = np.arange(sum(sizes))
    value = float(stat(full))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(resamples):
        idx = np.concatenate([s + rng.integers(0, m, m) for s, m in zip(starts, sizes,
                                                                         strict=True) if m])
        v = float(stat(idx))
        if math.isfinite(v):
            vals.append(v)
    if len(vals) < resamples // 2:
        return value, float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return value, float(lo), float(hi)


def mean_interval(x: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Bootstrap interval of a mean (of per-unit values, e.g. paired differences)."""
    a = np.asarray(x, dtype=np.float64)
    return bootstrap(lambda i: a[i].mean(), len(a), seed=seed)


def gap_closed_interval(base: Sequence[float], mid: Sequence[float], ref: Sequence[float],
                        strata: Sequence[int] | None = None, seed: int = 0
                        ) -> tuple[float, float, float]:
    """(base − mid) / (base − ref) of per-unit losses (means over resampled units): the
    share of the base → reference gap that `mid` closes, with its paired interval."""
    b, m, r = (np.asarray(v, dtype=np.float64) for v in (base, mid, ref))

    def stat(i):
        den = b[i].mean() - r[i].mean()
        return (b[i].mean() - m[i].mean()) / den if den > 0 else float("nan")

    return bootstrap(stat, list(strata) if strata else len(b), seed=seed)


def fmt_interval(value: float, lo: float, hi: float, pct: bool = False, digits: int = 3
                 ) -> str:
    """`value [lo, hi]`, as percentages when `pct`."""
    if pct:
        return f"{100 * value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def claim(text: str, paper: str, paper_number: str, measured: str, value: float, lo: float,
          hi: float, threshold: float, higher: bool = True, verdict_: str | None = None,
          note: str = "") -> dict:
    """One row of the report's claims table. The verdict is `verdict(lo, hi, threshold,
    higher)` unless the claim combines several parts (`verdict_`, from `all_of`)."""
    v = verdict_ if verdict_ is not None else verdict(lo, hi, threshold, higher)
    assert v in VERDICTS, v
    return {"claim": text, "paper": paper, "paper_number": paper_number, "measured": measured,
            "value": value, "lo": lo, "hi": hi, "threshold": threshold, "higher": higher,
            "combined": verdict_ is not None, "verdict": v, "note": note}
