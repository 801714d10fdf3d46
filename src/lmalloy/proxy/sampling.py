"""Pure functions of proxy-tuned decoding: the logit arithmetic and the sampling processors.

Proxy-tuning (Liu et al. 2024, arXiv 2401.08565) steers a large model with the difference
between a small tuned model and its untuned base, at the logit level:

    z = z_large + Σᵢ αᵢ · (z_tunedᵢ − z_untunedᵢ)          # (B, V)

The processors then run in the order transformers applies them: repetition penalty,
temperature, top-k, top-p, then greedy argmax or a seeded multinomial draw. Every
function here takes and returns tensors; nothing holds state.

`probabilities` is the same chain with one set of parameters per row (the server batches
requests with different settings; speculative decoding needs the whole distribution, not a
draw): for the same parameters it gives exactly the distribution `next_tokens` samples from.
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


def combine_rows(z_large: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 alphas: torch.Tensor) -> torch.Tensor:
    """`combine` with one α per row and pair: z (B, ..., V), alphas (B, P)."""
    v = min([z_large.shape[-1]] + [t.shape[-1] for p in pairs for t in p])
    z = z_large[..., :v].float().clone()  # (B, ..., V)
    for i, (zt, zu) in enumerate(pairs):
        a = alphas[:, i].to(z.device).reshape(-1, *([1] * (z.dim() - 1)))  # (B, 1, ...)
        z += a * (zt[..., :v].to(z.device).float() - zu[..., :v].to(z.device).float())
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


def top_k_filter(z: torch.Tensor, k: int | torch.Tensor | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept), others −inf.

    k: one int for all rows, or a tensor of z's leading shape (0 = no filter for that row)."""
    if isinstance(k, torch.Tensor):
        V = z.shape[-1]
        k_eff = torch.where(k > 0, k.clamp(max=V), V).long()  # (...)
        kth = torch.sort(z, dim=-1, descending=True).values.gather(-1, k_eff[..., None] - 1)
        return z.masked_fill(z < kth, float("-inf"))
    if not k or k >= z.shape[-1]:
        return z
    kth = torch.topk(z, k, dim=-1).values[..., -1:]  # (B, 1)
    return z.masked_fill(z < kth, float("-inf"))


def top_p_filter(z: torch.Tensor, p: float | torch.Tensor | None) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probability reaches p (always at least the most likely one).

    p: one float for all rows, or a tensor of z's leading shape (1 = no filter for that row)."""
    per_row = isinstance(p, torch.Tensor)
    if not per_row and (p is None or p >= 1.0):
        return z
    sorted_z, idx = torch.sort(z, dim=-1, descending=True)  # (B, V)
    probs = sorted_z.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    if per_row:
        drop_sorted = (before >= p[..., None]) & (p[..., None] < 1.0)
    else:
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


def probabilities(z: torch.Tensor, seen: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor, top_p: torch.Tensor, penalty: torch.Tensor
                  ) -> torch.Tensor:
    """The distribution `next_tokens` draws from, with parameters per row.

    z (..., V) float32 logits; seen (..., V) bool (tokens in the row so far, for the
    repetition penalty); temperature, top_k, top_p, penalty of z's leading shape (...).
    Temperature 0 gives the one-hot distribution of the (penalised) argmax; top_k 0 and
    top_p 1 are off. Returns (..., V) probabilities.
    """
    if bool((penalty != 1).any()):
        pen = penalty[..., None]
        z = torch.where(seen, torch.where(z > 0, z / pen, z * pen), z)
    greedy = temperature <= 0  # (...)
    hot = torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
    if bool(greedy.all()):
        return hot
    t = torch.where(greedy, torch.ones_like(temperature), temperature)[..., None]
    # the filters only where some row uses them (a filter that is off changes nothing)
    k = top_k if bool((top_k > 0).any()) else None
    p = top_p if bool((top_p < 1).any()) else None
    probs = top_p_filter(top_k_filter(z / t, k), p).softmax(-1)
    return torch.where(greedy[..., None], hot, probs)
