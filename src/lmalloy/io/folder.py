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

import contextlib
import json
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmalloy.errors import UserError
from lmalloy.io.dtypes import SIZES, st_dtype, torch_dtype

# buffers some checkpoints carry that transformers recomputes: never compared or required
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
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
        return self.numel * SIZES[self.dtype]


def _check_entry(path: Path, name: str, v: Any) -> None:
    """One header entry: a known dtype, a shape, offsets that hold exactly its bytes."""
    ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str)
          and isinstance(v.get("shape"), list) and isinstance(v.get("data_offsets"), list)
          and len(v["data_offsets"]) == 2
          and all(isinstance(x, int) and x >= 0 for x in v["shape"] + v["data_offsets"]))
    if not ok:
        raise UserError(f"{path}: malformed safetensors header entry for `{name}`")
    if v["dtype"] not in SIZES:
        raise UserError(f"{path}: tensor `{name}` has unknown dtype `{v['dtype']}`")
    a, b = v["data_offsets"]
    numel = 1
    for d in v["shape"]:
        numel *= d
    if b - a != numel * SIZES[v["dtype"]]:
        raise UserError(f"{path}: tensor `{name}` has {b - a} bytes for shape {v['shape']} "
                        f"{v['dtype']} (corrupt header)")


def context_length(config) -> int | None:
    """Positions a model config allows (a config dict or a transformers config object)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


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
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        _check_entry(path, k, v)
        end = max(end, v["data_offsets"][1])
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
    _maps: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return archs[0]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "unknown")

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes, from its config (None if it does not say)."""
        return context_length(self.config)

    def check_seq_len(self, seq_len: int, flag: str = "--seq-len") -> None:
        """UserError when `seq_len` tokens do not fit the model's positions."""
        limit = self.context_length
        if limit is not None and seq_len > limit:
            raise UserError(f"`{flag}` {seq_len} is above {self.path}'s maximum of {limit} "
                            "positions")

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
        info = self.tensors[name]  # info.name: the stored name (a `renamed` view differs)
        if self.pickle_state is not None:
            t = self.pickle_state[info.name]
        else:
            from safetensors import safe_open

            h = self._handles.get(info.file)
            if h is None:
                h = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            t = h.get_tensor(info.name)
        return t if dtype is None else t.to(dtype)

    def read_range(self, name: str, start: int, stop: int, out=None):
        """Elements [start, stop) of tensor `name` (flattened), by one positioned read.

        `out` is a reusable buffer of the tensor's dtype with at least stop − start
        elements; without it fresh memory is used. Positioned reads, not a memory map: the
        pages read are not kept mapped in this process, so reading many inputs does not
        grow its resident memory.
        """
        import torch

        info = self.tensors[name]
        n = stop - start
        if self.pickle_state is not None:
            src = self.pickle_state[info.name].reshape(-1)[start:stop]
            if out is None:
                return src.clone()
            out[:n].copy_(src)
            return out[:n]
        dt = torch_dtype(info.dtype)
        view = torch.empty(n, dtype=dt) if out is None else out[:n]
        size = SIZES[info.dtype]
        with open(info.file, "rb") as f:
            f.seek(info.offsets[0] + start * size)
            got = f.readinto(view.view(torch.uint8).numpy()) if n else 0
        if got != n * size:
            raise UserError(f"{info.file}: truncated while reading `{name}`")
        return view

    def _map(self, file: Path):
        import mmap

        m = self._maps.get(file)
        if m is None:
            with open(file, "rb") as f:  # private, read-only in practice: never written
                m = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return m

    def view_range(self, name: str, start: int, stop: int):
        """Elements [start, stop) of tensor `name` (flattened) as a zero-copy view of the
        memory-mapped file: the page cache's own pages, no copy. `release(name)` drops the
        tensor's pages from this process's resident set afterwards, so streaming many
        inputs does not grow it. Pickle folders give a slice of the loaded tensor."""
        import torch

        info = self.tensors[name]
        if self.pickle_state is not None:
            return self.pickle_state[info.name].reshape(-1)[start:stop]
        size = SIZES[info.dtype]
        t = torch.frombuffer(self._map(info.file), dtype=torch.uint8,
                             count=(stop - start) * size, offset=info.offsets[0] + start * size)
        return t.view(torch_dtype(info.dtype))

    def advise(self, name: str, start: int, stop: int, need: bool) -> None:
        """madvise the pages of elements [start, stop): WILLNEED (read ahead) or DONTNEED
        (drop them from this process's resident set; the page cache keeps them)."""
        import mmap

        if self.pickle_state is not None:
            return
        info = self.tensors[name]
        size = SIZES[info.dtype]
        a = (info.offsets[0] + start * size) // mmap.PAGESIZE * mmap.PAGESIZE
        b = info.offsets[0] + stop * size
        if b > a:
            self._map(info.file).madvise(mmap.MADV_WILLNEED if need else mmap.MADV_DONTNEED,
                                         a, b - a)

    def renamed(self, names: dict[str, str], config: dict | None = None) -> ModelFolder:
        """A view of this folder whose tensors are `names` ({new name: stored name}), in
        that order: it reads the same files (sharing their handles), e.g. layer 20 of the
        folder as layer 3 of a stacked model."""
        return replace(self, tensors={new: self.tensors[old] for new, old in names.items()},
                       config=self.config if config is None else config)

    def close(self) -> None:
        self._handles.clear()
        for m in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still alive keeps it open
                m.close()
        self._maps.clear()
        self.pickle_state = None


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path}: expected a JSON object, got a {type(config).__name__}")
    return config


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
            if name in tensors:
                raise UserError(f"{p}: tensor `{name}` is stored twice ({tensors[name].file.name}"
                                f" and {f.name})")
            a, b = meta["data_offsets"]
            tensors[name] = TensorInfo(name, f, meta["dtype"], tuple(meta["shape"]),
                                       (start + a, start + b))
    return ModelFolder(p_dir, config, _tied_view(config, tensors, p_dir), files)


EMBED_RE = re.compile(r"(^|\.)(embed_tokens|wte|embed_in)\.weight$")
HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")


def is_tied(config: dict) -> bool:
    """Whether the config ties the LM head to the input embedding."""
    return bool(config.get("tie_word_embeddings", False))


def _tied_view(config: dict, tensors: dict, path: Path) -> dict:
    """A tied model's tensors as transformers reads them: the LM head is the embedding, so
    a stored head (an older writer's duplicate) is not a tensor of its own. Folders of one
    tied config then hold the same tensor set whoever wrote them."""
    if not is_tied(config):
        return tensors
    heads = [n for n in tensors if HEAD_RE.search(n)]
    if not any(EMBED_RE.search(n) for n in tensors):
        if heads:  # a head alone: transformers ties the embedding to it
            return tensors
        raise UserError(f"{path}: the config ties the LM head to the embedding "
                        "(`tie_word_embeddings: true`), but the folder has neither "
                        "`lm_head.weight` nor an embedding tensor")
    return {n: t for n, t in tensors.items() if n not in heads}


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
    tensors = {k: TensorInfo(k, first, st_dtype(v.dtype), tuple(v.shape), (0, 0))
               for k, v in state.items()}
    return ModelFolder(folder, config, _tied_view(config, tensors, folder),
                       list(files or [first]), pickle_state=state)


def check_finite(name: str, tensor, where: Path | str) -> None:
    """UserError naming the tensor if it holds NaN or Inf."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{where}: tensor `{name}` contains NaN or Inf")


# checkpoint name -> the name transformers 5 gives the parameter in memory (it fuses
# per-expert Mixtral weights on load; see lmalloy.moe.layout for the tensors)
_LOADED_NAMES = [
    (re.compile(r"\.block_sparse_moe\.experts\.\d+\.w[13]\.weight$"), ".mlp.experts.gate_up_proj"),
    (re.compile(r"\.block_sparse_moe\.experts\.\d+\.w2\.weight$"), ".mlp.experts.down_proj"),
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),
]


def loaded_names(names) -> list[str]:
    """Parameter names as transformers holds them after loading these checkpoint names."""
    out = []
    for n in names:
        for rx, rep in _LOADED_NAMES:
            n = rx.sub(rep, n)
        out.append(n)
    return list(dict.fromkeys(out))


# config keys fine-tunes of one architecture share (vocab_size may differ by padding)
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "num_local_experts", "head_dim", "tie_word_embeddings")


def check_same_architecture(folders, keys=ARCH_KEYS) -> None:
    """UserError unless the folders share an architecture and its sizes (one message for
    every command that combines models)."""
    folders = list(folders)
    if len({(f.architecture, f.model_type) for f in folders}) > 1:
        desc = "; ".join(f"{f.path}: {f.architecture} ({f.model_type})" for f in folders)
        raise UserError(f"the models have different architectures: {desc}")
    for key in keys:
        default = False if key == "tie_word_embeddings" else None
        vals = {f.config.get(key, default) for f in folders}
        if len(vals) > 1:
            desc = ", ".join(f"{f.path}: {f.config.get(key, default)}" for f in folders)
            if key == "tie_word_embeddings":
                raise UserError(f"the models disagree on `tie_word_embeddings` ({desc}): one "
                                "ties its LM head to its embedding, another does not")
            raise UserError(f"the models differ in `{key}` ({desc}); they are not fine-tunes "
                            f"of one architecture")


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names[:5]) + (" ..." if len(names) > 5 else "")


def compare_tensors(ref: ModelFolder, others, rows_may_differ=None) -> set[str]:
    """UserError unless every folder in `others` holds `ref`'s tensor names and shapes.

    `rows_may_differ(name)` marks tensors (vocabulary matrices) whose first dimension may
    differ; the names where it does are returned. Missing, extra and mismatched tensors
    are listed (the first few) with both folders named.
    """
    padded: set[str] = set()

    def kept(folder) -> set[str]:
        return {n for n in folder.tensors if not n.endswith(IGNORABLE_SUFFIXES)}

    names = kept(ref)
    for f in others:
        if f is ref:
            continue
        missing, extra = sorted(names - kept(f)), sorted(kept(f) - names)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{f.path} lacks {len(missing)} tensor(s) of {ref.path}: "
                             + _names(missing))
            if extra:
                parts.append(f"{f.path} has {len(extra)} tensor(s) {ref.path} lacks: "
                             + _names(extra))
            raise UserError("; ".join(parts))
        bad = []
        for n in sorted(names):
            a, b = ref.tensors[n].shape, f.tensors[n].shape
            if a == b:
                continue
            if (rows_may_differ is not None and rows_may_differ(n) and len(a) == len(b)
                    and a[1:] == b[1:]):
                padded.add(n)
                continue
            bad.append(f"`{n}` is {list(b)} in {f.path} but {list(a)} in {ref.path}")
        if bad:
            raise UserError(f"shape mismatch ({len(bad)} tensor(s)): " + "; ".join(bad[:3])
                            + (" ..." if len(bad) > 3 else ""))
    return padded
