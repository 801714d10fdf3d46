"""Loading a model folder into transformers, after lmalloy's own checks.

Every command that runs a model loads it here: the folder is opened from its headers
first (pickle refused unless allowed, truncation detected), the architecture is checked
against what the command needs, and transformers' load report is read: a tensor that
the folder lacks (which transformers would initialise at random) is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

from lmalloy.errors import UserError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def quiet_transformers() -> None:
    """No load reports or progress bars from transformers (lmalloy reports what matters)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def check_device(device: str, flag: str = "--device"):
    """The torch device named by `device`, or a UserError if it is malformed or absent."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"`{flag}` {device!r} is not a torch device (cpu, cuda, cuda:1, "
                        "mps, ...)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"`{flag}` {device}: no CUDA device is available here")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"`{flag}` {device}: only {n} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"`{flag}` {device}: MPS is not available here")
    return dev


def compiler_missing(device_type: str = "cpu") -> str | None:
    """Why torch.compile (inductor) cannot build kernels for `device_type` here, or None:
    on CPU it needs a C++ compiler ($CXX, g++, c++ or clang++), on CUDA Triton."""
    import os
    import shutil

    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "torch has no Triton support"
        return None if has_triton() else "Triton is not installed"
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if any(shutil.which(n) for n in names):
        return None
    return f"no C++ compiler ({', '.join(names)}) on PATH"


def is_causal_lm(config: dict) -> bool:
    archs = config.get("architectures") or []
    return not archs or any(a.endswith(CAUSAL_SUFFIXES) for a in archs)




def _load(cls, path: str | Path, what: str, allow_missing: tuple[str, ...] = (),
          allow_unexpected: tuple[str, ...] = (), **kw):
    """`cls.from_pretrained` with a one-line error; missing or unexpected weights and
    NaN/Inf weights refused (each named)."""
    import torch

    quiet_transformers()
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: transformers cannot load it as {what} "
                        f"({str(e).splitlines()[0][:200]})") from None
    missing = [k for k in info.get("missing_keys", ())
               if not any(k.startswith(a) for a in allow_missing)]
    if missing:
        raise UserError(f"{path}: the folder lacks {len(missing)} weight(s) the "
                        f"architecture needs (e.g. `{sorted(missing)[0]}`); refusing to run "
                        "on randomly initialised tensors")
    from lmalloy.io.folder import IGNORABLE_SUFFIXES

    extra = [k for k in info.get("unexpected_keys", ()) if not k.endswith(IGNORABLE_SUFFIXES)
             and not any(k.startswith(a) for a in allow_unexpected)]
    if extra:
        raise UserError(f"{path}: the folder has {len(extra)} weight(s) its config's "
                        f"architecture does not use (e.g. `{sorted(extra)[0]}`); the config "
                        "and the weights disagree")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise UserError(f"{path}: tensor `{n}` contains NaN or Inf")
    model.eval()
    return model


def load_causal_lm(path: str | Path, allow_pickle: bool = False, dtype: str = "float32"):
    """AutoModelForCausalLM from a local folder; the folder is checked first."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmalloy.io.folder import open_model

    m = open_model(path, allow_pickle=allow_pickle)
    if not is_causal_lm(m.config):
        raise UserError(f"{path}: {m.architecture} is not a causal language model")
    kw = {"state_dict": m.pickle_state} if m.pickle_state is not None else {}
    return _load(AutoModelForCausalLM, path, "a causal LM", dtype=getattr(torch, dtype), **kw)


def load_sequence_classifier(path: str | Path, dtype: str = "float32", config=None,
                             from_causal_lm: bool = False):
    """AutoModelForSequenceClassification from a local folder (reward models).

    `from_causal_lm`: the folder is a causal LM whose body becomes the classifier's (its
    LM head is dropped, the `score` head is new)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    kw = {"config": config} if config is not None else {}
    allow = (("score.",), ("lm_head.",)) if from_causal_lm else ((), ())
    return _load(AutoModelForSequenceClassification, path, "a sequence classifier", *allow,
                 dtype=getattr(torch, dtype), **kw)


def tied_aliases(model) -> set[str]:
    """State-dict names that are tied aliases of another parameter (a tied LM head):
    transformers' `save_pretrained` does not store them, so neither does lmalloy."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, (list, tuple, set)):
        keys = {k: None for k in keys}
    params = dict(model.named_parameters(remove_duplicate=False))
    tied_cfg = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    out = set()
    for alias, source in keys.items():
        if alias not in params:
            continue
        same = source in params and params[alias] is params[source]
        if same or tied_cfg:
            out.add(alias)
    return out


def saved_state(model, state: dict) -> dict:
    """`state` (the model's full, in-memory state dict) as `save_pretrained` stores it:
    without tied aliases, and with transformers' load-time conversions reverted (e.g. the
    fused in-memory MoE experts written back per expert, as every checkpoint has them)."""
    from transformers.core_model_loading import revert_weight_conversion

    drop = tied_aliases(model)
    return revert_weight_conversion(model, {k: v for k, v in state.items() if k not in drop})
