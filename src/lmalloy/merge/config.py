"""Configs of `lmalloy merge`, `merge search`, `merge lorahub` and `merge extract-lora`
(pydantic only: cheap to import).

lmalloy's merge YAML has the shape of mergekit's, so one file works in both tools for the
methods they share:

    merge_method: ties            # lmalloy also accepts `method`
    base_model: runs/base
    models:
      - model: runs/email
        parameters: {weight: 1.0, density: 0.5}
      - model: runs/json
        parameters: {weight: [0.2, 1.0]}       # a gradient over the layers
    parameters: {normalize: true, density: [{filter: mlp, value: 0.3}, {value: 0.6}]}
    dtype: bfloat16

`from_file_data` maps mergekit's keys (`merge_method`, `tokenizer_source`, `out_dtype`) onto
this config's fields; the output folder is `--out` (also `--output`; mergekit takes it on its
command line).
Parameter *values* are checked per tensor when the merge is planned (gradients and filters
make them differ by tensor), before any tensor data is read.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmalloy.config import Config, also, positional, threads_field
from lmalloy.data.config import DataFields
from lmalloy.errors import closest

# kept in step with lmalloy.merge.methods.METHODS (a test checks); listed here so that
# validating a config does not import torch
METHOD_NAMES = ("linear", "soup", "greedy_soup", "task_arithmetic", "ties", "dare_linear",
                "dare_ties", "slerp", "model_stock", "passthrough", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "sce", "nuslerp", "multislerp",
                "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
# methods for PEFT adapter folders (lmalloy.merge.lora); `linear` also applies to adapters
LORA_METHODS = ("cat", "svd", "bake")


class _Parameters(Config):
    """A YAML entry with `parameters`; `parameters:` left empty (mergekit YAML) is none."""

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _none(cls, v):
        return {} if v is None else v


class ModelEntry(_Parameters):
    model: str = Field(..., description="HF model folder")
    parameters: dict[str, Any] = Field({}, description="per-model parameters (weight, density, "
                                       "...); values may be gradients or filtered lists")


class SliceSource(_Parameters):
    model: str = Field(..., description="HF model folder")
    layer_range: tuple[int, int] = Field(..., description="[first, end) of its decoder "
                                         "layers, end exclusive (mergekit's convention)")
    parameters: dict[str, Any] = Field({}, description="parameters of this source in this "
                                       "slice (they take precedence)")

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"`layer_range` [{v[0]}, {v[1]}] is empty or reversed: give "
                             "[first, end) with 0 <= first < end")
        return v


class Slice(_Parameters):
    sources: list[SliceSource] = Field(..., min_length=1, description="the models whose "
                                       "layers this output slice merges")
    base_model: str | None = Field(None, description="this slice's base (default: the "
                                   "merge's); it must be one of the sources")
    parameters: dict[str, Any] = Field({}, description="parameters of this slice (between "
                                       "the sources' and the global ones)")

    @field_validator("sources")
    @classmethod
    def _lengths(cls, v: list[SliceSource]) -> list[SliceSource]:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in v}
        if len(lengths) > 1:
            raise ValueError("the sources of a slice must span the same number of layers, "
                             "got " + ", ".join(f"{s.model} [{s.layer_range[0]}, "
                                                f"{s.layer_range[1]}]" for s in v))
        return v


def _check_plain(where: str, name: str, value: Any) -> None:
    """Structural check of one parameter value (a number, a gradient, or a filter list)."""
    if isinstance(value, bool) or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"parameter `{name}`{where} must be a finite number, got {value}")
        return
    if isinstance(value, list):
        if not value:
            raise ValueError(f"parameter `{name}`{where} is an empty list")
        for v in value:
            if isinstance(v, dict):
                extra = set(v) - {"filter", "value"}
                if "value" not in v or extra:
                    raise ValueError(f"parameter `{name}`{where}: each filtered entry needs "
                                     f"`value` (and optionally `filter`), got {v}")
                _check_plain(where, name, v["value"])
            else:
                _check_plain(where, name, v)
        return
    raise ValueError(f"parameter `{name}`{where}: expected a number, a list of numbers or a "
                     f"list of {{filter, value}}, got {value!r}")


class MergeConfig(DataFields):
    method: str = Field("linear", description="merge method: " + ", ".join(METHOD_NAMES)
                        + "; for PEFT adapter folders: cat, svd, linear, bake (into "
                        "--base-model)")
    models: list[ModelEntry] = Field([], description="models to merge (folders; "
                                     "YAML entries may carry `parameters`)")
    slices: list[Slice] | None = Field(
        None, min_length=1, description="YAML only: output layers stacked from slices of "
        "the models' layers (mergekit's `slices:`; instead of `models`)",
        json_schema_extra={"yaml_only": True})
    base_model: str | None = Field(None, description="shared base (task-vector methods, "
                                   "slerp's t=0 end, model_stock, nearswap, arcee_fusion; "
                                   "optional for nuslerp, multislerp, karcher)")
    parameters: dict[str, Any] = Field({}, description="parameters for every model and the "
                                       "method (YAML mapping; per-model ones take precedence)")
    weights: list[float] | None = Field(None, description="one weight per model, in order "
                                        "(sets each model's `weight` parameter)")
    out: str = Field("runs/merged", description="output HF model folder", **also("output"))
    overwrite: bool = Field(False, description="replace an existing output folder")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="output dtype (default: the base's, else the first model's)")
    compute_dtype: Literal["float32", "float64"] = Field(
        "float32", description="dtype the method computes in")
    chat_template: str | None = Field(
        None, description="the output tokenizer's chat template: `auto` (the reference "
        "model's, as it is) or the template's Jinja text (mergekit's key)")
    tokenizer_source: str | None = Field(
        None, description="when the inputs' tokenizers differ: `union` (the reference's plus "
        "every token another input adds), `base` or a model folder; embedding rows are "
        "re-indexed to it (mergekit's `tokenizer.source`)")
    tokenizer_pad_to: int | None = Field(None, gt=0, description="pad the output's "
                                         "embedding rows to a multiple of this (mergekit's "
                                         "`tokenizer.pad_to_multiple_of`)")
    ties_trim: Literal["tensor", "model"] = Field(
        "tensor", description="TIES/DARE-TIES trim scope: per tensor (mergekit) or over the "
        "whole flattened task vector (the TIES paper)")
    seed: int = Field(0, description="seed of DARE's random drops (per tensor and model)")
    compile: bool | None = Field(None, description="TIES: fuse each chunk's arithmetic into "
                                 "one torch.compile kernel (needs a C++ compiler; eager with "
                                 "a warning where it fails); default: when the inputs exceed "
                                 "1 GB")
    rank: int | None = Field(None, gt=0, description="LoRA `svd`: output rank (default: the "
                             "largest input rank)")
    max_shard_size: int = Field(5 * 1024**3, gt=0, description="bytes per output shard")
    allow_pickle: bool = Field(False, description="allow pickle inputs (weights_only)")
    progress: bool = Field(True, description="show a progress bar")
    threads: int | None = Field(None, gt=0, description="workers for TIES chunks (default 1; "
                                "more help only on idle cores); torch runs one thread, "
                                "reading and writing one each")
    # greedy_soup: held-out data (the DataFields above choose the corpus)
    seq_len: int = Field(256, gt=1, description="greedy_soup, merge search: evaluation "
                         "window")
    eval_tokens: int = Field(65536, gt=0, description="greedy_soup, merge search: held-out "
                             "tokens per model (merge search's mean-domain-loss: per domain)")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="greedy_soup, merge search: as "
                                "in training")
    eval_split: Literal["val", "train"] = Field("val", description="greedy_soup, merge search: "
                                                "split scored")
    split_seed: int = Field(0, description="greedy_soup, merge search: the training run's "
                            "--seed (it chose which documents are held out)")

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v):
        if isinstance(v, (str, dict)):
            v = [v]
        if not isinstance(v, list):
            raise ValueError(f"expected a list of model folders (or of {{model, parameters}} "
                             f"entries), got {v!r}")
        return [{"model": m} if isinstance(m, str) else m for m in v]

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v):
        """`--parameters density=0.5,lambda=0.8` on the command line."""
        if isinstance(v, str):
            import yaml

            out = {}
            for item in v.split(","):
                if "=" not in item:
                    raise ValueError("expected key=value pairs separated by commas")
                k, val = item.split("=", 1)
                out[k.strip()] = yaml.safe_load(val)
            return out
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or "{%" in v or "{{" in v:
            return v
        raise ValueError(f"expected `auto` or a Jinja template; named templates such as "
                         f"{v!r} are not built in: give the template's text")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        names = METHOD_NAMES + LORA_METHODS
        if v not in names:
            raise ValueError(f"unknown merge method `{v}`{closest(v, names)}; choose "
                             f"from: {', '.join(names)}")
        return v

    def _apply_weights(self) -> None:
        """`--weights` into each model's `weight` parameter."""
        if self.slices and self.weights is not None:
            raise ValueError("`--weights` sets the weights of `models`; with `slices`, set "
                             "each source's `weight` parameter")
        if self.weights is not None:
            if len(self.weights) != len(self.models):
                raise ValueError(f"`--weights` has {len(self.weights)} values for "
                                 f"{len(self.models)} models")
            for m, w in zip(self.models, self.weights, strict=True):
                if not math.isfinite(w):
                    raise ValueError(f"`--weights` must be finite numbers, got {w}")
                m.parameters["weight"] = w
            self.weights = None

    @staticmethod
    def check_values(parameters: dict, models: list, slices: list | None = None) -> None:
        """Every parameter value's structure (numbers, gradients, filter lists)."""
        for name, value in parameters.items():
            _check_plain("", name, value)
        for m in models:
            for name, value in m.parameters.items():
                _check_plain(f" of {m.model}", name, value)
        for i, sl in enumerate(slices or []):
            for name, value in sl.parameters.items():
                _check_plain(f" of slice {i}", name, value)
            for src in sl.sources:
                for name, value in src.parameters.items():
                    _check_plain(f" of {src.model} in slice {i}", name, value)

    @model_validator(mode="after")
    def _check(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("give the models to merge (`models`, --models) or, in the YAML, "
                             "`slices` of their layers; not both" if self.models else
                             "no models to merge: give `models` (--models) or, in the YAML, "
                             "`slices`")
        self._apply_weights()
        self.check_values(self.parameters, self.models, self.slices)
        return self

    @classmethod
    def from_file_data(cls, data: dict) -> dict:
        """Translate mergekit's YAML keys into this config's (lmalloy's own pass through)."""
        data = dict(data)
        if "merge_method" in data:
            data["method"] = data.pop("merge_method")
        if "out_dtype" in data:  # mergekit: dtype = compute dtype, out_dtype = output dtype
            data["dtype"] = data.pop("out_dtype")
        from lmalloy.errors import UserError

        tok = data.pop("tokenizer", None)
        if tok is not None:
            if not isinstance(tok, dict):
                raise UserError(f"`tokenizer` must be a mapping such as {{source: base}}, got "
                                f"{tok!r}")
            for k in tok:
                if k not in ("source", "pad_to_multiple_of"):
                    raise UserError(f"mergekit's `tokenizer.{k}` is not supported by lmalloy "
                                    "(only `tokenizer.source`: base, union or a model folder, "
                                    "and `tokenizer.pad_to_multiple_of`)"
                                    f"{closest(k, ['source', 'pad_to_multiple_of'])}")
            if tok.get("source") is not None:
                data["tokenizer_source"] = tok["source"]
            if tok.get("pad_to_multiple_of") is not None:
                data["tokenizer_pad_to"] = tok["pad_to_multiple_of"]
        if "modules" in data:
            raise UserError("mergekit's `modules:` (per-module slices of multi-module models) "
                            "is not supported; use `slices:` or `models:`")
        for i, sl in enumerate(data.get("slices") or []):
            if isinstance(sl, dict) and "residual_weight" in sl:
                raise UserError(f"`slices[{i}].residual_weight` is not supported (mergekit "
                                "0.1.5 accepts it but never uses it)")
        data.pop("name", None)  # mergekit's label of one document of a multi-stage merge
        return data


OBJECTIVES = ("loss", "mean-domain-loss", "accuracy", "accuracy-norm")


class SearchConfig(MergeConfig):
    """`lmalloy merge search`: the merge YAML, any parameter of which may be a range or a
    choice (`lmalloy.merge.space`), and how candidates are scored and searched."""

    out: str = Field("runs/merge-search", description="output folder: the best merge (an HF "
                     "model) with merge.yaml, search.jsonl and search.png", **also("output"))
    objective: Literal[OBJECTIVES] | None = Field(  # type: ignore[valid-type]
        None, description="what is optimised on held-out data: `loss` (all tokens of the "
        "corpus/domains pooled), `mean-domain-loss` (each domain's loss on up to "
        "--eval-tokens of its own, averaged: every domain counts alike), `accuracy` / "
        "`accuracy-norm` on --choices (choices ranked by summed / per-token log-likelihood; "
        "maximised); default: accuracy with --choices, mean-domain-loss with --domains, "
        "else loss")
    choices: str | None = Field(None, description="multiple-choice JSONL: {\"context\", "
                                "\"choices\": [...], \"answer\": index} per line")
    budget: int = Field(40, gt=0, description="candidate merges to evaluate, those in a "
                        "resumed search's log included")
    optimizer: str = Field("NGOpt", description="nevergrad optimizer: NGOpt picks one by "
                           "budget and space; CMA, TwoPointsDE, Cobyla, RandomSearch, ...")
    search_seed: int = Field(0, description="the optimizer's seed (`--seed` is the merge's: "
                             "DARE's drops)")
    resume: bool = Field(False, description="continue the search whose log a killed run left "
                         "beside --out (or, with --overwrite, the log of a finished --out); "
                         "logged candidates are told to the optimizer, not evaluated again")
    in_memory: bool | None = Field(None, description="merge each candidate straight into the "
                                   "loaded model's weights (default: when its tensors match "
                                   "the merged ones by name and shape); --no-in-memory writes "
                                   "each into a reused scratch folder beside --out")
    threads: int | None = Field(None, gt=0, description="torch CPU threads for evaluating "
                                "(default: torch's choice); merges run torch on one thread and "
                                "TIES' chunks on this many workers",
                                json_schema_extra={"torch_threads": True})

    @model_validator(mode="before")
    @classmethod
    def _fixed(cls, data):
        from lmalloy.merge.space import fixed_fields

        if isinstance(data, dict):
            fixed_fields(data)
        return data

    @property
    def variables(self) -> list:
        from lmalloy.merge.space import find_variables

        return find_variables(self.parameters, [m.model_dump() for m in self.models])

    def concrete(self, values: dict) -> tuple[dict, list[ModelEntry]]:
        """(parameters, models) with the search values replaced by `values` {path: value}."""
        from lmalloy.merge.space import substitute

        params, models = substitute(self.parameters, [m.model_dump() for m in self.models],
                                    self.variables, values)
        return params, [ModelEntry(**m) for m in models]

    @model_validator(mode="after")
    def _check(self):
        from lmalloy.merge.space import is_search_value

        if self.slices:
            raise ValueError("`merge search` searches a `models:` merge's parameters; `slices` "
                             "are not searched")
        if self.weights is not None and any(is_search_value(m.parameters.get("weight"))
                                            for m in self.models):
            raise ValueError("`--weights` fixes every model's weight, but a model's `weight` "
                             "is a range or choice; give one or the other")
        self._apply_weights()
        if self.method == "greedy_soup":
            raise ValueError("`merge search` does not search greedy_soup (it picks its models "
                             "itself); search `linear` weights instead")
        if self.method in LORA_METHODS:
            raise ValueError(f"`merge search` merges full models; `{self.method}` is for PEFT "
                             "adapters")
        variables = self.variables
        if not variables:
            raise ValueError("nothing to search: no parameter is a range or a choice (e.g. "
                             "`weight: {range: [0, 1]}`)")
        self.check_values(*self.concrete({v.path: v.start for v in variables}))
        accuracy = self.objective in ("accuracy", "accuracy-norm")
        if self.choices is not None and self.objective in ("loss", "mean-domain-loss"):
            raise ValueError(f"`--objective {self.objective}` scores held-out text, not "
                             "--choices; drop one")
        if accuracy and self.choices is None:
            raise ValueError(f"`--objective {self.objective}` needs a multiple-choice JSONL "
                             "(--choices)")
        if self.objective is None:
            self.objective = ("accuracy" if self.choices else
                              "mean-domain-loss" if self.domains else "loss")
        return self


class LorahubConfig(DataFields):
    adapters: list[str] = Field(..., min_length=1, **positional("PEFT adapter folders"))
    base_model: str = Field(..., description="the adapters' base model folder", **also("base"))
    examples: int = Field(5, gt=0, description="few-shot examples: windows of --seq-len tokens "
                          "from the chosen corpus/domains")
    seq_len: int = Field(128, gt=1, description="tokens per example")
    budget: int = Field(40, gt=0, description="nevergrad evaluations (LoraHub: 40)")
    l1: float = Field(0.05, ge=0, description="penalty on mean |w| (LoraHub: 0.05)")
    bound: float = Field(1.5, gt=0, description="weights searched in [-bound, bound]")
    seed: int = Field(0, description="optimizer and example seed")
    out: str = Field("runs/lorahub", description="output adapter folder", **also("output"))
    overwrite: bool = Field(False, description="replace an existing output folder")
    threads: int | None = threads_field()


class ExtractLoraConfig(Config):
    model: str = Field(..., **positional("the fine-tuned HF model folder"))
    base_model: str = Field(..., description="the base model it was fine-tuned from")
    rank: int | None = Field(None, gt=0, description="the rank of every module (or --energy)")
    energy: float | None = Field(None, gt=0, le=1, description="per module, the smallest rank "
                                 "that keeps this fraction of ‖ΔW‖² (Σ σ²), e.g. 0.9 (or "
                                 "--rank)")
    embed_lora: bool = Field(False, description="also extract the input embeddings and the LM "
                             "head (mergekit's --embed-lora); default: the linear modules of "
                             "the decoder layers only")
    out: str = Field("runs/extracted-lora", description="output PEFT adapter folder",
                     **also("output"))
    overwrite: bool = Field(False, description="replace an existing output folder")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="adapter dtype (default: the fine-tune's)")
    allow_pickle: bool = Field(False, description="allow pickle inputs (weights_only)")

    @model_validator(mode="after")
    def _check(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("set exactly one of `--rank` (the same rank for every module) or "
                             "`--energy` (a rank per module by retained energy)")
        return self
