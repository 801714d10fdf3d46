"""`lmalloy merge`: plan every check first (`lmalloy.merge.plan`), then stream.

Weighted averages (linear, soup, greedy soup) stream through `lmalloy.average.weighted`,
chunk by chunk. Every other method reads one tensor of each input (a reader thread
prefetches the next), computes it in fp32 (`lmalloy.merge.strategies`), casts it to the
output dtype and hands it to a writer thread that appends it to the current safetensors
shard: peak memory is a few tensors, whatever the model size. Output is atomic (temporary
folder, renamed when complete) and holds the reference's config/tokenizer/generation
files and `merge_config.yaml`, which repeats the merge.

Parameters vary by tensor as in mergekit (`lmalloy.merge.params`).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.merge.config import MergeConfig
from lmalloy.merge.plan import Plan, plan


def _progress(p: Plan):
    if not p.cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=p.bytes_in, unit="B", unit_scale=True, desc=f"merge {p.cfg.method}",
                file=sys.stderr, leave=False, disable=None)


def _write_meta(p: Plan, tmp: Path) -> None:
    from lmalloy import __version__
    from lmalloy.io.writer import copy_aux_files
    from lmalloy.merge.methods import METHODS

    if p.vocab is not None:  # the output vocabulary's tokenizer, as built
        p.vocab.tokenizer.save_pretrained(tmp)
    elif p.tokenizer_from != p.ref.path:
        copy_aux_files(p.tokenizer_from, tmp, [n for n in (
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")])
    if p.cfg.chat_template not in (None, "auto"):
        _set_chat_template(tmp, p.cfg.chat_template)
    head = [f"# written by lmalloy {__version__} merge: {p.cfg.method} "
            f"({METHODS[p.cfg.method].paper})",
            f"# {len(p.tensors)} tensors, {p.bytes_in / 1e6:.1f} MB read, "
            f"{p.bytes_out / 1e6:.1f} MB written as {p.out_dtype}; "
            f"`lmalloy merge merge_config.yaml --out DIR` repeats it"]
    head += [f"# {x}" for x in p.notes]
    (tmp / "merge_config.yaml").write_text("\n".join(head) + "\n" + p.cfg.to_yaml())
    for name, data in p.files.items():  # text, or bytes (an image)
        if isinstance(data, bytes):
            (tmp / name).write_bytes(data)
        else:
            (tmp / name).write_text(data)


def _out_config(p: Plan) -> dict:
    """The reference's config, with the output vocabulary's size where rows were re-indexed."""
    cfg = dict(p.ref.config)
    if p.vocab is not None:
        cfg["vocab_size"] = p.vocab.rows
    return cfg


def _set_chat_template(folder: Path, template: str) -> None:
    """The template as `chat_template.jinja` (what transformers 5 reads first) and in
    tokenizer_config.json."""
    import json

    (folder / "chat_template.jinja").write_text(template)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _average_inputs(p: Plan) -> tuple:
    """Linear / soup / greedy soup as a streaming weighted average: (the combination of
    each tensor, the re-indexed vocabulary rows that replace the files' rows)."""
    from lmalloy.average.weighted import Combination
    from lmalloy.merge.methods import METHODS
    from lmalloy.merge.vocab import reindexed

    weights = METHODS[p.cfg.method].weights
    by_name = {tp.name: tp for tp in p.tensors}

    def combo(name: str) -> Combination:
        tp = by_name[name]
        return Combination(tuple(weights(tp.params, tp.glob)))

    overrides = {}
    if p.vocab is not None:  # re-indexed vocabulary rows (small: a few tensors)
        for name in p.vocab.names:
            mats = reindexed(p.vocab, p.inputs, name)
            overrides.update({(i, name): mats[str(m.path)] for i, m in enumerate(p.models)})
    return combo, overrides


def execute_average(p: Plan, bar) -> None:
    """Linear / soup / greedy soup: the streaming weighted average of the models."""
    from lmalloy.average.weighted import write_average

    combo, overrides = _average_inputs(p)
    write_average(p.models, combo, p.output, ref=p.ref, overwrite=p.cfg.overwrite,
                  extra=lambda tmp: _write_meta(p, tmp),
                  metadata={"lmalloy_merge": p.cfg.method},
                  max_shard_bytes=p.cfg.max_shard_size,
                  progress=bar.update if bar is not None else None,
                  entries=[(t.name, t.dtype, t.shape) for t in p.tensors],
                  overrides=overrides, config=_out_config(p))


def _stream(p: Plan, writer, load, compute_one, bar) -> None:
    """Read tensor i+1 (a thread), compute tensor i, write tensor i−1 (a thread)."""
    with ThreadPoolExecutor(1) as rpool, ThreadPoolExecutor(1) as wpool:
        fut = rpool.submit(load, p.tensors[0]) if p.tensors else None
        pending = None
        for i, tp in enumerate(p.tensors):
            xs, b = fut.result()
            if i + 1 < len(p.tensors):
                fut = rpool.submit(load, p.tensors[i + 1])
            out = compute_one(tp, xs, b)
            del xs, b
            if pending is not None:
                pending.result()
            pending = wpool.submit(writer.write, tp.name, out)
            del out
            if bar is not None:
                bar.update(tp.nbytes_in)
        if pending is not None:
            pending.result()


def tensorwise(p: Plan, sink, bar=None) -> None:
    """Every method but the weighted averages, tensor by tensor through
    `lmalloy.merge.strategies`, into `sink` (a `ShardedWriter` or an in-memory
    `StateSink`: `write`, or `begin`/`part`/`end`)."""
    import torch

    from lmalloy.io.dtypes import torch_dtype
    from lmalloy.merge import strategies as S
    from lmalloy.merge.methods import METHODS

    cfg = p.cfg
    compute = getattr(torch, cfg.compute_dtype)
    out_dtype = torch_dtype(p.out_dtype)
    # TIES without L1 rescale is elementwise once the thresholds are known: streamed
    chunked = cfg.method == "ties" and not any(tp.glob.get("rescale") for tp in p.tensors)
    thresholds = None
    if cfg.ties_trim == "model" and cfg.method in ("ties", "dare_ties"):
        dens = [float(q["density"]) for q in p.tensors[0].params]
        thresholds = S.whole_model_thresholds(p, dens, compute)
    fn = METHODS[cfg.method].fn
    if not chunked:
        _stream(p, sink, lambda tp: S.load_inputs(p, tp, False, compute),
                lambda tp, xs, b: S.merge_tensor(p, tp, xs, b, fn=fn, compute=compute,
                                                 out_dtype=out_dtype, thresholds=thresholds),
                bar)
        return
    pool = ThreadPoolExecutor(cfg.threads) if (cfg.threads or 1) > 1 else None
    try:  # chunk by chunk, straight into the sink
        for tp in p.tensors:
            if tp.merge:
                S.ties_streamed(p, tp, sink, fn, compute, out_dtype, thresholds, pool)
            else:
                sink.write(tp.name, p.ref.read(tp.name))
            if bar is not None:
                bar.update(tp.nbytes_in)
    finally:
        if pool is not None:
            pool.shutdown()


def execute_tensorwise(p: Plan, bar) -> None:
    from lmalloy.io.writer import ShardedWriter, atomic_output, copy_aux_files, write_config

    with atomic_output(p.output, p.cfg.overwrite) as tmp:
        entries = [(t.name, t.dtype, t.shape) for t in p.tensors]
        with ShardedWriter(tmp, entries, p.cfg.max_shard_size,
                           metadata={"lmalloy_merge": p.cfg.method}) as writer:
            tensorwise(p, writer, bar)
        write_config(tmp, _out_config(p), p.out_dtype)
        copy_aux_files(p.ref.path, tmp)
        _write_meta(p, tmp)


def merge_into(p: Plan, sink) -> None:
    """The merge of a plan into an in-memory sink (`StateSink`), by the same code that
    writes a folder; torch on one thread, the inputs closed afterwards."""
    from lmalloy.average.weighted import one_torch_thread, weighted_average
    from lmalloy.merge.methods import METHODS

    try:
        with one_torch_thread():
            if METHODS[p.cfg.method].weights is not None:
                combo, overrides = _average_inputs(p)
                weighted_average(p.models, combo, sink,
                                 [(t.name, t.dtype, t.shape) for t in p.tensors], p.ref,
                                 overrides=overrides)
            else:
                tensorwise(p, sink)
    finally:
        for f in p.inputs:
            f.close()


def execute(p: Plan) -> None:
    from lmalloy.merge.methods import METHODS

    bar = _progress(p)
    try:
        if METHODS[p.cfg.method].weights is not None:
            execute_average(p, bar)
        else:
            execute_tensorwise(p, bar)
    finally:
        if bar is not None:
            bar.close()
        for f in p.inputs:
            f.close()


def merge(cfg: MergeConfig) -> Path:
    """Plan (all checks, before any tensor is read), then stream the merge into `cfg.out`.
    Returns the output path.

    Torch runs one thread (merging is memory-bound; `one_torch_thread` says why); TIES
    spreads its chunks over `--threads` Python workers instead (torch releases the GIL)."""
    import time

    from lmalloy.average.weighted import one_torch_thread
    from lmalloy.merge.lora import is_adapter, merge_adapters

    if any(is_adapter(m.model) for m in cfg.models):
        return merge_adapters(cfg)
    if cfg.method in ("cat", "svd", "bake"):
        raise UserError(f"`{cfg.method}` merges PEFT adapter folders (adapter_config.json); "
                        f"{cfg.models[0].model} is a full model")
    notes: list[str] = []
    files: dict[str, str | bytes] = {}
    if cfg.method == "greedy_soup":
        from lmalloy.merge.greedy import greedy_select

        for f in plan(cfg).inputs:  # every check before the evaluations
            f.check_seq_len(cfg.seq_len)
        cfg, notes, files = greedy_select(cfg)
    p = plan(cfg)
    p.notes, p.files = notes, files
    t0 = time.perf_counter()
    with one_torch_thread():
        execute(p)
    dt = time.perf_counter() - t0
    gb = (p.bytes_in + p.bytes_out) / 1e9
    print(f"merged {len(p.models) + (p.base is not None)} models ({cfg.method}) -> {p.output} "
          f"in {dt:.1f}s ({gb / max(dt, 1e-9):.2f} GB/s in+out)", file=sys.stderr)
    return p.output


def main(cfg: MergeConfig) -> int:
    merge(cfg)
    return 0
