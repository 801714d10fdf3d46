"""Atomic, streaming writing of Hugging Face model folders.

`atomic_output(target)` yields a temporary folder beside the target; on success every
file is fsynced and the folder renamed into place (an existing target, when overwriting,
is swapped out only after the new one is complete). On any error, or if the process is
killed, the target is untouched: the temporary folder's name starts with a dot and
never looks like a model.

`ShardedWriter` streams tensors to disk in a planned order: each shard's safetensors
header is written first (the shapes are known from the plan), then each tensor's bytes
as they arrive, whole (`write`) or in consecutive parts (`begin`, `part`, `end`), so peak
memory is one part, whatever the tensor or shard size. A NaN/Inf in a floating tensor is
refused: no command writes a non-finite weight. Used as a context manager it
writes the index on success and, on an error, closes its file so that the temporary
folder can be removed.

`atomic_write_text` is the same promise for one small file (JSON, JSONL, YAML), and
`write_config` the one way a model's config.json is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.io.dtypes import SIZES, st_dtype
from lmalloy.io.folder import AUX_FILES

DEFAULT_SHARD_BYTES = 5 * 1024**3
__all__ = ["ShardedWriter", "atomic_output", "atomic_write_text", "check_free_space",
           "check_output", "check_output_file",
           "clean_stale_tmp", "copy_aux_files", "st_dtype", "write_config", "write_state_dict"]


def check_output(target: str | Path, overwrite: bool = False,
                 inputs: Sequence[str | Path] = (), flag: str = "--out") -> Path:
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
    _probe_writable(t.parent, f"cannot write to {t.parent}")
    return t


def _probe_writable(parent: Path, what: str) -> None:
    """UserError unless a file can be created in `parent` (or its nearest existing
    ancestor): a real write probe, since permission bits say nothing for root or
    read-only mounts."""
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what}: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".lmalloy-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{what}: {e.strerror}") from None


def check_free_space(target: str | Path, nbytes: int, what: str = "the output") -> None:
    """UserError before writing when `nbytes` (plus 1% and 16 MB of slack for headers,
    config and tokenizer files) would not fit the free space where `target` goes."""
    probe = Path(target).resolve().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes * 1.01) + (16 << 20)
    if need > free:
        raise UserError(f"{what} needs {need / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} "
                        "GB free; nothing was written (free space or choose another --out)")


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
    clean_stale_tmp(target.parent)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-z]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove temporary folders and files left in `folder` by killed writers: only those
    whose owner process is gone (a running writer's are kept). An `.old-` copy whose output
    is missing (the writer was killed between the two renames of a swap) is the only copy:
    it is renamed back into place. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir(), key=lambda q: ".old-" not in q.name):
        m = _TMP_RE.match(p.name)
        if not m or _alive(int(m.group("pid"))):
            continue
        target = folder / m.group("name")
        if m.group("kind") == "old" and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(p, target)  # restore the user's output
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        n = SIZES[dtype]
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
            n = SIZES[dtype]
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
        self.total_bytes = sum(SIZES[d] * _numel(s) for _, d, s in self._order)
        self._open_part: tuple[str, int] | None = None  # (name, bytes still due)

    def _open_next(self) -> None:
        if self._file:
            self._file.close()
        self._shard += 1
        self._file = open(self.folder / self.names[self._shard], "wb")  # noqa: SIM115
        self._file.write(_header_bytes(self.shards[self._shard], self.metadata))
        self._left = len(self.shards[self._shard])

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _check(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self._open_part is not None:
            raise RuntimeError(f"writer: `{self._open_part[0]}` is not finished")
        if self._pos >= len(self._order):
            raise RuntimeError(f"writer got `{name}` after the last planned tensor")
        want_name, want_dtype, want_shape = self._order[self._pos]
        if name != want_name:
            raise RuntimeError(f"writer expected `{want_name}`, got `{name}`")
        if dtype != want_dtype or tuple(shape) != want_shape:
            raise RuntimeError(f"`{name}`: planned {want_dtype}{list(want_shape)}, got "
                               f"{dtype}{list(shape)}")
        if self._file is None or self._left == 0:
            self._open_next()

    def write(self, name: str, tensor) -> None:
        """Write the next planned tensor whole."""
        self.begin(name, st_dtype(tensor.dtype), tuple(tensor.shape))
        self.part(tensor)
        self.end()

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Start the next planned tensor; its bytes follow in `part` calls, in order."""
        self._check(name, dtype, shape)
        self._open_part = (name, SIZES[dtype] * _numel(shape))

    def part(self, tensor) -> None:
        """The next consecutive elements (any shape, the planned dtype) of the open tensor."""
        import torch

        name, due = self._open_part
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        n = t.numel() * t.element_size()
        if st_dtype(t.dtype) != self._order[self._pos][1] or n > due:
            raise RuntimeError(f"`{name}`: a part of {n} bytes ({t.dtype}) does not fit")
        # never write a non-finite weight (a sum is non-finite if any entry is; confirmed)
        if t.is_floating_point() and t.numel() and not (
                bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())):
            raise UserError(f"refusing to write tensor `{name}`: it contains NaN or Inf")
        if n:
            self._file.write(memoryview(t.view(torch.uint8).numpy()))
        self._open_part = (name, due - n)

    def end(self) -> None:
        name, due = self._open_part
        if due:
            raise RuntimeError(f"`{name}`: {due} bytes were never written")
        self._open_part = None
        self._left -= 1
        self._pos += 1

    def abort(self) -> None:
        """Close the open file after an error (the caller's temporary folder then goes)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def close(self) -> None:
        if self._pos != len(self._order) or self._open_part is not None:
            missing = self._order[min(self._pos, len(self._order) - 1)][0]
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


def write_config(folder: str | Path, config: dict, dtype: str | None = None) -> None:
    """config.json of a written model; `dtype` (a dtype name) sets `dtype`, and the older
    `torch_dtype` where the source config has it."""
    config = dict(config)
    if dtype is not None:
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True)
                                              + "\n")


def check_output_file(path: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """Validate an output *file* before any work: not a folder, not existing unless
    overwriting, its folder writable (created if missing)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder; expected a file path")
    if p.exists() and not overwrite:
        raise UserError(f"{flag} {p} exists; pass --overwrite to replace it")
    _probe_writable(p.parent, f"{flag} {p}: cannot write to {p.parent}")
    return p


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write one small file atomically: a hidden temporary file beside it, fsynced, renamed.

    A killed process leaves the old file (or none), never a half-written one. With
    `overwrite=False` an existing file is a UserError (checked again at the rename).
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise UserError(f"{p} already exists; pass --overwrite to replace it")
    if p.is_dir():
        raise UserError(f"{p} is a folder; expected a file path")
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and p.exists():
            raise UserError(f"{p} already exists; pass --overwrite to replace it")
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise UserError(f"disk full while writing {p}; nothing was written") from None
        raise UserError(f"cannot write {p}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return p


def write_state_dict(folder: str | Path, state: dict, config: dict | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, aux_from: Path | None = None
                     ) -> None:
    """Write an in-memory state dict (plus config.json) into an existing folder."""
    folder = Path(folder)
    plan = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in state.items()]
    with ShardedWriter(folder, plan, max_shard_bytes) as w:
        for k, v in state.items():
            w.write(k, v)
    if config is not None:
        write_config(folder, config)
    if aux_from is not None:
        copy_aux_files(aux_from, folder)
