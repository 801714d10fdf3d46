"""Merge parameters per tensor, as mergekit resolves them.

A parameter's value is a scalar, a gradient (a list of numbers interpolated over the
layers: t = layer / (layers − 1); embeddings, final norm and LM head take t = 0), or a
list of `{filter, value}` entries (the first whose filter is a substring of the tensor
name wins). Per-model values take precedence over the global ones.
"""

from __future__ import annotations

import re
from typing import Any

from lmalloy.errors import UserError

LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def evaluate_setting(name: str, value: Any, t: float) -> Any:
    """mergekit's evaluate_setting: a scalar, a gradient over t, or filtered entries."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in value):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in value):
                return value[int(t * (len(value) - 1))]
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate_setting(name, entry["value"], t)
        return None
    return None


def layer_t(name: str, num_layers: int) -> float:
    """A tensor's position along the layers in [0, 1] (0 outside the decoder layers)."""
    m = LAYER_RE.search(name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(spec, sources: list[dict], name: str, t: float, where: str) -> Any:
    """The value of parameter `spec` for tensor `name`: the first source that sets it,
    checked against the parameter's range, else its default (a required one is an error)."""
    for src in sources:
        if spec.name in src:
            v = evaluate_setting(name, src[spec.name], t)
            if v is not None:
                if spec.kind == "float" and isinstance(v, (int, float)) and not isinstance(
                        v, bool):
                    v = float(v)
                err = spec.check(v, where)
                if err:
                    raise UserError(f"{err} (tensor `{name}`)")
                return v
    if spec.default is None:
        raise UserError(f"missing parameter `{spec.name}`{where} for tensor `{name}` "
                        f"(set it under the model's `parameters` or the global ones)")
    return spec.default
