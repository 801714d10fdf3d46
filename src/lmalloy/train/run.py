"""`lmalloy pretrain` and `lmalloy finetune`: validate, prepare data, train, write HF folders.

The run folder's layout is `lmalloy.io.runs`. Everything a config or a header can reveal
is checked before the run folder is touched. A new run is written in place (so a killed
run can be resumed); `--overwrite` trains into a hidden folder beside the old run and
swaps it in only when the new run is complete, so a failed or killed run leaves the old
one as it was. `--resume` continues the saved run: its config.yaml, with only the flags
given on this command line applied (and refused where they would change the run).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import yaml

from lmalloy.config import deep_merge, diff_keys, validate
from lmalloy.errors import UserError
from lmalloy.train.config import RESUME_MUTABLE


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def resume_config(cfg, out: Path):
    """The saved run config with the flags given now applied; refuses changed run keys."""
    saved = out / "config.yaml"
    if not saved.is_file():
        raise UserError(f"--resume: no run to resume in {out} (no config.yaml)")
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"--resume: {saved} is not valid YAML") from None
    given = {k: v for k, v in cfg.given.items() if k not in ("out",)}
    merged = deep_merge(old, given)
    new = validate(type(cfg), merged)
    new_d = new.model_dump(mode="json")
    changed = [k for k in diff_keys(old, new_d)
               if k.split(".")[0] not in RESUME_MUTABLE | {"out"}]
    if changed:
        raise UserError("--resume with a changed config: " + ", ".join(
            f"{k} ({_get(old, k)!r} -> {_get(new_d, k)!r})" for k in changed[:5])
            + "; resume with the run's own settings, or start a new run")
    return new


def check_run_folder(cfg):
    """Validate --out/--resume/--overwrite; returns (cfg, out, step to resume from or None)."""
    import os

    from lmalloy.io.runs import STATE_FILE, list_checkpoints
    from lmalloy.io.writer import check_output

    if cfg.distributed == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise UserError("`--distributed fsdp` shards the model across the processes that "
                        "torchrun starts: run `torchrun --nproc-per-node N -m lmalloy ...`")
    out = Path(cfg.out).resolve()
    if not cfg.resume:
        check_output(out, cfg.overwrite)
        return cfg, out, None
    cfg = resume_config(cfg, out)
    ckpts = list_checkpoints(out)
    if not ckpts:
        raise UserError(f"--resume: {out} has no checkpoint yet (nothing to resume)")
    step, path = ckpts[-1]
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume: checkpoint {path} is corrupt ({STATE_FILE} missing)")
    return cfg, out, step


def check_batch(cfg, world: int) -> None:
    per_pass = cfg.seq_len * cfg.micro_batch_size * world
    if cfg.global_batch_tokens % per_pass:
        raise UserError(
            f"`--global-batch-tokens` {cfg.global_batch_tokens} must be a multiple of "
            f"--seq-len × --micro-batch-size × processes = {cfg.seq_len}×"
            f"{cfg.micro_batch_size}×{world} = {per_pass}")


class RunFolder:
    """Where a run writes (`work`) and where it ends up (`out`).

    A fresh run works in `out` itself; `--overwrite` of an existing run works in a hidden
    sibling that `publish` swaps in at the end. `discard` removes a folder this run
    created when it fails before training starts (nothing of value in it yet).
    """

    def __init__(self, out: Path, cfg, resume: bool, dist):
        import os

        self.out, self.dist = out, dist
        self.swap = bool(cfg.overwrite and out.exists() and not resume)
        # one name on every rank: rank 0's process id (a stale folder's owner is then known)
        owner = dist.broadcast(os.getpid())
        self.work = out.parent / f".{out.name}.tmp-{owner}-run" if self.swap else out
        self.created = not resume and not out.exists()
        if dist.main and not resume:
            from lmalloy.io.writer import clean_stale_tmp

            clean_stale_tmp(out.parent)
            if self.swap and self.work.exists():
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True, exist_ok=not self.swap)
            cfg.save(self.work / "config.yaml")
        dist.barrier()

    def discard(self) -> None:
        if self.dist.main and (self.swap or self.created):
            shutil.rmtree(self.work, ignore_errors=True)

    def publish(self) -> None:
        if self.dist.main and self.swap:
            import os
            import uuid

            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
            os.rename(self.work, self.out)
            shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()


def _data(cfg, out: Path, tokenizer_dir: Path | None, dist, vocab_size: int | None = None):
    """Load the corpus, train/load the tokenizer (rank 0), pack tokens (rank 0).

    A trained tokenizer sees the training documents only (the split is by document and
    does not depend on the tokenizer: `lmalloy.data.pack.train_documents`). JSONL/Parquet
    files are streamed; their every line is checked (`scan`) before the tokenizer trains."""
    from lmalloy.data.corpus import corpus_from, scan
    from lmalloy.data.pack import load_tokens, pack, read_meta, train_documents
    from lmalloy.data.tokenizer import Tok, train_tokenizer
    from lmalloy.io.writer import atomic_output
    from lmalloy.train.trainer import TrainData

    corpus = corpus_from(cfg, quiet=not dist.main)
    tok_dir = tokenizer_dir or out / "tokenizer"
    if dist.main:
        if tokenizer_dir is None and not (tok_dir / "tokenizer.json").is_file():
            scan(corpus)
            with atomic_output(tok_dir, overwrite=True) as tmp:
                train_tokenizer(train_documents(corpus, cfg.val_fraction, cfg.seed),
                                vocab_size, tmp, model_max_length=cfg.seq_len)
        pack(corpus, Tok.load(tok_dir), out / "data", cfg.val_fraction, cfg.seed)
    dist.barrier()
    tok = Tok.load(tok_dir)
    meta = read_meta(out / "data")
    return TrainData(out / "data", meta, load_tokens(out / "data", "train", meta),
                     load_tokens(out / "data", "val", meta), tok.token_bytes(), tok_dir), tok


def _write_final(trainer, out: Path) -> None:
    from lmalloy.io.runs import METRICS_FILE
    from lmalloy.train.moe import plot_expert_load
    from lmalloy.train.plot import plot_run, read_metrics

    with trainer.dist.atomic_output(out / "final") as tmp:
        trainer.write_hf(tmp)
        for cb in trainer.callbacks:
            if hasattr(cb, "save"):
                cb.save(trainer, tmp)
    if not trainer.dist.main:
        return
    records = read_metrics(out / METRICS_FILE)
    plot_run(trainer.history or records, out / "loss.png")
    if trainer.moe:
        plot_expert_load(records, out / "expert_load.png")


def _train(cfg, model, data, run: RunFolder, resume_step: int | None, dist, callbacks=()
           ) -> dict:
    from lmalloy.io.runs import list_checkpoints
    from lmalloy.train.trainer import Trainer

    out = run.work
    try:
        trainer = Trainer(cfg, model, data, out, dist, list(callbacks))
    except UserError:
        run.discard()
        raise
    if resume_step is not None:
        path = dict(list_checkpoints(out))[resume_step]
        trainer.load_checkpoint(path)
        trainer.truncate_metrics(trainer.step)
        if dist.main:
            was = trainer.resumed_from_world
            print(f"resuming from {path.name}" + (
                f" (written by {was} process(es), resharded for {dist.world})"
                if was != dist.world else ""), file=sys.stderr)
    elif dist.main:
        print(f"training {trainer.arch}: {trainer.n_params / 1e6:.2f}M parameters, "
              f"{len(data.train):,} train tokens, {trainer.total_steps} steps of "
              f"{cfg.global_batch_tokens:,} tokens ({trainer.accum} accumulation step(s), "
              f"{dist.world} process(es))", file=sys.stderr)
    last = trainer.fit()
    _write_final(trainer, out)
    run.publish()
    raw = last.get("raw", {})
    if dist.main and raw:
        print(f"done: val loss {raw['loss']:.4f}, ppl {raw['ppl']:.2f}, bpb "
              f"{raw['bpb']:.4f} -> {run.out / 'final'}", file=sys.stderr)
    return last


def build_callbacks(cfg, world: int = 1) -> list:
    """Averagers and other trainer callbacks named by the config (none by default), for a
    run of `world` processes."""
    hook = getattr(cfg, "callbacks_factory", None)
    callbacks = hook() if callable(hook) else []
    if getattr(cfg, "average", None):
        from lmalloy.average.averagers import Averaging

        callbacks.append(Averaging(cfg.average, cfg.ema, cfg.swa, cfg.lawa, world))
    return callbacks


def _check_pretrain(cfg) -> Path | None:
    """Every pretrain check a config reveals; returns the given tokenizer folder."""
    from lmalloy.data.tokenizer import Tok
    from lmalloy.train.presets import PRESETS, check_overrides, model_kwargs

    if cfg.preset not in PRESETS:
        model_kwargs(cfg.preset, 0)  # raises the unknown-preset error
    check_overrides(cfg.preset, cfg.model_overrides)
    limit = {**PRESETS[cfg.preset], **cfg.model_overrides}.get("max_position_embeddings", 2048)
    if cfg.seq_len > limit:
        raise UserError(f"`--seq-len` {cfg.seq_len} is above the {cfg.preset} model's "
                        f"maximum of {limit} positions")
    if cfg.tokenizer:
        Tok.load(cfg.tokenizer)
        return Path(cfg.tokenizer)
    return None


def _new_model(cfg, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from lmalloy.train.presets import is_moe, model_kwargs

    kw = model_kwargs(cfg.preset, tok.vocab_size, cfg.model_overrides)
    kw.update(bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(cfg.seed)
    if is_moe(kw):  # a Mixtral preset
        return MixtralForCausalLM(MixtralConfig(**kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


def _run(cfg, out: Path, resume_step, dist, tok_dir: Path | None, make_model) -> None:
    """The shared tail of pretrain and finetune: corpus check, folder, data, model, train."""
    from lmalloy.data.corpus import corpus_from

    check_batch(cfg, dist.world)
    corpus_from(cfg, quiet=True)  # fail on a bad corpus before anything is written
    run = RunFolder(out, cfg, resume_step is not None, dist)
    try:
        data, tok = _data(cfg, run.work, tok_dir, dist, getattr(cfg, "vocab_size", None))
        model = make_model(tok)
    except BaseException:
        run.discard()
        raise
    _train(cfg, model, data, run, resume_step, dist, build_callbacks(cfg, dist.world))


def pretrain(cfg) -> int:
    from lmalloy.train.dist import Dist

    cfg, out, resume_step = check_run_folder(cfg)
    tok_dir = _check_pretrain(cfg)
    dist = Dist.init(cfg.dist_timeout, cfg.device)
    try:
        _run(cfg, out, resume_step, dist, tok_dir, lambda tok: _new_model(cfg, tok))
    finally:
        dist.close()
    return 0


def check_patterns(names: list[str], freeze: list[str], train_only: list[str]) -> None:
    """UserError for a `--freeze`/`--train-only` regex that is invalid or matches nothing."""
    for pat in [*freeze, *train_only]:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise UserError(f"bad pattern `{pat}`: {e}") from None
        if not any(rx.search(n) for n in names):
            raise UserError(f"pattern `{pat}` matches no parameter (e.g. {names[0]})")


def apply_freezing(model, freeze: list[str], train_only: list[str]) -> int:
    """Set requires_grad by regex patterns; returns the number of trainable parameters."""
    check_patterns([n for n, _ in model.named_parameters()], freeze, train_only)
    for n, p in model.named_parameters():
        if train_only:
            p.requires_grad = any(re.search(t, n) for t in train_only)
        if any(re.search(f, n) for f in freeze):
            p.requires_grad = False
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise UserError("--freeze/--train-only leave no trainable parameter")
    return n


def _check_finetune(cfg, out: Path) -> None:
    """Every finetune check the base's headers, config and tokenizer reveal."""
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.folder import loaded_names, open_model

    src = open_model(cfg.base_model, allow_pickle=cfg.allow_pickle)
    src.check_seq_len(cfg.seq_len)
    check_patterns(loaded_names(src.tensors), cfg.freeze, cfg.train_only)
    Tok.load(cfg.base_model)
    base = Path(cfg.base_model).resolve()
    if base in [out, *out.parents] or out in base.parents:
        raise UserError(f"--out {out} overlaps --base-model {cfg.base_model}")


def finetune(cfg) -> int:
    from lmalloy.io.models import load_causal_lm
    from lmalloy.train.dist import Dist

    cfg, out, resume_step = check_run_folder(cfg)
    _check_finetune(cfg, out)
    if cfg.device is not None:  # before the base model loads
        from lmalloy.io.models import check_device

        check_device(cfg.device)
    model = load_causal_lm(cfg.base_model, cfg.allow_pickle)
    n_train = apply_freezing(model, cfg.freeze, cfg.train_only)
    total = sum(p.numel() for p in model.parameters())
    dist = Dist.init(cfg.dist_timeout, cfg.device)
    try:
        if dist.main and n_train < total:
            print(f"training {n_train:,} of {total:,} parameters", file=sys.stderr)
        _run(cfg, out, resume_step, dist, Path(cfg.base_model), lambda _tok: model)
    finally:
        dist.close()
    return 0
