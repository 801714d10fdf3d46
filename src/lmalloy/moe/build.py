"""`lmalloy moe build`: sparse MoEs from dense models — Llama/Mistral into Mixtral,
Qwen2 into Qwen2-MoE, Qwen3 into Qwen3-MoE (the table in `lmalloy.moe.layout`).

- `upcycle` (Sparse Upcycling, Komatsuzaki et al. 2022): every expert is a copy of the
  dense FFN (optionally with noise), plus a new router. With identical experts the MoE
  computes exactly the dense model whatever the router: the top-k weights sum to one
  (Qwen MoEs are written with `norm_topk_prob: true` for that, as mergekit-moe does).
- `compose` (mergekit-moe): attention, norms and embeddings from the base; expert i's
  FFN from fine-tune i; router rows from prompts (see `lmalloy.moe.router`).
- `btx` (Branch-Train-MiX, Sukhbaatar et al. 2024, arXiv 2403.07816): as compose, but
  every non-FFN tensor is the mean of the fine-tunes' tensors; the router is then
  fine-tuned (`lmalloy finetune --train-only mlp.gate`).

Qwen2-MoE layers have a shared expert with a sigmoid gate. With `shared_experts:` (one
entry, mergekit-moe's key) its FFN comes from that model and its gate row from that
entry's prompts like the routers'; without one it is the base's FFN with its down
projection zeroed — its output is exactly 0 (upcycling stays exact) yet it trains.

Every input is checked (architecture, tensor names and shapes, prompts, context length,
output folder) before any tensor is read; then tensors stream one at a time from the
memory-mapped inputs into `ShardedWriter` inside `atomic_output`. Peak memory is one
layer's expert tensors (plus the base model when `gate_mode: hidden` runs it).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from lmalloy.errors import UserError
from lmalloy.moe.layout import ARCHS, MoeArch, arch_for, expert_plan, is_dense_ffn, router_name

_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "sliding_window", "attention_dropout", "rope_parameters")
SUPPORTED = ", ".join(f"{t} (-> {a.architecture})" for a in ARCHS.values()
                      for t in a.dense_types)


def check_dense(folder, label: str, name: str | None = None) -> MoeArch:
    """The MoE architecture `folder` becomes, or a UserError when it cannot become one."""
    from lmalloy.train.moe import moe_spec

    if moe_spec(folder.config) is not None:
        raise UserError(f"{label} {folder.path}: {folder.architecture} is already a mixture "
                        f"of experts; supported dense families: {SUPPORTED}")
    arch = arch_for(folder.model_type, name)
    if arch is None:
        what = f"cannot become a {name} MoE" if name else "has no MoE counterpart here"
        raise UserError(f"{label} {folder.path}: {folder.architecture} "
                        f"({folder.model_type}) {what}; supported dense families: {SUPPORTED}")
    cfg = folder.config
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) and not (arch.biases and key == "attention_bias"):
            raise UserError(f"{label} {folder.path}: `{key}: true`, but {arch.architecture} "
                            "layers have no such biases")
    if not any(n.endswith("mlp.gate_proj.weight") for n in folder.tensors):
        raise UserError(f"{label} {folder.path}: no `mlp.gate_proj` tensors (not a SwiGLU "
                        "FFN)")
    return arch


def check_same(base, other, label: str) -> None:
    """UserError unless `other` has the base's architecture, tensor names and shapes."""
    from lmalloy.io.folder import check_same_architecture, compare_tensors

    try:
        check_same_architecture([base, other])
        compare_tensors(base, [other])
    except UserError as e:
        raise UserError(f"{label}: {e}") from None


def mixtral_config(dense: dict, n_experts: int, top_k: int, aux_coef: float, dtype: str
                   ) -> dict:
    """config.json of the Mixtral built from a dense Llama/Mistral config dict.

    Written as a plain dict (no transformers import: `random`/`cheap_embed` builds never
    load it); old-style `rope_theta`/`rope_scaling` keys are kept as they are, which
    transformers converts on load as it does for every published Mixtral config.
    """
    out = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
           "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "use_cache": True,
           "sliding_window": None}
    out.update({k: dense[k] for k in _CONFIG_KEYS if k in dense})
    for k in ("rope_theta", "rope_scaling"):
        if k in dense and "rope_parameters" not in dense:
            out[k] = dense[k]
    out["sliding_window"] = out.get("sliding_window") or None
    if out.get("head_dim") is None:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    out.update(num_local_experts=n_experts, num_experts_per_tok=top_k,
               router_aux_loss_coef=aux_coef, router_jitter_noise=0.0,
               output_router_logits=False, dtype=dtype)
    return dict(sorted(out.items()))


def moe_config(dense: dict, arch: MoeArch, n_experts: int, top_k: int, aux_coef: float,
               dtype: str) -> dict:
    """config.json of the MoE of `arch` built from a dense config dict (a plain dict)."""
    if arch.name == "mixtral":
        return mixtral_config(dense, n_experts, top_k, aux_coef, dtype)
    out = {k: v for k, v in dense.items() if k not in ("architectures", "transformers_version",
                                                        "torch_dtype")}
    inter = dense["intermediate_size"]
    out.update(architectures=[arch.architecture], model_type=arch.model_type,
               num_experts=n_experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
               decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
               router_aux_loss_coef=aux_coef, output_router_logits=False, dtype=dtype)
    if arch.shared:
        out["shared_expert_intermediate_size"] = inter
    return dict(sorted(out.items()))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def _dtype_name(folder) -> str:
    """The base's dtype: its config's, else that of most of its floating tensors."""
    from lmalloy.io.dtypes import config_dtype, majority_float

    return config_dtype(folder.config) or majority_float(t.dtype for t in
                                                         folder.tensors.values())


def encode_prompts(experts, tok, bos: int | None, limit: int | None, label: str = "expert"
                   ) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Token ids of each expert's (positive, negative) prompts; checks the context length."""
    pairs = []
    for i, e in enumerate(experts):
        sides = []
        for kind, prompts in (("positive", e.positive_prompts), ("negative", e.negative_prompts)):
            ids = []
            for j, p in enumerate(prompts):
                x = ([bos] if bos is not None else []) + tok.encode(p)
                if limit and len(x) > limit:
                    raise UserError(f"{label} {i}'s {kind} prompt {j} is {len(x)} tokens, "
                                    f"longer than the base's context of {limit}")
                if len(x) == 0:
                    raise UserError(f"{label} {i}'s {kind} prompt {j} is empty")
                ids.append(x)
            sides.append(ids)
        pairs.append((sides[0], sides[1]))
    return pairs


def compute_router(cfg, base, n_layers: int, n_experts: int, hidden: int, pairs):
    """(L, E, H) float32 router weights for the config's gate_mode."""
    from lmalloy.moe import router as R

    if cfg.gate_mode in ("zero", "random"):
        std = (base.config.get("initializer_range", 0.02) if cfg.method == "upcycle"
               else 1.0)
        return R.plain_router(cfg.gate_mode, n_layers, n_experts, hidden, cfg.seed, std)
    embed_name = next(n for n in base.tensors if n.endswith("embed_tokens.weight"))
    if cfg.gate_mode == "cheap_embed":
        embed = base.read(embed_name)
        return R.prompt_router(pairs, lambda ps: R.cheap_embedding(embed, ps, n_layers))
    from lmalloy.io.models import load_causal_lm

    model = load_causal_lm(str(base.path))
    return R.prompt_router(pairs, lambda ps: R.prompt_hidden_states(model, ps))


@dataclass
class _Build:
    """Everything one build reads, checked: the inputs, the target and its parts."""

    cfg: Any
    arch: MoeArch
    base: Any
    sources: list
    shared: Any  # the shared expert's source folder (Qwen2-MoE), or None
    out: Any
    pairs: Any  # prompt ids per expert (hidden / cheap_embed), else None
    shared_pairs: Any


def _open_inputs(cfg) -> _Build:
    """Every input opened and checked, before any tensor is read."""
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io import check_output, open_model
    from lmalloy.io.tokenizer_files import check_same_tokenizer

    base = open_model(cfg.base_model)
    arch = check_dense(base, "base_model", cfg.architecture)
    if cfg.layout == "fused" and arch.name != "mixtral":
        raise UserError(f"`--layout fused` is written for Mixtral only; {arch.architecture} "
                        "folders use the per-expert names save_pretrained writes")
    if cfg.shared_experts and not arch.shared:
        raise UserError(f"`shared_experts`: {arch.architecture} has no shared expert; only "
                        + ", ".join(a.architecture for a in ARCHS.values() if a.shared)
                        + " has one")
    sources = []
    for i, e in enumerate(cfg.experts if cfg.method != "upcycle" else []):
        sources.append(open_model(e.source_model))
        check_same(base, sources[-1], f"expert {i}")
    shared = None
    if cfg.shared_experts:
        shared = open_model(cfg.shared_experts[0].source_model or cfg.base_model)
        check_same(base, shared, "shared expert")
    check_same_tokenizer([base, *sources], hint=" (experts must share the base's vocabulary)")
    out = check_output(cfg.out, cfg.overwrite, inputs=[
        cfg.base_model, *[e.source_model for e in [*cfg.experts, *cfg.shared_experts]
                          if e.source_model]])
    pairs = shared_pairs = None
    if cfg.gate_mode in ("hidden", "cheap_embed"):
        tok, c = Tok.load(cfg.base_model), base.config
        bos, limit = c.get("bos_token_id"), base.context_length
        pairs = encode_prompts(cfg.experts, tok, bos, limit)
        if cfg.shared_experts:
            shared_pairs = encode_prompts(cfg.shared_experts, tok, bos, limit, "shared expert")
    return _Build(cfg, arch, base, sources, shared, out, pairs, shared_pairs)


def _warn_collinear(gates, n_layers: int) -> list:
    from lmalloy.moe.router import collinear_pairs

    near = collinear_pairs(gates)
    if near:
        layers = sorted({x[0] for x in near})
        worst = max(near, key=lambda x: x[3])
        print(f"warning: router rows nearly collinear in {len(layers)} of {n_layers} layers "
              f"(worst: layer {worst[0]}, experts {worst[1]} and {worst[2]}, cosine "
              f"{worst[3]:.3f}); those experts will get similar tokens — make their prompts "
              "more distinct", file=sys.stderr)
    return near


def _tensor_groups(base) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """The base's non-FFN tensors: before the layers (embeddings), per layer, after."""
    from lmalloy.io.folder import IGNORABLE_SUFFIXES

    names = [n for n in base.tensors if not n.endswith(IGNORABLE_SUFFIXES)]
    non_ffn = [n for n in names if not is_dense_ffn(n)]
    head = [n for n in non_ffn if _layer_of(n) is None and "embed" in n]
    tail = [n for n in non_ffn if _layer_of(n) is None and n not in head]
    per_layer: dict[int, list[str]] = {}
    for n in non_ffn:
        if _layer_of(n) is not None:
            per_layer.setdefault(_layer_of(n), []).append(n)
    return head, per_layer, tail


def _plan(b: _Build, groups, sd: str) -> list:
    head, per_layer, tail = groups
    c = b.base.config
    n_layers, hidden, inter = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]
    plan = [(n, sd, b.base.tensors[n].shape) for n in head]
    for layer in range(n_layers):
        plan += [(n, sd, b.base.tensors[n].shape) for n in per_layer.get(layer, [])]
        plan.append((router_name(layer, b.cfg.layout, b.arch), sd, (b.cfg.n_experts, hidden)))
        plan += [(n, sd, s) for n, s in expert_plan(layer, b.cfg.n_experts, hidden, inter,
                                                    b.cfg.layout, b.arch)]
    return plan + [(n, sd, b.base.tensors[n].shape) for n in tail]


def _non_ffn_tensor(b: _Build, name: str, dtype):
    """The base's tensor; for btx the mean of the fine-tunes' (fp32)."""
    if b.cfg.method != "btx":
        return b.base.read(name).to(dtype)
    acc = None
    for m in b.sources:
        t = m.read(name).float()
        acc = t if acc is None else acc.add_(t)
    return (acc / len(b.sources)).to(dtype)


PROJS = ("gate_proj", "up_proj", "down_proj")


def _ffns(b: _Build, layer: int, dtype, gen) -> list[dict]:
    """Each expert's dense FFN {gate_proj, up_proj, down_proj} for one layer."""
    import torch

    from lmalloy.moe.layout import dense_ffn_name

    if b.cfg.method != "upcycle":
        return [{p: m.read(dense_ffn_name(layer, p)).to(dtype) for p in PROJS}
                for m in b.sources]
    dense = {p: b.base.read(dense_ffn_name(layer, p)) for p in PROJS}
    out = []
    for _ in range(b.cfg.n_experts):
        f = {}
        for p, w in dense.items():
            if b.cfg.noise:
                w32 = w.float()
                f[p] = (w32 + b.cfg.noise * w32.std() * torch.randn(w32.shape, generator=gen)
                        ).to(dtype)
            else:
                f[p] = w.to(dtype)
        out.append(f)
    return out


def _shared_ffn(b: _Build, layer: int, gate_row, dtype) -> dict | None:
    """The shared expert of one layer (with its gate row), where the architecture has one."""
    from lmalloy.moe.layout import dense_ffn_name

    if not b.arch.shared:
        return None
    src = b.shared or b.base
    f = {p: src.read(dense_ffn_name(layer, p)).to(dtype) for p in PROJS}
    if b.shared is None:  # no shared expert given: its output is 0 until it is trained
        f["down_proj"] = f["down_proj"].clone().zero_()
    f["gate"] = gate_row.to(dtype)  # (1, H)
    return f


def _write(b: _Build, groups, gates, shared_gates, w, dtype) -> None:
    import torch

    from lmalloy.moe.layout import expert_tensors

    head, per_layer, tail = groups
    gen = torch.Generator().manual_seed(b.cfg.seed + 1)
    for n in head:
        w.write(n, _non_ffn_tensor(b, n, dtype))
    for layer in range(b.base.config["num_hidden_layers"]):
        for n in per_layer.get(layer, []):
            w.write(n, _non_ffn_tensor(b, n, dtype))
        w.write(router_name(layer, b.cfg.layout, b.arch), gates[layer].to(dtype))
        shared = _shared_ffn(b, layer, shared_gates[layer], dtype) if b.arch.shared else None
        for n, t in expert_tensors(layer, _ffns(b, layer, dtype, gen), b.cfg.layout, b.arch,
                                   shared):
            w.write(n, t)
    for n in tail:
        w.write(n, _non_ffn_tensor(b, n, dtype))


def _routers(b: _Build, n_layers: int, hidden: int):
    """(L, E, H) router rows, and (L, 1, H) shared-expert gate rows (zeros without one)."""
    import torch

    gates = compute_router(b.cfg, b.base, n_layers, b.cfg.n_experts, hidden, b.pairs)
    shared = torch.zeros(n_layers, 1, hidden)
    if b.cfg.shared_experts:
        shared = compute_router(b.cfg.model_copy(update={"seed": b.cfg.seed + 7}), b.base,
                                n_layers, 1, hidden, b.shared_pairs)
    return gates, shared


def build(cfg, quiet: bool = False) -> dict:
    """Validate, then write the MoE folder; returns a summary dict."""
    from lmalloy.io import atomic_output, copy_aux_files, st_dtype
    from lmalloy.io.dtypes import torch_dtype
    from lmalloy.io.writer import ShardedWriter, write_config
    from lmalloy.moe.stats import param_counts

    b = _open_inputs(cfg)
    c = b.base.config
    n_layers, hidden = c["num_hidden_layers"], c["hidden_size"]
    dtype_name = cfg.dtype or _dtype_name(b.base)
    dtype = torch_dtype(dtype_name)
    mcfg = moe_config(c, b.arch, cfg.n_experts, cfg.experts_per_token,
                      cfg.router_aux_loss_coef, dtype_name)
    groups = _tensor_groups(b.base)
    plan = _plan(b, groups, st_dtype(dtype))
    from lmalloy.io.dtypes import SIZES
    from lmalloy.io.writer import check_free_space

    check_free_space(b.out, sum(SIZES[st] * math.prod(s) for _, st, s in plan), "the MoE")
    # -- heavy work starts here
    gates, shared_gates = _routers(b, n_layers, hidden)
    near = _warn_collinear(gates, n_layers) if not quiet else []
    with atomic_output(b.out, cfg.overwrite) as tmp:
        with ShardedWriter(tmp, plan) as w:
            _write(b, groups, gates, shared_gates, w, dtype)
        write_config(tmp, mcfg)
        copy_aux_files(b.base.path, tmp)
        cfg.save(tmp / "moe_build.yaml")
    counts = param_counts(mcfg)
    if not quiet:
        print(f"wrote {cfg.method} {b.arch.architecture}: {cfg.n_experts} experts, top-"
              f"{cfg.experts_per_token}, {counts['total'] / 1e6:.2f}M parameters, "
              f"{counts['active'] / 1e6:.2f}M active per token, router {cfg.gate_mode} "
              f"-> {b.out}", file=sys.stderr)
    return {"out": str(b.out), "collinear": near, **counts}


def main(cfg) -> int:
    build(cfg)
    return 0


__all__ = ["build", "main", "check_dense", "check_same", "mixtral_config", "moe_config"]
