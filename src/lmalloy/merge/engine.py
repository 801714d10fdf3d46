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
    """The reference's config, with the output vocabulary's size where rows were re-indexed
    (a `StackPlan` carries its own: the stacked layer count)."""
    if getattr(p, "config", None) is not None:
        return dict(p.config)
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


def write_average(p: Plan, writer, bar) -> None:
    """Linear / soup / greedy soup: the streaming weighted average of the models."""
    from lmalloy.average.weighted import Combination, weighted_average
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
    weighted_average(p.models, combo, writer, [(t.name, t.dtype, t.shape) for t in p.tensors],
                     p.ref, bar.update if bar is not None else None, overrides)


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


def _write_ties_streamed(p: Plan, writer, compute, out_dtype, thresholds, bar) -> None:
    from lmalloy.merge import strategies as S
    from lmalloy.merge.fused import Kernels, want_compile

    kernels = Kernels(want_compile(p.cfg.compile, p.bytes_in))

    pool = ThreadPoolExecutor(p.cfg.threads) if (p.cfg.threads or 1) > 1 else None
    try:
        for tp in p.tensors:
            if tp.merge:
                S.ties_streamed(p, tp, writer, compute, out_dtype, thresholds, pool, kernels)
            else:
                writer.write(tp.name, p.ref.read(tp.name))
            if bar is not None:
                bar.update(tp.nbytes_in)
    finally:
        if pool is not None:
            pool.shutdown()


def write_tensorwise(p: Plan, writer, bar) -> None:
    """Every other method: tensor by tensor through `lmalloy.merge.strategies`."""
    import torch

    from lmalloy.io.dtypes import torch_dtype
    from lmalloy.merge import strategies as S
    from lmalloy.merge.methods import METHODS

    cfg = p.cfg
    compute = getattr(torch, cfg.compute_dtype)
    out_dtype = torch_dtype(p.out_dtype)
    thresholds = None
    if cfg.ties_trim == "model" and cfg.method in ("ties", "dare_ties"):
        dens = [float(q["density"]) for q in p.tensors[0].params]
        thresholds = S.whole_model_thresholds(p, dens, compute)
    fn = METHODS[cfg.method].fn
    # TIES without L1 rescale is elementwise once the thresholds are known: streamed
    if cfg.method == "ties" and not any(tp.glob.get("rescale") for tp in p.tensors):
        _write_ties_streamed(p, writer, compute, out_dtype, thresholds, bar)
        return

    def load(tp):
        return S.load_inputs(p, tp, False, compute)

    def compute_one(tp, xs, b):
        return S.merge_tensor(p, tp, xs, b, fn=fn, compute=compute, out_dtype=out_dtype,
                              thresholds=thresholds)

    _stream(p, writer, load, compute_one, bar)


def write_tensors(p: Plan, writer, bar=None) -> None:
    """The plan's tensors, in order, into an open `ShardedWriter` (or any sink)."""
    from lmalloy.merge.methods import METHODS

    if METHODS[p.cfg.method].weights is not None:
        write_average(p, writer, bar)
    else:
        write_tensorwise(p, writer, bar)


def merge_into(p: Plan, sink) -> None:
    """The merge of a plan into an in-memory sink (`StateSink`), by the same code that
    writes a folder; torch on one thread, the inputs closed afterwards."""
    from lmalloy.average.weighted import one_torch_thread

    try:
        with one_torch_thread():
            write_tensors(p, sink)
    finally:
        for f in p.inputs:
            f.close()


def execute(p) -> None:
    """Write a `Plan` (or a `StackPlan`: its slices' plans one after another) to its output
    folder, atomically."""
    from lmalloy.io.writer import ShardedWriter, atomic_output, copy_aux_files, write_config

    bar = _progress(p)
    try:
        with atomic_output(p.output, p.cfg.overwrite) as tmp:
            entries = [(t.name, t.dtype, t.shape) for t in p.tensors]
            with ShardedWriter(tmp, entries, p.cfg.max_shard_size,
                               metadata={"lmalloy_merge": p.cfg.method}) as writer:
                for part in getattr(p, "parts", [p]):
                    write_tensors(part, writer, bar)
            write_config(tmp, _out_config(p), p.out_dtype)
            copy_aux_files(p.ref.path, tmp)
            _write_meta(p, tmp)
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
    if cfg.method in ("cat", "svd", "bake") and cfg.models:
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
    p.notes += notes
    p.files.update(files)
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
