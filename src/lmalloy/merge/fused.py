"""TIES at memory speed: one fused kernel per chunk, thresholds in one pass.

Eager TIES costs about fifteen torch passes over every entry (difference, magnitude, trim,
weight, sum, sign, agreement, two sums, divide, ...). Here each chunk of the inputs is read
once per pass and all of that arithmetic is one kernel:

- `ties_chunk`: the whole TIES combination of one chunk (the same arithmetic as
  `lmalloy.merge.methods._generalized` with magnitude trimming and sign consensus), the
  non-finite inputs counted in the same kernel (a NaN that TIES would trim away is still
  refused);
- `band_chunk`: for the trim thresholds, each model's |τ| of one chunk, how many entries lie
  above a bound and which lie inside a band.

`torch.compile` (inductor) turns each into one C++ loop over the chunk; it needs a C++
compiler and costs seconds once per process (inductor caches the code on disk), so it is
used where a merge is large enough to repay it (`--compile`, default: inputs over 1 GB).
Without it, or where compiling fails (a warning says why), the same functions run eagerly.

Thresholds (`ties_thresholds`): the k-th largest |τᵢ| of a tensor, exactly. A strided sample
of |τᵢ| (65,536 entries) brackets it between two sampled values with a wide margin (±6σ of
the sample quantile); one pass then counts the entries above the band and keeps the ones in
it (about 2% of the tensor), and the exact k-th largest is found among those. If the band
misses it (it never has in testing; the margin makes it vanishingly rare), the exact
two-pass radix select (`kth_largest_streaming`) runs instead. Tensors of at most 2²⁰
entries are selected directly.
"""

from __future__ import annotations

import math
import sys
import threading

EXACT_MAX = 1 << 20  # entries: select directly
SAMPLE = 1 << 16  # entries of the strided sample
COMPILE_MIN_BYTES = 1 << 30  # `--compile` default: inputs larger than this

_lock = threading.Lock()
_kernels: dict = {}
_warned: list[str] = []


def _nonfinite(x):
    """The count of non-finite entries, as a float sum (`x * 0` would be folded to 0)."""
    import torch

    return (~torch.isfinite(x)).to(x.dtype).sum()


def _ties_core(xs: list, base, thr, w, normalize: bool, lam, out_dtype, compute):
    """One chunk of TIES, written for inductor: trim each τᵢ to |τᵢ| >= thrᵢ, weight, elect
    the sign of Σ wᵢτᵢ, average the agreeing entries (`_generalized`'s arithmetic). Returns
    (output chunk, the count of non-finite input entries, of non-finite output entries).
    Float reductions only: bool outputs and integer sums keep inductor from vectorizing."""
    import torch

    b = base.to(compute)
    bad = _nonfinite(b)
    ds = []
    for i, x in enumerate(xs):
        xf = x.to(compute)
        bad = bad + _nonfinite(xf)
        d = xf - b
        ds.append(torch.where(d.abs() >= thr[i], d, 0.0) * w[i])
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    sgn = torch.where(total >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(b)
    divisor = torch.zeros_like(b)
    for i, d in enumerate(ds):
        agreed = (d * sgn).clamp_min(0.0)
        mixed = mixed + agreed
        divisor = divisor + torch.where(agreed > 0, w[i], 0.0)
    mixed = mixed * sgn
    if normalize:
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    out = (b + mixed * lam).to(out_dtype)
    return out, bad, _nonfinite(out.to(compute))


def _band_core(xs: list, base, lo, hi, compute):
    """Per model, |τᵢ| of the chunk where loᵢ <= |τᵢ| <= hiᵢ, else −1, and the number of
    entries above hiᵢ (a float sum: exact below 2²⁴ entries a chunk)."""
    import torch

    b = base.to(compute)
    out = []
    for i, x in enumerate(xs):
        a = (x.to(compute) - b).abs()
        out.append((torch.where((a >= lo[i]) & (a <= hi[i]), a, -1.0), (a > hi[i]).to(
            compute).sum()))
    return out


class Kernels:
    """The two chunk operations, fused by torch.compile (`compiled`) or eager torch; the
    first compile failure warns once and falls back to eager for good."""

    def __init__(self, compiled: bool):
        from lmalloy.io.models import compiler_missing

        self.compiled = compiled
        if compiled and (why := compiler_missing("cpu")):
            self.compiled = False
            _warn(why)

    def _call(self, name: str, fn, *args):
        try:
            with _lock:  # the first call compiles; one chunk at a time through it
                k = _kernels.get(name)
                if k is None:
                    import torch

                    k = _kernels[name] = torch.compile(fn, dynamic=True)
                return k(*args)
        except Exception as e:  # a compiler that fails, an unsupported platform, ...
            self.compiled = False
            _warn((str(e).strip().splitlines() or [type(e).__name__])[0][:200])
            return None

    def band(self, xs: list, base, lo, hi, compute) -> list[tuple[int, object]]:
        """Per model: (entries above hiᵢ, the |τᵢ| values in [loᵢ, hiᵢ]). The values are
        picked out by numpy (its boolean indexing is ~3x torch's on CPU)."""
        import numpy as np
        import torch

        if self.compiled:
            r = self._call("band", _band_core, xs, base, lo, hi, compute)
            if r is not None:
                out = []
                for v, cnt in r:
                    vn = v.numpy()
                    out.append((int(cnt), torch.from_numpy(vn[vn >= 0])))
                return out
        b = base.to(compute)
        out = []
        for i, x in enumerate(xs):
            a = (x.to(compute) - b).abs_().numpy()
            lo_i, hi_i = float(lo[i]), float(hi[i])
            out.append((int(np.count_nonzero(a > hi_i)),
                        torch.from_numpy(a[(a >= lo_i) & (a <= hi_i)])))
        return out

    def ties(self, xs: list, base, thr, w, normalize: bool, lam, out_dtype, compute):
        """(output chunk, whether an input entry is non-finite, whether an output one is)."""
        if self.compiled:
            r = self._call("ties", _ties_core, xs, base, thr, w, normalize, lam, out_dtype,
                           compute)
            if r is not None:
                out, bad_in, bad_out = r
                return out, float(bad_in) != 0, float(bad_out) != 0
        import torch

        from lmalloy.merge.methods import TensorCtx, _generalized
        from lmalloy.merge.strategies import finite

        fx = [x.to(compute) for x in xs]
        b = base.to(compute)
        if not all(finite(x) for x in [*fx, b]):  # TIES may trim a NaN away
            return None, True, False
        p = [{"weight": float(wi), "density": 0.5} for wi in w.tolist()]
        g = {"normalize": normalize, "lambda": float(lam)}
        ctx = TensorCtx("", 0, tuple(thr.tolist()))
        with torch.no_grad():
            out = _generalized(fx, b, p, g, ctx, "magnitude", True)
        return out.to(out_dtype), False, not finite(out)


def _warn(why: str) -> None:
    """One warning per process that merging falls back to eager torch."""
    if not _warned:
        _warned.append(why)
        print(f"lmalloy: warning: torch.compile is unavailable here ({why}); merging with "
              "eager torch", file=sys.stderr)


def want_compile(flag: bool | None, bytes_in: int) -> bool:
    """`--compile` as given, else whether the merge is large enough to repay compiling."""
    return flag if flag is not None else bytes_in >= COMPILE_MIN_BYTES


def _bracket(sample, k: int, n: int) -> tuple[float, float]:
    """(lo, hi): sampled |τ| values bracketing the k-th largest of n with a ±6σ margin."""
    m = sample.numel()
    s = sample.sort(descending=True).values
    q = k / n
    j = q * m
    spread = 6.0 * math.sqrt(max(m * q * (1 - q), 1.0)) + 8
    hi = float(s[max(0, int(j - spread))]) if j - spread >= 1 else math.inf
    lo = float(s[min(m - 1, int(j + spread))]) if j + spread < m - 1 else 0.0
    return lo, hi


def ties_thresholds(read, models: list, base, densities: list[float], n: int, compute,
                    chunk: int, kernels: Kernels, on_bad) -> list[float]:
    """Per model, the magnitude of its τ's k-th largest entry (k = ⌊density·n⌋, at least 1)
    for one tensor of n entries; `read(folder, a, b)` gives entries [a, b) of an input.
    `on_bad()` is called (and must raise) when an input holds NaN/Inf."""
    import torch

    from lmalloy.merge.methods import kth_largest, kth_largest_streaming
    from lmalloy.merge.strategies import finite

    ks = [max(1, int(d * n)) for d in densities]
    todo = [i for i, d in enumerate(densities) if 0 < d < 1]
    thr = [0.0 if d >= 1 else math.inf for d in densities]
    if not todo:
        return thr
    if n <= EXACT_MAX:
        b = read(base, 0, n).to(compute)
        for i in todo:
            a = (read(models[i], 0, n).to(compute) - b).abs_().float()
            if not finite(a):
                on_bad()
            thr[i] = float(kth_largest(a, ks[i]))
        return thr
    step = max(1, n // SAMPLE)
    b_all = read(base, 0, n)
    bounds = []
    for i in todo:
        sample = (read(models[i], 0, n)[::step].to(compute) - b_all[::step].to(compute)).abs()
        if not finite(sample):
            on_bad()
        bounds.append(_bracket(sample.float(), ks[i], n))
    del b_all
    lo = torch.tensor([x[0] for x in bounds], dtype=compute)
    hi = torch.tensor([x[1] for x in bounds], dtype=compute)
    above = [0] * len(todo)
    parts: list[list] = [[] for _ in todo]
    with torch.no_grad():
        for a0 in range(0, n, chunk):
            b0 = min(n, a0 + chunk)
            got = kernels.band([read(models[i], a0, b0) for i in todo], read(base, a0, b0), lo,
                               hi, compute)
            for j, (cnt, vals) in enumerate(got):
                above[j] += cnt
                parts[j].append(vals)
    for j, i in enumerate(todo):
        vals = torch.cat(parts[j]) if parts[j] else torch.zeros(0)
        r = ks[i] - above[j]  # the rank of the answer inside the band, from the top
        if 1 <= r <= vals.numel():
            thr[i] = float(torch.kthvalue(vals.float(), vals.numel() - r + 1).values)
        else:  # the band missed it: exact, two passes
            def chunks(m=models[i]):
                for a0 in range(0, n, chunk):
                    b0 = min(n, a0 + chunk)
                    yield (read(m, a0, b0).to(compute) - read(base, a0, b0).to(compute)).abs()
            thr[i] = float(kth_largest_streaming(chunks, ks[i]))
    return thr
