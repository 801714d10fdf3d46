"""Configs of `lmalloy proxy generate` and `lmalloy proxy eval` (pydantic only)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmalloy.config import Config, threads_field
from lmalloy.data.config import DataFields


def _check_format(v: str) -> str:
    if v not in ("raw", "chat") and "{prompt}" not in v:
        raise ValueError("must be `raw`, `chat` or a template containing `{prompt}`")
    return v


class ProxyModels(Config):
    """The ensemble: fields shared by both commands."""

    large: str = Field(..., description="the large base model (HF folder)")
    tuned: list[str] = Field(..., min_length=1, description="small tuned model(s) (HF folders)")
    untuned: list[str] = Field(..., min_length=1, description="their untuned bases, one per "
                               "--tuned, in the same order")
    alpha: list[float] = Field([1.0], min_length=1, description="strength of each pair's "
                               "steering (one value for all pairs, or one per pair)")
    large_format: str = Field("raw", description="prompt format the large model sees: `raw`, "
                              "`chat` (its tokenizer's chat template) or a `{prompt}` template")
    tuned_format: str = Field("raw", description="prompt format of the tuned model(s)")
    untuned_format: str = Field("raw", description="prompt format of the untuned model(s)")
    tokenizer: str | None = Field(None, description="tokenizer folder for model folders "
                                  "that have none")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32",
                                                             description="weights' dtype")
    device: str = Field("cpu", description="torch device (cpu, cuda, cuda:1, ...)")
    threads: int | None = threads_field()
    allow_pickle: bool = Field(False, description="allow pickle weights (weights_only)")

    @field_validator("alpha")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        for a in v:
            if not math.isfinite(a):
                raise ValueError(f"must be finite, got {a}")
        return v

    @field_validator("large_format", "tuned_format", "untuned_format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        return _check_format(v)

    @model_validator(mode="after")
    def _pairs(self):
        if len(self.tuned) != len(self.untuned):
            raise ValueError(f"{len(self.tuned)} --tuned model(s) but {len(self.untuned)} "
                             "--untuned; give one untuned base per tuned model")
        if len(self.alpha) not in (1, len(self.tuned)):
            raise ValueError(f"{len(self.alpha)} --alpha values for {len(self.tuned)} pairs; "
                             "give one value or one per pair")
        return self

    def formats(self) -> dict[str, str]:
        return {"large": self.large_format, "tuned": self.tuned_format,
                "untuned": self.untuned_format,
                "draft": getattr(self, "draft_format", "raw")}

    def alphas(self) -> list[float]:
        return self.alpha * len(self.tuned) if len(self.alpha) == 1 else list(self.alpha)


class SpeculativeFields(Config):
    """Speculative decoding (lmalloy.proxy.speculative), for `proxy generate` and `serve`."""

    speculative: int | None = Field(None, gt=0, description="draft K tokens per round with "
                                    "the draft model, verified exactly (off by default)")
    adaptive_k: bool = Field(False, description="with --speculative K: choose each round's K "
                             "in [1, K] from the measured acceptance rate and costs")
    draft: str | None = Field(None, description="draft model folder for --speculative "
                              "(default: the first --tuned model); same tokenizer")
    draft_format: str = Field("raw", description="prompt format of the --draft model")

    @field_validator("draft_format")
    @classmethod
    def _dfmt(cls, v: str) -> str:
        return _check_format(v)


class ProxyGenerateConfig(ProxyModels, SpeculativeFields):
    prompt: str | None = Field(None, description="one prompt")
    prompts: str | None = Field(None, description="JSONL file: one {\"prompt\": ...} object "
                                "(or JSON string) per line")
    out: str | None = Field(None, description="write results as JSONL here (default: print)")
    overwrite: bool = Field(False, description="replace an existing --out file")
    max_new_tokens: int = Field(128, gt=0, description="tokens to generate per prompt")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_k: int | None = Field(None, gt=0, description="sample among the k most likely tokens")
    top_p: float | None = Field(None, description="nucleus sampling mass, in (0, 1]")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL repetition penalty "
                                      "(1 = off)")
    stop: list[str] = Field([], description="stop strings (not included in the output)")
    stop_at_eos: bool = Field(True, description="stop a row at the end-of-text token")
    seed: int = Field(0, description="sampling seed")
    batch_size: int = Field(8, gt=0, description="prompts decoded together")
    json_output: bool = Field(False, alias="json", description="print JSONL instead of text")

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("temperature", "repetition_penalty")
    @classmethod
    def _finite_sampling(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of --prompt TEXT and --prompts FILE.jsonl")
        return self


class ProxyEvalConfig(ProxyModels, DataFields):
    tuned_large: str | None = Field(None, description="the large model fine-tuned directly "
                                    "(to report the fraction of the gap proxy-tuning closes)")
    split: Literal["val", "train", "all"] = Field("val", description="which documents of the "
                                                  "corpus (as split by training)")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="as in training")
    seed: int = Field(0, description="as in training")
    seq_len: int = Field(256, gt=1, description="evaluation window (non-overlapping)")
    eval_tokens: int = Field(65536, gt=0, description="max tokens evaluated")
    batch_size: int = Field(8, gt=0, description="sequences per forward pass")
    perplexity: bool = Field(True, description="evaluate perplexity on the corpus")
    choices: str | None = Field(None, description="multiple-choice JSONL: {\"context\", "
                                "\"choices\": [...], \"answer\": index} per line")
    normalize: bool = Field(False, description="rank choices by mean log-probability per token")
    json_output: bool = Field(False, alias="json", description="print JSON")

    @model_validator(mode="after")
    def _something(self):
        if not self.perplexity and not self.choices:
            raise ValueError("nothing to evaluate: --no-perplexity without --choices")
        return self
