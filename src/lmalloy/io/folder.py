"""Lazy reading of Hugging Face model folders.

`open_model(path)` parses `config.json` and the safetensors headers (8-byte length + JSON)
without importing torch or touching tensor data: names, shapes, dtypes and sizes are
known before any heavy work. `ModelFolder.read(name)` returns one tensor, memory-mapped
through `safetensors.safe_open`. A header that promises more bytes than the file holds
(a truncated download or an interrupted copy) is reported when the folder is opened.

Pickle weights (`pytorch_model.bin`, `*.pt`) are refused unless `allow_pickle=True`, and
then loaded with `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmalloy.errors import UserError

# safetensors dtype string -> bytes per element
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
               "U64": 8}
TORCH_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                     "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                     "BOOL": "bool"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# files copied beside the weights when a model folder is re-written
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
             "generation_config.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset) of one .safetensors file; validates its size."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise UserError(f"{path}: not a safetensors file (header length {n})")
            head = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if len(head) < n:
        raise UserError(f"{path}: truncated safetensors file (header cut short)")
    try:
        header = json.loads(head)
    except json.JSONDecodeError:
        raise UserError(f"{path}: not a safetensors file (header is not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    size = path.stat().st_size
    if 8 + n + end > size:
        raise UserError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header, 8 + n


@dataclass
class ModelFolder:
    """A model folder opened lazily: config and tensor index, no tensor data read."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path]
    pickle_state: dict[str, Any] | None = field(default=None, repr=False)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return archs[0]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "unknown")

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, dtype=None):
        """One tensor, memory-mapped (a view of the page cache until it is modified)."""
        if name not in self.tensors:
            raise UserError(f"{self.path}: no tensor named `{name}`")
        if self.pickle_state is not None:
            t = self.pickle_state[name]
        else:
            from safetensors import safe_open

            file = self.tensors[name].file
            h = self._handles.get(file)
            if h is None:
                h = self._handles[file] = safe_open(str(file), framework="pt")
            t = h.get_tensor(name)
        return t if dtype is None else t.to(dtype)

    def close(self) -> None:
        self._handles.clear()
        self.pickle_state = None

    def aux_files(self) -> list[Path]:
        return [self.path / n for n in AUX_FILES if (self.path / n).is_file()]


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} names {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(path.glob("*.safetensors"))


def open_model(path: str | Path, allow_pickle: bool = False, require_config: bool = True
               ) -> ModelFolder:
    """Open an HF model folder (or a single .safetensors file) lazily."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model folder not found: {p}")
    if p.is_file():
        if p.suffix == ".safetensors":
            files, config = [p], {}
            p_dir = p.parent
        elif p.suffix in PICKLE_SUFFIXES:
            return _open_pickle(p, p.parent, {}, allow_pickle)
        else:
            raise UserError(f"{p}: expected a model folder or a .safetensors file")
    else:
        p_dir = p
        config = _read_config(p)
        if require_config and not config:
            raise UserError(f"{p}: no config.json (is this a Hugging Face model folder?)")
        files = _safetensors_files(p)
        if not files:
            pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES
                             and not f.name.startswith(("optimizer", "trainer_state",
                                                        "training_args", "scheduler", "rng")))
            if pickles:
                return _open_pickle(pickles[0], p, config, allow_pickle, pickles)
            raise UserError(f"{p}: no *.safetensors weights found")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        header, start = read_header(f)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            tensors[name] = TensorInfo(name, f, meta["dtype"], tuple(meta["shape"]),
                                       (start + a, start + b))
    return ModelFolder(p_dir, config, tensors, files)


def _open_pickle(first: Path, folder: Path, config: dict, allow: bool,
                 files: list[Path] | None = None) -> ModelFolder:
    if not allow:
        raise UserError(
            f"{first} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to safetensors, or pass --allow-pickle to load it with "
            "torch.load(weights_only=True)")
    import torch

    state: dict[str, Any] = {}
    for f in files or [first]:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - report any unpickling failure in one line
            raise UserError(f"{f}: cannot load with weights_only=True ({type(e).__name__})"
                            ) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        state.update({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    dmap = {v: k for k, v in TORCH_DTYPE_NAMES.items()}
    tensors = {k: TensorInfo(k, first, dmap.get(str(v.dtype).removeprefix("torch."), "F32"),
                             tuple(v.shape), (0, 0)) for k, v in state.items()}
    return ModelFolder(folder, config, tensors, list(files or [first]), pickle_state=state)


def check_finite(name: str, tensor, where: Path | str) -> None:
    """UserError naming the tensor if it holds NaN or Inf."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{where}: tensor `{name}` contains NaN or Inf")
