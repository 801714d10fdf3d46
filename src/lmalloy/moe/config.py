"""Configs of `lmalloy moe build` and `lmalloy moe analyze` (pydantic only).

`moe build` also reads mergekit-moe's YAML for the fields both share (`base_model`,
`gate_mode`, `dtype`, `experts_per_token`, `experts: [{source_model, positive_prompts,
negative_prompts}]`); the output folder, which mergekit-moe takes as its second argument,
is `--out`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmalloy.config import Config, positional, threads_field
from lmalloy.data.config import DataFields

# the MoE architectures `moe build` writes (mergekit-moe's `architecture:` names; `qwen` is
# mergekit-moe's name for Qwen2-MoE); kept in step with lmalloy.moe.layout.ARCHS (a test)
ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
_ARCH_ALIASES = {"qwen": "qwen2_moe", "qwen2moe": "qwen2_moe", "qwen3": "qwen3_moe"}


class Expert(Config):
    source_model: str | None = Field(None, description="dense fine-tune whose FFN becomes this "
                                     "expert (upcycle: omit, the base is copied)")
    positive_prompts: list[str] = Field([], description="prompts this expert should handle")
    negative_prompts: list[str] = Field([], description="prompts it should not handle")


class MoeBuildConfig(Config):
    method: Literal["upcycle", "compose", "btx"] = Field(
        "compose", description="upcycle: one dense model -> E copies of its FFN; compose: "
        "non-FFN weights from the base, expert i's FFN from fine-tune i (mergekit-moe); btx: "
        "as compose, non-FFN weights averaged over the fine-tunes (Branch-Train-MiX)")
    base_model: str = Field(..., description="dense Llama/Mistral-family HF folder: attention, "
                            "norms, embeddings (compose), the copied FFN (upcycle), the router's "
                            "hidden states and the tokenizer")
    experts: list[Expert] = Field([], description="experts: YAML list of {source_model, "
                                  "positive_prompts, negative_prompts}, or model folders")
    num_experts: int | None = Field(None, description="upcycle: number of experts E (default: "
                                    "len(experts) if given, else 8)")
    experts_per_token: int = Field(2, description="top-k experts per token")
    gate_mode: Literal["hidden", "cheap_embed", "random", "zero"] | None = Field(
        None, description="router init: hidden (base hidden states on each expert's "
        "prompts), cheap_embed (prompt token embeddings), random (compose/btx: N(0, 1) as "
        "mergekit; upcycle: N(0, initializer_range)), zero (uniform routing); default: hidden "
        "for compose/btx, random for upcycle")
    noise: float = Field(0.0, ge=0, description="upcycle: add N(0, (noise·std W)²) to each "
                         "expert copy of W")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="output dtype (default: the base's)")
    architecture: str | None = Field(None, description="the MoE architecture written: "
                                     + ", ".join(ARCHITECTURES) + " (default: the base's "
                                     "counterpart: llama/mistral -> mixtral, qwen2 -> "
                                     "qwen2_moe, qwen3 -> qwen3_moe)")
    shared_experts: list[Expert] = Field([], description="Qwen2-MoE: the shared expert "
                                         "(one entry {source_model, positive_prompts}; "
                                         "default: the base's FFN with its output zeroed)")
    layout: Literal["per_expert", "fused"] = Field(
        "per_expert", description="per_expert: `block_sparse_moe.experts.N.w1/w2/w3` as "
        "transformers' save_pretrained writes Mixtral (also read by transformers 4.x, vLLM, "
        "mergekit); fused: `mlp.experts.gate_up_proj`/`down_proj` 3-D tensors as transformers "
        "5 holds them in memory")
    router_aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing coefficient "
                                        "written to the config (used when fine-tuning)")
    seed: int = Field(0, description="seed for random routers and noise")
    out: str = Field(..., description="output Mixtral folder")
    overwrite: bool = Field(False, description="replace an existing output folder")
    threads: int | None = threads_field()

    @field_validator("experts", "shared_experts", mode="before")
    @classmethod
    def _experts(cls, v):
        if isinstance(v, list):
            return [{"source_model": e} if isinstance(e, str) else e for e in v]
        return v

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        from lmalloy.errors import closest

        v = _ARCH_ALIASES.get(v, v)
        if v is not None and v not in ARCHITECTURES:
            raise ValueError(f"unknown MoE architecture `{v}`{closest(v, ARCHITECTURES)}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        return v

    @field_validator("experts_per_token")
    @classmethod
    def _k(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.gate_mode is None:
            self.gate_mode = "random" if self.method == "upcycle" else "hidden"
        if self.method == "upcycle":
            if any(e.source_model not in (None, self.base_model) for e in self.experts):
                raise ValueError("upcycle copies the base's FFN: its experts take prompts "
                                 "only, no source_model (use --method compose)")
            if self.num_experts is not None and self.experts and \
                    self.num_experts != len(self.experts):
                raise ValueError(f"--num-experts {self.num_experts} differs from the "
                                 f"{len(self.experts)} experts listed")
        else:
            if self.num_experts is not None:
                raise ValueError("--num-experts is for upcycle; compose/btx take one expert "
                                 "per listed source_model")
            if any(e.source_model is None for e in self.experts):
                raise ValueError(f"{self.method}: every expert needs a source_model")
            if self.noise:
                raise ValueError("--noise is for upcycle")
        if len(self.shared_experts) > 1:
            raise ValueError(f"at most one shared expert, got {len(self.shared_experts)}")
        if self.gate_mode in ("hidden", "cheap_embed") and any(
                not x.positive_prompts for x in self.shared_experts):
            raise ValueError(f"gate_mode {self.gate_mode}: the shared expert needs "
                             "positive_prompts")
        e = self.n_experts
        if e < 2:
            raise ValueError(f"an MoE needs at least 2 experts, got {e}")
        if self.experts_per_token > e:
            raise ValueError(f"--experts-per-token {self.experts_per_token} is more than the "
                             f"{e} experts")
        if self.gate_mode in ("hidden", "cheap_embed"):
            if not self.experts:
                raise ValueError(f"gate_mode {self.gate_mode} needs an `experts` list with "
                                 "positive_prompts (or use gate_mode random/zero)")
            for i, x in enumerate(self.experts):
                if not x.positive_prompts:
                    raise ValueError(f"gate_mode {self.gate_mode}: expert {i} "
                                     f"({x.source_model or 'base copy'}) has no positive_prompts")
        return self

    @property
    def n_experts(self) -> int:
        if self.method == "upcycle":
            if self.num_experts is not None:
                return self.num_experts
            return len(self.experts) or 8
        return len(self.experts)

    @classmethod
    def from_file_data(cls, data: dict) -> dict:
        """mergekit-moe's YAML -> this config: its keys mapped, or refused by name."""
        from lmalloy.errors import UserError

        data = dict(data)
        if data.get("gate_mode") in ("hidden_avg", "hidden_last"):
            data["gate_mode"] = "hidden"
        if "out_dtype" in data:  # mergekit-moe: the output dtype
            data["dtype"] = data.pop("out_dtype")
        src = data.pop("tokenizer_source", None)
        if src not in (None, "base", data.get("base_model")):
            raise UserError(f"`tokenizer_source: {src}`: `moe build` keeps the base's "
                            "tokenizer (every expert must share it); use `base` or omit it")
        if data.pop("allow_crimes", False):
            raise UserError("`allow_crimes: true`: `moe build` does not mix architectures; "
                            "every expert must be a fine-tune of the base")
        return data


class MoeAnalyzeConfig(DataFields):
    model: str = Field(..., **positional("Mixtral-format HF model folder"))
    init: str | None = Field(None, description="the same model at initialisation (e.g. the "
                             "`moe build` output before router fine-tuning), analysed alike")
    out: str = Field("runs/moe-analyze", description="folder for routing.json, "
                     "expert_shares.png and tokens.html")
    tokenizer: str | None = Field(None, description="tokenizer folder (default: the model's)")
    seq_len: int = Field(256, gt=1, description="tokens per analysed sequence")
    eval_tokens: int = Field(16384, gt=0, description="max tokens analysed per domain")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="as in training")
    split: Literal["val", "train", "all"] = Field("val", description="which documents")
    seed: int = Field(0, description="as in training")
    text: str | None = Field(None, description="text file to colour by expert in tokens.html "
                             "(default: the start of the first domain)")
    html_layers: list[int] | None = Field(None, description="layers shown in tokens.html "
                                          "(default: first, middle, last)")
    max_html_tokens: int = Field(400, gt=0, description="tokens coloured in tokens.html")
    batch_size: int = Field(8, gt=0, description="sequences per forward pass")
    json_output: bool = Field(False, alias="json", description="print JSON")
    threads: int | None = threads_field()
    overwrite: bool = Field(False, description="replace an existing --out folder")


__all__ = ["Expert", "MoeBuildConfig", "MoeAnalyzeConfig"]
