"""LoRA adapters: merge PEFT adapter folders, bake one into its base, LoraHub.

An adapter folder holds `adapter_config.json` (r, lora_alpha, target_modules, use_rslora,
base_model_name_or_path) and `adapter_model.safetensors` with, per adapted module `m`,
`base_model.model.<m>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r). The module's
update is ΔW = s·B·A with s = alpha / r (alpha / √r with rsLoRA). Read directly: no peft.

Merging N adapters with weights wᵢ (PEFT's `add_weighted_adapter` types):

- `cat` (exact): A = [A₁; …; A_N], B = [w₁s₁B₁, …, w_N s_N B_N], alpha = r = Σ rᵢ, so
  B·A = Σ wᵢsᵢBᵢAᵢ exactly; the rank adds up.
- `svd` (exact ΔW, then truncated): ΔW = Σ wᵢsᵢBᵢAᵢ, ΔW ≈ U_k S_k V_kᵀ; B = U_k S_k,
  A = V_kᵀ, alpha = r = k. The retained energy Σ_{≤k} σ² / Σ σ² is reported.
- `linear` (an approximation): A = Σ √wᵢ Aᵢ, B = Σ √wᵢ sᵢ Bᵢ (PEFT's linear type; needs
  equal ranks). B·A then holds the cross terms BᵢAⱼ: its relative error against the exact
  Σ wᵢsᵢBᵢAᵢ is printed. Default weights: 1 for cat/svd (a sum of task updates), 1/N for
  linear (an average).
- `bake`: W' = W + s·B·A for every adapted weight, streamed tensor by tensor into a full
  HF model (the merge engine's writer, atomic).

LoraHub (Huang et al. 2023, arXiv 2307.13269): learn w for N adapters from a few examples
of a new task by gradient-free search (nevergrad; bounds [−1.5, 1.5], init 0, budget 40),
minimising cross-entropy + 0.05·mean|w|, with the reference code's composition (A and B
combined separately with the same w). Works on causal LMs.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lmalloy.errors import UserError

PREFIX = "base_model.model."


@dataclass
class Adapter:
    path: Path
    config: dict
    tensors: dict  # module -> (A (r, in), B (out, r)) fp32
    scale: float

    @property
    def rank(self) -> int:
        return int(self.config["r"])


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_adapter(path: str | Path) -> Adapter:
    from safetensors.torch import load_file

    from lmalloy.io.folder import read_header

    p = Path(path)
    cfg_path = p / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{p}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{cfg_path}: `r` (the LoRA rank) must be a positive integer, got "
                        f"{r!r}")
    alpha = cfg.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(
            alpha):
        raise UserError(f"{cfg_path}: `lora_alpha` must be a number, got {alpha!r}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{p}: a {cfg.get('peft_type')} adapter; only LoRA is supported")
    w = p / "adapter_model.safetensors"
    if not w.is_file():
        if (p / "adapter_model.bin").is_file():
            raise UserError(f"{p}: adapter_model.bin is a pickle; convert it to safetensors")
        raise UserError(f"{p}: no adapter_model.safetensors")
    read_header(w)  # truncation check
    raw = load_file(w)
    emb = [k for k in raw if ".lora_embedding_" in k]
    if emb:
        raise UserError(f"{p}: `{emb[0]}` is an embedding LoRA, which lmalloy's adapter "
                        f"merging does not read; merge it with PEFT")
    mods: dict[str, dict] = {}
    for k, v in raw.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in k:
                mod = k.split(tag)[0]
                mod = mod[len(PREFIX):] if mod.startswith(PREFIX) else mod
                mods.setdefault(mod, {})[part] = v.float()
    import torch

    tensors = {}
    for m, d in mods.items():
        if set(d) != {"lora_A", "lora_B"}:
            raise UserError(f"{p}: module `{m}` lacks lora_A or lora_B")
        A, B = d["lora_A"], d["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{p}: module `{m}` has lora_A {list(A.shape)} and lora_B "
                            f"{list(B.shape)}, which do not multiply")
        for part, t in (("lora_A", A), ("lora_B", B)):
            if not bool(torch.isfinite(t).all()):
                raise UserError(f"{p}: tensor `{m}.{part}` contains NaN or Inf")
        tensors[m] = (A, B)
    if not tensors:
        raise UserError(f"{p}: adapter_model.safetensors holds no lora_A/lora_B tensors")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return Adapter(p, cfg, tensors, scale)


def _base_key(adapter: Path, base) -> str:
    """A base model's identity: the resolved folder when it exists (relative to the working
    directory, else to the adapter), else the name as written (a hub id)."""
    for p in (Path(str(base)), adapter / str(base)):
        if p.is_dir():
            return str(p.resolve())
    return str(base)


def check_compatible(adapters: list[Adapter]) -> None:
    a0 = adapters[0]
    for a in adapters[1:]:
        b0, b1 = a0.config.get("base_model_name_or_path"), a.config.get(
            "base_model_name_or_path")
        if b0 and b1 and _base_key(a0.path, b0) != _base_key(a.path, b1):
            raise UserError(f"the adapters were trained on different base models: {a0.path} on "
                            f"{b0}, {a.path} on {b1}")
        if set(a.tensors) != set(a0.tensors):
            diff = sorted(set(a.tensors) ^ set(a0.tensors))
            raise UserError(f"the adapters target different modules ({a0.path} vs {a.path}): "
                            + ", ".join(f"`{m}`" for m in diff[:4])
                            + (" ..." if len(diff) > 4 else ""))
        for m, (A, B) in a.tensors.items():
            A0, B0 = a0.tensors[m]
            if (A.shape[1], B.shape[0]) != (A0.shape[1], B0.shape[0]):
                raise UserError(f"`{m}` is {B0.shape[0]}x{A0.shape[1]} in {a0.path} but "
                                f"{B.shape[0]}x{A.shape[1]} in {a.path}: different base models")
        if bool(a.config.get("fan_in_fan_out")) != bool(a0.config.get("fan_in_fan_out")):
            raise UserError("the adapters differ in `fan_in_fan_out`")


def delta(a: Adapter, m: str):
    A, B = a.tensors[m]
    return a.scale * (B @ A)  # (out, in)


def merge_cat(adapters: list[Adapter], w: list[float]) -> tuple[dict, int]:
    import torch

    out = {}
    for m in adapters[0].tensors:
        A = torch.cat([a.tensors[m][0] for a in adapters], 0)  # (Σr, in)
        B = torch.cat([wi * a.scale * a.tensors[m][1] for wi, a in zip(w, adapters,
                                                                      strict=True)], 1)
        out[m] = (A, B)
    return out, sum(a.rank for a in adapters)


def merge_svd(adapters: list[Adapter], w: list[float], rank: int) -> tuple[dict, dict]:
    import torch

    out, energy = {}, {}
    for m in adapters[0].tensors:
        dw = sum(wi * delta(a, m) for wi, a in zip(w, adapters, strict=True))  # (out, in)
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        k = min(rank, S.numel())
        tot = float((S ** 2).sum())
        energy[m] = float((S[:k] ** 2).sum()) / tot if tot > 0 else 1.0
        out[m] = (Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous())  # A (k, in), B (out, k)
    return out, energy


def merge_linear(adapters: list[Adapter], w: list[float]) -> tuple[dict, dict]:
    ranks = {a.rank for a in adapters}
    if len(ranks) > 1:
        raise UserError(f"`linear` combines A and B entry-wise and needs equal ranks; got "
                        f"{sorted(ranks)} (use `cat` or `svd`)")
    out, err = {}, {}
    for m in adapters[0].tensors:
        A = sum(math.copysign(math.sqrt(abs(wi)), wi) * a.tensors[m][0]
                for wi, a in zip(w, adapters, strict=True))
        B = sum(math.sqrt(abs(wi)) * a.scale * a.tensors[m][1]
                for wi, a in zip(w, adapters, strict=True))
        exact = sum(wi * delta(a, m) for wi, a in zip(w, adapters, strict=True))
        n = float(exact.norm())
        err[m] = float((B @ A - exact).norm()) / n if n > 0 else 0.0
        out[m] = (A, B)
    return out, err


def write_adapter(folder: Path, like: Adapter, mods: dict, rank: int, dtype) -> None:
    from lmalloy.io.writer import ShardedWriter, st_dtype

    state = {}
    for m, (A, B) in mods.items():
        state[f"{PREFIX}{m}.lora_A.weight"] = A.to(dtype).contiguous()
        state[f"{PREFIX}{m}.lora_B.weight"] = B.to(dtype).contiguous()

    plan = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in state.items()]
    with ShardedWriter(folder, plan, prefix="adapter_model") as wr:
        for k, v in state.items():
            wr.write(k, v)
    cfg = dict(like.config)
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False,
               rank_pattern={}, alpha_pattern={})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _weights(cfg, n: int, method: str) -> list[float]:
    w = [m.parameters.get("weight") for m in cfg.models]
    if any(x is None for x in w):
        d = 1.0 / n if method == "linear" else 1.0
        w = [d if x is None else x for x in w]
    for x in w:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise UserError(f"adapter weights must be finite numbers, got {x!r}")
    return [float(x) for x in w]


def merge_adapters(cfg) -> Path:
    """`lmalloy merge` on PEFT adapter folders (method cat, svd, linear or bake)."""
    import torch

    from lmalloy.io.writer import atomic_output, check_output

    method = cfg.method
    if method not in ("cat", "svd", "linear", "bake"):
        raise UserError(f"adapter folders merge by `cat`, `svd`, `linear` or `bake`, not "
                        f"`{method}`")
    paths = [m.model for m in cfg.models]
    for p in paths:
        if not is_adapter(p):
            raise UserError(f"{p} is not a PEFT adapter folder while other inputs are; merge "
                            f"adapters with adapters (or `bake` one into --base-model)")
    adapters = [load_adapter(p) for p in paths]
    check_compatible(adapters)
    if method == "bake":
        return bake(cfg, adapters)
    w = _weights(cfg, len(adapters), method)
    out = check_output(cfg.out, cfg.overwrite, paths)
    if cfg.dtype:
        dtype = getattr(torch, cfg.dtype)
    else:  # the first adapter's stored dtype
        from safetensors import safe_open

        with safe_open(str(adapters[0].path / "adapter_model.safetensors"), "pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
    with torch.no_grad():
        if method == "cat":
            mods, rank = merge_cat(adapters, w)
            note = f"rank {rank} (exact)"
        elif method == "svd":
            rank = cfg.rank or max(a.rank for a in adapters)
            limit = min(min(A.shape[1], B.shape[0]) for A, B in adapters[0].tensors.values())
            if rank > limit:
                raise UserError(f"`--rank` {rank} is above the smallest adapted module's "
                                f"full rank {limit} (min of its input and output sizes)")
            mods, energy = merge_svd(adapters, w, rank)
            e = list(energy.values())
            note = (f"rank {rank}; retained energy mean {100 * sum(e) / len(e):.2f}%, min "
                    f"{100 * min(e):.2f}% ({min(energy, key=energy.get)})")
        else:
            rank = adapters[0].rank
            mods, err = merge_linear(adapters, w)
            e = list(err.values())
            note = (f"rank {rank}; an approximation: relative error of B·A against the exact "
                    f"sum, mean {sum(e) / len(e):.3f}, max {max(e):.3f}")
    with atomic_output(out, cfg.overwrite) as tmp:
        write_adapter(tmp, adapters[0], mods, rank, dtype)
        (tmp / "merge_config.yaml").write_text(f"# lmalloy merge {method}: {note}\n"
                                               + cfg.to_yaml())
    print(f"merged {len(adapters)} adapters ({method}) -> {out}: {note}", file=sys.stderr)
    return out


def bake(cfg, adapters: list[Adapter]) -> Path:
    """Fold one adapter into its base model: a full HF model, streamed tensor by tensor."""
    import torch

    from lmalloy.io.dtypes import is_float, name_to_st, st_to_name, torch_dtype
    from lmalloy.io.folder import open_model
    from lmalloy.io.writer import (
        ShardedWriter,
        atomic_output,
        check_output,
        copy_aux_files,
        write_config,
    )

    if len(adapters) != 1 or not cfg.base_model:
        raise UserError("`bake` takes one adapter (--models) and its base (--base-model)")
    a = adapters[0]
    base = open_model(cfg.base_model, allow_pickle=cfg.allow_pickle)
    targets = {}
    for m, (A, B) in a.tensors.items():
        name = f"{m}.weight"
        if name not in base.tensors:
            raise UserError(f"{a.path}: adapted module `{m}` has no weight `{name}` in "
                            f"{base.path}: not this adapter's base model")
        shape = base.tensors[name].shape
        want = (B.shape[0], A.shape[1])
        if a.config.get("fan_in_fan_out"):
            want = want[::-1]
        if tuple(shape) != want:
            raise UserError(f"`{name}` is {list(shape)} in {base.path} but the adapter's "
                            f"update is {list(want)}: not this adapter's base model")
        targets[name] = m
    out = check_output(cfg.out, cfg.overwrite, [base.path, a.path])
    out_dtype = cfg.dtype or st_to_name(next(iter(base.tensors.values())).dtype)
    st = name_to_st(out_dtype)
    plan = [(n, st if is_float(t.dtype) else t.dtype, t.shape) for n, t in base.tensors.items()]
    with atomic_output(out, cfg.overwrite) as tmp:
        with ShardedWriter(tmp, plan, cfg.max_shard_size) as wr, torch.no_grad():
            for n, _, _ in plan:
                x = base.read(n)
                if n in targets:
                    d = delta(a, targets[n])
                    if a.config.get("fan_in_fan_out"):
                        d = d.T
                    x = x.float() + d
                wr.write(n, x.to(torch_dtype(out_dtype)) if x.is_floating_point() else x)
        write_config(tmp, base.config, out_dtype)
        copy_aux_files(base.path, tmp)
        (tmp / "merge_config.yaml").write_text(f"# lmalloy merge bake: {a.path} into "
                                               f"{base.path}\n" + cfg.to_yaml())
    print(f"baked {a.path} ({len(targets)} modules) into {base.path} -> {out}", file=sys.stderr)
    return out


def compose_linear(adapters: list[Adapter], w) -> dict:
    """LoraHub's composition: A = Σ wᵢAᵢ, B = Σ wᵢsᵢBᵢ (scales folded into B)."""
    out = {}
    for m in adapters[0].tensors:
        A = sum(wi * a.tensors[m][0] for wi, a in zip(w, adapters, strict=True))
        B = sum(wi * a.scale * a.tensors[m][1] for wi, a in zip(w, adapters, strict=True))
        out[m] = (A, B)
    return out


def lorahub_main(cfg) -> int:
    """`lmalloy merge lorahub`: learn adapter weights from a few examples, write the adapter."""
    from lmalloy.merge.optimizer import nevergrad, optimizer, quiet

    ng = nevergrad("merge lorahub")
    import numpy as np
    import torch

    from lmalloy.data.corpus import corpus_from
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.folder import open_model
    from lmalloy.io.models import load_causal_lm
    from lmalloy.io.writer import atomic_output, check_output

    adapters = [load_adapter(p) for p in cfg.adapters]
    check_compatible(adapters)
    base = open_model(cfg.base_model)
    base.check_seq_len(cfg.seq_len)
    for m, (A, B) in adapters[0].tensors.items():
        t = base.tensors.get(f"{m}.weight")
        if t is None or tuple(t.shape) != (B.shape[0], A.shape[1]):
            raise UserError(f"{cfg.base_model} is not the adapters' base model (module `{m}`)")
    out = check_output(cfg.out, cfg.overwrite, [*cfg.adapters, cfg.base_model])
    tok = Tok.load(cfg.base_model)
    corpus = corpus_from(cfg, quiet=True)
    ids = [i for d in corpus.documents for i in tok.encode(d.text) + [tok.eos_id]]
    n = cfg.seq_len + 1
    if len(ids) < n:
        raise UserError(f"the examples hold {len(ids)} tokens; need at least {n}")
    rng = np.random.default_rng(cfg.seed)
    starts = rng.choice(len(ids) - n + 1, size=min(cfg.examples, len(ids) - n + 1),
                        replace=False)
    batch = torch.tensor([ids[s:s + n] for s in starts])  # (E, T+1)
    model = load_causal_lm(cfg.base_model)
    params = dict(model.named_parameters())
    w0 = {m: params[f"{m}.weight"].detach().clone() for m in adapters[0].tensors}

    def loss_of(w) -> float:
        with torch.no_grad():
            for m, (A, B) in compose_linear(adapters, w).items():
                params[f"{m}.weight"].copy_(w0[m] + B @ A)
            logits = model(input_ids=batch[:, :-1]).logits
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                   batch[:, 1:].reshape(-1))
        return float(ce) + cfg.l1 * float(np.mean(np.abs(w)))

    k = len(adapters)
    param = ng.p.Array(init=np.zeros(k), lower=-cfg.bound, upper=cfg.bound)
    opt = optimizer(ng, param, cfg.budget, "NGOpt", cfg.seed)
    zero = loss_of(np.zeros(k))
    with quiet():
        rec = opt.minimize(loss_of)
    w = [float(x) for x in rec.value]
    best = loss_of(np.array(w))
    mods = compose_linear(adapters, w)
    dtype = next(iter(adapters[0].tensors.values()))[0].dtype
    with atomic_output(out, cfg.overwrite) as tmp:
        write_adapter(tmp, adapters[0], mods, adapters[0].rank, dtype)
        (tmp / "lorahub.json").write_text(json.dumps(
            {"weights": dict(zip(cfg.adapters, w, strict=True)), "objective": best,
             "objective_at_zero": zero, "examples": len(starts), "budget": cfg.budget},
            indent=2) + "\n")
        (tmp / "merge_config.yaml").write_text(cfg.to_yaml())
    print(f"lorahub: weights {', '.join(f'{x:+.3f}' for x in w)}; objective {zero:.4f} (w=0) "
          f"-> {best:.4f} -> {out}", file=sys.stderr)
    return 0
