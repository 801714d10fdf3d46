"""How each tensor of a merge is computed, once the plan is made (`lmalloy.merge.plan`).

- **weighted averages** (linear, soup, greedy soup) are not here: they stream through
  `lmalloy.average.weighted`, chunk by chunk, the same code as `lmalloy average`;
- **streamed TIES** (`ties_streamed`): TIES without L1 rescale is elementwise once each
  model's magnitude threshold for the tensor is known: the thresholds come from two
  chunked passes (a histogram of the float bits, then the one bucket holding the k-th
  largest: `kth_largest_streaming`), then the method runs on 1M-entry chunks read as
  zero-copy views of the mapped inputs and each chunk goes to the writer at once — peak
  memory is a few chunks, whatever the tensor size;
- **generic** (`merge_tensor`): the method's pure function on whole fp32 tensors.

Inputs are read whole here (`read_input`), their rows aligned with the reference for
padded vocabularies. A NaN/Inf is named by input and tensor: for methods where any
non-finite input reaches the output only the output is checked (then the inputs, to name
the culprit); methods that drop entries (`Method.drops`) could lose it, so their inputs
are checked first.
"""

from __future__ import annotations

import math

from lmalloy.errors import UserError
from lmalloy.merge.plan import Plan, TensorPlan

CHUNK = 1 << 18  # entries: a few of them fit the L2 cache


def read_input(folder, tp: TensorPlan, ref_t, dtype=None):
    """One input tensor (in `dtype` if given), rows aligned to the reference (padding)."""
    import torch

    x = folder.read(tp.name)
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if tuple(x.shape) != tp.shape:  # vocabulary padding: align rows with the reference
        rows = tp.shape[0]
        x = x[:rows] if x.shape[0] > rows else torch.cat([x, ref_t[x.shape[0]:].to(x.dtype)])
    return x


def finite(t) -> bool:
    """A sum is non-finite if any entry is (one cheap pass); confirmed entry-wise."""
    import torch

    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def name_nonfinite(p: Plan, name: str, what: str) -> UserError:
    """The error for a non-finite result: the input that holds NaN/Inf, if any."""
    from lmalloy.io.folder import check_finite

    for f in p.inputs:
        check_finite(name, f.read(name), f.path)
    return UserError(f"merging `{name}` produced NaN or Inf ({what})")


def load_inputs(p: Plan, tp: TensorPlan, keep_dtype: bool, compute):
    """(fine-tunes' tensors, base tensor or None) for one tensor plan."""
    if not tp.merge:
        return None, None
    if p.vocab is not None and tp.name in p.vocab.names:  # rows re-indexed to one tokenizer
        from lmalloy.merge.vocab import reindexed

        mats = reindexed(p.vocab, p.inputs, tp.name)
        b = mats[str(p.base.path)].to(compute) if p.base is not None else None
        return [mats[str(m.path)].to(compute) for m in p.models], b
    ref_t = p.ref.read(tp.name)
    b = None
    if p.base is not None:
        b = ref_t if keep_dtype else ref_t.to(compute)
    xs = [read_input(m, tp, ref_t, None if keep_dtype else compute) for m in p.models]
    return xs, b


def chunk_reader(p: Plan, tp: TensorPlan):
    """read(folder, a, b): entries [a, b) of the tensor in `folder`, a zero-copy view (rows
    aligned to the reference for padding, or re-indexed to the output vocabulary)."""
    from lmalloy.average.weighted import read_chunk

    overrides = {}
    if p.vocab is not None and tp.name in p.vocab.names:
        from lmalloy.merge.vocab import reindexed

        overrides = reindexed(p.vocab, p.inputs, tp.name)

    def read(f, a: int, b: int):
        return read_chunk(f, p.ref, tp.name, a, b, overrides.get(str(f.path)))

    return read


def _abs_delta_chunks(p: Plan, tp: TensorPlan, read, m, compute):
    n = math.prod(tp.shape)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        yield (read(m, a, b).to(compute) - read(p.base, a, b).to(compute)).abs_()


def ties_streamed(p: Plan, tp: TensorPlan, writer, compute, out_dtype, thresholds=None,
                  pool=None, kernels=None) -> None:
    """One TIES tensor, chunk by chunk into `writer` (see the module docstring and
    `lmalloy.merge.fused`). With a `pool` (`--threads N`), N chunks are computed at once
    (torch releases the GIL) and written in order; at most 2N are in flight."""
    import torch

    from lmalloy.io.folder import check_finite
    from lmalloy.merge.fused import Kernels, ties_thresholds

    read = chunk_reader(p, tp)
    n = math.prod(tp.shape)
    kernels = kernels or Kernels(False)

    def name_bad(a: int = 0, b: int = n):
        for f in [*p.models, p.base]:
            check_finite(tp.name, read(f, a, b).to(compute), f.path)
        raise name_nonfinite(p, tp.name, "check the inputs")

    thr = thresholds if thresholds is not None else ties_thresholds(
        read, p.models, p.base, [float(q["density"]) for q in tp.params], n, compute, CHUNK,
        kernels, name_bad)
    thr_t = torch.tensor(thr, dtype=compute)
    w = torch.tensor([float(q["weight"]) for q in tp.params], dtype=compute)
    lam = torch.tensor(float(tp.glob.get("lambda", 1.0)), dtype=compute)
    normalize = bool(tp.glob["normalize"])

    def part(a: int):
        b = min(n, a + CHUNK)
        with torch.no_grad():
            out, bad_in, bad_out = kernels.ties([read(m, a, b) for m in p.models],
                                                read(p.base, a, b), thr_t, w, normalize, lam,
                                                out_dtype, compute)
        if bad_in:  # TIES may trim a NaN away: the inputs are checked
            name_bad(a, b)
        if bad_out:
            raise name_nonfinite(p, tp.name, "check the parameters")
        return out

    writer.begin(tp.name, tp.dtype, tp.shape)
    starts = list(range(0, n, CHUNK))
    if pool is None:
        for a in starts:
            writer.part(part(a))
    else:
        window = 2 * pool._max_workers
        futs = [pool.submit(part, a) for a in starts[:window]]
        for i in range(len(starts)):
            writer.part(futs[i].result())
            futs[i] = None
            if i + window < len(starts):
                futs.append(pool.submit(part, starts[i + window]))
    writer.end()


def merge_tensor(p: Plan, tp: TensorPlan, xs, b, *, fn, compute, out_dtype, thresholds):
    """One output tensor of a non-averaging method, NaN/Inf named by input."""
    import torch

    from lmalloy.io.folder import check_finite
    from lmalloy.merge.methods import METHODS, TensorCtx

    if not tp.merge:
        return p.ref.read(tp.name)
    if METHODS[p.cfg.method].drops:  # a NaN input may be trimmed away: check the inputs
        for f, x in zip(p.models + ([p.base] if b is not None else []),
                        xs + ([b] if b is not None else []), strict=True):
            if not finite(x):
                check_finite(tp.name, x, f.path)
    ctx = TensorCtx(tp.name, p.cfg.seed, thresholds)
    with torch.no_grad():
        out = fn(xs, b, tp.params, tp.glob, ctx)
    if out.is_floating_point() and not finite(out):
        raise name_nonfinite(p, tp.name, "check the parameters")
    return out.to(out_dtype)


def whole_model_thresholds(p: Plan, densities: list[float], compute) -> tuple[float, ...]:
    """Per model, the magnitude above which `density` of its whole task vector lies.

    Two streaming passes: a log2 histogram of |τ| (65,536 bins), then the values in the
    boundary bins, whose exact k-th largest is the threshold. Never holds the model.
    """
    import torch

    lo, hi, bins = -160.0, 160.0, 1 << 16
    n = len(p.models)
    hists = [torch.zeros(bins, dtype=torch.float64) for _ in range(n)]
    total = 0
    for i, a in _abs_deltas(p, compute):
        if i == 0:
            total += a.numel()
        hists[i] += torch.histc(torch.log2(a[a > 0].double()), bins, lo, hi).double()
    ks = [max(1, int(d * total)) if d < 1 else None for d in densities]
    windows = [_window(hists[i], ks[i], lo, hi, bins) for i in range(n)]
    above = [0] * n
    vals: list[list] = [[] for _ in range(n)]
    for i, a in _abs_deltas(p, compute):
        if windows[i] is None or windows[i][1] == 0:
            continue
        w0, w1 = windows[i]
        above[i] += int((a > w1).sum())
        vals[i].append(a[(a >= w0) & (a <= w1)])
    out = []
    for i in range(n):
        if windows[i] is None or windows[i][1] == 0:
            out.append(0.0)
            continue
        v = torch.cat(vals[i]) if vals[i] else torch.zeros(0)
        r = ks[i] - above[i]  # rank of the threshold inside the window, from the top
        if r <= 0 or r > v.numel():
            raise RuntimeError("whole-model trim: threshold search failed")
        out.append(float(torch.kthvalue(v, v.numel() - r + 1).values))
    return tuple(out)


def _abs_deltas(p: Plan, compute):
    """(model index, |τ| of one chunk) for every floating tensor, a chunk at a time."""
    for tp in p.tensors:
        if not tp.merge:
            continue
        read = chunk_reader(p, tp)
        for i, m in enumerate(p.models):
            for c in _abs_delta_chunks(p, tp, read, m, compute):
                yield i, c


def _window(hist, k: int | None, lo: float, hi: float, bins: int):
    """The |τ| range of the histogram bins around the k-th largest value (None: keep all)."""
    import torch

    if k is None:
        return None
    from_top = hist.flip(0).cumsum(0)
    hit = torch.nonzero(from_top >= k)
    if len(hit) == 0:  # fewer nonzero entries than k: keep everything
        return (0.0, 0.0)
    width = (hi - lo) / bins
    b = bins - 1 - int(hit[0])
    return (2 ** (lo + (b - 1) * width), 2 ** (lo + (b + 2) * width))
