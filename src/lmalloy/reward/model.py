"""Reward models: a causal LM with a scalar head on the last non-padding token.

The model is transformers' `AutoModelForSequenceClassification` with `num_labels=1`
(for Llama: `LlamaForSequenceClassification`, whose `score` head reads the rightmost
token that is not `pad_token_id`, so left and right padding give the same index).
Each text is prompt + answer + EOS, cut from the left to `max_len` tokens, so the score
is read at the EOS that closes the answer. Padded batches pass an attention mask and
position ids counted over real tokens only, so a sequence scores the same alone, left-
padded or right-padded.

Bradley–Terry (WARM, arXiv 2401.12187, eq. 1): P(chosen ≻ rejected) = σ(r_c − r_r); the
loss is −log σ(r_c − r_r), averaged over pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmalloy.errors import UserError


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(r_c − r_r) over pairs; inputs (P,)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class Encoder:
    """Text -> token ids for a reward model: prompt + answer + EOS, cut from the left."""

    def __init__(self, folder: str | Path, pad_id: int | None = None, max_len: int = 256):
        from lmalloy.data.tokenizer import Tok

        self.tok = Tok.load(folder)
        self.pad_id = self.tok.pad_id if pad_id is None else pad_id
        if self.pad_id is None:
            raise UserError(f"{folder}: the tokenizer has no pad token and the model config "
                            "no pad_token_id; a reward model needs one to find the last token")
        self.eos = [self.tok.eos_id] if self.tok.eos_id != self.pad_id else []
        self.max_len = max_len

    def __call__(self, prompts: list[str], answers: list[str]) -> list[list[int]]:
        ids = self.tok.encode_batch([p + a for p, a in zip(prompts, answers, strict=True)])
        return [(x + self.eos)[-self.max_len :] for x in ids]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, T); positions count real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return ids, mask, pos


def forward_scores(model, seqs: list[list[int]], pad_id: int, side: str = "right"
                   ) -> torch.Tensor:
    """Scores (B,) of one batch, with gradients when the model is training."""
    dev = next(model.parameters()).device
    ids, mask, pos = (t.to(dev) for t in pad_batch(seqs, pad_id, side))
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 0].float()


@torch.no_grad()
def score(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32,
          side: str = "right") -> torch.Tensor:
    """Scores (N,) of many sequences, in batches of similar lengths (order preserved)."""
    was = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        out[idx] = forward_scores(model, [seqs[i] for i in idx], pad_id, side).cpu()
    model.train(was)
    return out


def num_labels(config: dict) -> int:
    """Labels of an HF config dict (transformers omits id2label for its default of 2)."""
    if "num_labels" in config:
        return int(config["num_labels"])
    return len(config["id2label"]) if config.get("id2label") else 2


def check_reward_folder(path: str | Path):
    """open_model + check that it is a one-label sequence classifier; returns the folder."""
    from lmalloy.io.folder import open_model

    m = open_model(path)
    archs = m.config.get("architectures") or []
    if not archs or not archs[0].endswith("ForSequenceClassification"):
        raise UserError(f"{path}: {archs[0] if archs else 'this model'} is not a reward model "
                        "(expected a *ForSequenceClassification folder from `reward train`)")
    n = num_labels(m.config)
    head = m.tensors.get("score.weight")
    if head is not None and head.shape[0] != n:
        n = head.shape[0]
    if n != 1:
        raise UserError(f"{path}: a reward model has one output, this one has {n}")
    return m


def load_reward_model(path: str | Path, dtype: str = "float32"):
    """An `AutoModelForSequenceClassification` reward model from a folder, in eval mode."""
    from lmalloy.io.models import load_sequence_classifier

    check_reward_folder(path)
    model = load_sequence_classifier(path, dtype)
    if model.config.pad_token_id is None:
        raise UserError(f"{path}: config.json has no pad_token_id; the score position "
                        "(last non-padding token) needs one")
    model.eval()
    return model


def reward_from_causal_lm(path: str | Path, head_seed: int = 0, dtype: str = "float32"):
    """A fresh one-label reward model whose body is the causal LM in `path`.

    The head is N(0, initializer_range²) drawn from `head_seed` (not from the global RNG),
    so every model built with the same seed shares its initialisation, as WARM needs.
    """
    from transformers import AutoConfig

    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.folder import open_model
    from lmalloy.io.models import is_causal_lm, load_sequence_classifier

    m = open_model(path)
    archs = m.config.get("architectures") or []
    if not is_causal_lm(m.config) and not archs[0].endswith("ForSequenceClassification"):
        raise UserError(f"{path}: {archs[0]} is not a causal language model")
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_labels = 1
    if cfg.pad_token_id is None and (Path(path) / "tokenizer.json").is_file():
        cfg.pad_token_id = Tok.load(path).pad_id
    if cfg.pad_token_id is None:
        raise UserError(f"{path}: neither config.json nor the tokenizer names a pad token; "
                        "the reward head reads the last non-padding token and needs one")
    model = load_sequence_classifier(path, dtype, config=cfg, from_causal_lm=not (
        archs and archs[0].endswith("ForSequenceClassification")))
    if archs and archs[0].endswith("ForSequenceClassification"):
        return model  # already a reward model: keep its head
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"{path}: {type(model).__name__} has no `score` head to initialise")
    g = torch.Generator().manual_seed(head_seed)
    std = getattr(cfg, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
    return model
