"""`lmalloy reward warm`: Weight Averaged Reward Models (WARM, arXiv 2401.12187).

θ_WARM = Σᵢ wᵢ θᵢ with Σ wᵢ = 1 (uniform by default, as in the paper): one model at
inference instead of M, and, the paper finds, more robust than the prediction ensemble
under label noise and distribution shift. Averaging is only meaningful between models
fine-tuned from one initialisation, so the models must share the architecture, the head
(one label, same shapes) and, when their `reward.json` says, the initialisation id
written by `reward train`.

The average is `lmalloy.average.weighted` (chunked, fp32 accumulation, written in the
inputs' dtype inside an atomic output folder): peak memory is a few chunks, whatever M.
It is exactly `lmalloy merge --method linear` with the same weights (a test checks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmalloy.errors import UserError

HEAD_KEYS = ("num_labels", "pad_token_id")
BODY_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size")


def resolve_models(paths: list[str]) -> list[Path]:
    """Model folders; a `reward train` run folder stands for its rm-* models."""
    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if (p / "config.json").is_file():
            out.append(p)
        elif p.is_dir() and sorted(p.glob("rm-*/config.json")):
            out += [c.parent for c in sorted(p.glob("rm-*/config.json"))]
        elif not p.exists():
            raise UserError(f"model folder not found: {p}")
        else:
            raise UserError(f"{p}: neither a model folder (config.json) nor a `reward train` "
                            "run folder (rm-*/)")
    return out


def _head_info(m) -> tuple:
    from lmalloy.reward.model import num_labels

    n = num_labels(m.config)
    heads = {k: v.shape for k, v in m.tensors.items() if not k.startswith("model.")}
    return n, tuple(sorted(heads.items()))


def check_compatible(folders: list) -> str | None:
    """UserError unless the reward models can be averaged; returns their shared init id."""
    from lmalloy.io.folder import check_same_architecture, compare_tensors
    from lmalloy.io.tokenizer_files import check_same_tokenizer
    from lmalloy.reward.model import check_reward_folder

    ref = folders[0]
    for f in folders:
        check_reward_folder(f.path)
    check_same_architecture(folders)
    for f in folders[1:]:
        for key in BODY_KEYS:
            if f.config.get(key) != ref.config.get(key):
                raise UserError(f"different architectures: `{key}` is {f.config.get(key)} in "
                                f"{f.path}, {ref.config.get(key)} in {ref.path}")
        if _head_info(f) != _head_info(ref):
            raise UserError(f"different heads: {f.path} has {_head_info(f)[1]} with "
                            f"{_head_info(f)[0]} label(s), {ref.path} has {_head_info(ref)[1]} "
                            f"with {_head_info(ref)[0]}")
    compare_tensors(ref, folders)
    check_same_tokenizer(folders)
    groups = {}
    for f in folders:
        meta = f.path / "reward.json"
        if meta.is_file():
            groups[f.path] = json.loads(meta.read_text()).get("init_group")
    if len(groups) == len(folders) and len(set(groups.values())) > 1:
        raise UserError("the models come from different initialisations (reward.json "
                        f"init_group {', '.join(sorted(set(map(str, groups.values()))))}); "
                        "WARM averages models fine-tuned from one shared init")
    vals = set(groups.values())
    return vals.pop() if len(vals) == 1 else None


def main(cfg) -> int:
    from lmalloy.average.weighted import Combination, write_average
    from lmalloy.io.folder import open_model
    from lmalloy.io.writer import check_output

    paths = resolve_models(cfg.models)
    if len(paths) < 2:
        raise UserError(f"WARM averages at least 2 reward models, got {len(paths)}")
    w = cfg.weights or [1.0] * len(paths)
    if len(w) != len(paths):
        raise UserError(f"`--weights` has {len(w)} value(s) for {len(paths)} models")
    w = [x / sum(w) for x in w]
    folders = [open_model(p) for p in paths]
    group = check_compatible(folders)
    out = check_output(cfg.out, cfg.overwrite, inputs=paths)
    meta = json.dumps({"warm_of": [str(p) for p in paths], "weights": w, "init_group": group},
                      indent=1) + "\n"
    write_average(folders, Combination(tuple(w)), out, ref=folders[0], overwrite=cfg.overwrite,
                  extra=lambda tmp: (tmp / "reward.json").write_text(meta))
    print(f"WARM: averaged {len(paths)} reward models (weights "
          f"{', '.join(f'{x:.3f}' for x in w)}) -> {out}", file=sys.stderr)
    return 0
