"""Merging models whose tokenizers differ: mergekit's `tokenizer: {source: ...}`.

With `source: union` the output tokenizer is the reference model's (the base, else the
first model) plus every token another input has and it lacks, appended in input order
(each model's added tokens by id), as mergekit builds it; with `source: base` it is the
reference's; with a model folder, that folder's. Embedding and LM-head rows are then
re-indexed to the output vocabulary per input (a permutation, −1 where the input lacks the
token) and the merge method runs on the re-indexed matrices. A row an input lacks is
filled as mergekit does: from the one input that has the token, else from the base if it
has it, else the mean of the inputs that have it (zeros if none does). With
`pad_to_multiple_of`, the rows are padded with the mean embedding.

Only tokenizers that differ by *added* tokens can be unioned: their base vocabularies
(`tokenizer.json`'s model vocabulary) must agree, or the same text would tokenize
differently in the output than in an input. Anything else is refused by name.
Legend: R output rows, H hidden size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmalloy.errors import UserError

VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out)\.weight$")


@dataclass
class VocabPlan:
    tokenizer: Any  # the output transformers tokenizer
    rows: int  # R
    perms: dict[str, list[int]]  # input folder path -> per output row its row there, or -1
    names: list[str]  # the vocabulary tensors re-indexed
    base: str | None = None  # the base's path (filled rows prefer it)
    cache: dict = field(default_factory=dict)  # tensor name -> {path: (R, H) tensor}


def _core_vocab(folder: Path) -> dict | None:
    import json

    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    added = {a["content"] for a in data.get("added_tokens", [])}
    return {t: i for t, i in data["model"]["vocab"].items() if t not in added}


def _check_unionable(folders, ref) -> None:
    core = _core_vocab(ref.path)
    for f in folders:
        other = _core_vocab(f.path)
        if core is None or other is None:
            raise UserError(f"`tokenizer.source` needs a tokenizer.json in every input; "
                            f"{ref.path if core is None else f.path} has none")
        if other != core:
            from lmalloy.io.tokenizer_files import first_vocab_difference

            raise UserError(f"the tokenizers of {ref.path} and {f.path} differ in their base "
                            f"vocabulary (first at {first_vocab_difference(core, other)}), "
                            "not only in added tokens: they cannot be unioned")


def _output_tokenizer(source: str, ref, folders):
    from transformers import AutoTokenizer

    from lmalloy.io.models import quiet_transformers

    quiet_transformers()
    if source not in ("union", "base"):
        return AutoTokenizer.from_pretrained(source)
    out = AutoTokenizer.from_pretrained(ref.path)
    if source == "base":
        return out
    for f in [ref, *[f for f in folders if f is not ref]]:
        tok = AutoTokenizer.from_pretrained(f.path)
        rows = f.config.get("vocab_size") or len(tok)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < rows and info.content not in out.get_vocab():
                out.add_tokens([info])
    return out


def plan_vocab(source: str, ref, folders, base, pad_to: int | None = None) -> VocabPlan:
    """The output tokenizer and every input's row permutation; all checks first."""
    from transformers import AutoTokenizer

    if source == "union":
        _check_unionable(folders, ref)
    tok = _output_tokenizer(source, ref, folders)
    vocab = tok.get_vocab()
    rows = len(vocab)
    if pad_to:
        rows = math.ceil(rows / pad_to) * pad_to
    perms = {}
    for f in folders:
        theirs = AutoTokenizer.from_pretrained(f.path).get_vocab()
        limit = f.config.get("vocab_size") or len(theirs)
        p = [-1] * rows
        for t, j in vocab.items():
            i = theirs.get(t, -1)
            p[j] = i if 0 <= i < limit else -1
        perms[str(f.path)] = p
    names = [n for n in ref.tensors if VOCAB_TENSOR.search(n)]
    return VocabPlan(tok, rows, perms, names, str(base.path) if base is not None else None)


def reindexed(vp: VocabPlan, folders, name: str) -> dict:
    """{input path: its `name` matrix re-indexed to the output vocabulary} (R, H), rows an
    input lacks filled by mergekit's rule (see the module docstring); cached per tensor."""
    import torch

    if name in vp.cache:
        return vp.cache[name]
    vp.cache.clear()  # one vocabulary tensor at a time
    mats = {str(f.path): f.read(name).float() for f in folders}
    n_tok = len(vp.tokenizer.get_vocab())
    h = next(iter(mats.values())).shape[1]
    perm = {k: torch.tensor(v, dtype=torch.long) for k, v in vp.perms.items()}  # (R,)
    have = torch.stack([perm[k][:n_tok] >= 0 for k in mats])  # (N, n_tok)
    count = have.sum(0)  # (n_tok,)
    summed = torch.zeros(n_tok, h)
    for k, m in mats.items():
        p = perm[k][:n_tok]
        summed[p >= 0] += m[p[p >= 0]]
    default = summed / count.clamp(min=1)[:, None]  # the mean of the inputs that have it
    if vp.base in mats:  # the base's row, where it has the token (and others do too)
        pb = perm[vp.base][:n_tok]
        default[pb >= 0] = mats[vp.base][pb[pb >= 0]]
    for k, m in mats.items():  # a token only one input has: that input's row
        p = perm[k][:n_tok]
        only = (count == 1) & (p >= 0)
        default[only] = m[p[only]]
    out = {}
    for k, m in mats.items():
        p = perm[k]
        x = torch.empty(vp.rows, h)
        x[:n_tok] = default
        mine = p[:n_tok] >= 0
        x[:n_tok][mine] = m[p[:n_tok][mine]]
        if vp.rows > n_tok:  # padding rows: the mean embedding
            x[n_tok:] = x[:n_tok].mean(0)
        out[k] = x
    vp.cache[name] = out
    return out
