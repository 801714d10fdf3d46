"""Model presets: Llama-2 architecture sizes (transformers' LlamaConfig fields).

Parameter counts below are for a 4096-token vocabulary (the demo's tokenizer), untied
embeddings; `lmalloy inspect` prints the exact count of any folder.

| preset          | hidden | layers | heads/kv | ffn  | params (vocab 4096) |
|-----------------|--------|--------|----------|------|---------------------|
| tiny            | 96     | 2      | 4/2      | 256  | ~1.0M (tests)       |
| small           | 320    | 6      | 8/4      | 864  | ~9.4M               |
| base            | 512    | 12     | 8/4      | 1408 | ~39.6M              |
| tinyllama-1.1b  | 2048   | 22     | 32/4     | 5632 | 1.100B (vocab 32000)|

`tinyllama-1.1b` is TinyLlama's exact architecture, vocabulary 32000 included.

MoE presets build transformers' `MixtralForCausalLM` (MixtralConfig fields): 8 SwiGLU
experts per layer, top-2 routing, Switch load-balancing loss with coefficient
`router_aux_loss_coef` (override it with `model_overrides`). Each expert is half the
dense preset's FFN, so `small-moe` has the same *active* parameters per token as `small`
(NonFF + 2·FF) and 4× its FFN parameters in total.

| preset     | hidden | layers | experts × ffn | top-k | total / active (vocab 4096) |
|------------|--------|--------|---------------|-------|-----------------------------|
| tiny-moe   | 96     | 2      | 8 × 128       | 2     | ~1.4M / ~1.0M               |
| small-moe  | 320    | 6      | 8 × 432       | 2     | ~24.4M / ~9.5M              |
"""

from __future__ import annotations

from lmalloy.errors import UserError, closest, unknown

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, max_position_embeddings=1024),
    "small": dict(hidden_size=320, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=864, max_position_embeddings=2048),
    "base": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=2048),
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, intermediate_size=5632,
                           max_position_embeddings=2048, vocab_size=32000),
    "tiny-moe": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                     num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01),
    "small-moe": dict(hidden_size=320, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=432,
                      max_position_embeddings=2048, num_local_experts=8,
                      num_experts_per_tok=2, router_aux_loss_coef=0.01),
}
MOE_ONLY = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
            "router_jitter_noise", "output_router_logits")
COMMON = dict(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, initializer_range=0.02)


def model_kwargs(preset: str, vocab_size: int, overrides: dict | None = None) -> dict:
    """LlamaConfig keyword arguments for a preset, a tokenizer size and user overrides."""
    if preset not in PRESETS:
        raise unknown("preset", preset, PRESETS)
    kw = {**COMMON, **PRESETS[preset]}
    if is_moe(kw):  # Mixtral layers have no biases
        kw.pop("attention_bias")
        kw.pop("mlp_bias")
    if "vocab_size" in kw:  # a fixed-vocabulary preset
        if vocab_size > kw["vocab_size"]:
            raise UserError(f"preset {preset} has a {kw['vocab_size']}-token vocabulary; the "
                            f"tokenizer has {vocab_size}")
    else:
        kw["vocab_size"] = -(-vocab_size // 64) * 64  # round up to a multiple of 64
    kw.update(overrides or {})
    if kw["hidden_size"] % kw["num_attention_heads"]:
        raise UserError(f"hidden_size {kw['hidden_size']} is not divisible by "
                        f"num_attention_heads {kw['num_attention_heads']}")
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        raise UserError("num_attention_heads must be a multiple of num_key_value_heads")
    if is_moe(kw):
        e, k = kw["num_local_experts"], kw.get("num_experts_per_tok", 2)
        if e < 2 or not 1 <= k <= e:
            raise UserError(f"an MoE needs num_local_experts >= 2 and 1 <= num_experts_per_tok "
                            f"<= num_local_experts, got {e} and {k}")
    else:
        extra = [k for k in MOE_ONLY if k in kw]
        if extra:
            raise UserError(f"model_overrides `{extra[0]}` applies to MoE presets only "
                            "(tiny-moe, small-moe)")
    return kw


def check_overrides(preset: str, overrides: dict) -> None:
    """UserError for a `--model-overrides` key the preset's config class does not have."""
    if not overrides:
        return
    from transformers import LlamaConfig, MixtralConfig

    moe = is_moe(PRESETS.get(preset, {}))
    extra = [k for k in MOE_ONLY if k in overrides and not moe]
    if extra:
        raise UserError(f"model_overrides `{extra[0]}` applies to MoE presets only "
                        "(tiny-moe, small-moe)")
    cls = MixtralConfig if moe else LlamaConfig
    known = set(cls().to_dict())
    for k in overrides:
        if k not in known:
            raise UserError(f"`--model-overrides`: {cls.__name__} has no field `{k}`"
                            f"{closest(k, known)}")


def is_moe(kw: dict) -> bool:
    """Whether preset kwargs describe a Mixtral MoE (else a Llama)."""
    return "num_local_experts" in kw
