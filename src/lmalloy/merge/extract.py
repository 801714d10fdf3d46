"""`lmalloy merge extract-lora`: a full fine-tune minus its base as a PEFT LoRA adapter.

For every linear module of the decoder layers (and, with `--embed-lora`, the input
embeddings and the LM head), ΔW = W_ft − W_base is factored by truncated SVD,
ΔW ≈ U_k S_k V_kᵀ, with the singular values split evenly: B = U_k √S_k (out, k),
A = √S_k V_kᵀ (k, in), so B·A is the best rank-k approximation (Eckart–Young). The rank k
is `--rank` for every module, or per module the smallest k whose Σ_{i≤k} σᵢ² reaches
`--energy` of ‖ΔW‖²_F. Each module's relative error ‖ΔW − BA‖_F / ‖ΔW‖_F is measured on the
stored (dtype-cast) factors and printed. lora_alpha = r per module (scaling 1), the other
ranks in `rank_pattern`/`alpha_pattern`, as mergekit-extract-lora writes them. Embeddings
follow PEFT's layout: `lora_embedding_A` (k, vocab), `lora_embedding_B` (dim, k), ΔW =
(B·A)ᵀ.

The modules are found on the model built on the meta device (no weights): nn.Linear inside
`.layers.N.`, nn.Embedding / the output embeddings with `--embed-lora`. Everything is
checked from the safetensors headers before any SVD; then one module at a time is read,
factored and appended to a scratch file (ranks chosen by energy are known only after the
SVD), and the scratch file becomes `adapter_model.safetensors` tensor by tensor: peak memory
is a few copies of the largest module, never the model. Output is atomic.

Tensors LoRA cannot carry (norms, biases, fused MoE experts, embeddings without
`--embed-lora`) are compared too: those that differ from the base are listed.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.merge.lora import PREFIX


@dataclass(frozen=True)
class Target:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]  # of the weight: (out, in), or (vocab, dim) for an embedding
    embedding: bool = False

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def max_rank(self) -> int:
        return min(self.shape)


def find_targets(folder, embed_lora: bool) -> list[Target]:
    """The adaptable modules, from the model built on the meta device (no weights read)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmalloy.merge.params import LAYER_RE

    try:
        conf = AutoConfig.from_pretrained(folder.path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{folder.path}: transformers cannot build this model "
                        f"({str(e).splitlines()[0]})") from None
    emb = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    out = []
    for name, mod in model.named_modules():
        in_layers = LAYER_RE.search(name + ".") is not None
        is_emb = id(mod) in emb or isinstance(mod, nn.Embedding)
        if is_emb and not embed_lora:
            continue
        if not (is_emb or (in_layers and isinstance(mod, nn.Linear))):
            continue
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        info = folder.tensors.get(f"{name}.weight")
        if info is None:
            if is_emb:  # a tied LM head is stored once, as the input embeddings
                continue
            raise UserError(f"{folder.path}: module `{name}` has no tensor `{name}.weight`: the "
                            f"checkpoint's names differ from the model's (converted on load?)")
        out.append(Target(name, tuple(info.shape), isinstance(mod, nn.Embedding)))
    if not out:
        raise UserError(f"{folder.path}: no linear modules in decoder layers (`.layers.N.`) "
                        f"to extract")
    return out


def choose_rank(s, rank: int | None, energy: float | None) -> int:
    """k: the fixed rank, or the smallest k with Σ_{i≤k} σᵢ² >= energy·Σ σᵢ²."""
    import torch

    if rank is not None:
        return min(rank, s.numel())
    cum = torch.cumsum(s.double() ** 2, 0)
    k = int(torch.searchsorted(cum, energy * cum[-1])) + 1
    return max(1, min(k, s.numel()))


def factor(dw, rank: int | None, energy: float | None, dtype):
    """ΔW (out, in) -> A (k, in), B (out, k) in `dtype`, rank k, relative error of B·A."""
    import torch

    U, S, Vh = torch.linalg.svd(dw, full_matrices=False)  # (out, m), (m,), (m, in)
    k = choose_rank(S, rank, energy)
    root = S[:k].sqrt()
    A = (root[:, None] * Vh[:k]).to(dtype).contiguous()  # (k, in)
    B = (U[:, :k] * root).to(dtype).contiguous()  # (out, k)
    del U, S, Vh
    res = float((dw - B.float() @ A.float()).norm())
    return A, B, k, res


class Spool:
    """Tensors whose shapes are known only once computed: appended to a scratch file, then
    copied into one safetensors file by ShardedWriter, one tensor in memory at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: list[tuple[str, object, tuple[int, ...], int]] = []
        self._f = open(path, "wb")  # noqa: SIM115 (closed in finish)
        self._pos = 0

    def add(self, name: str, t) -> None:
        import torch

        t = t.detach().contiguous().reshape(-1)
        self._f.write(memoryview(t.view(torch.uint8).numpy()))
        self.entries.append((name, t.dtype, tuple(t.shape), self._pos))
        self._pos += t.numel() * t.element_size()

    def finish(self, folder: Path, prefix: str, shapes: dict[str, tuple[int, ...]]) -> None:
        import numpy as np
        import torch

        from lmalloy.io.writer import ShardedWriter, st_dtype

        self._f.close()
        plan = [(n, st_dtype(d), shapes[n]) for n, d, _, _ in self.entries]
        with ShardedWriter(folder, plan, max_shard_bytes=1 << 62, prefix=prefix) as wr:
            for (name, dtype, (numel,), pos), (_, _, shape) in zip(self.entries, plan,
                                                                   strict=True):
                nbytes = numel * torch.empty(0, dtype=dtype).element_size()
                raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=pos,
                                shape=(nbytes,))
                wr.write(name, torch.from_numpy(np.array(raw)).view(dtype).view(shape))
                del raw
        self.path.unlink()


def _suffixes(targets: list[Target], done: list[Target]) -> list[str]:
    """PEFT target_modules: module suffixes where that is exact, else full names."""
    chosen = {t.module for t in done}
    out = []
    for suf in sorted({t.module.rsplit(".", 1)[-1] for t in done}):
        same = [t.module for t in targets if t.module.rsplit(".", 1)[-1] == suf]
        out += [suf] if all(m in chosen for m in same) else sorted(m for m in same
                                                                    if m in chosen)
    return out


def _adapter_config(cfg, base, targets, done, ranks: dict[str, int]) -> dict:
    r = max(ranks.values())
    other = {m: k for m, k in ranks.items() if k != r}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base.path.resolve()), "r": r, "lora_alpha": r,
            "rank_pattern": other, "alpha_pattern": dict(other),
            "target_modules": _suffixes(targets, done), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
            "inference_mode": True}


def _not_carried(ft, base, targets: list[Target]) -> tuple[list[str], float, str]:
    """The other tensors that differ from the base, the largest relative change and where."""
    names = {t.weight for t in targets}
    differ, worst, where = [], 0.0, ""
    for n in ft.tensors:
        if n in names:
            continue
        a, b = ft.read(n), base.read(n)
        if a.is_floating_point() and not bool((a == b).all()):
            differ.append(n)
            rel = float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))
            if rel > worst:
                worst, where = rel, n
    return differ, worst, where


def _plan(cfg) -> tuple:
    """(fine-tune, base, target modules, output): every check the headers allow."""
    from lmalloy.io.folder import check_same_architecture, compare_tensors, open_model
    from lmalloy.io.writer import check_output

    ft = open_model(cfg.model, allow_pickle=cfg.allow_pickle)
    base = open_model(cfg.base_model, allow_pickle=cfg.allow_pickle)
    if ft.path.resolve() == base.path.resolve():
        raise UserError(f"the fine-tune and the base are the same folder ({ft.path})")
    check_same_architecture([base, ft])
    compare_tensors(base, [base, ft])
    targets = find_targets(ft, cfg.embed_lora)
    if cfg.rank is not None:
        over = [t for t in targets if cfg.rank > t.max_rank]
        if over:
            t = over[0]
            raise UserError(f"`--rank` {cfg.rank} exceeds the dimensions of `{t.module}` "
                            f"({t.shape[0]} x {t.shape[1]}: at most {t.max_rank})"
                            + (f" and {len(over) - 1} other module(s)" if len(over) > 1 else ""))
    return ft, base, targets, check_output(cfg.out, cfg.overwrite, [ft.path, base.path])


def extract_lora(cfg) -> Path:
    """Plan (every check from the headers), then factor module by module into `cfg.out`."""
    import torch

    from lmalloy.io.dtypes import torch_dtype
    from lmalloy.io.writer import atomic_output

    ft, base, targets, out = _plan(cfg)
    dtype = torch_dtype(cfg.dtype or ft.tensors[targets[0].weight].dtype)

    ranks: dict[str, int] = {}
    done: list[Target] = []
    shapes: dict[str, tuple[int, ...]] = {}
    errs, sq_res, sq_tot = [], 0.0, 0.0
    with atomic_output(out, cfg.overwrite) as tmp, torch.no_grad():
        spool = Spool(tmp / ".factors")
        for t in targets:
            dw = ft.read(t.weight).float() - base.read(t.weight).float()  # (out, in)
            if t.embedding:
                dw = dw.T  # (dim, vocab): PEFT's lora_embedding_B·A is ΔWᵀ
            tot = float(dw.norm())
            if tot == 0:
                print(f"{t.module}: unchanged, left out", file=sys.stderr)
                continue
            A, B, k, res = factor(dw, cfg.rank, cfg.energy, dtype)
            del dw
            kind = "lora_embedding" if t.embedding else "lora"
            sfx = "" if t.embedding else ".weight"
            for part, x in (("A", A), ("B", B)):
                name = f"{PREFIX}{t.module}.{kind}_{part}{sfx}"
                spool.add(name, x)
                shapes[name] = tuple(x.shape)
            ranks[t.module] = k
            done.append(t)
            errs.append(res / tot)
            sq_res, sq_tot = sq_res + res**2, sq_tot + tot**2
            print(f"{t.module}: rank {k} of {t.max_rank}, relative error {res / tot:.4g}",
                  file=sys.stderr)
        if not done:
            raise UserError(f"{ft.path} equals {base.path} in every extracted module: there is "
                            f"nothing to extract")
        spool.finish(tmp, "adapter_model", shapes)
        (tmp / "adapter_config.json").write_text(json.dumps(
            _adapter_config(cfg, base, targets, done, ranks), indent=2) + "\n")
        differ, worst, where = _not_carried(ft, base, targets)
        total = math.sqrt(sq_res / sq_tot)
        params = sum(math.prod(s) for s in shapes.values())
        full = sum(math.prod(t.shape) for t in done)
        summary = (f"{len(done)} modules, rank {min(ranks.values())}-{max(ranks.values())}, "
                   f"{params:,} parameters ({100 * params / full:.1f}% of the modules'); "
                   f"relative error mean {sum(errs) / len(errs):.4g}, max {max(errs):.4g} "
                   f"(`{done[errs.index(max(errs))].module}`), overall {total:.4g}")
        lost = (f"not in the adapter: {len(differ)} other tensor(s) that differ from the base, "
                f"e.g. " + ", ".join(f"`{n}`" for n in differ[:3])
                + f" (largest relative change {worst:.4g}, `{where}`); LoRA holds linear "
                f"modules only" if differ else "")
        (tmp / "extract_lora.yaml").write_text(
            f"# lmalloy merge extract-lora: {summary}\n" + (f"# {lost}\n" if lost else "")
            + cfg.to_yaml())
    print(f"extracted {summary} -> {out}", file=sys.stderr)
    if lost:
        print(lost, file=sys.stderr)
    ft.close()
    base.close()
    return out


def main(cfg) -> int:
    extract_lora(cfg)
    return 0
