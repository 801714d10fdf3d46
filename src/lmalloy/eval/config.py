"""Config of `lmalloy eval` (pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmalloy.config import positional, threads_field
from lmalloy.data.config import DataFields


class EvalConfig(DataFields):
    models: list[str] = Field(..., min_length=1, **positional("HF model folders to evaluate"))
    split: Literal["val", "train", "all"] = Field(
        "val", description="which part of the corpus: the held-out documents (the same split "
        "as training with the same --val-fraction and --seed), the rest, or everything")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="as in training")
    seed: int = Field(0, description="as in training")
    seq_len: int = Field(256, gt=1, description="evaluation window (non-overlapping)")
    eval_tokens: int = Field(262144, gt=0, description="max tokens evaluated per model")
    batch_size: int = Field(8, gt=0, description="sequences per forward pass")
    per_domain: bool = Field(False, description="one row per domain")
    json_output: bool = Field(False, alias="json", description="print JSON")
    tokenizer: str | None = Field(None, description="tokenizer folder (default: the first "
                                  "model's)")
    allow_pickle: bool = Field(False, description="allow pickle weights (weights_only)")
    threads: int | None = threads_field()
