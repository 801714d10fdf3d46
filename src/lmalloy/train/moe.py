"""MoE pieces of the trainer: the Switch load-balancing loss and per-layer expert load.

Per layer, with router probabilities p (N, E) and top-k assignments: f_e = share of the
N tokens that pick expert e among their top k (Σ f = k), P_e = mean p_e, and
loss = E·Σ_e f_e·P_e (Switch Transformer, arXiv 2101.03961, eq. 4-6, with f counted as
transformers counts it, so a balanced router gives k). The trainer adds coef × the mean over layers to the
LM loss. transformers' own `load_balancing_loss_func` pools the counts of all layers
before multiplying; the per-layer mean here is the Switch definition and never lets one
layer's imbalance hide behind another's.
Legend: L layers, N tokens, E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def router_aux(router_logits, n_experts: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over layers of the per-layer balance loss, (L, E) load: share of assignments)."""
    losses, loads = [], []
    for r in router_logits:  # (N, E) per layer
        p = torch.softmax(r.float(), dim=-1)
        top = torch.topk(p, k, dim=-1).indices  # (N, k)
        f = torch.zeros(n_experts, device=p.device).scatter_add_(
            0, top.reshape(-1), torch.ones(top.numel(), device=p.device)) / p.shape[0]  # sums to k
        losses.append(n_experts * (f * p.mean(0)).sum())
        loads.append(f / k)
    return torch.stack(losses).mean(), torch.stack(loads).detach()


def plot_expert_load(records: list[dict], out: Path) -> Path | None:
    """Per-layer expert load (share of assignments) over training, one panel per layer."""
    rows = [r for r in records if "expert_load" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_e = len(rows[0]["expert_load"]), len(rows[0]["expert_load"][0])
    cols = min(3, n_layers)
    nrows = -(-n_layers // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.6 * nrows + 0.5), dpi=110,
                             squeeze=False, sharey=True)
    x = [r["tokens"] / 1e6 for r in rows]
    for layer in range(n_layers):
        ax = axes[layer // cols, layer % cols]
        for e in range(n_e):
            ax.plot(x, [r["expert_load"][layer][e] for r in rows], lw=1)
        ax.axhline(1 / n_e, color="0.3", ls="--", lw=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(alpha=0.3)
    for j in range(n_layers, nrows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.supxlabel("tokens (M)")
    fig.supylabel("share of assignments")
    fig.suptitle("Expert load per layer (dashed: balanced 1/E)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


@dataclass(frozen=True)
class MoeSpec:
    """The sparse layers of an MoE config, whatever the family names its keys."""

    experts: int  # E routed experts per sparse layer
    top_k: int  # k experts per token
    expert_ffn: int  # an expert's FFN (intermediate) size
    shared_ffn: int  # the always-on shared expert's FFN size (0: none)
    sparse_layers: tuple[int, ...]  # layers with a router (others are dense)


def moe_spec(config) -> MoeSpec | None:
    """The MoE layout of a config dict or a transformers config (None: a dense model).

    Mixtral names E `num_local_experts`; Qwen2-MoE, Qwen3-MoE and OLMoE `num_experts`,
    an expert's FFN `moe_intermediate_size`; Qwen MoEs may keep some layers dense
    (`mlp_only_layers`, `decoder_sparse_step`)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    n_e = get("num_local_experts") or get("num_experts")
    if not n_e:
        return None
    layers = int(get("num_hidden_layers") or 0)
    step = int(get("decoder_sparse_step") or 1)
    dense = set(get("mlp_only_layers") or [])
    sparse = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    return MoeSpec(int(n_e), int(get("num_experts_per_tok") or 2),
                   int(get("moe_intermediate_size") or get("intermediate_size")),
                   int(get("shared_expert_intermediate_size") or 0), sparse)
