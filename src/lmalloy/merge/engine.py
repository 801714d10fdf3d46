"""`lmalloy merge`: plan every check first, then stream tensor by tensor.

Planning opens every input lazily (headers only) and checks, before any tensor data is
read: one architecture, the same tensor names and shapes (all mismatches listed), the
vocabulary rule below, every parameter of every tensor valid for the method (gradients and
filters evaluated per tensor), a base where the method needs one, the output folder.

Execution reads one tensor of each input memory-mapped (a reader thread prefetches the
next), computes in fp32, casts to the output dtype and hands it to a writer thread that
appends it to the current safetensors shard: peak memory is a few tensors, whatever the
model size. Output is atomic (temporary folder, renamed when complete) and holds the
base's config/tokenizer/generation files and `merge_config.yaml`.

Vocabulary rule: embedding and LM-head matrices (`embed_tokens`, `lm_head`) may differ in
their number of rows when the extra rows are padding, i.e. beyond the tokenizer's vocabulary
(same tokenizer.json in every input). The output has the reference model's rows (the base,
else the first model); a model with fewer rows contributes the reference's rows there (no
change), a model with more has its padding rows dropped. Different tokenizers are an error
unless `tokenizer_source` names where the output's tokenizer comes from; rows are then
merged by id.

Parameters vary by tensor as in mergekit: a list of numbers is a gradient interpolated over
the layers (t = layer / (layers − 1); embeddings, final norm and LM head take t = 0), a list
of `{filter, value}` takes the first entry whose filter is a substring of the tensor name.
Per-model parameters take precedence over global ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmalloy.errors import UserError
from lmalloy.merge.config import MergeConfig

LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
VOCAB_RE = re.compile(r"(embed_tokens|lm_head|wte|embed_in|embed_out)")


# ----------------------------------------------------------------- parameter resolution

def evaluate_setting(name: str, value: Any, t: float) -> Any:
    """mergekit's evaluate_setting: a scalar, a gradient over t, or filtered entries."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in value):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in value):
                return value[int(t * (len(value) - 1))]
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate_setting(name, entry["value"], t)
        return None
    return None


def layer_t(name: str, num_layers: int) -> float:
    m = LAYER_RE.search(name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(spec, sources: list[dict], name: str, t: float, where: str) -> Any:
    for src in sources:
        if spec.name in src:
            v = evaluate_setting(name, src[spec.name], t)
            if v is not None:
                if spec.kind == "float" and isinstance(v, (int, float)) and not isinstance(
                        v, bool):
                    v = float(v)
                err = spec.check(v, where)
                if err:
                    raise UserError(f"{err} (tensor `{name}`)")
                return v
    if spec.default is None:
        raise UserError(f"missing parameter `{spec.name}`{where} for tensor `{name}` "
                        f"(set it under the model's `parameters` or the global ones)")
    return spec.default


# ----------------------------------------------------------------- planning

@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str  # output safetensors dtype
    params: list[dict]
    glob: dict
    nbytes_in: int
    merge: bool = True  # False: copy the reference tensor (non-float)


@dataclass
class Plan:
    cfg: MergeConfig
    models: list  # ModelFolder of the fine-tunes
    base: Any  # ModelFolder | None
    ref: Any  # config/shape reference
    tensors: list[TensorPlan]
    out_dtype: str  # torch dtype name
    tokenizer_from: Path
    output: Path

    @property
    def bytes_in(self) -> int:
        return sum(t.nbytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        from lmalloy.io.folder import DTYPE_SIZES

        return sum(DTYPE_SIZES[t.dtype] * math.prod(t.shape) for t in self.tensors)


def _tok_digest(folder) -> str | None:
    p = folder.path / "tokenizer.json"
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def _tok_vocab(folder) -> int | None:
    import json

    p = folder.path / "tokenizer.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        vocab = data["model"]["vocab"]
        return len(vocab) + len([a for a in data.get("added_tokens", [])
                                 if a["content"] not in vocab])
    except (KeyError, ValueError, TypeError):
        return None


def _check_architectures(folders) -> None:
    archs = {(f.architecture, f.model_type) for f in folders}
    if len(archs) > 1:
        desc = "; ".join(f"{f.path}: {f.architecture} ({f.model_type})" for f in folders)
        raise UserError(f"the models have different architectures: {desc}")
    ref = folders[0]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "num_local_experts"):
        vals = {f.config.get(key) for f in folders}
        if len(vals) > 1:
            desc = ", ".join(f"{f.path}: {f.config.get(key)}" for f in folders)
            raise UserError(f"the models differ in `{key}` ({desc}); they are not fine-tunes "
                            f"of one architecture")
    del ref


def _check_tensors(ref, folders, vocab_ok: bool) -> set[str]:
    """Names and shapes; returns the names whose row counts differ by padding only."""
    names = set(ref.tensors)
    padded: set[str] = set()
    for f in folders:
        if f is ref:
            continue
        other = set(f.tensors)
        missing, extra = sorted(names - other), sorted(other - names)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{f.path} lacks {len(missing)} tensor(s) of {ref.path}: "
                             + ", ".join(f"`{n}`" for n in missing[:5])
                             + (" ..." if len(missing) > 5 else ""))
            if extra:
                parts.append(f"{f.path} has {len(extra)} tensor(s) {ref.path} lacks: "
                             + ", ".join(f"`{n}`" for n in extra[:5])
                             + (" ..." if len(extra) > 5 else ""))
            raise UserError("; ".join(parts))
        bad = []
        for n in ref.tensors:
            a, b = ref.tensors[n].shape, f.tensors[n].shape
            if a == b:
                continue
            if (vocab_ok and VOCAB_RE.search(n) and len(a) == len(b) and a[1:] == b[1:]):
                padded.add(n)
                continue
            bad.append(f"`{n}` is {list(b)} in {f.path} but {list(a)} in {ref.path}")
        if bad:
            raise UserError(f"shape mismatch ({len(bad)} tensor(s)): " + "; ".join(bad[:3])
                            + (" ..." if len(bad) > 3 else ""))
    return padded


def plan(cfg: MergeConfig) -> Plan:
    from lmalloy.io.folder import TORCH_DTYPE_NAMES, open_model
    from lmalloy.io.writer import TORCH_TO_ST, check_output
    from lmalloy.merge.methods import METHODS

    method = METHODS[cfg.method]
    paths = [m.model for m in cfg.models]
    base_path = cfg.base_model
    if method.needs_base and base_path is None:
        raise UserError(f"`{cfg.method}` needs a base model: set `base_model` (--base-model)")
    seen = {}
    for p in paths + ([base_path] if base_path else []):
        key = str(Path(p).resolve())
        if key not in seen:
            seen[key] = open_model(p, allow_pickle=cfg.allow_pickle)
    base = seen[str(Path(base_path).resolve())] if base_path else None
    # fine-tunes: the listed models, minus the base where the method treats it specially
    takes_base = method.needs_base or method.optional_base
    entries = [m for m in cfg.models
               if not (takes_base and base_path
                       and Path(m.model).resolve() == Path(base_path).resolve())]
    lo, hi = method.n_models
    if cfg.method == "slerp" and len(entries) != 1:
        raise UserError(f"slerp interpolates exactly two models (the base and one other); got "
                        f"{len(entries) + (1 if base else 0)}: base {base_path} and "
                        f"{len(entries)} other(s)")
    if len(entries) < lo or (hi is not None and len(entries) > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else \
            f"{lo} to {hi}"
        raise UserError(f"`{cfg.method}` takes {want} model(s)"
                        f"{' besides the base' if takes_base else ''}, got {len(entries)}")
    models = [seen[str(Path(m.model).resolve())] for m in entries]
    folders = list(seen.values())
    ref = base or models[0]
    _check_architectures(folders)

    # vocabulary / tokenizer
    digests = {_tok_digest(f) for f in folders} - {None}
    if len(digests) > 1 and cfg.tokenizer_source is None:
        raise UserError("the models' tokenizers differ (tokenizer.json); set "
                        "`tokenizer_source: base` (or a model folder) to merge embedding rows "
                        "by id with that tokenizer")
    tok_vocab = [v for v in (_tok_vocab(f) for f in folders) if v is not None]
    padded = _check_tensors(ref, folders, vocab_ok=True)
    for n in padded:
        rows = min(f.tensors[n].shape[0] for f in folders)
        if tok_vocab and max(tok_vocab) > rows and cfg.tokenizer_source is None:
            raise UserError(f"`{n}` has {rows} rows in one model but the tokenizer has "
                            f"{max(tok_vocab)} tokens: the vocabularies really differ")
    if cfg.tokenizer_source in (None, "base"):
        tok_from = ref.path
    else:
        tok_from = Path(cfg.tokenizer_source)
        if not tok_from.is_dir():
            raise UserError(f"`tokenizer_source` {tok_from} is not a folder")

    # output dtype
    if cfg.dtype:
        out_dtype = cfg.dtype
    else:
        floats = [t.dtype for t in ref.tensors.values() if t.dtype in ("F32", "BF16", "F16")]
        out_dtype = TORCH_DTYPE_NAMES[max(set(floats), key=floats.count)] if floats else "float32"
    out_st = TORCH_TO_ST[out_dtype]

    # parameters, per tensor
    known = {p.name for p in method.model_params} | {p.name for p in method.global_params}
    if cfg.method in ("ties", "dare_ties"):
        known |= {"density"}
    for where, params in [("", cfg.parameters)] + [(f" of {m.model}", m.parameters)
                                                   for m in cfg.models]:
        for k in params:
            if k not in known:
                from lmalloy.errors import closest

                raise UserError(f"`{cfg.method}` has no parameter `{k}`{where}"
                                f"{closest(k, known)}; its parameters: "
                                f"{', '.join(sorted(known)) or 'none'}")
    num_layers = int(ref.config.get("num_hidden_layers") or 1)
    tensors = []
    for name, info in ref.tensors.items():
        t = layer_t(name, num_layers)
        is_float = info.dtype in ("F32", "BF16", "F16", "F64")
        params = [{s.name: resolve(s, [m.parameters, cfg.parameters], name, t,
                                   f" of {m.model}") for s in method.model_params}
                  for m in entries]
        glob = {s.name: resolve(s, [cfg.parameters], name, t, "") for s in method.global_params}
        if method.check is not None and (err := method.check(params, glob)):
            raise UserError(f"{err} (tensor `{name}`)")
        if cfg.method == "linear" and glob["normalize"] and abs(
                sum(q["weight"] for q in params)) < 1e-8:
            raise UserError(f"the weights sum to 0 for tensor `{name}`; with normalize they "
                            f"must not")
        n_in = sum(f.tensors[name].nbytes for f in ([base] if base else []) + models)
        tensors.append(TensorPlan(name, info.shape, out_st if is_float else info.dtype, params,
                                  glob, n_in, merge=is_float))
    if cfg.ties_trim == "model" and cfg.method in ("ties", "dare_ties"):
        for i in range(len(entries)):
            ds = {tp.params[i]["density"] for tp in tensors}
            if len(ds) > 1:
                raise UserError("`ties_trim: model` needs one density per model (no gradients "
                                "or filters)")
    inputs = [f.path for f in folders]
    output = check_output(cfg.output, cfg.overwrite, inputs)
    return Plan(cfg, models, base, ref, tensors, out_dtype, tok_from, output)


# ----------------------------------------------------------------- execution

def _read(folder, name: str, tp: TensorPlan, ref_t, dtype):
    """One input tensor in the compute dtype, rows aligned to the reference (padding rule)."""
    import torch

    x = folder.read(name)
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if tuple(x.shape) != tp.shape:  # vocabulary padding: align rows with the reference
        rows = tp.shape[0]
        if x.shape[0] > rows:
            x = x[:rows]
        else:
            x = torch.cat([x, ref_t[x.shape[0]:].to(x.dtype)])
    return x


def whole_model_thresholds(p: Plan, densities: list[float], compute) -> tuple[float, ...]:
    """Per model, the magnitude above which `density` of its whole task vector lies.

    Two streaming passes: a log2 histogram of |τ| (65,536 bins), then the values in the
    boundary bins, whose exact k-th largest is the threshold. Never holds the model.
    """
    import torch

    lo, hi, bins = -160.0, 160.0, 1 << 16
    width = (hi - lo) / bins
    n = len(p.models)
    hists = [torch.zeros(bins, dtype=torch.float64) for _ in range(n)]
    total = 0

    def deltas():
        for tp in p.tensors:
            if not tp.merge:
                continue
            b = p.base.read(tp.name).to(compute)
            for i, m in enumerate(p.models):
                yield i, (_read(m, tp.name, tp, b, compute) - b).abs().reshape(-1)

    for i, a in deltas():
        if i == 0:
            total += a.numel()
        nz = a[a > 0]
        hists[i] += torch.histc(torch.log2(nz.double()), bins, lo, hi).double()
    ks = [max(1, int(d * total)) if d < 1 else None for d in densities]
    windows = []
    for i in range(n):
        if ks[i] is None:
            windows.append(None)
            continue
        from_top = hists[i].flip(0).cumsum(0)
        hit = torch.nonzero(from_top >= ks[i])
        if len(hit) == 0:  # fewer nonzero entries than k: keep everything
            windows.append((0.0, 0.0))
            continue
        b = bins - 1 - int(hit[0])
        windows.append((2 ** (lo + (b - 1) * width), 2 ** (lo + (b + 2) * width)))
    above = [0] * n
    vals: list[list] = [[] for _ in range(n)]
    for i, a in deltas():
        if windows[i] is None or windows[i][1] == 0:
            continue
        w0, w1 = windows[i]
        above[i] += int((a > w1).sum())
        vals[i].append(a[(a >= w0) & (a <= w1)])
    out = []
    for i in range(n):
        if windows[i] is None:
            out.append(0.0)
            continue
        if windows[i][1] == 0:
            out.append(0.0)
            continue
        v = torch.cat(vals[i]) if vals[i] else torch.zeros(0)
        r = ks[i] - above[i]  # rank of the threshold inside the window, from the top
        if r <= 0 or r > v.numel():
            raise RuntimeError("whole-model trim: threshold search failed")
        out.append(float(torch.kthvalue(v, v.numel() - r + 1).values))
    return tuple(out)


def execute(p: Plan) -> None:

    import torch

    from lmalloy.io.folder import check_finite
    from lmalloy.io.writer import ShardedWriter, atomic_output
    from lmalloy.merge.methods import METHODS, TensorCtx, kth_largest

    cfg = p.cfg
    fn = METHODS[cfg.method].fn
    compute = getattr(torch, cfg.compute_dtype)
    out_torch = getattr(torch, p.out_dtype)
    # linear/soup accumulate in place, so inputs need no fp32 copy of their own
    raw = cfg.method in ("linear", "soup", "greedy_soup")
    # TIES without L1 rescale is elementwise once each model's threshold is known: it runs
    # chunk by chunk on inputs kept in their own dtype (peak memory ~ one fp32 tensor)
    chunked_ties = cfg.method == "ties" and not any(
        tp.glob.get("rescale") for tp in p.tensors)
    # methods where a NaN/Inf input always reaches the output: check the output only
    propagates = not METHODS[cfg.method].drops
    thresholds = None
    if cfg.ties_trim == "model" and cfg.method in ("ties", "dare_ties"):
        dens = [float(q["density"]) for q in p.tensors[0].params]
        thresholds = whole_model_thresholds(p, dens, compute)
    inputs = ([p.base] if p.base is not None else []) + p.models
    embed = VOCAB_RE

    def load(tp: TensorPlan):
        if not tp.merge:
            return None, None
        ref_t = p.ref.read(tp.name)
        keep = raw or chunked_ties
        b = (ref_t if keep else ref_t.to(compute)) if p.base is not None else None
        xs = [_read(m, tp.name, tp, ref_t, None if keep else compute) for m in p.models]
        return xs, b

    # reused buffers (accumulator, cast input): no fresh pages per tensor; casting into a
    # buffer then adding in fp32 is faster on CPU than a mixed-dtype add_
    buf = {"acc": torch.empty(0, dtype=compute), "x": torch.empty(0, dtype=compute)}

    def buffer(key: str, shape) -> torch.Tensor:
        n = math.prod(shape)
        if buf[key].numel() < n:
            buf[key] = torch.empty(n, dtype=compute)
        return buf[key][:n].view(shape)

    chunk = 1 << 20

    def linear_chunked(xs, w, shape):
        """out = Σ wᵢxᵢ in the output dtype, by 1M-entry chunks (4 MB, near cache): inputs are
        read once, the output written once (6 memory passes fewer than whole-tensor ops)."""
        n = math.prod(shape)
        out = torch.empty(n, dtype=out_torch)
        acc, tmp = buffer("acc", (chunk,)), buffer("x", (chunk,))
        flat = [x.reshape(-1) for x in xs]
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            c, t = acc[: b - a], tmp[: b - a]
            c.copy_(flat[0][a:b])
            if w[0] != 1.0:
                c.mul_(w[0])
            for wi, x in zip(w[1:], flat[1:], strict=True):
                t.copy_(x[a:b])
                c.add_(t, alpha=wi)
            out[a:b].copy_(c)
        return out.view(shape)

    from concurrent.futures import ThreadPoolExecutor

    cpool = ThreadPoolExecutor(cfg.threads or 1)

    def ties_chunked(tp: TensorPlan, xs, base, ctx):
        """Each model's magnitude threshold on its whole τ for this tensor (one fp32 τ at a
        time), then `ties` on 1M-entry chunks with those thresholds: the same result."""
        n = math.prod(tp.shape)
        flat = [x.reshape(-1) for x in xs]
        bflat = base.reshape(-1)
        thr = ctx.thresholds
        if thr is None:
            thr = []
            b32 = bflat.to(compute)
            for x, q in zip(flat, tp.params, strict=True):
                dens = float(q["density"])
                if dens >= 1:
                    thr.append(0.0)  # keeps every entry
                elif dens <= 0:
                    thr.append(math.inf)
                else:
                    a = (x.to(compute) - b32).abs_()  # never in place: x may be the input
                    thr.append(float(kth_largest(a, max(1, int(dens * n)))))
                    del a
            del b32
        cctx = TensorCtx(ctx.name, ctx.seed, ctx.is_embed, tuple(thr))
        out = torch.empty(n, dtype=out_torch)

        def part(a: int) -> None:
            b = min(n, a + chunk)
            out[a:b] = fn([x[a:b].to(compute) for x in flat], bflat[a:b].to(compute),
                          tp.params, tp.glob, cctx)

        # chunks are independent: `--threads` workers share them (torch releases the GIL)
        list(cpool.map(part, range(0, n, chunk)))
        return out.view(tp.shape)

    def finite(t) -> bool:
        """A sum is non-finite if any entry is (one cheap pass); confirm entry-wise."""
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())

    def compute_one(tp: TensorPlan, xs, b):
        if not tp.merge:
            return p.ref.read(tp.name)
        ctx = TensorCtx(tp.name, cfg.seed, bool(embed.search(tp.name)), thresholds)
        if not propagates:
            for m, x in zip(p.models, xs, strict=True):
                if not finite(x):
                    check_finite(tp.name, x, m.path)
            if b is not None and not finite(b):
                check_finite(tp.name, b, p.base.path)
        with torch.no_grad():
            if raw:  # Σ (wᵢ/S)·xᵢ, chunk by chunk in cache, fp32 accumulation
                w = [float(q["weight"]) for q in tp.params] if cfg.method == "linear" else \
                    [1.0] * len(xs)
                norm = cfg.method != "linear" or tp.glob["normalize"]
                scale = 1.0 / sum(w) if norm else 1.0
                out = linear_chunked(xs, [wi * scale for wi in w], tp.shape)
                if not finite(out):
                    for f in inputs:
                        check_finite(tp.name, f.read(tp.name), f.path)
                    raise UserError(f"merging `{tp.name}` produced NaN or Inf")
                return out
            elif chunked_ties:
                out = ties_chunked(tp, xs, b, ctx)
            else:
                out = fn(xs, b, tp.params, tp.glob, ctx)
        if out.is_floating_point() and not finite(out):
            for f in inputs:  # name the input that brought it
                check_finite(tp.name, f.read(tp.name), f.path)
            raise UserError(f"merging `{tp.name}` produced NaN or Inf (check the parameters)")
        return out.to(out_torch)

    plan_list = [(t.name, t.dtype, t.shape) for t in p.tensors]
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=p.bytes_in, unit="B", unit_scale=True, desc=f"merge {cfg.method}",
                   file=sys.stderr, leave=False)
    try:
        with atomic_output(p.output, cfg.overwrite) as tmp:
            writer = ShardedWriter(tmp, plan_list, cfg.max_shard_size,
                                   metadata={"lmalloy_merge": cfg.method})
            try:
                _stream(p, writer, load, compute_one, bar)
            except BaseException:
                if writer._file is not None:  # release the file before the folder goes
                    with contextlib.suppress(OSError):
                        writer._file.close()
                raise
            writer.close()
            _write_meta(p, tmp)
    finally:
        if bar is not None:
            bar.close()
    for f in inputs:
        f.close()


def _stream(p: Plan, writer, load, compute_one, bar) -> None:
    """Read tensor i+1 (a thread), compute tensor i, write tensor i−1 (a thread)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as rpool, ThreadPoolExecutor(1) as wpool:
        fut = rpool.submit(load, p.tensors[0]) if p.tensors else None
        pending = None
        for i, tp in enumerate(p.tensors):
            xs, b = fut.result()
            if i + 1 < len(p.tensors):
                fut = rpool.submit(load, p.tensors[i + 1])
            out = compute_one(tp, xs, b)
            del xs, b
            if pending is not None:
                pending.result()
            pending = wpool.submit(writer.write, tp.name, out)
            del out
            if bar is not None:
                bar.update(tp.nbytes_in)
        if pending is not None:
            pending.result()


def _write_meta(p: Plan, tmp: Path) -> None:
    import json

    from lmalloy import __version__
    from lmalloy.io.writer import copy_aux_files
    from lmalloy.merge.methods import METHODS

    config = dict(p.ref.config)
    if "torch_dtype" in config:
        config["torch_dtype"] = p.out_dtype
    config["dtype"] = p.out_dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_aux_files(p.ref.path, tmp)
    if p.tokenizer_from != p.ref.path:
        copy_aux_files(p.tokenizer_from, tmp, [n for n in (
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")])
    head = [f"# written by lmalloy {__version__} merge: {p.cfg.method} "
            f"({METHODS[p.cfg.method].paper})",
            f"# {len(p.tensors)} tensors, {p.bytes_in / 1e6:.1f} MB read, "
            f"{p.bytes_out / 1e6:.1f} MB written as {p.out_dtype}; "
            f"`lmalloy merge merge_config.yaml --output DIR` repeats it"]
    extra = getattr(p, "notes", None)
    if extra:
        head += [f"# {x}" for x in extra]
    (tmp / "merge_config.yaml").write_text("\n".join(head) + "\n" + p.cfg.to_yaml())


def merge(cfg: MergeConfig) -> Path:
    """Plan (all checks), then stream the merge into `cfg.output`. Returns the output path."""
    import torch

    # One torch (OpenMP) thread: merging is memory-bound, and OpenMP barriers spin when
    # cores are oversubscribed (a 4-7x slow-down measured on a busy 2-core machine). TIES
    # spreads its chunks over `--threads` Python workers instead (torch releases the GIL).
    # Restored afterwards: in-process callers keep theirs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _merge(cfg)
    finally:
        torch.set_num_threads(before)


def _merge(cfg: MergeConfig) -> Path:
    import time

    from lmalloy.merge.lora import is_adapter, merge_adapters

    if any(is_adapter(m.model) for m in cfg.models):
        return merge_adapters(cfg)
    if cfg.method in ("cat", "svd", "bake"):
        raise UserError(f"`{cfg.method}` merges PEFT adapter folders (adapter_config.json); "
                        f"{cfg.models[0].model} is a full model")
    notes = []
    if cfg.method == "greedy_soup":
        from lmalloy.merge.greedy import greedy_select

        plan(cfg)  # every check before the evaluations
        chosen, notes = greedy_select(cfg)
        cfg = cfg.model_copy(update={"models": chosen})
    p = plan(cfg)
    p.notes = notes
    t0 = time.perf_counter()
    execute(p)
    dt = time.perf_counter() - t0
    gb = (p.bytes_in + p.bytes_out) / 1e9
    print(f"merged {len(p.models) + (p.base is not None)} models ({cfg.method}) -> {p.output} "
          f"in {dt:.1f}s ({gb / max(dt, 1e-9):.2f} GB/s in+out)", file=sys.stderr)
    return p.output


def main(cfg: MergeConfig) -> int:
    merge(cfg)
    return 0
