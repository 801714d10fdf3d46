"""Pure functions of proxy-tuned decoding: the logit arithmetic and the sampling processors.

Proxy-tuning (Liu et al. 2024, arXiv 2401.08565) steers a large model with the difference
between a small tuned model and its untuned base, at the logit level:

    z = z_large + Σᵢ αᵢ · (z_tunedᵢ − z_untunedᵢ)          # (B, V)

The processors then run in the order transformers applies them: repetition penalty,
temperature, top-k, top-p, then greedy argmax or a seeded multinomial draw. Every
function here takes and returns tensors; nothing holds state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def combine(z_large: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
            alphas: Sequence[float]) -> torch.Tensor:
    """z_large + Σ αᵢ (z_tunedᵢ − z_untunedᵢ), in float32, on the common (leading) vocabulary.

    Any shape (..., V); the last dimension of every input is cut to the smallest V, so heads
    padded to a multiple of 64 combine with unpadded ones.
    """
    v = min([z_large.shape[-1]] + [t.shape[-1] for p in pairs for t in p])
    z = z_large[..., :v].float().clone()  # (..., V)
    for (zt, zu), a in zip(pairs, alphas, strict=True):
        if a != 0:
            z += a * (zt[..., :v].float() - zu[..., :v].float())
    return z


def repetition_penalty(z: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): logits of tokens already in the sequence are
    divided by `penalty` when positive, multiplied when negative.

    z (B, V); seen (B, V) bool — tokens present in each row's prompt or output.
    """
    if penalty == 1.0:
        return z
    pen = torch.where(z > 0, z / penalty, z * penalty)
    return torch.where(seen, pen, z)


def top_k_filter(z: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept), others −inf."""
    if not k or k >= z.shape[-1]:
        return z
    kth = torch.topk(z, k, dim=-1).values[..., -1:]  # (B, 1)
    return z.masked_fill(z < kth, float("-inf"))


def top_p_filter(z: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probability reaches p (always at least the most likely one)."""
    if p is None or p >= 1.0:
        return z
    sorted_z, idx = torch.sort(z, dim=-1, descending=True)  # (B, V)
    probs = sorted_z.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return z.masked_fill(drop, float("-inf"))


def next_tokens(z: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """One token per row: greedy when temperature is 0, else a draw from the filtered
    softmax(z / temperature). z (B, V) float32 -> (B,) int64."""
    if temperature <= 0:
        return z.argmax(-1)
    z = top_p_filter(top_k_filter(z / temperature, top_k), top_p)
    probs = z.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
