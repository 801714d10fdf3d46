"""Training checkpoints at any scale: an HF folder, plus what `--resume` needs beside it.

  step-N/                    the model as an HF folder (config, safetensors, tokenizer)
  step-N/trainer_state.pt    plain values: step, scheduler, RNG, the optimizer's parameter
                             groups, the callbacks' counters, the number of processes
                             (tensors and plain Python only: loaded with weights_only=True)
  step-N/trainer_state/      the tensors: optimizer moments and the callbacks' (the weight
                             averages), written by every process at once as its own part
                             (torch.distributed.checkpoint with its Hugging Face storage:
                             safetensors files, each part's offsets in the header; no pickle)
                             and read back by any number of processes (DCP reshards)
  step-N/<average>/          an HF folder per weight average (`lmalloy.average.Averaging`)

The weights are gathered one decoder layer at a time (under FSDP2 `DTensor.full_tensor()`)
and written by rank 0 as they arrive, so no process holds the whole model beside its own
part; the names and shapes of the files are planned on meta tensors first. Resuming under
FSDP2, rank 0 reads the weights and sends them tensor by tensor (`broadcast_from_rank0`).

Tensors in a callback's `state_dict()` that sit under a parameter's name are this process's
part of a tensor shaped like that parameter (`ParamShards.local`); they are saved as such.
"""

from __future__ import annotations

import contextlib
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmalloy.errors import UserError
from lmalloy.io.runs import STATE_FILE

TENSORS_DIR = "trainer_state"
FILE_BYTES = 1 << 30  # a process's tensor files are cut at about 1 GiB
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """RNG states as tensors and plain tuples, so `torch.load(weights_only=True)` reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- weights


def whole(t: torch.Tensor) -> torch.Tensor:
    """A state-dict entry in full: gathered from every process if it is a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def layer_groups(keys: list[str]) -> list[list[str]]:
    """State-dict keys by decoder layer (`...layers.<i>.`), the other keys first."""
    groups: dict[str, list[str]] = {"": []}
    for k in keys:
        m = _LAYER.match(k)
        groups.setdefault(m.group(1) if m else "", []).append(k)
    return [g for g in groups.values() if g]


def write_weights(folder: Path | None, model: torch.nn.Module,
                  fetch: Callable[[str], torch.Tensor]) -> None:
    """Stream `model`'s weights as `save_pretrained` stores them into `folder` (rank 0;
    None elsewhere). `fetch(key)` gives a state-dict entry in full; every process calls it
    for every key in the same order (it may gather), one decoder layer at a time."""
    from lmalloy.io.models import saved_state, tied_aliases
    from lmalloy.io.writer import ShardedWriter, st_dtype

    sd = model.state_dict(keep_vars=True)
    drop = tied_aliases(model)
    groups = layer_groups([k for k in sd if k not in drop])
    plan = [(n, st_dtype(t.dtype), tuple(t.shape)) for g in groups for n, t in saved_state(
        model, {k: torch.empty(sd[k].shape, dtype=sd[k].dtype, device="meta") for k in g}
    ).items()]
    writer = ShardedWriter(folder, plan) if folder is not None else None
    try:
        for g in groups:
            part = {k: fetch(k).to(device="cpu", dtype=sd[k].dtype) for k in g}
            if writer is not None:
                for n, t in saved_state(model, part).items():
                    writer.write(n, t)
            del part
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


# ----------------------------------------------------------------------------- tensor state


def split_tensors(obj, shards, prefix: str = ""):
    """(`obj` with each tensor replaced by a plain marker, {flat key: tensor}). A tensor
    under a parameter's name is this process's part of one shaped like it: it is saved as
    a DTensor of the whole (`shards.dtensor`), so any number of processes can read it."""
    flat: dict[str, torch.Tensor] = {}

    def walk(x, key: str, name: str | None):
        if isinstance(x, torch.Tensor):
            like = name if name in shards.params else None
            flat[key] = shards.dtensor(like, x) if like else x
            return {"tensor": key, "like": like}
        if isinstance(x, dict):
            return {k: walk(v, f"{key}.{k}", k) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{key}.{i}", None) for i, v in enumerate(x))
        return x

    return walk(obj, prefix, None), flat


def _is_marker(x) -> bool:
    return isinstance(x, dict) and set(x) == {"tensor", "like"}


def _markers(x):
    if _is_marker(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _markers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _markers(v)


def tensor_templates(skeleton, shards, meta: dict) -> dict[str, torch.Tensor]:
    """Empty tensors for the markers of `skeleton`, laid out for this run's processes
    (`meta`: {key: (shape, dtype)} of the saved tensors)."""
    out: dict[str, torch.Tensor] = {}
    for m in _markers(skeleton):
        if m["tensor"] not in meta:
            raise UserError(f"{TENSORS_DIR}/ lacks `{m['tensor']}`")
        shape, dtype = meta[m["tensor"]]
        like = m["like"] if m["like"] in shards.params else None
        if like is not None:
            local = torch.empty_like(shards.local(shards.params[like]), dtype=dtype)
            out[m["tensor"]] = shards.dtensor(like, local)
        else:
            out[m["tensor"]] = torch.empty(shape, dtype=dtype)
    return out


def join_tensors(skeleton, flat: dict[str, torch.Tensor]):
    """`split_tensors` undone: the markers replaced by this process's part of each tensor."""
    if _is_marker(skeleton):
        t = flat[skeleton["tensor"]]
        return t.to_local() if hasattr(t, "to_local") else t
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, flat) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(join_tensors(v, flat) for v in skeleton)
    return skeleton


def _file_index(tensors: dict[str, torch.Tensor], world: int) -> dict[str, int]:
    """Which of a process's files each tensor goes to, about FILE_BYTES each (the same on
    every process: sizes from global shapes)."""
    out, size, idx = {}, 0, 1
    for k, t in tensors.items():
        n = t.numel() * t.element_size() // (world if hasattr(t, "to_local") else 1)
        if size and size + n > FILE_BYTES:
            idx, size = idx + 1, 0
        out[k] = idx
        size += n
    return out


@contextlib.contextmanager
def _dcp():
    """torch.distributed.checkpoint, in one process without a process group too."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield dcp, not dist.is_initialized()


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], world: int) -> None:
    """Every process writes its part of `tensors` (DTensors: their shards; plain tensors:
    once, by one process) into `folder`, as safetensors files."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(str(folder), _file_index(tensors, world),
                                      save_distributed=True)
    with _dcp() as (dcp, alone):
        dcp.save(tensors, storage_writer=writer, no_dist=alone)


def tensor_meta(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (whole shape, dtype)} of the tensors saved in `folder` (headers only)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    md = HuggingFaceStorageReader(str(folder)).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()}


def load_tensors(folder: Path, templates: dict[str, torch.Tensor]) -> None:
    """Fill `templates` in place from `folder`, whatever number of processes wrote it."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with _dcp() as (dcp, alone):
        dcp.load(templates, storage_reader=HuggingFaceStorageReader(str(folder)),
                 no_dist=alone)


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer state with its tensors whole, read by one process:
    trainer_state.pt's values, `callbacks` with their tensors in place, and `optimizer`:
    {"<parameter>.<moment>": tensor}."""
    ts = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    flat = {k: torch.empty(shape, dtype=dtype)
            for k, (shape, dtype) in tensor_meta(Path(checkpoint) / TENSORS_DIR).items()}
    load_tensors(Path(checkpoint) / TENSORS_DIR, flat)
    ts["callbacks"] = join_tensors(ts["callbacks"], flat)
    ts["optimizer"] = {k.removeprefix("optimizer."): v for k, v in flat.items()
                       if k.startswith("optimizer.")}
    return ts


# ----------------------------------------------------------------------------- trainer


def _optimizer_tensors(trainer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the optimizer's parameter groups, {flat key: moment}); under FSDP2 the moments are
    DTensors sharded like their parameters. Made on first use (zero state)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(trainer.model, trainer.opt)
    return osd["param_groups"], {f"optimizer.{fqn}.{k}": v for fqn, st in osd["state"].items()
                                 for k, v in st.items()}


def save(trainer, step: int, target: Path) -> None:
    """The checkpoint of `trainer` at `step` into `target`, atomically (every process)."""
    d = trainer.dist
    trainer.shards.reshard()
    groups, tensors = _optimizer_tensors(trainer)
    state = {"step": step, "world": d.world, "param_groups": groups,
             "scheduler": trainer.sched.state_dict(), "rng": rng_state(), "callbacks": {}}
    for cb in trainer.callbacks:
        if hasattr(cb, "state_dict"):
            name = type(cb).__name__
            state["callbacks"][name], t = split_tensors(cb.state_dict(), trainer.shards,
                                                        f"callbacks.{name}")
            tensors.update(t)
    with d.atomic_output(target) as tmp:
        trainer.write_hf(tmp)
        save_tensors(tmp / TENSORS_DIR, tensors, d.world)
        if d.main:
            torch.save(state, tmp / STATE_FILE)
        for cb in trainer.callbacks:
            if hasattr(cb, "save"):
                cb.save(trainer, tmp)


def _read(trainer, path: Path) -> tuple[dict, dict | None]:
    """(trainer_state.pt, the model's weights: on rank 0 only under FSDP2), or a UserError."""
    from lmalloy.io.folder import open_model
    from lmalloy.io.models import load_causal_lm

    state_path = path / STATE_FILE
    try:
        open_model(path)
        ts = torch.load(state_path, map_location="cpu", weights_only=True)
        if not (path / TENSORS_DIR).is_dir():
            raise UserError(f"{TENSORS_DIR}/ is missing")
        weights = None
        if trainer.dist.main or not trainer.fsdp:
            # the checkpoint's weights under the model's in-memory names (transformers
            # applies its own load-time conversions: fused MoE experts, tied heads)
            dtype = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
            weights = load_causal_lm(path, dtype=dtype).state_dict()
    except UserError as e:
        raise UserError(f"--resume: checkpoint {path} is corrupt: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable state is a corrupt checkpoint
        raise UserError(f"--resume: checkpoint {path} is corrupt ({state_path.name}: "
                        f"{type(e).__name__})") from None
    return ts, weights


def load(trainer, path: Path) -> None:
    """Continue `trainer` from the checkpoint `path` (every process), exactly; the tensor
    state is resharded when the checkpoint was written by another number of processes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ts, weights = _read(trainer, path)
    if trainer.fsdp:
        set_model_state_dict(trainer.model, weights or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
    else:
        trainer.model.load_state_dict(weights)
    del weights
    _, templates = _optimizer_tensors(trainer)  # the optimizer's own tensors, filled in place
    try:
        meta = tensor_meta(path / TENSORS_DIR)
        templates.update(tensor_templates(ts["callbacks"], trainer.shards, meta))
        load_tensors(path / TENSORS_DIR, templates)
    except UserError as e:
        raise UserError(f"--resume: checkpoint {path} is corrupt: {e}") from None
    except Exception as e:  # noqa: BLE001 - DCP's errors for missing or mismatched entries
        raise UserError(f"--resume: checkpoint {path / TENSORS_DIR} does not fit this run "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    state: dict[str, dict] = {}
    for key, t in templates.items():
        if key.startswith("optimizer."):
            fqn, k = key.removeprefix("optimizer.").rsplit(".", 1)
            state.setdefault(fqn, {})[k] = t
    set_optimizer_state_dict(trainer.model, trainer.opt,
                             {"state": state, "param_groups": ts["param_groups"]})
    trainer.sched.load_state_dict(ts["scheduler"])
    set_rng_state(ts["rng"])
    for cb in trainer.callbacks:
        key = type(cb).__name__
        if hasattr(cb, "load_state_dict") and key in ts["callbacks"]:
            cb.load_state_dict(join_tensors(ts["callbacks"][key], templates))
    trainer.step = ts["step"]
    trainer.resumed_from_world = ts["world"]
