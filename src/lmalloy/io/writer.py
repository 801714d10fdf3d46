"""Atomic, streaming writing of Hugging Face model folders.

`atomic_output(target)` yields a temporary folder beside the target; on success every
file is fsynced and the folder renamed into place (an existing target, when overwriting,
is swapped out only after the new one is complete). On any error, or if the process is
killed, the target is untouched: the temporary folder's name starts with a dot and
never looks like a model.

`ShardedWriter` streams tensors to disk in a planned order: each shard's safetensors
header is written first (the shapes are known from the plan), then each tensor's bytes
as it arrives. Peak memory is the one tensor being written, whatever the shard size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.io.folder import AUX_FILES, DTYPE_SIZES

TORCH_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
               "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
               "bool": "BOOL"}
DEFAULT_SHARD_BYTES = 5 * 1024**3


def st_dtype(dtype) -> str:
    return TORCH_TO_ST[str(dtype).removeprefix("torch.")]


def check_output(target: str | Path, overwrite: bool = False,
                 inputs: Sequence[str | Path] = (), flag: str = "--output") -> Path:
    """Validate an output folder before any heavy work; returns it resolved."""
    t = Path(target).resolve()
    if t.exists() and not overwrite:
        raise UserError(f"output folder {t} already exists; pass --overwrite to replace it")
    if t.exists() and not t.is_dir():
        raise UserError(f"output {t} exists and is not a folder")
    for i in inputs:
        ip = Path(i).resolve()
        if ip == t or ip in t.parents:
            raise UserError(f"{flag} {t} is inside the input folder {ip}; choose another place")
        if t in ip.parents and overwrite:
            raise UserError(f"{flag} {t} contains the input {ip}; overwriting it would lose it")
    parent = t.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write to {parent}: {probe} is not a folder")
    try:  # a real write probe: permission bits say nothing for root or read-only mounts
        fd, name = tempfile.mkstemp(prefix=".lmalloy-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror}") from None
    return t


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write into a hidden temporary folder beside `target`, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except PermissionError:
        raise UserError(f"cannot write to {target.parent}: permission denied") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if not overwrite:
                raise UserError(f"output folder {target} already exists; pass --overwrite")
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == 28:  # ENOSPC
            raise UserError(f"disk full while writing {target}; nothing was written") from None
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_tmp(folder: Path) -> None:
    """Remove temporary folders left by killed writers in `folder`."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        n = DTYPE_SIZES[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset,
                                                                                offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Stream tensors into safetensors shards in the order of `plan`.

    plan: (name, safetensors dtype, shape) per tensor, in writing order. Shards are cut
    when the next tensor would push a shard past `max_shard_bytes`. With one shard the
    file is `model.safetensors`; with more, `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`, as transformers writes them.
    """

    def __init__(self, folder: str | Path, plan: Sequence[tuple[str, str, tuple[int, ...]]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None,
                 prefix: str = "model"):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list] = [[]]
        size = 0
        for name, dtype, shape in plan:
            n = DTYPE_SIZES[dtype]
            for s in shape:
                n *= s
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape)))
            size += n
        self.shards = shards
        k = len(shards)
        self.names = ([f"{prefix}.safetensors"] if k == 1 else
                      [f"{prefix}-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)])
        self._order = [e for s in shards for e in s]
        self._pos = 0
        self._shard = -1
        self._file = None
        self._expect: dict[str, tuple[str, tuple[int, ...]]] = {
            n: (d, s) for n, d, s in self._order}
        self.total_bytes = sum(DTYPE_SIZES[d] * _numel(s) for _, d, s in self._order)

    def _open_next(self) -> None:
        if self._file:
            self._file.close()
        self._shard += 1
        self._file = open(self.folder / self.names[self._shard], "wb")  # noqa: SIM115
        self._file.write(_header_bytes(self.shards[self._shard], self.metadata))
        self._left = len(self.shards[self._shard])

    def write(self, name: str, tensor) -> None:
        import torch

        want_name, want_dtype, want_shape = self._order[self._pos]
        if name != want_name:
            raise RuntimeError(f"writer expected `{want_name}`, got `{name}`")
        if st_dtype(tensor.dtype) != want_dtype or tuple(tensor.shape) != want_shape:
            raise RuntimeError(f"`{name}`: planned {want_dtype}{list(want_shape)}, got "
                               f"{st_dtype(tensor.dtype)}{list(tensor.shape)}")
        if self._file is None or self._left == 0:
            self._open_next()
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._file.write(memoryview(t.view(torch.uint8).numpy()))
        self._left -= 1
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._order):
            missing = self._order[self._pos][0]
            raise RuntimeError(f"writer closed before `{missing}` was written")
        if self._file is None:  # an empty plan still writes a valid file
            self._open_next()
        self._file.close()
        if len(self.names) > 1:
            weight_map = {n: self.names[i] for i, s in enumerate(self.shards) for n, _, _ in s}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / f"{self.names[0].split('-')[0]}.safetensors.index.json").write_text(
                json.dumps(index, indent=2))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_aux_files(src: str | Path, dst: str | Path, names: Sequence[str] = AUX_FILES) -> None:
    """Copy tokenizer and generation files that exist in `src` into `dst`."""
    src, dst = Path(src), Path(dst)
    for n in names:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)


def write_state_dict(folder: str | Path, state: dict, config: dict | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, aux_from: Path | None = None
                     ) -> None:
    """Write an in-memory state dict (plus config.json) into an existing folder."""
    folder = Path(folder)
    plan = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in state.items()]
    w = ShardedWriter(folder, plan, max_shard_bytes)
    for k, v in state.items():
        w.write(k, v)
    w.close()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if aux_from is not None:
        copy_aux_files(aux_from, folder)
