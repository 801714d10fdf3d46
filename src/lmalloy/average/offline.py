"""`lmalloy average`: average the checkpoints of one run offline, streaming tensor by tensor.

- `uniform`: (m₁ + … + m_n) / n, summed in fp32 in input order.
- `--last K` of a run folder: uniform over its K newest `checkpoints/step-N/` models —
  LaWA after the fact (Kaddour 2022; Sanyal et al. 2306.03241: k = 5, 200 steps apart).
- `ema`: avg ← m₁, then avg ← decay·avg + (1 − decay)·m_i for the inputs oldest first
  (`lerp_` in fp32, the in-training EMA's update applied to checkpoints).

Each tensor is read from every input in turn (positioned reads, located by the headers
`lmalloy.io.open_model` parsed) into one fp32 accumulator, then cast and streamed into
the output shards (`ShardedWriter`, inside `atomic_output`): peak memory is one
accumulator plus one input tensor, whatever the number of inputs. Names, shapes and architectures are checked
from the headers before any data is read; a NaN/Inf found while reading aborts the run
and the temporary output folder is removed, so nothing partial is ever left behind.
Config and tokenizer files come from the newest input (the last one listed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.io.folder import TORCH_DTYPE_NAMES

DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def resolve_inputs(inputs: list[str], last: int | None) -> list[Path]:
    """The model folders to average, oldest first (`--last K`: a run's newest K checkpoints)."""
    if not inputs:
        raise UserError("no input folders given (list model folders, or one run folder "
                        "with --last K)")
    if last is None:
        return [Path(p) for p in inputs]
    if len(inputs) != 1:
        raise UserError(f"--last {last} takes one run folder, got {len(inputs)} inputs")
    from lmalloy.train.trainer import list_checkpoints

    run = Path(inputs[0])
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise UserError(f"{run}: no checkpoints (expected checkpoints/step-NNNNNN/ folders)")
    if last > len(ckpts):
        raise UserError(f"--last {last}: {run} has only {len(ckpts)} checkpoint(s) "
                        f"({', '.join(p.name for _, p in ckpts)})")
    return [p for _, p in ckpts[-last:]]


def check_compatible(models: list) -> None:
    """Same architecture, tensor names and shapes in every input (names the first
    difference)."""
    ref = models[0]
    for m in models[1:]:
        if m.architecture != ref.architecture:
            raise UserError(f"{m.path}: architecture {m.architecture} differs from "
                            f"{ref.path}'s {ref.architecture}")
        for name, info in ref.tensors.items():
            other = m.tensors.get(name)
            if other is None:
                raise UserError(f"{m.path}: tensor `{name}` is missing (present in "
                                f"{ref.path})")
            if other.shape != info.shape:
                raise UserError(f"{m.path}: tensor `{name}` has shape {list(other.shape)}, "
                                f"{ref.path} has {list(info.shape)}")
        extra = [n for n in m.tensors if n not in ref.tensors]
        if extra:
            raise UserError(f"{m.path}: tensor `{extra[0]}` is not in {ref.path}")


def read_tensor(model, name: str, buf=None):
    """One tensor of a safetensors folder, read with a positioned read into `buf` (a uint8
    tensor at least as large; reused across calls) or into fresh memory.

    Not memory-mapped on purpose: mapped pages of every input would stay resident in this
    process until the end, so peak memory would grow with the number of inputs."""
    import torch

    info = model.tensors[name]
    if model.pickle_state is not None:
        return model.read(name)
    view = (torch.empty(info.nbytes, dtype=torch.uint8) if buf is None
            else buf[: info.nbytes])
    with open(info.file, "rb") as f:
        f.seek(info.offsets[0])
        if f.readinto(view.numpy()) != info.nbytes:
            raise UserError(f"{info.file}: truncated while reading `{name}`")
    return view.view(getattr(torch, TORCH_DTYPE_NAMES[info.dtype])).reshape(info.shape)


def average_folders(inputs: list[str | Path], output: str | Path, method: str = "uniform",
                    decay: float | None = None, last: int | None = None, dtype: str = "auto",
                    overwrite: bool = False, allow_pickle: bool = False,
                    progress: bool = True) -> dict:
    """Average HF folders into `output` (an HF folder). Returns sizes and timing."""
    import torch

    from lmalloy.io.folder import check_finite, open_model
    from lmalloy.io.writer import ShardedWriter, atomic_output, check_output, copy_aux_files

    if method not in ("uniform", "ema"):
        raise UserError(f"unknown method `{method}`; choose from ema, uniform")
    if method == "ema" and (decay is None or not 0 < decay < 1):
        raise UserError(f"`--decay` must be in (0, 1) for --method ema, got {decay}")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"unknown dtype `{dtype}`; choose from auto, {', '.join(DTYPES)}")
    paths = resolve_inputs([str(p) for p in inputs], last)
    models = [open_model(p, allow_pickle=allow_pickle) for p in paths]
    check_compatible(models)
    newest = models[-1]
    out = check_output(output, overwrite, inputs=paths)
    order = sorted(newest.tensors.values(), key=lambda t: (str(t.file), t.offsets[0]))
    plan = []
    for info in order:
        floating = info.dtype in ("F64", "F32", "F16", "BF16")
        st = DTYPES[dtype] if dtype != "auto" and floating else info.dtype
        plan.append((info.name, st, info.shape))
    st_to_torch = {k: getattr(torch, v) for k, v in TORCH_DTYPE_NAMES.items()}
    bytes_in = sum(m.nbytes for m in models)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="average", unit="tensor", file=sys.stderr,
                   disable=None, mininterval=1.0)
    t0 = time.perf_counter()

    # two buffers reused for every tensor (the fp32 accumulator and one input), so their
    # pages are faulted in once rather than once per tensor and input
    largest = max(t.numel for t in newest.tensors.values())
    acc_buf = torch.empty(4 * largest, dtype=torch.uint8)
    in_buf = torch.empty(max(t.nbytes for m in models for t in m.tensors.values()),
                         dtype=torch.uint8)

    def averaged(name: str):
        info = newest.tensors[name]
        if all(m.tensors[name].dtype == "F32" and m.pickle_state is None for m in models):
            acc = read_tensor(models[0], name, acc_buf)  # the first input is the accumulator
        else:
            acc = acc_buf[: 4 * info.numel].view(torch.float32).reshape(info.shape)
            acc.copy_(read_tensor(models[0], name, in_buf))
        for m in models[1:]:
            t = read_tensor(m, name, in_buf)
            if method == "uniform":
                acc.add_(t)  # ((m1 + m2) + m3 ...) in fp32
            else:
                acc.lerp_(t.to(torch.float32), 1.0 - decay)
        if method == "uniform":
            acc.div_(float(len(models)))
        # a NaN/Inf input makes the average non-finite, and then its sum: one cheap pass
        if not (bool(torch.isfinite(acc.sum())) or bool(torch.isfinite(acc).all())):
            for m in models:
                check_finite(name, read_tensor(m, name), m.path)
            raise UserError(f"the average of tensor `{name}` overflows")
        return acc

    with atomic_output(out, overwrite) as tmp:
        w = ShardedWriter(tmp, plan)
        for name, st, _shape in plan:
            if st in ("F64", "F32", "F16", "BF16"):
                w.write(name, averaged(name).to(st_to_torch[st]))
            else:  # integer/bool buffers: the newest input's
                w.write(name, read_tensor(newest, name))
            if bar is not None:
                bar.update(1)
        w.close()
        config = dict(newest.config)
        if dtype != "auto":
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "dtype":
                    config[key] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_aux_files(newest.path, tmp)
        bytes_out = w.total_bytes
    if bar is not None:
        bar.close()
    for m in models:
        m.close()
    seconds = time.perf_counter() - t0
    return {"inputs": [str(p) for p in paths], "output": str(out), "bytes_in": bytes_in,
            "bytes_out": bytes_out, "seconds": seconds}


def main(cfg) -> int:
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    r = average_folders(cfg.inputs, cfg.output, cfg.method, cfg.decay, cfg.last, cfg.dtype,
                        cfg.overwrite, cfg.allow_pickle)
    gb = (r["bytes_in"] + r["bytes_out"]) / 1e9
    what = f"the last {cfg.last} checkpoints" if cfg.last else f"{len(r['inputs'])} models"
    print(f"averaged {what} ({cfg.method}) -> {r['output']} ({gb:.2f} GB read+written in "
          f"{r['seconds']:.1f} s, {gb / max(r['seconds'], 1e-9):.2f} GB/s)", file=sys.stderr)
    return 0
