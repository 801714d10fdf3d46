"""Tensor names of dense models and of the MoEs `moe build` writes from them.

| dense family (model_type) | MoE written | router | expert e's FFN | shared expert |
|---|---|---|---|---|
| llama, mistral | Mixtral | `block_sparse_moe.gate` | `block_sparse_moe.experts.e.w1/w3/w2` | — |
| qwen2 | Qwen2-MoE | `mlp.gate` | `mlp.experts.e.gate_proj/up_proj/down_proj` | `mlp.shared_expert.*` + `mlp.shared_expert_gate` (1, H) |
| qwen3 | Qwen3-MoE | `mlp.gate` | `mlp.experts.e.gate_proj/up_proj/down_proj` | — |

Every name is the one transformers' `save_pretrained` writes, per expert (transformers 5
fuses the experts in memory and converts on load).

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
from dataclasses import dataclass

DENSE_FFN = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass(frozen=True)
class MoeArch:
    """An MoE architecture `moe build` writes, and the dense families it is built from."""

    name: str  # mergekit-moe's `architecture:` name
    architecture: str
    model_type: str
    dense_types: tuple[str, ...]
    block: str  # module holding the router and experts
    proj: dict  # dense FFN projection -> expert tensor name
    experts_key: str  # config key of E
    shared: bool = False  # a shared expert (and its gate) in every layer
    biases: bool = False  # attention biases allowed (Qwen2's q/k/v biases)


ARCHS: dict[str, MoeArch] = {
    "mixtral": MoeArch("mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"),
                       "block_sparse_moe", DENSE_FFN, "num_local_experts"),
    "qwen2_moe": MoeArch("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", ("qwen2",), "mlp",
                         {p: p for p in DENSE_FFN}, "num_experts", shared=True, biases=True),
    "qwen3_moe": MoeArch("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",), "mlp",
                         {p: p for p in DENSE_FFN}, "num_experts"),
}
# dense model_type -> the MoE architecture it becomes by default
DEFAULT_ARCH = {t: a.name for a in ARCHS.values() for t in a.dense_types}


def arch_for(model_type: str, name: str | None = None) -> MoeArch | None:
    """The MoE architecture for a dense family (`name` to choose one), or None."""
    name = name or DEFAULT_ARCH.get(model_type)
    a = ARCHS.get(name) if name else None
    return a if a is not None and model_type in a.dense_types else None
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def dense_ffn_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def is_dense_ffn(name: str) -> bool:
    m = _LAYER_RE.match(name)
    return bool(m) and m.group(2).startswith("mlp.")


def router_name(layer: int, layout: str, arch: MoeArch | None = None) -> str:
    arch = arch or ARCHS["mixtral"]
    mid = "mlp" if layout == "fused" else arch.block
    return f"model.layers.{layer}.{mid}.gate.weight"


def _order(arch: MoeArch) -> list[str]:
    """Dense projections in the writing order of the expert names (sorted, as HF does)."""
    return sorted(DENSE_FFN, key=lambda p: arch.proj[p])


def expert_plan(layer: int, n_experts: int, hidden: int, inter: int, layout: str,
                arch: MoeArch | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of one layer's expert tensors (and shared expert), in writing order."""
    arch = arch or ARCHS["mixtral"]
    p = f"model.layers.{layer}"
    if layout == "fused":
        return [(f"{p}.mlp.experts.gate_up_proj", (n_experts, 2 * inter, hidden)),
                (f"{p}.mlp.experts.down_proj", (n_experts, hidden, inter))]
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    out = []
    for e in range(n_experts):
        q = f"{p}.{arch.block}.experts.{e}"
        out += [(f"{q}.{arch.proj[d]}.weight", shapes[d]) for d in _order(arch)]
    if arch.shared:
        out += [(f"{p}.mlp.shared_expert.{d}.weight", shapes[d]) for d in sorted(DENSE_FFN)]
        out.append((f"{p}.mlp.shared_expert_gate.weight", (1, hidden)))
    return out


def expert_tensors(layer: int, ffns: list[dict], layout: str, arch: MoeArch | None = None,
                   shared: dict | None = None) -> list[tuple[str, object]]:
    """One layer's expert tensors from each expert's dense FFN {gate_proj, up_proj,
    down_proj} (and the shared expert's FFN plus its gate row `gate`, where the arch has one)."""
    import torch

    arch = arch or ARCHS["mixtral"]
    p = f"model.layers.{layer}"
    if layout == "fused":
        gate_up = torch.stack([torch.cat([f["gate_proj"], f["up_proj"]], 0) for f in ffns])
        down = torch.stack([f["down_proj"] for f in ffns])  # (E, H, I)
        return [(f"{p}.mlp.experts.gate_up_proj", gate_up),  # (E, 2I, H)
                (f"{p}.mlp.experts.down_proj", down)]
    out = []
    for e, f in enumerate(ffns):
        q = f"{p}.{arch.block}.experts.{e}"
        out += [(f"{q}.{arch.proj[d]}.weight", f[d]) for d in _order(arch)]
    if arch.shared:
        out += [(f"{p}.mlp.shared_expert.{d}.weight", shared[d]) for d in sorted(DENSE_FFN)]
        out.append((f"{p}.mlp.shared_expert_gate.weight", shared["gate"]))
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
    if any(re.search(r"\.experts\.\d+\.", n) for n in names):
        return "per_expert"
    if any(n.endswith(".experts.gate_up_proj") for n in names):
        return "fused"
    return None
