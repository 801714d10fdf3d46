"""Planning a merge: every check before the first tensor byte is read.

`plan(cfg)` opens every input lazily (headers only) and checks: one architecture, the same
tensor names and shapes (all mismatches listed), the vocabulary rule below, every
parameter of every tensor valid for the method (gradients and filters evaluated per
tensor), a base where the method needs one, the output folder. The result, a `Plan`,
holds per tensor its output dtype and resolved parameters; `lmalloy.merge.engine` then
streams it.

Vocabulary rule: embedding and LM-head matrices (`embed_tokens`, `lm_head`) may differ in
their number of rows when the extra rows are padding, i.e. beyond the tokenizer's vocabulary
(same tokenizer.json in every input). The output has the reference model's rows (the base,
else the first model); a model with fewer rows contributes the reference's rows there (no
change), a model with more has its padding rows dropped. Different tokenizers are an error
unless `tokenizer_source` (mergekit's `tokenizer.source`: base, union or a model folder)
names the output's tokenizer; every input's embedding rows are then re-indexed to it
(`lmalloy.merge.vocab`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmalloy.errors import UserError, closest
from lmalloy.merge.config import MergeConfig

VOCAB_RE = re.compile(r"(embed_tokens|lm_head|wte|embed_in|embed_out)")


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
    vocab: Any = None  # lmalloy.merge.vocab.VocabPlan when the tokenizers differ
    notes: list[str] = field(default_factory=list)  # lines for merge_config.yaml
    files: dict[str, str | bytes] = field(default_factory=dict)  # more output files

    @property
    def inputs(self) -> list:
        return ([self.base] if self.base is not None else []) + self.models

    @property
    def bytes_in(self) -> int:
        return sum(t.nbytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        from lmalloy.io.dtypes import SIZES

        return sum(SIZES[t.dtype] * math.prod(t.shape) for t in self.tensors)


def _open_inputs(cfg: MergeConfig, method) -> tuple[dict, Any, list, list]:
    """(every folder by resolved path, base, model entries besides the base, their folders)."""
    from lmalloy.io.folder import open_model

    base_path = cfg.base_model
    if method.needs_base and base_path is None:
        raise UserError(f"`{cfg.method}` needs a base model: set `base_model` (--base-model)")
    seen = {}
    for p in [m.model for m in cfg.models] + ([base_path] if base_path else []):
        key = str(Path(p).resolve())
        if key not in seen:
            seen[key] = open_model(p, allow_pickle=cfg.allow_pickle)
    base = seen[str(Path(base_path).resolve())] if base_path else None
    # fine-tunes: the listed models, minus the base where the method treats it specially
    takes_base = method.needs_base or method.optional_base
    entries = [m for m in cfg.models
               if not (takes_base and base_path
                       and Path(m.model).resolve() == Path(base_path).resolve())]
    check_model_count(cfg, method, entries, base)
    return seen, base, entries, [seen[str(Path(m.model).resolve())] for m in entries]


def check_model_count(cfg: MergeConfig, method, entries: list, base) -> None:
    lo, hi = method.n_models
    if cfg.method == "slerp" and len(entries) != 1:
        raise UserError(f"slerp interpolates exactly two models (the base and one other); got "
                        f"{len(entries) + (1 if base else 0)}: base {cfg.base_model} and "
                        f"{len(entries)} other(s)")
    if len(entries) < lo or (hi is not None and len(entries) > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else \
            f"{lo} to {hi}"
        takes_base = method.needs_base or method.optional_base
        raise UserError(f"`{cfg.method}` takes {want} model(s)"
                        f"{' besides the base' if takes_base else ''}, got {len(entries)}")


def check_vocabulary(cfg: MergeConfig, ref, folders, base) -> tuple[Path, Any]:
    """Tokenizer and padded-row checks: (the folder the output's tokenizer comes from, the
    re-indexing plan when the inputs' tokenizers differ, else None)."""
    from lmalloy.io.folder import compare_tensors
    from lmalloy.io.tokenizer_files import tokenizer_digest, tokenizer_vocab_size

    src = cfg.tokenizer_source
    if src not in (None, "base", "union") and not Path(src).is_dir():
        raise UserError(f"`tokenizer_source` {src} is neither base, union nor a folder")
    digests = {tokenizer_digest(f.path) for f in folders} - {None}
    if src not in (None, "base", "union"):
        digests.add(tokenizer_digest(src))
    if len(digests) > 1:
        if src is None:
            raise UserError("the models' tokenizers differ (tokenizer.json); set "
                            "`tokenizer_source: union` (or base, or a model folder) to "
                            "re-index their embedding rows to one tokenizer")
        from lmalloy.merge.vocab import plan_vocab

        compare_tensors(ref, folders, rows_may_differ=lambda n: bool(VOCAB_RE.search(n)))
        vp = plan_vocab(src, ref, folders, base, cfg.tokenizer_pad_to)
        return ref.path, vp
    tok_vocab = [v for v in (tokenizer_vocab_size(f.path) for f in folders) if v is not None]
    padded = compare_tensors(ref, folders, rows_may_differ=lambda n: bool(VOCAB_RE.search(n)))
    for n in padded:
        rows = min(f.tensors[n].shape[0] for f in folders)
        if tok_vocab and max(tok_vocab) > rows:
            raise UserError(f"`{n}` has {rows} rows in one model but the tokenizer has "
                            f"{max(tok_vocab)} tokens: the vocabularies really differ")
    return (ref.path if src in (None, "base", "union") else Path(src)), None


def check_param_names(cfg: MergeConfig, method, given: list[tuple[str, dict]] | None = None
                      ) -> None:
    """Every parameter name the method takes; `given`: (where, parameters) pairs (default:
    the global ones and each model's)."""
    known = {p.name for p in method.model_params} | {p.name for p in method.global_params}
    if given is None:
        given = [("", cfg.parameters)] + [(f" of {m.model}", m.parameters) for m in cfg.models]
    for where, params in given:
        for k in params:
            if k not in known:
                raise UserError(f"`{cfg.method}` has no parameter `{k}`{where}"
                                f"{closest(k, known)}; its parameters: "
                                f"{', '.join(sorted(known)) or 'none'}")


def tensor_plans(cfg: MergeConfig, method, ref, base, models, entries, out_st: str,
                 vocab=None, middle: tuple[dict, ...] = (), t_of=None) -> list[TensorPlan]:
    """Per tensor: output dtype and every parameter resolved (and range-checked).

    A parameter is looked up in the model's entry, then `middle` (a slice's parameters),
    then the global ones; `t_of(name)` is a tensor's position along the gradients (default:
    its layer over the reference's layers)."""
    from lmalloy.io.dtypes import is_float
    from lmalloy.merge.params import layer_t, resolve

    num_layers = int(ref.config.get("num_hidden_layers") or 1)
    t_of = t_of or (lambda name: layer_t(name, num_layers))
    tensors = []
    for name, info in ref.tensors.items():
        t = t_of(name)
        params = [{s.name: resolve(s, [m.parameters, *middle, cfg.parameters], name, t,
                                   f" of {m.model}") for s in method.model_params}
                  for m in entries]
        glob = {s.name: resolve(s, [*middle, cfg.parameters], name, t, "")
                for s in method.global_params}
        if method.check is not None and (err := method.check(params, glob)):
            raise UserError(f"{err} (tensor `{name}`)")
        if method.weights is not None:  # e.g. weights that sum to 0 under normalize
            try:
                method.weights(params, glob)
            except UserError as e:
                raise UserError(f"{e} (tensor `{name}`)") from None
        n_in = sum(f.tensors[name].nbytes for f in ([base] if base else []) + models)
        shape = info.shape
        if vocab is not None and name in vocab.names:  # re-indexed rows
            shape = (vocab.rows, *info.shape[1:])
        tensors.append(TensorPlan(name, shape, out_st if is_float(info.dtype)
                                  else info.dtype, params, glob, n_in,
                                  merge=is_float(info.dtype)))
    if cfg.ties_trim == "model" and cfg.method in ("ties", "dare_ties"):
        for i in range(len(entries)):
            if len({tp.params[i]["density"] for tp in tensors}) > 1:
                raise UserError("`ties_trim: model` needs one density per model (no gradients "
                                "or filters)")
    return tensors


def plan(cfg: MergeConfig) -> Plan:
    """Every check of a merge, in the order a user would fix them; no tensor data read."""
    from lmalloy.io.dtypes import majority_float, name_to_st
    from lmalloy.io.folder import check_same_architecture
    from lmalloy.io.writer import check_output
    from lmalloy.merge.methods import METHODS

    if cfg.slices:
        from lmalloy.merge.slices import plan_slices

        return plan_slices(cfg)
    method = METHODS[cfg.method]
    seen, base, entries, models = _open_inputs(cfg, method)
    folders = list(seen.values())
    ref = base or models[0]
    check_same_architecture(folders)
    tok_from, vocab = check_vocabulary(cfg, ref, folders, base)
    out_dtype = cfg.dtype or majority_float(t.dtype for t in ref.tensors.values())
    check_param_names(cfg, method)
    tensors = tensor_plans(cfg, method, ref, base, models, entries, name_to_st(out_dtype),
                            vocab)
    from lmalloy.io.writer import check_free_space

    output = check_output(cfg.out, cfg.overwrite, [f.path for f in folders])
    p = Plan(cfg, models, base, ref, tensors, out_dtype, tok_from, output, vocab)
    check_free_space(output, p.bytes_out, "the merged model")
    return p
