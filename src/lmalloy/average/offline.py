"""`lmalloy average`: average the checkpoints of one run offline, streaming tensor by tensor.

- `uniform`: (m₁ + … + m_n) / n, summed in fp32 in input order.
- `--last K` of a run folder: uniform over its K newest `checkpoints/step-N/` models —
  LaWA after the fact (Kaddour 2022; Sanyal et al. 2306.03241: k = 5, 200 steps apart).
- `ema`: avg ← m₁, then avg ← decay·avg + (1 − decay)·m_i for the inputs oldest first
  (`lerp_` in fp32, the in-training EMA's update applied to checkpoints).

The averaging is `lmalloy.average.weighted` (chunked positioned reads into one fp32
accumulator, written shard by shard inside an atomic output folder). Names, shapes and
architectures are checked from the headers before any data is read; a NaN/Inf aborts the
run naming the input and tensor, and nothing is left behind. Config and tokenizer files
come from the newest input (the last one listed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmalloy.errors import UserError


def resolve_inputs(inputs: list[str], last: int | None) -> list[Path]:
    """The model folders to average, oldest first (`--last K`: a run's newest K checkpoints)."""
    if not inputs:
        raise UserError("no input folders given (list model folders, or one run folder "
                        "with --last K)")
    if last is None:
        return [Path(p) for p in inputs]
    if len(inputs) != 1:
        raise UserError(f"--last {last} takes one run folder, got {len(inputs)} inputs")
    from lmalloy.io.runs import list_checkpoints

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
    """One architecture, tokenizer, tensor names and shapes in every input."""
    from lmalloy.io.folder import check_same_architecture, compare_tensors
    from lmalloy.io.tokenizer_files import check_same_tokenizer

    check_same_architecture(models)
    compare_tensors(models[-1], models)
    check_same_tokenizer(models)


def average_folders(inputs: list[str | Path], output: str | Path, method: str = "uniform",
                    decay: float | None = None, last: int | None = None, dtype: str = "auto",
                    overwrite: bool = False, allow_pickle: bool = False,
                    progress: bool = True) -> dict:
    """Average HF folders into `output` (an HF folder). Returns sizes and timing."""
    from lmalloy.average.weighted import Combination, write_average
    from lmalloy.io.dtypes import OUTPUT_DTYPES
    from lmalloy.io.folder import open_model
    from lmalloy.io.writer import check_output

    if method not in ("uniform", "ema"):
        raise UserError(f"unknown method `{method}`; choose from ema, uniform")
    if method == "ema" and (decay is None or not 0 < decay < 1):
        raise UserError(f"`--decay` must be in (0, 1) for --method ema, got {decay}")
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise UserError(f"unknown dtype `{dtype}`; choose from auto, {', '.join(OUTPUT_DTYPES)}")
    paths = resolve_inputs([str(p) for p in inputs], last)
    models = [open_model(p, allow_pickle=allow_pickle) for p in paths]
    check_compatible(models)
    out = check_output(output, overwrite, inputs=paths)
    combo = (Combination.uniform(len(models)) if method == "uniform"
             else Combination.ema(len(models), decay))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(m.nbytes for m in models), desc="average", unit="B",
                   unit_scale=True, file=sys.stderr, disable=None, mininterval=1.0)
    t0 = time.perf_counter()
    try:
        bytes_out = write_average(models, combo, out, out_dtype=None if dtype == "auto"
                                  else dtype, overwrite=overwrite,
                                  progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    for m in models:
        m.close()
    return {"inputs": [str(p) for p in paths], "output": str(out),
            "bytes_in": sum(m.nbytes for m in models), "bytes_out": bytes_out,
            "seconds": time.perf_counter() - t0}


def main(cfg) -> int:
    r = average_folders(cfg.inputs, cfg.out, cfg.method, cfg.decay, cfg.last, cfg.dtype,
                        cfg.overwrite, cfg.allow_pickle)
    gb = (r["bytes_in"] + r["bytes_out"]) / 1e9
    what = f"the last {cfg.last} checkpoints" if cfg.last else f"{len(r['inputs'])} models"
    print(f"averaged {what} ({cfg.method}) -> {r['output']} ({gb:.2f} GB read+written in "
          f"{r['seconds']:.1f} s, {gb / max(r['seconds'], 1e-9):.2f} GB/s)", file=sys.stderr)
    return 0
