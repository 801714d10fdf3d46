"""`lmalloy pretrain` and `lmalloy finetune`: validate, prepare data, train, write HF folders.

Run folder:
  config.yaml           the resolved config (compared on --resume)
  tokenizer/            the trained tokenizer (pretrain without --tokenizer)
  data/                 packed tokens (train.bin, val.bin, meta.json)
  checkpoints/step-N/   HF folder + trainer_state.pt
  final/                the final HF model
  metrics.jsonl, loss.png
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import yaml

from lmalloy.config import diff_keys
from lmalloy.errors import UserError
from lmalloy.train.config import RESUME_MUTABLE


def _check_run_folder(cfg) -> tuple[Path, int | None]:
    """Validate --out/--resume/--overwrite; returns (out, step to resume from or None)."""
    from lmalloy.io.writer import check_output
    from lmalloy.train.trainer import STATE_FILE, list_checkpoints

    out = Path(cfg.out).resolve()
    if cfg.resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume: no run to resume in {out} (no config.yaml)")
        old = yaml.safe_load(saved.read_text()) or {}
        new = cfg.model_dump(mode="json")
        changed = [k for k in diff_keys(old, new) if k.split(".")[0] not in RESUME_MUTABLE]
        if changed:
            raise UserError("--resume with a changed config: " + ", ".join(
                f"{k} ({_get(old, k)!r} -> {_get(new, k)!r})" for k in changed[:5]))
        ckpts = list_checkpoints(out)
        if not ckpts:
            raise UserError(f"--resume: {out} has no checkpoint yet (nothing to resume)")
        step, path = ckpts[-1]
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume: checkpoint {path} is corrupt ({STATE_FILE} missing)")
        return out, step
    check_output(out, cfg.overwrite, flag="--out")
    return out, None


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _check_batch(cfg, world: int) -> None:
    per_pass = cfg.seq_len * cfg.micro_batch_size * world
    if cfg.global_batch_tokens % per_pass:
        raise UserError(
            f"`--global-batch-tokens` {cfg.global_batch_tokens} must be a multiple of "
            f"--seq-len × --micro-batch-size × processes = {cfg.seq_len}×"
            f"{cfg.micro_batch_size}×{world} = {per_pass}")


def _prepare_out(out: Path, cfg, resume: bool, dist) -> None:
    _check_batch(cfg, dist.world)
    if dist.main and not resume:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        cfg.save(out / "config.yaml")
    dist.barrier()


def _data(cfg, out: Path, tokenizer_dir: Path | None, dist, vocab_size: int | None = None):
    """Load the corpus, train/load the tokenizer (rank 0), pack tokens (rank 0)."""
    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.pack import load_tokens, pack
    from lmalloy.data.tokenizer import Tok, train_tokenizer
    from lmalloy.io.writer import atomic_output
    from lmalloy.train.trainer import TrainData

    corpus = load_corpus(cfg.data, cfg.domains, cfg.exclude_domains, cfg.max_chars_per_domain,
                         quiet=not dist.main)
    tok_dir = tokenizer_dir or out / "tokenizer"
    if dist.main:
        if tokenizer_dir is None and not (tok_dir / "tokenizer.json").is_file():
            with atomic_output(tok_dir, overwrite=True) as tmp:
                train_tokenizer((d.text for d in corpus.documents), vocab_size, tmp,
                                model_max_length=cfg.seq_len)
        tok = Tok.load(tok_dir)
        pack(corpus, tok, out / "data", cfg.val_fraction, cfg.seed)
    dist.barrier()
    tok = Tok.load(tok_dir)
    import json

    meta = json.loads((out / "data" / "meta.json").read_text())
    return TrainData(out / "data", meta, load_tokens(out / "data", "train", meta),
                     load_tokens(out / "data", "val", meta), tok.token_bytes(), tok_dir), tok


def _train(cfg, model, data, out: Path, resume_step: int | None, dist, callbacks=()) -> dict:
    import torch

    from lmalloy.train.plot import plot_run
    from lmalloy.train.trainer import Trainer, list_checkpoints

    trainer = Trainer(cfg, model, data, out, dist, list(callbacks))
    if resume_step is not None:
        path = dict(list_checkpoints(out))[resume_step]
        trainer.load_checkpoint(path)
        trainer.truncate_metrics(trainer.step)
        if dist.main:
            print(f"resuming from {path.name}", file=sys.stderr)
    elif dist.main:
        print(f"training {trainer.arch}: {trainer.n_params / 1e6:.2f}M parameters, "
              f"{len(data.train):,} train tokens, {trainer.total_steps} steps of "
              f"{cfg.global_batch_tokens:,} tokens ({trainer.accum} accumulation step(s), "
              f"{dist.world} process(es))", file=sys.stderr)
    last = trainer.fit()
    state = trainer.full_state_dict()
    if dist.main:
        from lmalloy.io.writer import atomic_output

        with atomic_output(out / "final", overwrite=True) as tmp:
            trainer.write_hf(tmp, state)
            for cb in trainer.callbacks:
                if hasattr(cb, "save"):
                    cb.save(trainer, tmp)
        plot_run(trainer.history or _read_metrics(out), out / "loss.png")
        if trainer.moe:
            from lmalloy.moe.train import plot_expert_load

            plot_expert_load(_read_metrics(out), out / "expert_load.png")
        raw = last.get("raw", {})
        if raw:
            print(f"done: val loss {raw['loss']:.4f}, ppl {raw['ppl']:.2f}, bpb "
                  f"{raw['bpb']:.4f} -> {out / 'final'}", file=sys.stderr)
    dist.barrier()
    del torch
    return last


def _read_metrics(out: Path) -> list[dict]:
    import json

    p = out / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def build_callbacks(cfg) -> list:
    """Averagers and other trainer callbacks named by the config (none by default)."""
    hook = getattr(cfg, "callbacks_factory", None)
    callbacks = hook() if callable(hook) else []
    if getattr(cfg, "average", None):
        from lmalloy.average.averagers import Averaging

        callbacks.append(Averaging(cfg.average, cfg.ema, cfg.swa, cfg.lawa))
    return callbacks


def pretrain(cfg) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.data.tokenizer import Tok
    from lmalloy.train.presets import PRESETS, is_moe, model_kwargs
    from lmalloy.train.trainer import Dist

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.preset not in PRESETS:
        model_kwargs(cfg.preset, 0)  # raises the unknown-preset error
    limit = {**PRESETS[cfg.preset], **cfg.model_overrides}.get("max_position_embeddings", 2048)
    if cfg.seq_len > limit:
        raise UserError(f"`--seq-len` {cfg.seq_len} is above the {cfg.preset} model's "
                        f"maximum of {limit} positions")
    tok_dir = None
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer)
        Tok.load(tok_dir)
    out, resume_step = _check_run_folder(cfg)
    dist = Dist.init()
    try:
        from lmalloy.data.corpus import load_corpus

        load_corpus(cfg.data, cfg.domains, cfg.exclude_domains, cfg.max_chars_per_domain,
                    quiet=True)  # fail on a bad corpus before anything is written
        _prepare_out(out, cfg, resume_step is not None, dist)
        data, tok = _data(cfg, out, tok_dir, dist, cfg.vocab_size)
        kw = model_kwargs(cfg.preset, tok.vocab_size, cfg.model_overrides)
        kw.update(bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        torch.manual_seed(cfg.seed)
        if is_moe(kw):  # a Mixtral preset
            from transformers import MixtralConfig, MixtralForCausalLM

            model = MixtralForCausalLM(MixtralConfig(**kw))
        else:
            model = LlamaForCausalLM(LlamaConfig(**kw))
        _train(cfg, model, data, out, resume_step, dist, build_callbacks(cfg))
    finally:
        dist.close()
    return 0


def apply_freezing(model, freeze: list[str], train_only: list[str]) -> int:
    """Set requires_grad by regex patterns; returns the number of trainable parameters."""
    names = [n for n, _ in model.named_parameters()]
    for pat in [*freeze, *train_only]:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise UserError(f"bad pattern `{pat}`: {e}") from None
        if not any(rx.search(n) for n in names):
            raise UserError(f"pattern `{pat}` matches no parameter (e.g. {names[0]})")
    for n, p in model.named_parameters():
        if train_only:
            p.requires_grad = any(re.search(t, n) for t in train_only)
        if any(re.search(f, n) for f in freeze):
            p.requires_grad = False
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise UserError("--freeze/--train-only leave no trainable parameter")
    return n


def finetune(cfg) -> int:
    import torch

    from lmalloy.data.tokenizer import Tok
    from lmalloy.eval.perplexity import load_causal_lm
    from lmalloy.io.folder import open_model
    from lmalloy.train.trainer import Dist

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    src = open_model(cfg.init_from, allow_pickle=cfg.allow_pickle)
    limit = src.config.get("max_position_embeddings")
    if limit and cfg.seq_len > limit:
        raise UserError(f"`--seq-len` {cfg.seq_len} is above {cfg.init_from}'s maximum of "
                        f"{limit} positions")
    Tok.load(cfg.init_from)
    out, resume_step = _check_run_folder(cfg)
    if Path(cfg.init_from).resolve() in [out, *out.parents] or out in Path(
            cfg.init_from).resolve().parents:
        raise UserError(f"--out {out} overlaps --init-from {cfg.init_from}")
    model = load_causal_lm(cfg.init_from, cfg.allow_pickle)
    n_train = apply_freezing(model, cfg.freeze, cfg.train_only)
    dist = Dist.init()
    try:
        from lmalloy.data.corpus import load_corpus

        load_corpus(cfg.data, cfg.domains, cfg.exclude_domains, cfg.max_chars_per_domain,
                    quiet=True)
        _prepare_out(out, cfg, resume_step is not None, dist)
        data, _tok = _data(cfg, out, Path(cfg.init_from), dist)
        if dist.main and n_train < sum(p.numel() for p in model.parameters()):
            print(f"training {n_train:,} of {sum(p.numel() for p in model.parameters()):,} "
                  "parameters", file=sys.stderr)
        _train(cfg, model, data, out, resume_step, dist, build_callbacks(cfg))
    finally:
        dist.close()
    return 0
