"""Configs of the data commands (pydantic only: cheap to import)."""

from __future__ import annotations

from pydantic import Field, field_validator

from lmalloy.config import Config


def valid_vocab_size(v: int) -> int:
    """Validator shared by every config that trains a tokenizer."""
    from lmalloy.data.tokenizer import MIN_VOCAB

    if v < MIN_VOCAB:
        raise ValueError(f"must be at least {MIN_VOCAB} (256 byte tokens + "
                         f"{MIN_VOCAB - 256} special tokens)")
    if v > 2**31:
        raise ValueError("is too large")
    return v


class DataFields(Config):
    """The fields every command that reads a corpus shares."""

    data: list[str] = Field(["stdlib"], description="corpus: `stdlib` (the running Python's "
                            "standard library), files, folders, globs, and JSONL or Parquet "
                            "files (streamed, never held in memory)")
    text_field: str = Field("text", min_length=1, description="the JSONL field / Parquet "
                            "column that holds a document's text")
    num_proc: int | None = Field(None, ge=1, description="processes that read and tokenize "
                                 "JSONL/Parquet files (default: min(4, CPU cores))")
    domains: list[str] | None = Field(None, description="keep only these domains")
    exclude_domains: list[str] = Field([], description="drop these domains")
    max_chars_per_domain: int | None = Field(None, gt=0, description="cap each domain's size "
                                             "(whole documents, in corpus order)")


class DataListConfig(DataFields):
    pass


class TokenizerConfig(DataFields):
    out: str = Field("runs/tokenizer", description="output HF tokenizer folder")
    vocab_size: int = Field(4096, description="BPE vocabulary size (>= 258: 256 bytes + specials)")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge")
    overwrite: bool = Field(False, description="replace an existing output folder")

    _vocab = field_validator("vocab_size")(classmethod(lambda cls, v: valid_vocab_size(v)))
