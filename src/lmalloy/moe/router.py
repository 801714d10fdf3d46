"""Router initialisation for MoEs built from dense models, as mergekit-moe defines it.

Each expert gets one router row per layer:

- `hidden`: the base model's hidden state at the *input* of each layer (HF
  `hidden_states[:-1]`: the embeddings, then layers 0..L-2's outputs) at the last token
  of each positive prompt (BOS prepended), averaged over the prompts; minus the same for
  the negative prompts; each layer's row normalised to unit length. mergekit batches the
  prompts with padding, so with right padding its "last token" can be a pad; here each
  prompt runs alone (identical for prompts of equal length).
- `cheap_embed`: the sum of the token embeddings of all positive prompts, normalised
  (the same row in every layer); the negative prompts' normalised sum subtracted; then
  normalised again.
- `random`: N(0, 1) entries (mergekit); `zero`: all zeros, i.e. uniform routing, where
  top-k then picks the lowest indices — meant for routers that are trained next.

A layer whose rows are nearly collinear routes most tokens to the same experts; the
builder warns (pairwise cosine above 0.9).
Legend: L layers, E experts, H hidden size, T tokens.
"""

from __future__ import annotations

import torch

COLLINEAR_COS = 0.9


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


@torch.no_grad()
def prompt_hidden_states(model, prompts: list[list[int]]) -> torch.Tensor:
    """(L, H): mean over prompts of the last token's input hidden state to each layer."""
    acc = None
    for ids in prompts:
        x = torch.tensor([ids], dtype=torch.long)
        body = getattr(model, "model", model)  # the decoder without the LM head
        out = body(input_ids=x, output_hidden_states=True)
        h = torch.stack(out.hidden_states[:-1])[:, 0, -1, :].float()  # (L, H)
        acc = h if acc is None else acc + h
    return acc / len(prompts)


def cheap_embedding(embed: torch.Tensor, prompts: list[list[int]], n_layers: int
                    ) -> torch.Tensor:
    """(L, H): the normalised sum of the prompts' token embeddings, repeated per layer."""
    ids = torch.tensor([i for p in prompts for i in p], dtype=torch.long)
    s = embed.float()[ids].sum(0, keepdim=True)  # (1, H)
    return _unit(s).repeat(n_layers, 1)


def gate_row(pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    """(L, H) router rows of one expert: positive minus negative, unit length per layer."""
    return _unit(pos - neg if neg is not None else pos)


def plain_router(mode: str, n_layers: int, n_experts: int, hidden: int, seed: int = 0,
                 std: float = 1.0) -> torch.Tensor:
    """(L, E, H) router weights that need no prompts: `zero` or `random` (N(0, std²))."""
    if mode == "zero":
        return torch.zeros(n_layers, n_experts, hidden)
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n_layers, n_experts, hidden, generator=g) * std
    raise ValueError(mode)


def prompt_router(pairs: list[tuple[list[list[int]], list[list[int]]]], encode
                  ) -> torch.Tensor:
    """(L, E, H) router weights from each expert's (positive, negative) prompt token ids;
    `encode(prompts) -> (L, H)` is `prompt_hidden_states` or `cheap_embedding` bound."""
    rows = []
    for pos, neg in pairs:
        rows.append(gate_row(encode(pos), encode(neg) if neg else None))  # (L, H)
    return torch.stack(rows, 1)  # (L, E, H)


def collinear_pairs(gates: torch.Tensor, threshold: float = COLLINEAR_COS
                    ) -> list[tuple[int, int, int, float]]:
    """(layer, i, j, cosine) for router rows i < j whose cosine similarity exceeds threshold."""
    u = _unit(gates.float())  # (L, E, H)
    cos = u @ u.transpose(1, 2)  # (L, E, E)
    out = []
    n_e = gates.shape[1]
    for layer in range(gates.shape[0]):
        for i in range(n_e):
            for j in range(i + 1, n_e):
                c = float(cos[layer, i, j])
                if c > threshold and gates[layer, i].abs().sum() > 0:
                    out.append((layer, i, j, c))
    return out
