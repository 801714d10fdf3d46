"""Tensor names of dense Llama/Mistral models and of Mixtral MoEs, in both Mixtral layouts.

transformers 5 holds a Mixtral layer's experts as two fused 3-D tensors, but its
`save_pretrained` writes the per-expert layout that every Mixtral checkpoint uses (and
converts it back on load). Both load with `AutoModelForCausalLM`:

| what            | per_expert (files written by save_pretrained) | fused (transformers 5 in memory) |
|-----------------|-----------------------------------------------|----------------------------------|
| router (E, H)   | `block_sparse_moe.gate.weight`                | `mlp.gate.weight`                |
| expert gate     | `block_sparse_moe.experts.e.w1.weight` (I, H) | `mlp.experts.gate_up_proj` (E, 2I, H), rows [0, I) |
| expert up       | `block_sparse_moe.experts.e.w3.weight` (I, H) | `mlp.experts.gate_up_proj`, rows [I, 2I) |
| expert down     | `block_sparse_moe.experts.e.w2.weight` (H, I) | `mlp.experts.down_proj` (E, H, I)  |

A dense SwiGLU FFN maps as gate_proj -> w1, up_proj -> w3, down_proj -> w2.
Legend: E experts, H hidden size, I FFN (intermediate) size.
"""

from __future__ import annotations

import re

# architectures a Mixtral can be built from: no attention/MLP biases, SwiGLU, RMSNorm
SUPPORTED_DENSE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
DENSE_FFN = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def dense_ffn_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def is_dense_ffn(name: str) -> bool:
    m = _LAYER_RE.match(name)
    return bool(m) and m.group(2).startswith("mlp.")


def router_name(layer: int, layout: str) -> str:
    mid = "block_sparse_moe" if layout == "per_expert" else "mlp"
    return f"model.layers.{layer}.{mid}.gate.weight"


def expert_plan(layer: int, n_experts: int, hidden: int, inter: int, layout: str
                ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of one layer's expert tensors, in writing order."""
    p = f"model.layers.{layer}"
    if layout == "fused":
        return [(f"{p}.mlp.experts.gate_up_proj", (n_experts, 2 * inter, hidden)),
                (f"{p}.mlp.experts.down_proj", (n_experts, hidden, inter))]
    out = []
    for e in range(n_experts):
        q = f"{p}.block_sparse_moe.experts.{e}"
        out += [(f"{q}.w1.weight", (inter, hidden)), (f"{q}.w2.weight", (hidden, inter)),
                (f"{q}.w3.weight", (inter, hidden))]
    return out


def expert_tensors(layer: int, ffns: list[dict], layout: str) -> list[tuple[str, object]]:
    """One layer's expert tensors from each expert's dense FFN {gate_proj, up_proj, down_proj}."""
    import torch

    p = f"model.layers.{layer}"
    if layout == "fused":
        gate_up = torch.stack([torch.cat([f["gate_proj"], f["up_proj"]], 0) for f in ffns])
        down = torch.stack([f["down_proj"] for f in ffns])  # (E, H, I)
        return [(f"{p}.mlp.experts.gate_up_proj", gate_up),  # (E, 2I, H)
                (f"{p}.mlp.experts.down_proj", down)]
    out = []
    for e, f in enumerate(ffns):
        q = f"{p}.block_sparse_moe.experts.{e}"
        out += [(f"{q}.w1.weight", f["gate_proj"]), (f"{q}.w2.weight", f["down_proj"]),
                (f"{q}.w3.weight", f["up_proj"])]
    return out


def per_expert_to_fused(state: dict) -> dict:
    """Per-expert Mixtral names -> fused names (the conversion transformers 5 does on load)."""
    import torch

    out, experts = {}, {}
    for k, v in state.items():
        m = re.match(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$",
                     k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k.replace(".block_sparse_moe.", ".mlp.")] = v
    for p, ex in experts.items():
        ids = sorted(ex)
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ex[i]["w1"], ex[i]["w3"]], 0) for i in ids])
        out[f"{p}.mlp.experts.down_proj"] = torch.stack([ex[i]["w2"] for i in ids])
    return out


def fused_to_per_expert(state: dict) -> dict:
    """Fused Mixtral names -> per-expert names (what save_pretrained writes)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", k)
        if not m:
            out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
            continue
        p = f"{m.group(1)}.block_sparse_moe.experts"
        for e in range(v.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{p}.{e}.w2.weight"] = v[e]
            else:
                inter = v.shape[1] // 2
                out[f"{p}.{e}.w1.weight"] = v[e, :inter]
                out[f"{p}.{e}.w3.weight"] = v[e, inter:]
    return out


def detect_layout(names) -> str | None:
    """'per_expert', 'fused' or None (not an MoE) from a folder's tensor names."""
    names = list(names)
    if any(".block_sparse_moe." in n for n in names):
        return "per_expert"
    if any(n.endswith(".mlp.experts.gate_up_proj") for n in names):
        return "fused"
    return None
