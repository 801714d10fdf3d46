"""Layer stacking: mergekit's `slices:` (frankenmerges such as Goliath-120B).

    merge_method: passthrough
    slices:
      - sources: [{model: runs/a, layer_range: [0, 24]}]
      - sources: [{model: runs/b, layer_range: [20, 40]}]

The output's decoder layers are the slices' layers in order: output slice k merges, layer by
layer, the `layer_range` [first, end) of each of its sources (all the same length) with the
merge method, as `models:` would merge whole models. The embedding comes from the first
slice's sources and the final norm and LM head from the last slice's (mergekit's rule),
merged the same way. Parameters are looked up in the source's entry, then the slice's, then
the global ones; a gradient runs over the slice's own layers (t = i / (n − 1), t = 1 for a
one-layer slice; 0 for the embedding, norm and head). A slice's base (its `base_model`, else
the merge's) must be one of its sources, at that source's layer range.

The output config is the merge's base model's (else the first slice's first source's) with
`num_hidden_layers` set to the stacked count; per-layer config lists (e.g. `layer_types`)
are rebuilt from each output layer's first source. Each output slice is planned like a
`models:` merge over views of its sources whose tensors carry the output's layer numbers
(`ModelFolder.renamed`), so every method, check and writer is the one `models:` uses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmalloy.errors import UserError
from lmalloy.merge.config import MergeConfig, ModelEntry, Slice
from lmalloy.merge.params import LAYER_RE
from lmalloy.merge.plan import (
    VOCAB_RE,
    Plan,
    check_model_count,
    check_param_names,
    check_vocabulary,
    tensor_plans,
)

# per-layer MoE layouts a stack cannot renumber from the config alone
LAYOUT_KEYS = ("mlp_only_layers", "decoder_sparse_step", "first_k_dense_replace",
               "moe_layer_freq")


@dataclass
class StackPlan:
    cfg: MergeConfig
    parts: list[Plan]  # one per output slice, in output order
    ref: Any  # the output's config and tokenizer reference (ModelFolder)
    config: dict  # the output config.json
    out_dtype: str
    output: Path
    inputs: list  # every opened folder
    notes: list[str] = field(default_factory=list)
    files: dict[str, str | bytes] = field(default_factory=dict)
    vocab: Any = None  # one tokenizer throughout (no re-indexing with slices)

    @property
    def tensors(self) -> list:
        return [tp for part in self.parts for tp in part.tensors]

    @property
    def models(self) -> list:
        return self.inputs

    @property
    def base(self):
        return None

    @property
    def tokenizer_from(self) -> Path:
        return self.ref.path

    @property
    def bytes_in(self) -> int:
        return sum(p.bytes_in for p in self.parts)

    @property
    def bytes_out(self) -> int:
        return sum(p.bytes_out for p in self.parts)


@contextlib.contextmanager
def _in_slice(k: int):
    """Errors of one slice's checks name the slice."""
    try:
        yield
    except UserError as e:
        raise UserError(f"slice {k}: {e}") from None


def _refuse_unsupported(cfg: MergeConfig) -> None:
    from lmalloy.merge.lora import is_adapter

    if cfg.method == "greedy_soup":
        raise UserError("greedy soup chooses whole models; it does not take `slices`")
    if cfg.method in ("cat", "svd", "bake"):
        raise UserError(f"`{cfg.method}` merges PEFT adapters; it does not take `slices`")
    if cfg.ties_trim == "model":
        raise UserError("`ties_trim: model` trims over the whole model; with `slices` use "
                        "the default `tensor`")
    if cfg.tokenizer_source is not None:
        raise UserError("`tokenizer_source` is not supported with `slices`: the sources must "
                        "share one tokenizer")
    for i, sl in enumerate(cfg.slices):
        for src in sl.sources:
            if is_adapter(src.model):
                raise UserError(f"slice {i}: {src.model} is a PEFT adapter; slices stack "
                                "full models' layers")


def _open_all(cfg: MergeConfig) -> dict[str, Any]:
    """Every folder the slices name (sources, slice bases, the base), opened once."""
    from lmalloy.io.folder import open_model

    paths = [cfg.base_model] if cfg.base_model else []
    for sl in cfg.slices:
        paths += [s.model for s in sl.sources] + ([sl.base_model] if sl.base_model else [])
    seen: dict[str, Any] = {}
    for p in paths:
        key = str(Path(p).resolve())
        if key not in seen:
            seen[key] = open_model(p, allow_pickle=cfg.allow_pickle)
    return seen


def _layers(folder) -> int:
    n = folder.config.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{folder.path}: config.json has no `num_hidden_layers`; slices need "
                        "the layer count")
    return n


def _check_sources(k: int, sl: Slice, seen: dict) -> None:
    for s in sl.sources:
        f = seen[str(Path(s.model).resolve())]
        if s.layer_range[1] > _layers(f):
            raise UserError(f"slice {k}: `layer_range` [{s.layer_range[0]}, "
                            f"{s.layer_range[1]}] of {s.model} is beyond its "
                            f"{_layers(f)} layers")
        for key in LAYOUT_KEYS:
            v = f.config.get(key)
            if v not in (None, [], 0, 1):
                raise UserError(f"{s.model}: `{key}: {v}` sets a per-layer MoE layout; "
                                "slices of it are not supported")


def _view(folder, src_first: int, out_first: int, n: int, pre: bool, post: bool):
    """The folder's layers [src_first, src_first + n) numbered from `out_first`, plus its
    embedding (`pre`) and its other non-layer tensors, the norm and head (`post`)."""
    from lmalloy.io.folder import EMBED_RE

    names = {}
    for name in folder.tensors:
        m = LAYER_RE.search(name)
        if m is None:
            if pre if EMBED_RE.search(name) else post:
                names[name] = name
            continue
        i = int(m.group(1)) - src_first
        if 0 <= i < n:
            new = name[:m.start(1)] + str(out_first + i) + name[m.end(1):]
            names[new] = name
    return folder.renamed(names)


def _slice_t(out_first: int, n: int):
    """A tensor's t within its slice: i / (n − 1) (1 for one layer), 0 outside the layers."""
    def t_of(name: str) -> float:
        m = LAYER_RE.search(name)
        if m is None:
            return 0.0
        return (int(m.group(1)) - out_first) / (n - 1) if n > 1 else 1.0
    return t_of


def _plan_slice(cfg: MergeConfig, method, k: int, sl: Slice, seen: dict, out_first: int,
                last: bool, out_st: str, out_dtype: str, output: Path) -> Plan:
    n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    base_path = sl.base_model or cfg.base_model
    takes_base = method.needs_base or method.optional_base
    views, entries, base = [], [], None
    for s in sl.sources:
        f = seen[str(Path(s.model).resolve())]
        v = _view(f, s.layer_range[0], out_first, n, pre=k == 0, post=last)
        if takes_base and base_path and Path(s.model).resolve() == Path(base_path).resolve():
            if base is not None:
                raise UserError(f"the base model {base_path} is listed twice among the sources")
            base = v
            continue
        views.append(v)
        entries.append(ModelEntry(model=s.model, parameters=s.parameters))
    if method.needs_base and base_path is None:
        raise UserError(f"`{cfg.method}` needs a base model: set `base_model` (for the merge "
                        "or the slice)")
    if takes_base and base_path and base is None:
        raise UserError(f"the base model {base_path} is not among its sources (give it a "
                        "`layer_range` there)")
    check_model_count(cfg, method, entries, base)
    folders = ([base] if base is not None else []) + views
    ref = base or views[0]
    check_vocabulary(cfg, ref, folders, base)
    tensors = tensor_plans(cfg, method, ref, base, views, entries, out_st, None,
                           middle=(sl.parameters,), t_of=_slice_t(out_first, n))
    return Plan(cfg, views, base, ref, tensors, out_dtype, ref.path, output)


def _out_config(cfg: MergeConfig, ref, seen: dict, total: int) -> dict:
    """The reference's config with the stacked layer count; per-layer lists (e.g.
    `layer_types`) taken from each output layer's first source."""
    out = dict(ref.config)
    n_ref = _layers(ref)
    out["num_hidden_layers"] = total
    for key, value in ref.config.items():
        if not isinstance(value, list) or len(value) != n_ref or key == "architectures":
            continue
        rebuilt = []
        for sl in cfg.slices:
            src = sl.sources[0]
            f = seen[str(Path(src.model).resolve())]
            own = f.config.get(key)
            if not isinstance(own, list) or len(own) != _layers(f):
                raise UserError(f"{src.model}: config `{key}` is not a per-layer list like "
                                f"{ref.path}'s; cannot rebuild it for the stacked layers")
            rebuilt += own[src.layer_range[0]:src.layer_range[1]]
        out[key] = rebuilt
    return out


def _check_rows(parts: list[Plan], config: dict) -> None:
    """The embedding (first slice) and the head (last) have the output config's rows."""
    vocab = config.get("vocab_size")
    for tp in (t for p in (parts[0], parts[-1]) for t in p.tensors):
        if VOCAB_RE.search(tp.name) and vocab is not None and tp.shape[0] != vocab:
            raise UserError(f"`{tp.name}` has {tp.shape[0]} rows in the slice it comes from, "
                            f"but the output config's vocab_size is {vocab} (padded "
                            "vocabularies of different sizes)")


def plan_slices(cfg: MergeConfig) -> StackPlan:
    """Every check of a stacked merge before any tensor data is read."""
    from lmalloy.io.dtypes import majority_float, name_to_st
    from lmalloy.io.folder import ARCH_KEYS, check_same_architecture
    from lmalloy.io.tokenizer_files import check_same_tokenizer
    from lmalloy.io.writer import check_free_space, check_output
    from lmalloy.merge.methods import METHODS

    _refuse_unsupported(cfg)
    method = METHODS[cfg.method]
    seen = _open_all(cfg)
    folders = list(seen.values())
    check_same_architecture(folders, keys=[k for k in ARCH_KEYS if k != "num_hidden_layers"])
    check_same_tokenizer([f.path for f in folders])
    given = [("", cfg.parameters)]
    for k, sl in enumerate(cfg.slices):
        given += [(f" of slice {k}", sl.parameters)]
        given += [(f" of {s.model} in slice {k}", s.parameters) for s in sl.sources]
        _check_sources(k, sl, seen)
    check_param_names(cfg, method, given)
    ref = seen[str(Path(cfg.base_model or cfg.slices[0].sources[0].model).resolve())]
    out_dtype = cfg.dtype or majority_float(t.dtype for t in ref.tensors.values())
    output = check_output(cfg.out, cfg.overwrite, [f.path for f in folders])
    parts, first = [], 0
    for k, sl in enumerate(cfg.slices):
        with _in_slice(k):
            parts.append(_plan_slice(cfg, method, k, sl, seen, first, k == len(cfg.slices) - 1,
                                     name_to_st(out_dtype), out_dtype, output))
        first += sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    config = _out_config(cfg, ref, seen, first)
    _check_rows(parts, config)
    sp = StackPlan(cfg, parts, ref, config, out_dtype, output, folders)
    check_free_space(output, sp.bytes_out, "the merged model")
    sp.notes.append(f"{len(cfg.slices)} slices, {first} layers: " + ", ".join(
        "+".join(f"{Path(s.model).name}[{s.layer_range[0]}:{s.layer_range[1]}]"
                 for s in sl.sources) for sl in cfg.slices))
    return sp
