"""Configs of `lmalloy reward data|train|warm|eval` (pydantic only: cheap to import)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from lmalloy.config import Config, also, positional, threads_field
from lmalloy.data.config import DataFields

# corruption kinds of the built-in generator (see lmalloy.reward.data.CORRUPTIONS)
KINDS = ("swap", "shuffle", "truncate", "repeat", "typo", "foreign")


def _noise(v: float) -> float:
    if not 0 <= v < 0.5:
        raise ValueError("must be in [0, 0.5) (a fraction of pairs whose labels are flipped)")
    return v


class RewardDataConfig(DataFields):
    out: str = Field("runs/reward/pairs.jsonl", description="output JSONL file of preference "
                     "pairs (prompt, chosen, rejected, distribution, flipped)")
    kinds: list[str] = Field(["swap", "shuffle", "truncate"], description="corruption kinds "
                             f"that make the rejected answers: {', '.join(KINDS)}")
    num_pairs: int = Field(1000, gt=0, description="pairs to write (kinds in turn)")
    label_noise: float = Field(0.0, description="fraction of pairs whose chosen/rejected are "
                               "swapped (marked `flipped`), in [0, 0.5)")
    prompt_lines: int = Field(3, ge=0, description="lines of code before the answer")
    answer_lines: int = Field(3, ge=1, description="lines of code in each answer")
    max_chars: int = Field(400, gt=0, description="skip snippets longer than this")
    split: str = Field("all", description="snippets to draw from: `train`, `test` (a "
                       "deterministic share of snippets, by file and line) or `all`")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of snippets in `test`")
    seed: int = Field(0, description="seed for snippet choice, corruptions and label noise")
    overwrite: bool = Field(False, description="replace an existing output file")

    @field_validator("label_noise")
    @classmethod
    def _label_noise(cls, v: float) -> float:
        return _noise(v)

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        from lmalloy.errors import closest

        for k in v:
            if k not in KINDS:
                raise ValueError(f"unknown corruption kind `{k}`{closest(k, KINDS)}; choose "
                                 f"from: {', '.join(KINDS)}")
        if not v:
            raise ValueError("name at least one corruption kind")
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        if v not in ("train", "test", "all"):
            raise ValueError("must be `train`, `test` or `all`")
        return v


class RewardTrainConfig(Config):
    base_model: list[str] = Field(..., description="causal-LM HF folder to start from (one: "
                                  "the shared init of all models; M folders, e.g. checkpoints "
                                  "of one fine-tuning run: Baklava, one init per model)",
                                  **also("init_from"))
    pairs: list[str] = Field(..., description="JSONL preference files (prompt, chosen, "
                             "rejected)")
    out: str = Field("runs/reward", description="run folder: rm-00, rm-01, ... HF folders")
    num_models: int = Field(1, ge=1, description="reward models to fine-tune (M)")
    lr: list[float] = Field([1e-4], description="peak learning rate, or a range `LOW,HIGH` "
                            "from which each model draws one (log-uniform)")
    dropout: list[float] = Field([0.0], description="attention dropout, or a range `LOW,HIGH` "
                                 "from which each model draws one (uniform)")
    epochs: float = Field(1.0, gt=0, description="passes over the pairs")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (overrides --epochs)")
    batch_size: int = Field(16, gt=0, description="pairs per optimizer step")
    seq_len: int = Field(256, gt=1, description="max tokens of prompt + answer (the prompt is "
                         "cut from the left)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps (default 5%)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms)")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0 disables)")
    seed: int = Field(0, description="seed of the shared head init; model i trains with "
                      "seed + 1 + i (data order, dropout, hyperparameter draws)")
    threads: int | None = threads_field()
    overwrite: bool = Field(False, description="replace an existing run folder")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("lr", "dropout")
    @classmethod
    def _range(cls, v: list[float], info) -> list[float]:
        if len(v) not in (1, 2):
            raise ValueError("give one value or a range LOW,HIGH")
        if len(v) == 2 and v[0] > v[1]:
            raise ValueError("range must be LOW,HIGH with LOW <= HIGH")
        if info.field_name == "lr" and min(v) <= 0:
            raise ValueError("must be > 0")
        if info.field_name == "dropout" and not all(0 <= x < 1 for x in v):
            raise ValueError("must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _inits(self):
        if len(self.base_model) not in (1, self.num_models):
            raise ValueError(f"--base-model: give one folder (shared init) or --num-models "
                             f"{self.num_models} folders (Baklava), got {len(self.base_model)}")
        return self


class RewardWarmConfig(Config):
    models: list[str] = Field(..., **positional("reward-model folders (or a `reward train` "
                                                 "run folder holding rm-*)"))
    out: str = Field("runs/reward/warm", description="output HF folder of the averaged model")
    weights: list[float] | None = Field(None, description="one weight per model (normalised "
                                        "to sum 1); default uniform")
    overwrite: bool = Field(False, description="replace an existing output folder")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("must be non-negative with a positive sum")
        return v


class RewardEvalConfig(Config):
    models: list[str] = Field(..., **positional("reward-model folders (or a `reward train` "
                                                 "run folder holding rm-*)"))
    pairs: list[str] = Field(..., description="JSONL test files of preference pairs; "
                             "accuracy is reported per file and per `distribution` field")
    warm: str | None = Field(None, description="the WARM folder (default: the uniform weight "
                             "average, computed in memory)")
    train_pairs: str | None = Field(None, description="training JSONL: accuracy on its "
                                    "`flipped` pairs measures memorisation of noisy labels")
    policy: str | None = Field(None, description="causal LM that samples answers for best-of-N")
    gold: str | None = Field(None, description="reward model that judges best-of-N picks")
    bon_n: int = Field(8, ge=2, description="answers sampled per prompt for best-of-N")
    bon_prompts: int = Field(32, gt=0, description="prompts (from --pairs) for best-of-N")
    max_new_tokens: int = Field(48, gt=0, description="tokens per sampled answer")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_k: int | None = Field(50, gt=0, description="top-k sampling (none: full distribution)")
    seq_len: int = Field(256, gt=1, description="max tokens of prompt + answer when scoring")
    batch_size: int = Field(32, gt=0, description="sequences per scoring batch")
    seed: int = Field(0, description="sampling seed")
    out: str | None = Field(None, description="write the results as JSON here")
    per_pair: bool = Field(False, description="also write each pair's outcome per selector "
                           "(1 right, 0.5 tie, 0 wrong; for paired intervals) to --out")
    overwrite: bool = Field(False, description="replace an existing --out file")
    threads: int | None = threads_field()

    @model_validator(mode="after")
    def _bon(self):
        if (self.policy is None) != (self.gold is None):
            raise ValueError("best-of-N needs both --policy and --gold")
        return self
