"""One config object per command: a pydantic model is the single source of truth.

Its fields are the YAML keys (`snake_case`, `kebab-case` accepted too) and the CLI flags
(`--kebab-case`; nested models flatten to `--ema.decay`); the help text lives once, on
the field's `description`. `build()` merges a YAML file with flag overrides, validates,
and turns the first validation error into one line that names the flag.

Only pydantic and PyYAML are imported here: `lmalloy --help` stays fast.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from lmalloy.errors import UserError, closest


class Config(BaseModel):
    """Base for every command's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)
    # the keys the user gave (YAML file and flags), as validated; set by `cli.parse`
    _given: dict = PrivateAttr(default_factory=dict)

    @property
    def given(self) -> dict:
        """The keys the user set explicitly (not defaults): `--resume` applies only these."""
        return self._given

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def positional(description: str) -> dict:
    """Field extras for a positional argument: `Field(..., **positional("..."))`."""
    return {"description": description, "json_schema_extra": {"positional": True}}


def also(*names: str) -> dict:
    """Field extras for other accepted names of a flag/key: `Field(..., **also("output"))`."""
    return {"json_schema_extra": {"aliases": list(names)}}


def threads_field():
    """The `--threads` field: torch's CPU threads, set once by the CLI before the command."""
    from pydantic import Field

    return Field(None, gt=0, description="torch CPU threads (default: torch's own choice)",
                 json_schema_extra={"torch_threads": True})


def _extra(field) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _is_positional(field) -> bool:
    return bool(_extra(field).get("positional"))


def flag_name(loc: tuple) -> str:
    return "--" + ".".join(str(p).replace("_", "-") for p in loc if not isinstance(p, int))


def _strip_optional(ann: Any) -> Any:
    if get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _is_list(ann: Any) -> bool:
    return get_origin(ann) in (list, tuple)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of config keys at the top level")
    return data


def _normalise_keys(cls: type[BaseModel], data: dict, prefix: tuple = ()) -> dict:
    """kebab-case -> snake_case, recursively; unknown keys get a closest-match hint."""
    out = {}
    fields = cls.model_fields
    aliases = {f.alias: n for n, f in fields.items() if f.alias}
    for n, f in fields.items():
        aliases.update({a.replace("-", "_"): n for a in _extra(f).get("aliases", ())})
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name)
        if name in out:
            raise UserError(f"config key `{'.'.join((*prefix, str(key)))}` is given twice "
                            f"(as `{name}` and an alias)")
        if name not in fields:
            full = ".".join((*prefix, str(key)))
            raise UserError(
                f"unknown config key `{full}`{closest(name, fields)}; "
                f"valid keys: {', '.join(fields)}"
            )
        ann = _strip_optional(fields[name].annotation)
        if _is_model(ann) and isinstance(value, dict):
            value = _normalise_keys(ann, value, (*prefix, name))
        elif _is_list(ann) and isinstance(value, list) and get_args(ann) and _is_model(
                get_args(ann)[0]):  # a list of records: each entry's keys checked too
            value = [_normalise_keys(get_args(ann)[0], v, (*prefix, f"{name}[{i}]"))
                     if isinstance(v, dict) else v for i, v in enumerate(value)]
        out[name] = value
    return out


def format_validation_error(err: ValidationError, cls: type[BaseModel] | None = None) -> str:
    e = err.errors()[0]
    msg = e["msg"]
    for head in ("Value error, ", "Assertion failed, "):
        if msg.startswith(head):
            msg = msg[len(head) :]
    loc = e.get("loc", ())
    got = e.get("input")
    got_s = ("" if isinstance(got, dict) or e["type"] == "missing" or repr(got) in msg
             or str(got) in msg else f", got {got!r}")
    if not loc:
        return msg
    field = cls.model_fields.get(str(loc[0])) if cls is not None and len(loc) == 1 else None
    if field is not None and _is_positional(field):
        name = str(loc[0]).upper()
        if e["type"] == "missing":
            return f"missing argument {name}: {field.description}"
        return f"argument {name}: {msg}{got_s}"
    if any(isinstance(p, int) for p in loc):  # inside a YAML list: the YAML path
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:]
        return f"`{path}`: {msg}{got_s}"
    return f"`{flag_name(loc)}`: {msg}{got_s}"


def validate(cls: type[BaseModel], data: dict) -> Any:
    data = _normalise_keys(cls, data)
    try:
        cfg = cls.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, cls)) from None
    if isinstance(cfg, Config):
        cfg._given = data
    return cfg


def _set_path(d: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def add_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel], prefix: tuple = ()) -> None:
    """One flag per field (positional fields become positional arguments)."""
    for name, field in cls.model_fields.items():
        ann = _strip_optional(field.annotation)
        path = (*prefix, name)
        dest = "cfg__" + "__".join(path)
        help_ = (field.description or "").replace("%", "%%")
        if not field.is_required() and not _is_model(ann):
            default = field.default
            if default not in (None, [], {}, False):
                help_ += f" [default: {', '.join(map(str, default)) if isinstance(default, list) else default}]"
        if _is_model(ann):
            add_arguments(parser, ann, path)
            continue
        extra = _extra(field)
        if extra.get("yaml_only"):
            continue
        if extra.get("positional") and not prefix:
            nargs = "*" if _is_list(ann) else "?"
            parser.add_argument(dest, metavar=name.upper(), nargs=nargs, help=help_,
                                default=argparse.SUPPRESS)
            continue
        names = [field.alias or name, *extra.get("aliases", ())]
        for i, n in enumerate(names):  # each alias its own dest: both given is detectable
            d = dest if i == 0 else f"{dest}__as__{n}"
            h = help_ if i == 0 else f"the same as {flag_name((*prefix, names[0]))}"
            _add_flag(parser, flag_name((*prefix, n)), d, ann, name, h)


def _add_flag(parser, flag: str, dest: str, ann, name: str, help_: str) -> None:
    if ann is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_)
    elif _is_list(ann):
        parser.add_argument(flag, dest=dest, action="append", default=argparse.SUPPRESS,
                            metavar="A,B", help=help_ + " (comma-separated or repeated)")
    else:
        meta = name.upper()
        if get_origin(ann) is Literal:
            meta = "{" + ",".join(map(str, get_args(ann))) + "}"
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=meta,
                            help=help_)


def overrides_from_namespace(cls: type[BaseModel], ns: argparse.Namespace) -> dict:
    out: dict = {}
    given: dict[tuple, str] = {}  # field path -> the flag that set it
    for dest, value in vars(ns).items():
        if not dest.startswith("cfg__"):
            continue
        key, _, alias = dest[5:].partition("__as__")
        path = tuple(key.split("__"))
        flag = flag_name((*path[:-1], alias)) if alias else flag_name(path)
        if path in given:
            raise UserError(f"`{given[path]}` and `{flag}` name the same setting; give one")
        given[path] = flag
        f_cls, ann = cls, None
        for p in path:
            ann = _strip_optional(f_cls.model_fields[p].annotation)
            f_cls = ann if _is_model(ann) else f_cls
        if _is_list(ann) and isinstance(value, list):
            items = []
            for v in value:
                items.extend(x.strip() for x in str(v).split(",") if x.strip()) if isinstance(
                    v, str) else items.append(v)
            value = items
            if not value:
                continue
        elif get_origin(ann) is dict and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserError(f"`{flag_name(path)}` expects a YAML mapping, got {value!r}"
                                ) from None
        elif isinstance(value, str) and value.lower() in ("none", "null") and ann is not str:
            value = None
        _set_path(out, path, value)
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys
