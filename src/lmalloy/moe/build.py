"""`lmalloy moe build`: Mixtral-format MoEs from dense Llama/Mistral-family models.

- `upcycle` (Sparse Upcycling, Komatsuzaki et al. 2022): every expert is a copy of the
  dense FFN (optionally with noise), plus a new router. With identical experts the MoE
  computes exactly the dense model whatever the router: the top-k weights sum to one.
- `compose` (mergekit-moe): attention, norms and embeddings from the base; expert i's
  FFN from fine-tune i; router rows from prompts (see `lmalloy.moe.router`).
- `btx` (Branch-Train-MiX, Sukhbaatar et al. 2024, arXiv 2403.07816): as compose, but
  every non-FFN tensor is the mean of the fine-tunes' tensors; the router is then
  fine-tuned (`lmalloy finetune --train-only mlp.gate`).

Every input is checked (architecture, tensor names and shapes, prompts, context length,
output folder) before any tensor is read; then tensors stream one at a time from the
memory-mapped inputs into `ShardedWriter` inside `atomic_output`. Peak memory is one
layer's expert tensors (plus the base model when `gate_mode: hidden` runs it).
"""

from __future__ import annotations

import sys

from lmalloy.errors import UserError
from lmalloy.moe.layout import SUPPORTED_DENSE, expert_plan, is_dense_ffn, router_name

_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "sliding_window", "attention_dropout", "rope_parameters")


def check_dense(folder, label: str) -> None:
    """UserError unless `folder` is a dense model a Mixtral can be built from."""
    arch = folder.architecture
    if arch not in SUPPORTED_DENSE:
        what = "is already a mixture of experts" if "moe" in arch.lower() or \
            arch.startswith("Mixtral") else "cannot become a Mixtral"
        raise UserError(f"{label} {folder.path}: {arch} {what}; supported dense "
                        f"architectures: {', '.join(SUPPORTED_DENSE)}")
    cfg = folder.config
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UserError(f"{label} {folder.path}: `{key}: true`, but Mixtral layers have "
                            "no biases")
    if not any(n.endswith("mlp.gate_proj.weight") for n in folder.tensors):
        raise UserError(f"{label} {folder.path}: no `mlp.gate_proj` tensors (not a SwiGLU "
                        "FFN)")


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


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def _dtype_name(folder) -> str:
    """The base's dtype: its config's, else that of most of its floating tensors."""
    from lmalloy.io.dtypes import config_dtype, majority_float

    return config_dtype(folder.config) or majority_float(t.dtype for t in
                                                         folder.tensors.values())


def encode_prompts(cfg, tok, bos: int | None, limit: int | None
                   ) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Token ids of each expert's (positive, negative) prompts; checks the context length."""
    pairs = []
    for i, e in enumerate(cfg.experts):
        sides = []
        for kind, prompts in (("positive", e.positive_prompts), ("negative", e.negative_prompts)):
            ids = []
            for j, p in enumerate(prompts):
                x = ([bos] if bos is not None else []) + tok.encode(p)
                if limit and len(x) > limit:
                    raise UserError(f"expert {i}'s {kind} prompt {j} is {len(x)} tokens, "
                                    f"longer than the base's context of {limit}")
                if len(x) == 0:
                    raise UserError(f"expert {i}'s {kind} prompt {j} is empty")
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
    if cfg.gate_mode == "cheap_embed":
        embed = base.read("model.embed_tokens.weight")
        return R.prompt_router(pairs, lambda ps: R.cheap_embedding(embed, ps, n_layers))
    from lmalloy.io.models import load_causal_lm

    model = load_causal_lm(str(base.path))
    return R.prompt_router(pairs, lambda ps: R.prompt_hidden_states(model, ps))


def _open_inputs(cfg) -> tuple:
    """(base, expert sources, output path, prompt token ids or None); every check first."""
    from lmalloy.io import check_output, open_model
    from lmalloy.io.tokenizer_files import check_same_tokenizer

    base = open_model(cfg.base_model)
    check_dense(base, "base_model")
    sources = []
    for i, e in enumerate(cfg.experts if cfg.method != "upcycle" else []):
        m = open_model(e.source_model)
        check_same(base, m, f"expert {i}")
        sources.append(m)
    check_same_tokenizer([base, *sources], hint=" (experts must share the base's vocabulary)")
    out = check_output(cfg.out, cfg.overwrite,
                       inputs=[cfg.base_model, *[e.source_model for e in cfg.experts
                                                 if e.source_model]])
    pairs = None
    if cfg.gate_mode in ("hidden", "cheap_embed"):
        from lmalloy.data.tokenizer import Tok

        c = base.config
        pairs = encode_prompts(cfg, Tok.load(cfg.base_model), c.get("bos_token_id"),
                               c.get("max_position_embeddings"))
    return base, sources, out, pairs


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


def _plan(cfg, base, groups, sd: str) -> list:
    head, per_layer, tail = groups
    c = base.config
    n_layers, hidden, inter = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]
    plan = [(n, sd, base.tensors[n].shape) for n in head]
    for layer in range(n_layers):
        plan += [(n, sd, base.tensors[n].shape) for n in per_layer.get(layer, [])]
        plan.append((router_name(layer, cfg.layout), sd, (cfg.n_experts, hidden)))
        plan += [(n, sd, s) for n, s in expert_plan(layer, cfg.n_experts, hidden, inter,
                                                    cfg.layout)]
    return plan + [(n, sd, base.tensors[n].shape) for n in tail]


def _non_ffn_tensor(cfg, base, sources, name: str, dtype):
    """The base's tensor; for btx the mean of the fine-tunes' (fp32)."""
    if cfg.method != "btx":
        return base.read(name).to(dtype)
    acc = None
    for m in sources:
        t = m.read(name).float()
        acc = t if acc is None else acc.add_(t)
    return (acc / len(sources)).to(dtype)


def _ffns(cfg, base, sources, layer: int, dtype, gen) -> list[dict]:
    """Each expert's dense FFN {gate_proj, up_proj, down_proj} for one layer."""
    import torch

    from lmalloy.moe.layout import dense_ffn_name

    projs = ("gate_proj", "up_proj", "down_proj")
    if cfg.method != "upcycle":
        return [{p: m.read(dense_ffn_name(layer, p)).to(dtype) for p in projs}
                for m in sources]
    dense = {p: base.read(dense_ffn_name(layer, p)) for p in projs}
    out = []
    for _ in range(cfg.n_experts):
        f = {}
        for p, w in dense.items():
            if cfg.noise:
                w32 = w.float()
                f[p] = (w32 + cfg.noise * w32.std() * torch.randn(w32.shape, generator=gen)
                        ).to(dtype)
            else:
                f[p] = w.to(dtype)
        out.append(f)
    return out


def _write(cfg, base, sources, groups, gates, w, dtype) -> None:
    import torch

    from lmalloy.moe.layout import expert_tensors

    head, per_layer, tail = groups
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for n in head:
        w.write(n, _non_ffn_tensor(cfg, base, sources, n, dtype))
    for layer in range(base.config["num_hidden_layers"]):
        for n in per_layer.get(layer, []):
            w.write(n, _non_ffn_tensor(cfg, base, sources, n, dtype))
        w.write(router_name(layer, cfg.layout), gates[layer].to(dtype))
        for n, t in expert_tensors(layer, _ffns(cfg, base, sources, layer, dtype, gen),
                                   cfg.layout):
            w.write(n, t)
    for n in tail:
        w.write(n, _non_ffn_tensor(cfg, base, sources, n, dtype))


def build(cfg, quiet: bool = False) -> dict:
    """Validate, then write the MoE folder; returns a summary dict."""
    from lmalloy.io import atomic_output, copy_aux_files, st_dtype
    from lmalloy.io.dtypes import torch_dtype
    from lmalloy.io.writer import ShardedWriter, write_config
    from lmalloy.moe.stats import param_counts

    base, sources, out, pairs = _open_inputs(cfg)
    c = base.config
    n_layers, hidden = c["num_hidden_layers"], c["hidden_size"]
    dtype_name = cfg.dtype or _dtype_name(base)
    dtype = torch_dtype(dtype_name)
    mcfg = mixtral_config(c, cfg.n_experts, cfg.experts_per_token, cfg.router_aux_loss_coef,
                          dtype_name)
    groups = _tensor_groups(base)
    plan = _plan(cfg, base, groups, st_dtype(dtype))
    # -- heavy work starts here
    gates = compute_router(cfg, base, n_layers, cfg.n_experts, hidden, pairs)  # (L, E, H)
    near = _warn_collinear(gates, n_layers) if not quiet else []
    with atomic_output(out, cfg.overwrite) as tmp:
        with ShardedWriter(tmp, plan) as w:
            _write(cfg, base, sources, groups, gates, w, dtype)
        write_config(tmp, mcfg)
        copy_aux_files(base.path, tmp)
        cfg.save(tmp / "moe_build.yaml")
    counts = param_counts(mcfg)
    if not quiet:
        print(f"wrote {cfg.method} Mixtral: {cfg.n_experts} experts, top-"
              f"{cfg.experts_per_token}, {counts['total'] / 1e6:.2f}M parameters, "
              f"{counts['active'] / 1e6:.2f}M active per token, router {cfg.gate_mode} "
              f"-> {out}", file=sys.stderr)
    return {"out": str(out), "collinear": near, **counts}


def main(cfg) -> int:
    build(cfg)
    return 0


__all__ = ["build", "main", "check_dense", "check_same", "mixtral_config"]
