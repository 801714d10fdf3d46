"""Merge methods: pure functions from one tensor of each input to one output tensor.

Every method has the signature

    fn(xs_N: list[Tensor], base: Tensor | None, p: list[dict], g: dict, ctx: TensorCtx) -> Tensor

`xs_N` holds the N fine-tunes' tensors (fp32 or the compute dtype, same shape), `base` the
base model's tensor (None when the method needs none), `p[i]` model i's parameters resolved
for this tensor (gradients and filters already evaluated), `g` the global ones, `ctx` the
tensor's name and the seed. The engine (engine.py) does loading, checking, dtype, shards.
Parameters follow mergekit's names and defaults so that its YAML gives the same tensors:

- linear (Wortsman et al. 2022, "Model soups", 2203.05482): Σ wᵢxᵢ, divided by Σ wᵢ when
  `normalize` (default true). `soup` is linear with equal weights. These are weighted
  averages: their entry gives the weights (`Method.weights`) and the streaming average
  (`lmalloy.average.weighted`) computes them, the same code as `lmalloy average`.
- task_arithmetic (Ilharco et al. 2022, 2212.04089): base + λ·Σ wᵢτᵢ, τᵢ = xᵢ − base
  (`normalize` default false).
- ties (Yadav et al. 2023, 2306.01708): trim each τᵢ to its top `density` fraction by
  magnitude, elect a sign per entry from Σ wᵢτᵢ (mergekit's weighted vote), keep the entries
  agreeing with it, sum wᵢτᵢ over them and divide by Σ wᵢ over the kept entries
  (`normalize`: default true for ties, false for dare_ties, as mergekit 0.1.5); base + λ·that. Top-k is a `kthvalue` threshold, never a sort.
- dare_linear / dare_ties (Yu et al. 2023, 2311.03099): drop each delta entry with
  probability 1 − density and rescale survivors by 1/density, the paper's rescale (mergekit
  0.1.5 matches the L1 norm instead: equal in expectation); seeded per tensor and model so a
  merge is reproducible; then task arithmetic / TIES' sign election.
- slerp (Shoemake 1985; mergekit): spherical interpolation of the whole tensor between the
  base (t = 0) and the other model (t = 1); linear when |cos| > 0.9995.
- model_stock (Jang et al. 2024, 2403.19522): t = N·cos / (1 + (N−1)·cos) from the mean
  pairwise cosine of the task vectors; t·mean(xᵢ) + (1 − t)·base; `filter_wise`: one t per
  row; where 1 + (N−1)·cos ≈ 0 the base is kept (as mergekit 0.1.5).
- passthrough: the single input unchanged (times `scale`, default 1).
- breadcrumbs / breadcrumbs_ties (Davari & Belilovsky 2023, "Model Breadcrumbs", 2312.06795):
  per τᵢ, drop the `gamma` fraction of largest magnitudes (outliers) and the smallest, keeping
  `density`; then task arithmetic / TIES' vote. Two selected thresholds, no sort.
- della / della_linear (Deep et al. 2024, "DELLA-Merging", 2406.11617): MagPrune, a drop
  probability per entry from its magnitude rank within its row (the whole vector for 1-D
  tensors): keep probability density − ε … density + ε from the smallest to the largest;
  survivors rescaled by 1/keep-probability (the paper; mergekit 0.1.5 matches the L1 norm);
  then TIES' vote (della) or a plain sum (della_linear).
- sce (arXiv 2408.07990): Select the `select_topk` fraction of entries with the largest
  variance across the τᵢ, Calculate one weight per model ∝ mean(τᵢ²), Erase entries whose
  sign disagrees with Σ τᵢ; the weighted mean of the rest.
- nuslerp (mergekit): SLERP between two models (or their task vectors when a base is given)
  at t = w₂/(w₁+w₂), over the flattened tensor or per row/column.
- multislerp (C. Goddard, mergekit): barycentric SLERP of N models (or task vectors) on the
  hypersphere through the tangent space at their weighted mean direction, scaled to the
  weighted mean norm.
- karcher (the Riemannian centre of mass, Karcher 1977; mergekit cites arXiv 2603.04972):
  the uniform Fréchet mean of the inputs' directions on the unit sphere by fixed-point
  iteration, scaled by the mean norm; a given base is one more input (as in mergekit).
- nearswap (alchemonaut, mergekit): interpolate base → model with weight
  clamp(t / |model − base|, 0, 1) per entry: entries that are already close are swapped in.
- arcee_fusion (Arcee AI, mergekit): keep the model's change where its importance
  |Δ|·KL(softmax(model) ‖ softmax(base)) (KL per row) reaches median + 1.5·IQR.
- ram / ramplus_tl (Reinforced Agent Merging, arXiv 2601.13572, as in mergekit): an entry
  changed (|τ| > ε) by one model takes that change, by several their mean; RAM+
  (tensor-local) scales each model's unique entries by 1 + r·clamp(shared/unique, 0, α).

Method fields beyond the paper: `needs_base` / `optional_base` (a given base is taken out of
the models and passed as `base`), `n_models` (fine-tunes besides the base), `drops` (the
engine checks inputs for NaN/Inf since a dropped entry could hide one), `check` (a
cross-parameter check run per tensor at planning).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class TensorCtx:
    name: str
    seed: int = 0
    # whole-model TIES trim: per model, the magnitude threshold over its whole task vector
    thresholds: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Param:
    name: str
    default: object = None  # None = required
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    kind: str = "float"  # float | int | bool

    def check(self, value, where: str) -> str | None:
        """An error message, or None if the value is valid."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"`{self.name}`{where} must be " \
                f"true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"`{self.name}`{where} must be a number, got {value!r}"
        if self.kind == "int" and value != int(value):
            return f"`{self.name}`{where} must be a whole number, got {value!r}"
        if not math.isfinite(value):
            return f"`{self.name}`{where} must be finite, got {value}"
        lo_bad = self.low is not None and (value <= self.low if self.low_open
                                           else value < self.low)
        hi_bad = self.high is not None and value > self.high
        if lo_bad or hi_bad:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            rng = f"{'(' if self.low_open else '['}{lo}, {hi}]"
            return f"`{self.name}`{where} must be in {rng}, got {value:g}"
        return None


@dataclass(frozen=True)
class Method:
    fn: Callable[..., Tensor] | None  # None: a weighted average, see `weights`
    paper: str
    needs_base: bool = False
    n_models: tuple[int, int | None] = (1, None)  # fine-tunes (base excluded), inclusive
    model_params: tuple[Param, ...] = ()
    global_params: tuple[Param, ...] = ()
    aliases: dict = field(default_factory=dict)
    # weighted averages: (per-model params, global params) -> the coefficient of each model
    weights: Callable[[list[dict], dict], list[float]] | None = None
    # a base that may be given or not: when given it is taken out of the models and passed
    # as `base` (nuslerp, multislerp: task vectors; karcher: one more input)
    optional_base: bool = False
    # may drop entries, so a NaN/Inf input can vanish from the output: the engine checks the
    # inputs, not just the output
    drops: bool = False
    # cross-parameter check per tensor, at planning: (p, g) -> error message or None
    check: Callable[[list[dict], dict], str | None] | None = None


# --------------------------------------------------------------------------- helpers

def kth_largest(a: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a non-negative fp32 tensor, by radix selection.

    Non-negative IEEE floats order like their bit patterns, so a histogram of the top 16
    bits (32,768 bins) finds the bucket holding the k-th largest; an exact `kthvalue` runs on
    that bucket alone (~1% of the entries). No sort; ~4x faster than `kthvalue` on the whole.
    """
    a = a.reshape(-1)
    return kth_largest_streaming(lambda: iter([a]), k)


def kth_largest_streaming(chunks, k: int) -> Tensor:
    """`kth_largest` over a tensor given as chunks: `chunks()` yields its non-negative
    parts (any sizes, the same each call). Two passes, each holding one chunk: a histogram
    of the top 16 float bits, then the entries of the one bucket that holds the answer."""
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for c in chunks():
        c = c.reshape(-1).float()
        hist += torch.bincount(c.view(torch.int32) >> 16, minlength=1 << 15)
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k)))
    above = int(from_top[j - 1]) if j > 0 else 0
    bucket = (1 << 15) - 1 - j
    parts = []
    for c in chunks():
        c = c.reshape(-1).float()
        parts.append(c[(c.view(torch.int32) >> 16) == bucket])
    sub = torch.cat(parts)
    return torch.kthvalue(sub, sub.numel() - (k - above) + 1).values


def trim(x: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """x where |x| is among its top `density` fraction (or >= `threshold`), else 0."""
    import torch.nn.functional as F

    a = x.abs()
    if threshold is None:
        n = a.numel()
        if density >= 1:
            return x
        if density <= 0 or n == 0:
            return torch.zeros_like(x)
        threshold = kth_largest(a, max(1, int(density * n)))
    thr = torch.as_tensor(threshold, dtype=a.dtype)
    below = float(torch.nextafter(thr, torch.tensor(-math.inf, dtype=a.dtype)))
    # threshold(a, below) keeps a > below, i.e. a >= thr, exactly; |x|·sign(x) == x
    return F.threshold(a, below, 0.0).mul_(x.sign())


def uniform(shape: torch.Size, ctx: TensorCtx, i: int) -> Tensor:
    """U[0, 1) noise from a generator seeded by (seed, tensor name, model index)."""
    h = hashlib.blake2b(f"{ctx.seed}/{ctx.name}/{i}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))
    return torch.rand(shape, generator=gen)


def dare_mask(shape: torch.Size, density: float, ctx: TensorCtx, i: int) -> Tensor:
    """Bernoulli(density) keep-mask, seeded by (seed, tensor name, model index)."""
    return uniform(shape, ctx, i) < density


def breadcrumbs_mask(x: Tensor, density: float, gamma: float) -> Tensor:
    """Keep `density` of the entries by magnitude after dropping the `gamma` largest.

    As mergekit's `magnitude_outliers`: with n entries, k = ⌊density·n⌋ are kept, the top
    ⌊gamma·n⌋ dropped (fewer when k needs them), the rest from the bottom. The kept band
    lies between two selected magnitudes (no sort; entries tied at a bound are all kept).
    """
    a = x.abs().reshape(-1)
    n = a.numel()
    k = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - k - n_top)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    lo = kth_largest(a, n - n_bot)  # the (n_bot + 1)-th smallest
    hi = kth_largest(a, n - n_bot - k + 1)  # the (n_bot + k)-th smallest
    return ((a >= lo) & (a <= hi)).view(x.shape)


def della_probs(x: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune keep probabilities: density − ε … density + ε by magnitude rank.

    Ranked along dim 1 (within each row of a matrix; 1-D tensors as one row), as mergekit
    0.1.5: rank 0 (smallest) gets density − ε, the largest density + ε, linearly between.
    """
    shape = x.shape
    a = x.abs().reshape(1, -1) if x.dim() < 2 else x.abs()  # (rows, n, ...)
    n = a.shape[1]
    order = torch.argsort(a, dim=1)
    ranks = torch.empty_like(order)
    ar = torch.arange(n).view(1, n, *([1] * (a.dim() - 2))).expand_as(order)
    ranks.scatter_(1, order, ar)  # ranks[order[j]] = j
    # a row of one entry has no spread: its probability is density (mergekit: NaN)
    rank_norm = ranks.to(x.dtype) / (n - 1) if n > 1 else torch.full_like(a, 0.5)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).view(shape)


def della_check(p: list[dict], g: dict) -> str | None:
    for i, q in enumerate(p):
        d, e = q["density"], q["epsilon"]
        if d < 1 and not (0 < d - e and d + e < 1):
            return (f"`epsilon` {e:g} with `density` {d:g} of model {i + 1}: density ± epsilon "
                    f"must lie in (0, 1)")
    return None


def _l1_rescale(before: Tensor, after: Tensor, eps: float = 1e-7) -> Tensor:
    """mergekit's `rescale` for magnitude trimming: match the L1 norm of the untrimmed delta."""
    a, b = before.abs().sum(), after.abs().sum()
    return after if a < eps or b < eps else after * (a / b)


def _generalized(xs: list[Tensor], base: Tensor, p: list[dict], g: dict, ctx: TensorCtx,
                 sparsify: str | None, consensus: bool) -> Tensor:
    """mergekit's generalized task arithmetic: sparsify, weight, (sign-vote), sum, scale.

    Written delta by delta (no (N, ...) stack): the same arithmetic as mergekit's
    `generalized_task_arithmetic.py` with fewer full-size temporaries.
    """
    w = [float(q["weight"]) for q in p]
    deltas = []  # wᵢ·τᵢ after sparsification
    for i, (x, q) in enumerate(zip(xs, p, strict=True)):
        d = x - base
        density = float(q.get("density", 1.0))
        if sparsify == "magnitude":
            thr = ctx.thresholds[i] if ctx.thresholds is not None else None
            if density < 1 or thr is not None:
                kept = trim(d, density, thr)
                d = _l1_rescale(d, kept) if g.get("rescale", False) else kept
        elif sparsify == "random" and density < 1:
            d = torch.where(dare_mask(d.shape, density, ctx, i), d, 0.0)
            if g.get("rescale", True):
                d.div_(density)
        elif sparsify == "outliers" and density < 1:
            kept = d * breadcrumbs_mask(d, density, float(q["gamma"]))
            d = _l1_rescale(d, kept) if g.get("rescale", False) else kept
        elif sparsify == "della" and density < 1:
            probs = della_probs(d, density, float(q["epsilon"]))
            d = torch.where(uniform(d.shape, ctx, i) < probs, d, 0.0)
            if g.get("rescale", True):
                d.div_(probs)  # the paper's 1/(1 − pᵢ), pᵢ the drop probability
            del probs
        if w[i] != 1.0:
            d.mul_(w[i])
        deltas.append(d)
    if consensus:
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        # elected sign ±1 (Σ wᵢτᵢ >= 0 -> +; a −0.0 sum only arises where every entry is 0)
        sgn = torch.ones_like(total).copysign_(total)
        del total
        mixed = torch.zeros_like(base)  # Σ over agreeing entries of |wᵢτᵢ|
        divisor = torch.zeros_like(base)  # Σ over agreeing entries of wᵢ
        for wi, d in zip(w, deltas, strict=True):
            agreed = (d * sgn).clamp_min_(0.0)  # |wᵢτᵢ| where its sign is the elected one
            mixed.add_(agreed)
            divisor.add_(agreed.sign_(), alpha=wi)  # float ops only: bool masks are slow
        mixed.mul_(sgn)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = deltas[0].clone()
        for d in deltas[1:]:
            mixed.add_(d)
        s = sum(w)
        divisor = s if abs(s) >= 1e-8 else 1.0
    del deltas
    if g["normalize"]:
        mixed = mixed / divisor
    lam = float(g.get("lambda", 1.0))
    if lam != 1:
        mixed.mul_(lam)
    return base + mixed


# --------------------------------------------------------------------------- methods

def linear_weights(p: list[dict], g: dict) -> list[float]:
    """Σ wᵢxᵢ, divided by Σ wᵢ when `normalize`: the coefficient of each model."""
    w = [float(q["weight"]) for q in p]
    if g.get("normalize", True):
        s = sum(w)
        if abs(s) < 1e-8:
            from lmalloy.errors import UserError

            raise UserError("the weights sum to 0; with normalize they must not")
        w = [x / s for x in w]
    return w


def uniform_weights(p: list[dict], g: dict) -> list[float]:
    """The uniform soup: 1/N each."""
    return [1.0 / len(p)] * len(p)


def gta(sparsify: str | None, consensus: bool) -> Callable[..., Tensor]:
    """A generalized task arithmetic method: sparsify each τᵢ (None, magnitude, random,
    outliers, della), then a plain sum or TIES' sign vote (`consensus`)."""
    return partial(_generalized, sparsify=sparsify, consensus=consensus)


def slerp_pair(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995,
               eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two tensors viewed as flat vectors (mergekit's formula)."""
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta0 = math.acos(dot)
    s = math.sin(theta0)
    s0 = math.sin(theta0 - theta0 * t) / s
    s1 = math.sin(theta0 * t) / s
    return s0 * v0 + s1 * v1


def slerp(xs, base, p, g, ctx):
    return slerp_pair(float(g["t"]), base, xs[0])


def model_stock(xs, base, p, g, ctx):
    shape = base.shape
    if g.get("filter_wise", False):  # one cosine per row (per output filter)
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
    else:
        w0 = base.reshape(-1)
    ws = [x.reshape(w0.shape) for x in xs]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norm = a.norm(dim=-1) * b.norm(dim=-1)
            cos.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)  # (1,) or (rows, 1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6  # opposing updates: keep the base there
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, 1, den))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)


def passthrough(xs, base, p, g, ctx):
    s = float(p[0].get("scale", 1.0))
    return xs[0] * s if s != 1 else xs[0]


def sce(xs, base, p, g, ctx):
    """Select (top variance across models), Calculate (weights ∝ mean τ²), Erase (sign)."""
    tvs = [x - base for x in xs]
    k_frac = float(g["select_topk"])
    if k_frac < 1:
        if k_frac <= 0:
            keep = torch.zeros_like(base, dtype=torch.bool)
        else:
            mean = sum(tvs) / len(tvs)
            var = sum((t - mean).square_() for t in tvs) / len(tvs)  # population variance
            del mean
            k = int(int(torch.count_nonzero(var)) * k_frac)
            # the k-th largest of k <= #nonzero variances is > 0: zero-variance entries go
            keep = var >= kth_largest(var, k) if k > 0 else torch.zeros_like(var,
                                                                             dtype=torch.bool)
            del var
        tvs = [t * keep for t in tvs]
    sq = [float(t.square().mean()) for t in tvs]
    total = sum(sq)
    w = [1.0 / len(tvs)] * len(tvs) if abs(total) < 1e-6 else [v / total for v in sq]
    sgn = torch.ones_like(base).copysign_(sum(tvs))  # elected sign: + where Σ τᵢ >= 0
    merged = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for wi, t in zip(w, tvs, strict=True):
        agree = (t.sign() == sgn).to(base.dtype)  # a zero entry agrees with no sign
        merged.add_(t * agree, alpha=wi)
        den.add_(agree, alpha=wi)
    return base + merged / den.clamp_(min=1e-6)


def _nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool,
             eps: float = 1e-8) -> Tensor:
    """SLERP along the last axis (of the flattened tensor, or of its transpose when
    row-wise), linear where the two are colinear: 1 − cos² <= eps²."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * a + t * b, res)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def nuslerp(xs, base, p, g, ctx):
    w0, w1 = float(p[0]["weight"]), float(p[1]["weight"])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row, flat = bool(g["nuslerp_row_wise"]), bool(g["nuslerp_flatten"])
    if base is None:
        return _nuslerp(t, xs[0], xs[1], row, flat)
    return base + _nuslerp(t, xs[0] - base, xs[1] - base, row, flat)


def multislerp(xs, base, p, g, ctx):
    """Barycentric SLERP: tangent space at the weighted mean direction, exponential map back."""
    from lmalloy.errors import UserError

    if len(xs) == 1:
        return xs[0]
    eps = float(g["eps"])
    w = torch.tensor([float(q["weight"]) for q in p], dtype=xs[0].dtype)
    if g["normalize_weights"]:
        w = w / w.sum()
    vs = [(x - base if base is not None else x).reshape(-1) for x in xs]
    norms = [v.norm() for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(xs) != 2:
            raise UserError(f"multislerp: the weighted directions of `{ctx.name}` cancel "
                            f"out (antipodal inputs); change the weights")
        res = (vs[0] * w[0] + vs[1] * w[1]).view(xs[0].shape)  # linear fallback
        return res + base if base is not None else res
    mean = mean / mean_norm
    tangent = sum(wi * (u - (u * mean).sum() * mean) for wi, u in zip(w, units, strict=True))
    tn = tangent.norm() + eps
    res = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    res = (res * sum(n * wi for n, wi in zip(norms, w, strict=True))).view(xs[0].shape)
    return res + base if base is not None else res


def karcher_mean(xs: list[Tensor], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Uniform Karcher (Fréchet) mean of the directions on the unit sphere × the mean norm.

    Fixed-point iteration, as mergekit 0.1.5: the mean of the log maps at the current
    estimate, one exponential-map step, until the step's norm is below `tol`. Inputs with
    norm <= tol take no part in the direction (they still count in the norm).
    """
    if len(xs) == 1:
        return xs[0]
    alpha = 1.0 / len(xs)
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n
             for x, n in zip(xs, norms, strict=True)]
    valid = [u for u, n in zip(units, norms, strict=True) if float(n) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a = 1.0 / len(valid)
    mean = torch.zeros_like(valid[0])
    for u in valid:
        mean += a * u
    mn = torch.linalg.vector_norm(mean)
    mean = valid[0].clone() if float(mn) < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in valid:
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(alpha * n for n in norms) * mean


def karcher(xs, base, p, g, ctx):
    inputs = xs + ([base] if base is not None else [])  # mergekit: the base is one more input
    return karcher_mean(inputs, int(g["max_iter"]), float(g["tol"]))


def nearswap(xs, base, p, g, ctx):
    b = xs[0]
    w = (float(g["t"]) / (base - b).abs().clamp_(min=1e-6)).clamp_(0, 1)
    return w * b + (1 - w) * base


def arcee_fusion(xs, base, p, g, ctx):
    """Keep the change where importance = |Δ|·KL(softmax(x) ‖ softmax(base)) per row is an
    upper outlier: >= median + 1.5·(q3 − q1), exact quantiles (the ⌊q·(n − 1)⌋-th
    smallest)."""
    import torch.nn.functional as F

    x = xs[0]
    q = F.softmax(base, dim=-1) + 1e-8
    pr = F.softmax(x, dim=-1) + 1e-8
    kl = (pr * torch.log(pr / q)).sum(dim=-1, keepdim=True)  # (..., 1)
    del q, pr
    imp = (x - base).abs() * kl  # (..., n)
    flat = imp.reshape(-1)
    n = flat.numel()
    q1, med, q3 = (torch.kthvalue(flat, int(f * (n - 1)) + 1).values for f in (0.25, 0.5, 0.75))
    keep = imp >= med + 1.5 * (q3 - q1)
    return base + (x - base) * keep


def _ram(xs, base, eps: float, r: float | None = None, alpha: float = 0.0) -> Tensor:
    """RAM: entries changed (|τ| > eps) by one model take it, by several their mean. With `r`
    (RAM+ tensor-local), model i's unique entries are scaled by 1 + r·clamp(ρᵢ, 0, α), ρᵢ =
    its shared / unique changed entries in this tensor."""
    tvs = [x - base for x in xs]
    nz = [t.abs() > eps for t in tvs]
    count = torch.zeros_like(base)
    for m in nz:
        count += m
    unique = count == 1
    overlap = count > 1
    inv = torch.where(overlap, 1 / count.clamp(min=1), 0.0)  # mean over contributors
    out = base.clone()
    for t, m in zip(tvs, nz, strict=True):
        scale = 1.0
        if r is not None:
            shared = int((m & overlap).sum())
            uniq = int((m & unique).sum())
            scale = 1 + r * min(max(shared / max(uniq, eps), 0.0), alpha)
        out += t * m * (unique * scale + inv)
    return out


def ram(xs, base, p, g, ctx):
    return _ram(xs, base, float(g["epsilon"]))


def ramplus_tl(xs, base, p, g, ctx):
    return _ram(xs, base, float(g["epsilon"]), float(g["r"]), float(g["alpha"]))


def multislerp_check(p: list[dict], g: dict) -> str | None:
    if g["normalize_weights"] and len(p) > 1 and abs(sum(q["weight"] for q in p)) < 1e-12:
        return "multislerp's weights sum to 0; with normalize_weights they must not"
    return None


# --------------------------------------------------------------------------- registry

WEIGHT = Param("weight")
DENSITY = Param("density", 1.0, 0.0, 1.0, low_open=True)
NORM_T = Param("normalize", True, kind="bool")
NORM_F = Param("normalize", False, kind="bool")
LAMBDA = Param("lambda", 1.0)
RESC_T = Param("rescale", True, kind="bool")
RESC_F = Param("rescale", False, kind="bool")
INT8 = Param("int8_mask", False, kind="bool")  # accepted for mergekit YAML; no effect here
GAMMA = Param("gamma", 0.01, 0.0, 1.0)
EPSILON = Param("epsilon", 0.15, 0.0, 0.5)

METHODS: dict[str, Method] = {
    "linear": Method(None, "Model soups, Wortsman et al. 2022 (arXiv 2203.05482)",
                     model_params=(Param("weight", 1.0),), global_params=(NORM_T,),
                     weights=linear_weights),
    "soup": Method(None, "uniform soup, Wortsman et al. 2022 (arXiv 2203.05482)",
                   weights=uniform_weights),
    "greedy_soup": Method(None, "greedy soup, Wortsman et al. 2022 (arXiv 2203.05482)",
                          weights=uniform_weights),
    "task_arithmetic": Method(gta(None, False), "Ilharco et al. 2022 (arXiv 2212.04089)",
                              needs_base=True, model_params=(WEIGHT,),
                              global_params=(NORM_F, LAMBDA, INT8)),
    "ties": Method(gta("magnitude", True), "TIES-merging, Yadav et al. 2023 (arXiv 2306.01708)",
                   needs_base=True, drops=True, model_params=(WEIGHT, DENSITY),
                   global_params=(NORM_T, LAMBDA, RESC_F, INT8)),
    "dare_linear": Method(gta("random", False), "DARE, Yu et al. 2023 (arXiv 2311.03099)",
                          needs_base=True, drops=True, model_params=(WEIGHT, DENSITY),
                          global_params=(NORM_F, LAMBDA, RESC_T)),
    "dare_ties": Method(gta("random", True), "DARE + TIES, Yu et al. 2023 (arXiv 2311.03099)",
                        needs_base=True, drops=True, model_params=(WEIGHT, DENSITY),
                        global_params=(NORM_F, LAMBDA, RESC_T, INT8)),
    "slerp": Method(slerp, "spherical interpolation, Shoemake 1985; as in mergekit",
                    needs_base=True, n_models=(1, 1), global_params=(Param("t", None, 0.0, 1.0),)),
    "model_stock": Method(model_stock, "Model Stock, Jang et al. 2024 (arXiv 2403.19522)",
                          needs_base=True, n_models=(2, None),
                          global_params=(Param("filter_wise", False, kind="bool"),)),
    "passthrough": Method(passthrough, "copy one model (optionally scaled)", n_models=(1, 1),
                          model_params=(Param("scale", 1.0),)),
    "breadcrumbs": Method(gta("outliers", False),
                          "Model Breadcrumbs, Davari & Belilovsky 2023 (arXiv 2312.06795)",
                          needs_base=True, drops=True, model_params=(WEIGHT, DENSITY, GAMMA),
                          global_params=(NORM_F, LAMBDA, RESC_F, INT8)),
    "breadcrumbs_ties": Method(gta("outliers", True), "Model Breadcrumbs with TIES, Davari & "
                               "Belilovsky 2023 (arXiv 2312.06795)", needs_base=True,
                               drops=True, model_params=(WEIGHT, DENSITY, GAMMA),
                               global_params=(NORM_F, LAMBDA, RESC_F, INT8)),
    "della": Method(gta("della", True), "DELLA-Merging, Deep et al. 2024 (arXiv 2406.11617)",
                    needs_base=True, drops=True, check=della_check,
                    model_params=(WEIGHT, DENSITY, EPSILON),
                    global_params=(NORM_T, LAMBDA, RESC_T, INT8)),
    "della_linear": Method(gta("della", False),
                           "DELLA-Merging, linear, Deep et al. 2024 (arXiv 2406.11617)",
                           needs_base=True, drops=True, check=della_check,
                           model_params=(WEIGHT, DENSITY, EPSILON),
                           global_params=(NORM_F, LAMBDA, RESC_T, INT8)),
    "sce": Method(sce, "SCE merging (arXiv 2408.07990)", needs_base=True, drops=True,
                  global_params=(Param("select_topk", 1.0, 0.0, 1.0), INT8)),
    "nuslerp": Method(nuslerp, "NuSLERP (mergekit): SLERP of two models or task vectors",
                      optional_base=True, n_models=(2, 2), model_params=(WEIGHT,),
                      global_params=(Param("nuslerp_row_wise", False, kind="bool"),
                                     Param("nuslerp_flatten", True, kind="bool"))),
    "multislerp": Method(multislerp, "Multi-SLERP, C. Goddard (goddard.blog/posts/"
                         "multislerp-wow-what-a-cool-idea)", optional_base=True,
                         model_params=(WEIGHT,), check=multislerp_check,
                         global_params=(Param("normalize_weights", True, kind="bool"),
                                        Param("eps", 1e-8, 0.0))),
    "karcher": Method(karcher, "Karcher mean on the sphere, Karcher 1977; mergekit cites "
                      "arXiv 2603.04972", optional_base=True,
                      global_params=(Param("max_iter", 10, 0.0, kind="int"),
                                     Param("tol", 1e-5, 0.0))),
    "nearswap": Method(nearswap, "NearSwap, alchemonaut (huggingface.co/alchemonaut/"
                       "QuartetAnemoi-70B-t0.0001)", needs_base=True, n_models=(1, 1),
                       global_params=(Param("t", None, 0.0),)),
    "arcee_fusion": Method(arcee_fusion, "Arcee Fusion, Arcee AI (as in mergekit 0.1.5)",
                           needs_base=True, n_models=(1, 1), drops=True),
    "ram": Method(ram, "RAM, Reinforced Agent Merging (arXiv 2601.13572)", needs_base=True,
                  drops=True, global_params=(Param("epsilon", 1e-5, 0.0),)),
    "ramplus_tl": Method(ramplus_tl, "RAM+ tensor-local, Reinforced Agent Merging (arXiv "
                         "2601.13572)", needs_base=True, drops=True,
                         global_params=(Param("r", 0.1, 0.0), Param("alpha", 0.2, 0.0),
                                        Param("epsilon", 1e-5, 0.0))),
}
