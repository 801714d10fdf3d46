"""Configs of `lmalloy pretrain` and `lmalloy finetune` (pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmalloy.average.config import AVERAGERS, EMASettings, LaWASettings, SWASettings
from lmalloy.config import also, threads_field
from lmalloy.data.config import DataFields, valid_vocab_size

# keys that may change between a run and its `--resume`
RESUME_MUTABLE = {"resume", "overwrite", "progress", "threads", "debug", "num_proc",
                  "dist_timeout", "device"}


class TrainConfig(DataFields):
    out: str = Field("runs/pretrain", description="run folder (checkpoints, metrics, final model)")
    seq_len: int = Field(256, gt=1, description="tokens per training sequence")
    global_batch_tokens: int = Field(16384, gt=0, description="tokens per optimizer step, all "
                                     "processes and accumulation steps together")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward pass per process")
    epochs: float | None = Field(1.0, gt=0, description="passes over the training tokens")
    max_tokens: int | None = Field(None, gt=0, description="token budget (overrides --epochs)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (overrides both)")
    unique_tokens: int | None = Field(None, gt=0, description="train on a seeded random "
                                      "subset of this many training tokens (whole sequences "
                                      "from every part of the data), repeated epoch after "
                                      "epoch: for data-repetition experiments")
    lr: float = Field(4e-4, gt=0, description="peak learning rate (TinyLlama: 4e-4)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps (default: "
                                     "TinyLlama's 2000, capped at 5% of the run)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0 disables)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = bf16 autocast with "
                                               "fp32 master weights")
    compile: bool = Field(False, description="torch.compile the model (where inductor cannot "
                          "build kernels here — no C++ compiler on CPU, no Triton on CUDA — a "
                          "warning, and the run trains eagerly)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder "
                                           "layer's activations in the backward pass instead "
                                           "of keeping them: less memory, ~1/3 more compute")
    device: str | None = Field(None, description="torch device: cpu, cuda, cuda:N, mps "
                               "(default: cuda when available, else cpu); under torchrun each "
                               "process takes cuda:LOCAL_RANK on a CUDA device")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of each domain's tokens "
                                "held out for validation (split by document)")
    eval_every: int = Field(100, gt=0, description="evaluate every N steps (and at the end)")
    eval_tokens: int = Field(131072, gt=0, description="max validation tokens per evaluation")
    eval_windows: bool = Field(False, description="log each validation window's loss at "
                               "every evaluation (for paired intervals between evaluations)")
    save_every: int | None = Field(None, gt=0, description="checkpoint every N steps "
                                   "(default: at every evaluation)")
    keep_checkpoints: int | None = Field(None, gt=0, description="keep only the newest N")
    log_every: int = Field(10, gt=0, description="log training metrics every N steps")
    seed: int = Field(0, description="seed for initialisation and data order")
    threads: int | None = threads_field()
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="strategy under torchrun")
    dist_timeout: float = Field(1800, gt=0, description="seconds a process waits for the "
                                "others under torchrun: to form the process group, and in "
                                "each collective")
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU (default: "
                                      "a table for known GPUs; measured matmul peak on CPU)")
    resume: bool = Field(False, description="continue from the newest checkpoint in --out")
    overwrite: bool = Field(False, description="replace an existing run folder")
    progress: bool = Field(True, description="show a progress bar")
    average: list[str] = Field([], description="weight averages kept, evaluated and saved "
                               "beside the raw model: any of ema, swa, lawa")
    ema: EMASettings = Field(default_factory=EMASettings, description="EMA settings")
    swa: SWASettings = Field(default_factory=SWASettings, description="SWA settings")
    lawa: LaWASettings = Field(default_factory=LaWASettings, description="LaWA settings")

    @field_validator("average")
    @classmethod
    def _average(cls, v: list[str]) -> list[str]:
        for a in v:
            if a not in AVERAGERS:
                raise ValueError(f"unknown averager `{a}`; choose from {', '.join(AVERAGERS)}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _check(self):
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        return self


class PretrainConfig(TrainConfig):
    preset: str = Field("small", description="model size: tiny, small, base, tinyllama-1.1b, "
                        "tiny-moe, small-moe")
    model_overrides: dict[str, int | float | str | bool] = Field(
        {}, description="LlamaConfig fields that override the preset (YAML mapping)")
    tokenizer: str | None = Field(None, description="existing HF tokenizer folder (default: "
                                  "train a byte-level BPE on the training data)")
    vocab_size: int = Field(4096, description="vocabulary of the trained tokenizer")

    _vocab = field_validator("vocab_size")(classmethod(lambda cls, v: valid_vocab_size(v)))


class FinetuneConfig(TrainConfig):
    base_model: str | None = Field(None, description="HF model folder to start from "
                                   "(required, except with --resume: the run's own)",
                                   **also("init_from"))
    out: str = Field("runs/finetune", description="run folder")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    freeze: list[str] = Field([], description="freeze parameters whose names match these "
                              "regular expressions")
    train_only: list[str] = Field([], description="train only parameters matching these "
                                  "regular expressions (e.g. `mlp.gate` for MoE routers)")
    allow_pickle: bool = Field(False, description="allow a pickle checkpoint (weights_only)")

    @model_validator(mode="after")
    def _base(self):
        if self.base_model is None and not self.resume:
            raise ValueError("`--base-model` is required: the HF model folder to fine-tune")
        return self
