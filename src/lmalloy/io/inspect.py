"""`lmalloy inspect PATH`: what is in a model folder, read from headers only."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

from pydantic import Field

from lmalloy.config import Config, positional


class InspectConfig(Config):
    path: str = Field(..., **positional("model folder (or .safetensors file) to inspect"))
    allow_pickle: bool = Field(False, description="allow pickle weights (loaded weights_only)")
    json_output: bool = Field(False, alias="json", description="print JSON instead of text")


def module_of(name: str) -> str:
    """Group a tensor name: `model.layers.3.self_attn.q_proj.weight` -> `layers.*.self_attn`."""
    n = re.sub(r"^model\.", "", name)
    n = re.sub(r"\.(weight|bias)$", "", n)
    parts = n.split(".")
    if parts[0] == "layers" and len(parts) > 2:
        return "layers.*." + parts[2]
    return parts[0] if parts[0] != "layers" else n


def summary(path: str, allow_pickle: bool = False) -> dict:
    from lmalloy.io.folder import open_model

    m = open_model(path, allow_pickle=allow_pickle, require_config=False)
    dtypes = Counter()
    groups: dict[str, int] = defaultdict(int)
    for t in m.tensors.values():
        dtypes[t.dtype] += t.numel
        groups[module_of(t.name)] += t.numel
    vocab = m.config.get("vocab_size")
    tok_vocab = None
    tok = m.path / "tokenizer.json"
    if tok.is_file():
        try:
            data = json.loads(tok.read_text())
            tok_vocab = len(data["model"]["vocab"]) + len(
                [a for a in data.get("added_tokens", [])
                 if a["content"] not in data["model"]["vocab"]])
        except (KeyError, json.JSONDecodeError, TypeError):
            tok_vocab = None
    return {
        "path": str(m.path),
        "architecture": m.architecture,
        "model_type": m.model_type,
        "parameters": m.num_parameters,
        "bytes": m.nbytes,
        "dtypes": dict(dtypes),
        "shards": [f.name for f in m.files],
        "vocab_size": vocab,
        "tokenizer_vocab_size": tok_vocab,
        "num_tensors": len(m.tensors),
        "modules": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "layers": m.config.get("num_hidden_layers"),
        "hidden_size": m.config.get("hidden_size"),
        "experts": m.config.get("num_local_experts"),
    }


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def main(cfg: InspectConfig) -> int:
    s = summary(cfg.path, cfg.allow_pickle)
    if cfg.json_output:
        print(json.dumps(s, indent=2))
        return 0
    total = s["parameters"] or 1
    print(f"{s['path']}")
    print(f"  architecture   {s['architecture']} ({s['model_type']})")
    print(f"  parameters     {human(s['parameters'])} ({s['parameters']:,})")
    print("  dtypes         " + ", ".join(f"{d} {100 * n / total:.1f}%"
                                          for d, n in s["dtypes"].items()))
    print(f"  size           {s['bytes'] / 1e6:.1f} MB in {len(s['shards'])} shard(s): "
          + ", ".join(s["shards"][:4]) + (" ..." if len(s["shards"]) > 4 else ""))
    vocab = f"{s['vocab_size']}"
    if s["tokenizer_vocab_size"] is not None:
        vocab += f" (tokenizer: {s['tokenizer_vocab_size']})"
    print(f"  vocabulary     {vocab}")
    if s["layers"]:
        print(f"  layers         {s['layers']}, hidden {s['hidden_size']}"
              + (f", {s['experts']} experts" if s["experts"] else ""))
    print("  modules:")
    width = max([28, *map(len, s["modules"])])
    for name, n in s["modules"].items():
        print(f"    {name:<{width}} {human(n):>9}  {100 * n / total:5.1f}%")
    return 0
