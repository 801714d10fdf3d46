"""Routing statistics and parameter accounting of Mixtral-style MoEs (pure functions).

Mixtral (arXiv 2401.04088, Table 5) measures, for consecutive tokens t, t+1 of a
sequence, how often the top-1 expert is the same and how often the top-2 sets overlap.
With E experts, top-k and independent uniform routing the baselines are

    P(same top-1)      = 1/E                       (12.5% for E = 8)
    P(top-k sets meet) = 1 − C(E−k, k) / C(E, k)   (≈ 46.4% for E = 8, k = 2)

Parameter accounting uses the config alone: NonFF + E·FF parameters in total and
NonFF + k·FF active per token, where FF is one expert's SwiGLU (3·H·I per layer) and
NonFF is everything else (embeddings, attention, norms, routers, LM head).
Legend: N tokens, E experts, k experts per token, L layers.
"""

from __future__ import annotations

from math import comb

import numpy as np


def baseline_same_top1(n_experts: int) -> float:
    return 1.0 / n_experts


def baseline_overlap(n_experts: int, k: int) -> float:
    return 1.0 - comb(n_experts - k, k) / comb(n_experts, k)


def topk_from_logits(logits: np.ndarray, k: int) -> np.ndarray:
    """(N, E) router logits -> (N, k) expert ids, best first (ties: the lower id)."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    return order[:, :k]


def consecutive_stats(topk: np.ndarray, seq_ids: np.ndarray | None = None) -> dict:
    """Share of consecutive token pairs (within one sequence) with the same top-1 expert
    and with overlapping top-k sets. topk: (N, k); seq_ids: (N,) sequence of each token
    (pairs across sequences are skipped); returns {same_top1, overlap, pairs}."""
    a, b = topk[:-1], topk[1:]  # (N-1, k)
    valid = np.ones(len(a), dtype=bool) if seq_ids is None else seq_ids[:-1] == seq_ids[1:]
    same = a[:, 0] == b[:, 0]
    overlap = (a[:, :, None] == b[:, None, :]).any(axis=(1, 2))
    n = int(valid.sum())
    return {"same_top1": float(same[valid].mean()) if n else float("nan"),
            "overlap": float(overlap[valid].mean()) if n else float("nan"), "pairs": n}


def expert_shares(topk: np.ndarray, n_experts: int) -> np.ndarray:
    """(E,) share of the top-k assignments that go to each expert (sums to 1)."""
    counts = np.bincount(topk.reshape(-1), minlength=n_experts).astype(np.float64)
    return counts / max(1.0, counts.sum())


def param_counts(cfg: dict) -> dict:
    """Total and active-per-token parameters of any transformers MoE config dict, split
    into NonFF (attention, norms, embeddings, routers, a shared expert) and one expert's FF.

    Counted on the model built on the meta device (no memory, exact for every family:
    biases, q/k norms, tied embeddings): FF = an expert's tensors summed over the sparse
    layers; total = NonFF + E·FF, active = NonFF + k·FF.
    """
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmalloy.train.moe import moe_spec

    spec = moe_spec(cfg)
    n_e, k = (spec.experts, spec.top_k) if spec else (1, 1)
    kw = {k_: v for k_, v in cfg.items() if k_ not in ("architectures",
                                                        "transformers_version")}
    conf = AutoConfig.for_model(kw.pop("model_type", "mixtral"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    total = sum(p.numel() for p in model.parameters())
    expert_rx = re.compile(r"\.experts\.")
    routed = sum(p.numel() for n, p in model.named_parameters() if expert_rx.search(n))
    ff = routed // n_e
    non_ff = total - routed
    return {"non_ff": non_ff, "ff_per_expert": ff, "experts": n_e, "top_k": k,
            "total": total, "active": non_ff + k * ff}
