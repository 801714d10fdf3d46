"""The search space of `lmalloy merge search`: a merge YAML whose parameter values may be
ranges or choices (the standard library only: cheap to import).

Wherever a merge parameter takes a number — a global or per-model value, one point of a
gradient over the layers, the `value` of a `{filter, value}` entry — a search value may
stand instead:

    {range: [LOW, HIGH]}                 a number in [LOW, HIGH] (LOW < HIGH)
    {range: [LOW, HIGH], log: true}      searched on a log scale (0 < LOW)
    {range: [LOW, HIGH], init: X}        where the optimizer starts (default: the middle,
                                         geometric with `log`)
    {choice: [A, B, ...]}                one of two or more values (numbers, true/false)

Each search value is one variable, named by where it stands: `lambda`, `density[1]` (the
second point of a gradient), `density[0].value` (a filtered entry), `models[2].weight`.
A whole-number parameter (`max_iter`) is searched over whole numbers; a true/false one
needs `choice`. Everything else in the YAML (models, method, dtype, ...) is one fixed
value. `substitute` puts concrete values in place of the search values: the result is a
plain merge YAML that `lmalloy merge` runs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from lmalloy.errors import closest

KEYS = ("range", "choice")
OPTIONS = {"range": ("range", "log", "init"), "choice": ("choice",)}


@dataclass(frozen=True)
class Variable:
    """One searched value: a range (low, high, log) or a choice among `choices`."""

    path: str  # where it stands, e.g. "models[0].weight", "density[1]"
    param: str  # the merge parameter it sets
    model: int | None  # index into `models` (None: the global `parameters`)
    loc: tuple  # the keys from the parameters' mapping to the value
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    init: Any = None

    @property
    def start(self) -> Any:
        """Where the optimizer starts (a choice: its first value, to check the YAML with)."""
        if self.init is not None:
            return self.init
        if self.choices is not None:
            return self.choices[0]
        if self.log:
            return math.sqrt(self.low * self.high)
        return (self.low + self.high) / 2

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.path} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.path} in [{self.low:g}, {self.high:g}]{' (log)' if self.log else ''}"


def is_search_value(v: Any) -> bool:
    return isinstance(v, dict) and any(k in v for k in KEYS)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _variable(path: str, param: str, model: int | None, loc: tuple, v: dict) -> Variable:
    """A search value checked for shape: ValueError with a one-line message."""
    if "range" in v and "choice" in v:
        raise ValueError(f"`{path}`: give `range` or `choice`, not both")
    kind = "range" if "range" in v else "choice"
    for k in v:
        if k not in OPTIONS[kind]:
            raise ValueError(f"`{path}`: a `{kind}` takes {', '.join(OPTIONS[kind])}; unknown "
                             f"key `{k}`{closest(str(k), OPTIONS[kind])}")
    init = v.get("init")
    if kind == "choice":
        ch = v["choice"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(
                isinstance(c, (bool, int, float, str)) for c in ch):
            raise ValueError(f"`{path}`: `choice` needs a list of two or more values, got "
                             f"{ch!r}")
        if len({repr(c) for c in ch}) < len(ch):
            raise ValueError(f"`{path}`: `choice` lists a value twice: {ch}")
        return Variable(path, param, model, loc, choices=tuple(ch))
    r = v["range"]
    if not isinstance(r, list) or len(r) != 2 or not all(_number(x) for x in r):
        raise ValueError(f"`{path}`: `range` needs [LOW, HIGH], two finite numbers, got {r!r}")
    lo, hi = float(r[0]), float(r[1])
    if lo == hi:
        raise ValueError(f"`{path}`: the range [{r[0]}, {r[1]}] is empty (LOW must be below "
                         "HIGH; a fixed value is written as the number itself)")
    if lo > hi:
        raise ValueError(f"`{path}`: the range [{r[0]}, {r[1]}] is reversed (write [LOW, "
                         "HIGH])")
    log = v.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"`{path}`: `log` must be true or false, got {log!r}")
    if log and lo <= 0:
        raise ValueError(f"`{path}`: a `log` range must be above 0, got [{r[0]}, {r[1]}]")
    if init is not None and not (_number(init) and lo <= init <= hi):
        raise ValueError(f"`{path}`: `init` {init!r} is not in the range [{r[0]}, {r[1]}]")
    return Variable(path, param, model, loc, lo, hi, log, init=init)


def _walk(value: Any, path: str, param: str, model: int | None, loc: tuple) -> list[Variable]:
    """The search values inside one parameter's value (scalar, gradient, filter list)."""
    if is_search_value(value):
        return [_variable(path, param, model, loc, value)]
    if isinstance(value, dict):
        hint = closest(str(next(iter(value), "")), KEYS)
        raise ValueError(f"`{path}`: a mapping here must be a search value ({{range: [LOW, "
                         f"HIGH]}} or {{choice: [...]}}), got keys {', '.join(map(str, value))}"
                         f"{hint}")
    out = []
    if isinstance(value, list):
        for i, e in enumerate(value):
            if isinstance(e, dict) and "value" in e and not is_search_value(e):
                if is_search_value(e.get("filter")):
                    raise ValueError(f"`{path}[{i}].filter` takes one fixed tensor-name filter")
                out += _walk(e["value"], f"{path}[{i}].value", param, model,
                             (*loc, i, "value"))
            else:
                out += _walk(e, f"{path}[{i}]", param, model, (*loc, i))
    return out


def find_variables(parameters: dict, models: list[dict]) -> list[Variable]:
    """Every search value of a merge config's global and per-model `parameters`, in the
    order they are written (globals first). `models`: [{model, parameters}]."""
    out = []
    for name, v in parameters.items():
        out += _walk(v, str(name), str(name), None, (name,))
    for i, m in enumerate(models):
        if is_search_value(m.get("model")):
            raise ValueError(f"`models[{i}].model` is one fixed folder; search values are for "
                             "merge parameters")
        for name, v in (m.get("parameters") or {}).items():
            out += _walk(v, f"models[{i}].{name}", str(name), i, (name,))
    return out


def _set(tree: dict, loc: tuple, value: Any) -> None:
    node = tree
    for k in loc[:-1]:
        node = node[k]
    node[loc[-1]] = value


def substitute(parameters: dict, models: list[dict], variables: list[Variable],
               values: dict[str, Any]) -> tuple[dict, list[dict]]:
    """(parameters, models) with each variable's search value replaced by `values[path]`."""
    params = copy.deepcopy(parameters)
    models = copy.deepcopy(models)
    for v in variables:
        tree = params if v.model is None else models[v.model].setdefault("parameters", {})
        _set(tree, v.loc, values[v.path])
    return params, models


def fixed_fields(data: dict, allowed: tuple[str, ...] = ("parameters", "models")) -> None:
    """ValueError when a key other than the merge parameters holds a search value."""
    for k, v in data.items():
        if k not in allowed and (is_search_value(v) or (
                isinstance(v, list) and any(is_search_value(x) for x in v))):
            raise ValueError(f"`{k}` takes one fixed value; only merge parameters (under "
                             "`parameters:` or a model's `parameters:`) may be ranges or "
                             "choices")
