"""The one dtype table: safetensors dtype strings, torch dtype names, element sizes.

safetensors headers name dtypes `F32`, `BF16`, ...; configs and flags name them
`float32`, `bfloat16`, ...; torch objects are `torch.float32`. Every conversion goes
through this table. No torch import here: headers are read before torch loads.
"""

from __future__ import annotations

# safetensors dtype string -> (torch dtype name, bytes per element)
_TABLE = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}
SIZES: dict[str, int] = {k: v[1] for k, v in _TABLE.items()}
FLOAT_ST = ("F64", "F32", "F16", "BF16")  # floating dtypes methods compute on
# output dtypes a user may choose for a written model
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
_NAME_TO_ST = {v[0]: k for k, v in _TABLE.items()}


def is_float(st: str) -> bool:
    """True for the floating safetensors dtypes that merging and averaging combine."""
    return st in FLOAT_ST


def st_to_name(st: str) -> str:
    """`BF16` -> `bfloat16`."""
    try:
        return _TABLE[st][0]
    except KeyError:
        from lmalloy.errors import UserError

        raise UserError(f"unknown safetensors dtype `{st}`") from None


def name_to_st(name: str) -> str:
    """`bfloat16` (or `torch.bfloat16`) -> `BF16`."""
    return _NAME_TO_ST[str(name).removeprefix("torch.")]


def st_dtype(dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    return name_to_st(str(dtype))


def torch_dtype(st_or_name: str):
    """The torch dtype of a safetensors dtype string or a dtype name."""
    import torch

    name = _TABLE[st_or_name][0] if st_or_name in _TABLE else str(st_or_name)
    return getattr(torch, name.removeprefix("torch."))


def config_dtype(config: dict) -> str | None:
    """The dtype name a config.json declares (`dtype`, or the older `torch_dtype`)."""
    d = config.get("dtype") or config.get("torch_dtype")
    return d if d in OUTPUT_DTYPES or d == "float64" else None


def majority_float(st_dtypes) -> str:
    """The dtype name of most floating tensors among safetensors dtypes (float32 if none)."""
    floats = [d for d in st_dtypes if d in FLOAT_ST]
    return st_to_name(max(set(floats), key=floats.count)) if floats else "float32"
