"""The streaming weighted average of HF model folders: the one core behind `average`,
`merge linear / soup / greedy_soup`, `reward warm` and the in-memory WARM of `reward eval`.

    out = (Σᵢ wᵢ·xᵢ) / divisor        (mode "sum", accumulated left to right in fp32)
    out = lerp(… lerp(x₁, x₂, 1−d) …, x_n, 1−d)   (mode "ema", decay d, oldest first)

Per tensor, the inputs are read chunk by chunk (1M entries: a few MB, near cache) as
zero-copy views of their memory-mapped files (a thread asks the kernel to read the next
chunk ahead), accumulated into one fp32 chunk, checked for NaN/Inf, cast to the output
dtype and handed to a sink (`ShardedWriter`, or `StateSink` for an in-memory state dict)
in consecutive parts. Peak memory is a few chunk buffers, whatever the tensor or model
size, and each tensor's pages leave the process's resident set once it is done. A non-finite accumulator names the input
and tensor that brought the NaN/Inf (or says the sum overflowed) before anything is
published.

Vocabulary matrices may differ in rows between inputs (padding): the output has the
reference's rows; an input with more rows contributes only the first ones, an input with
fewer contributes the reference's rows beyond its own (no change there).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.io.dtypes import is_float, name_to_st, torch_dtype

CHUNK = 1 << 20  # entries per chunk: 4 MB of fp32 accumulator


@contextlib.contextmanager
def one_torch_thread():
    """Torch (OpenMP) on one thread for memory-bound streaming work, restored afterwards.

    Reading, combining and writing chunks is memory-bound: a second OpenMP thread only
    competes with the reader thread (measured: 0.33 s vs 0.26 s to average five 40M
    checkpoints on 2 cores), and OpenMP barriers spin when cores are shared (a 4-7x
    slow-down measured on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Combination:
    """How the inputs combine: weights (mode sum) or an EMA decay (mode ema)."""

    weights: tuple[float, ...]
    divisor: float = 1.0
    mode: str = "sum"  # "sum" | "ema"
    decay: float = 0.0

    @classmethod
    def uniform(cls, n: int) -> Combination:
        """(x₁ + … + x_n) / n, as a hand-written fp32 mean computes it."""
        return cls((1.0,) * n, float(n))

    @classmethod
    def normalized(cls, weights: Sequence[float]) -> Combination:
        """Σ (wᵢ / Σw)·xᵢ."""
        s = float(sum(weights))
        if abs(s) < 1e-12:
            raise UserError("the weights sum to 0; they cannot be normalised")
        return cls(tuple(float(w) / s for w in weights))

    @classmethod
    def ema(cls, n: int, decay: float) -> Combination:
        return cls((1.0,) * n, 1.0, "ema", float(decay))


class StateSink:
    """A sink that assembles the averaged tensors in memory: `state[name] -> tensor`.

    With `targets` ({name: tensor}, e.g. a loaded model's parameters), a tensor of that name
    is written into its target instead (cast to the target's dtype, as loading a written
    folder casts it), so merging into a model needs no second copy of it."""

    def __init__(self, targets: dict | None = None):
        self.state: dict = {}
        self.targets = targets or {}
        self._cur = None

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        import torch

        t = self.targets.get(name)
        if t is not None:
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"`{name}` is {list(shape)}, its target {list(t.shape)}")
            buf = t.data.view(-1)
        else:
            buf = torch.empty(math.prod(shape), dtype=torch_dtype(dtype))
        self._cur = (name, buf, shape, 0)

    def part(self, t) -> None:
        import torch

        name, buf, shape, pos = self._cur
        n = t.numel()
        # as ShardedWriter: no non-finite weight (a cast to a narrower dtype may overflow)
        if t.is_floating_point() and n and not (bool(torch.isfinite(t.sum()))
                                                or bool(torch.isfinite(t).all())):
            raise UserError(f"tensor `{name}` contains NaN or Inf")
        buf[pos : pos + n].copy_(t.reshape(-1))
        self._cur = (name, buf, shape, pos + n)

    def end(self) -> None:
        name, buf, shape, _ = self._cur
        self.state[name] = buf.view(shape)
        self._cur = None

    def write(self, name: str, t) -> None:
        """A whole tensor (the interface of `ShardedWriter.write`)."""
        self.begin(name, name_to_st(t.dtype), tuple(t.shape))
        self.part(t)
        self.end()


def plan(ref, names: Sequence[str] | None = None, out_dtype: str | None = None
         ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of each output tensor, in the reference's order;
    floating tensors in `out_dtype` (a dtype name) when given, else their own dtype."""
    out = []
    for name in names if names is not None else list(ref.tensors):
        t = ref.tensors[name]
        st = name_to_st(out_dtype) if out_dtype and is_float(t.dtype) else t.dtype
        out.append((name, st, t.shape))
    return out


class _Buffers:
    """Chunk buffers reused across tensors (no fresh pages per chunk): per key and dtype."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self._bufs: dict = {}

    def get(self, key, dtype):
        import torch

        b = self._bufs.get((key, dtype))
        if b is None:
            b = self._bufs[(key, dtype)] = torch.empty(self.chunk, dtype=dtype)
        return b


def read_chunk(folder, ref, name: str, a: int, b: int, override=None):
    """Entries [a, b) of `name` in `folder` (a zero-copy view of its mapped file), the
    reference's entries beyond its own rows; `override` (a tensor) replaces the file's."""
    import torch

    if override is not None:
        return override.reshape(-1)[a:b]
    n = folder.tensors[name].numel
    if b <= n:
        return folder.view_range(name, a, b)
    if a >= n:
        return ref.view_range(name, a, b).to(torch_dtype(folder.tensors[name].dtype))
    tail = ref.view_range(name, n, b).to(torch_dtype(folder.tensors[name].dtype))
    return torch.cat([folder.view_range(name, a, n), tail])


def _nonfinite(inputs, ref, name: str, a: int, b: int, overrides: dict) -> UserError:
    """The error for a non-finite accumulator: the input that holds NaN/Inf, if any."""
    import torch

    for i, f in enumerate(inputs):
        x = read_chunk(f, ref, name, a, b, overrides.get((i, name)))
        if not bool(torch.isfinite(x).all()):
            return UserError(f"{f.path}: tensor `{name}` contains NaN or Inf")
    return UserError(f"the weighted average of tensor `{name}` overflows (non-finite "
                     "result from finite inputs; check the weights)")


def _prefetched(inputs, ref, chunks: list[tuple[str, int, int]], overrides: dict):
    """(name, a, b, inputs' entries [a, b)) per chunk, in order, as views of the mapped
    files; a thread asks the kernel to read chunk k+1 ahead (MADV_WILLNEED) while chunk k
    is combined, and each tensor's pages leave the resident set once it is done."""
    from concurrent.futures import ThreadPoolExecutor

    def ahead(k: int) -> None:
        name, a, b = chunks[k]
        for i, f in enumerate(inputs):
            if (i, name) not in overrides:
                f.advise(name, a, min(b, f.tensors[name].numel), need=True)

    if not chunks:
        return
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ahead, 0)
        for k, (name, a, b) in enumerate(chunks):
            fut.result()
            if k + 1 < len(chunks):
                fut = pool.submit(ahead, k + 1)
            yield name, a, b, [read_chunk(f, ref, name, a, b, overrides.get((i, name)))
                               for i, f in enumerate(inputs)]
            if b == ref.tensors[name].numel:  # the tensor's last chunk
                for f in {id(x): x for x in [*inputs, ref]}.values():
                    f.advise(name, 0, f.tensors[name].numel, need=False)


def _combine(xs, combo: Combination, acc, bufs: _Buffers):
    """acc ← the combination of one chunk of every input, in fp32."""
    import torch

    n = acc.numel()
    for i, (x, w) in enumerate(zip(xs, combo.weights, strict=True)):
        if i == 0:
            acc.copy_(x)
            if w != 1.0:
                acc.mul_(w)
        elif combo.mode == "ema":
            acc.lerp_(x if x.dtype == torch.float32 else x.float(), 1.0 - combo.decay)
        elif x.dtype == torch.float32:
            acc.add_(x, alpha=w)
        else:  # cast into a buffer, then an fp32 add: faster than a mixed-dtype add_
            tmp = bufs.get("cast", torch.float32)[:n]
            tmp.copy_(x)
            acc.add_(tmp, alpha=w)
    if combo.divisor != 1.0:
        acc.div_(combo.divisor)


def weighted_average(inputs: Sequence, combo, sink, entries, ref=None,
                     progress: Callable[[int], None] | None = None,
                     overrides: dict | None = None) -> None:
    """Average `inputs` (opened ModelFolders) tensor by tensor into `sink`.

    combo: a `Combination`, or a function of the tensor name returning one (weights that
    vary by layer or filter). entries: (name, safetensors dtype, shape) in output order
    (see `plan`); non-floating tensors are copied from `ref` (default: the last input, the
    newest checkpoint). `progress(bytes_read)` is called after each tensor. `overrides`
    maps (input index, tensor name) to a tensor read instead of the file's (re-indexed
    vocabularies); an entry's shape may then differ from the reference's.
    """
    ref = ref if ref is not None else inputs[-1]
    with one_torch_thread():
        _stream(inputs, combo, sink, entries, ref, progress, overrides or {})


def _stream(inputs, combo, sink, entries, ref, progress, overrides: dict) -> None:
    import torch

    bufs = _Buffers(CHUNK)
    numel = {n: math.prod(shape) for n, _, shape in entries}
    chunks = [(n, a, min(numel[n], a + CHUNK)) for n, _, _ in entries
              if is_float(ref.tensors[n].dtype) for a in range(0, numel[n], CHUNK)]
    stream = _prefetched(inputs, ref, chunks, overrides)
    for name, st, shape in entries:
        sink.begin(name, st, shape)
        if not is_float(ref.tensors[name].dtype):  # integer/bool buffers: the reference's
            sink.part(ref.view_range(name, 0, ref.tensors[name].numel))
        else:
            c = combo(name) if callable(combo) else combo
            if len(c.weights) != len(inputs):
                raise ValueError(f"{len(c.weights)} weights for {len(inputs)} inputs")
            out_t = torch_dtype(st)
            for _ in range(-(-numel[name] // CHUNK)):
                _, a, b, xs = next(stream)
                acc = bufs.get("acc", torch.float32)[: b - a]
                _combine(xs, c, acc, bufs)
                # a NaN/Inf entry makes the sum non-finite: one cheap pass, then confirmed
                if not (bool(torch.isfinite(acc.sum())) or bool(torch.isfinite(acc).all())):
                    raise _nonfinite(inputs, ref, name, a, b, overrides)
                out = acc if out_t == torch.float32 else bufs.get("out", out_t)[: b - a]
                if out is not acc:
                    out.copy_(acc)
                sink.part(out)
        sink.end()
        if progress is not None:
            progress(sum(f.tensors[name].nbytes for f in inputs))


@contextlib.contextmanager
def averaged_model(inputs: Sequence, combo, load: Callable[[Path], object], near: Path,
                   ref=None):
    """The weighted average loaded as a model: written to a hidden scratch folder beside
    `near` (the streaming core, then transformers loads it with its own conversions and
    tying), removed on exit. Memory: one loaded model, never the inputs."""
    import shutil
    import uuid

    near = Path(near)
    scratch = near.parent / f".{near.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_average(inputs, combo, scratch, ref=ref, overwrite=True)
        yield load(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def average_state(inputs: Sequence, combo, ref=None) -> dict:
    """The weighted average as an in-memory state dict (models that fit in memory)."""
    ref = ref if ref is not None else inputs[-1]
    sink = StateSink()
    weighted_average(inputs, combo, sink, plan(ref), ref)
    return sink.state


def write_average(inputs: Sequence, combo, output: str | Path, *, ref=None,
                  out_dtype: str | None = None, overwrite: bool = False,
                  aux_from: Path | None = None, extra: Callable[[Path], None] | None = None,
                  metadata: dict | None = None, max_shard_bytes: int | None = None,
                  progress: Callable[[int], None] | None = None, entries=None,
                  overrides: dict | None = None, config: dict | None = None) -> int:
    """Write the weighted average as an HF folder at `output`, atomically.

    The config and tokenizer files come from `ref` (default: the last input) or
    `aux_from`; `extra(tmp)` writes more files into the folder before it is published.
    Returns the bytes of weights written.
    """
    from lmalloy.io.dtypes import SIZES, majority_float
    from lmalloy.io.writer import (
        DEFAULT_SHARD_BYTES,
        ShardedWriter,
        atomic_output,
        check_free_space,
        copy_aux_files,
        write_config,
    )

    ref = ref if ref is not None else inputs[-1]
    entries = entries if entries is not None else plan(ref, out_dtype=out_dtype)
    total = sum(SIZES[st] * math.prod(shape) for _, st, shape in entries)
    check_free_space(output, total, "the averaged model")
    with atomic_output(output, overwrite) as tmp:
        with ShardedWriter(tmp, entries, max_shard_bytes or DEFAULT_SHARD_BYTES,
                           metadata=metadata) as w:
            weighted_average(inputs, combo, w, entries, ref, progress, overrides)
        write_config(tmp, config if config is not None else ref.config,
                     majority_float(st for _, st, _ in entries))
        copy_aux_files(aux_from or ref.path, tmp)
        if extra is not None:
            extra(tmp)
    return total
