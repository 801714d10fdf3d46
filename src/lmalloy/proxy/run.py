"""`lmalloy proxy generate` and `lmalloy proxy eval`.

Both validate every input (folders, tokenizers, α, prompt files and lengths, sampling
options) before generating or evaluating anything, and `generate --out` writes its JSONL
atomically, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from lmalloy.data.jsonl import iter_jsonl, read_choices
from lmalloy.errors import UserError


def read_prompts(path: str) -> list[str]:
    """Prompts of a JSONL file: one {"prompt": ...} object or JSON string per line."""
    prompts = []
    for n, obj in iter_jsonl(path, "prompt file"):
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, str):
            prompts.append(obj)
        else:
            raise UserError(f"{path} line {n}: expected a JSON string or an object with a "
                            "string `prompt`")
    if not prompts:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return prompts


def _load(cfg, prompts=()):
    from lmalloy.proxy.model import ProxyTuned

    return ProxyTuned.from_pretrained(cfg.large, cfg.tuned, cfg.untuned, cfg.alphas(),
                                      formats=cfg.formats(), tokenizer=cfg.tokenizer,
                                      dtype=cfg.dtype, device=cfg.device,
                                      allow_pickle=cfg.allow_pickle, prompts=prompts,
                                      draft=getattr(cfg, "draft", None),
                                      speculative=getattr(cfg, "speculative", None))


def generate_main(cfg) -> int:
    prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts)
    from lmalloy.io.writer import atomic_write_text, check_output_file

    out = check_output_file(cfg.out, cfg.overwrite) if cfg.out else None
    proxy = _load(cfg, prompts)  # every prompt fits before the first weight is read
    stream = out is None and not cfg.json_output and len(prompts) == 1
    results = []
    for s in range(0, len(prompts), cfg.batch_size):
        batch = prompts[s : s + cfg.batch_size]
        gens = proxy.generate(
            batch, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
            stop=cfg.stop, seed=cfg.seed + s, stop_at_eos=cfg.stop_at_eos,
            speculative=cfg.speculative, adaptive_k=cfg.adaptive_k,
            on_text=(lambda _i, t: (sys.stdout.write(t), sys.stdout.flush())) if stream
            else None)
        for g in gens:
            rec = {"prompt": g.prompt, "text": g.text, "tokens": len(g.tokens),
                   "finish_reason": g.finish_reason}
            results.append(rec)
            if out is None and cfg.json_output:
                print(json.dumps(rec, ensure_ascii=False), flush=True)
            elif out is None and not stream:
                if len(prompts) > 1:
                    print(f"--- prompt {len(results)} ({g.finish_reason})")
                print(g.text, flush=True)
    if stream:
        print()
    if cfg.speculative and proxy.last_speculative:
        st = proxy.last_speculative
        print(f"speculative: {st['accepted']}/{st['drafted']} drafts kept "
              f"({st['acceptance_rate']:.2f}) in {st['rounds']} rounds", file=sys.stderr)
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in results), overwrite=cfg.overwrite)
        print(f"wrote {len(results)} generations to {out}", file=sys.stderr)
    return 0


def gap_closed(large: float, proxy: float, tuned_large: float) -> float:
    """(proxy − large) / (tuned_large − large): 1 = proxy-tuning matches direct tuning."""
    d = tuned_large - large
    return (proxy - large) / d if d else float("nan")


def _check_eval(cfg) -> None:
    from lmalloy.io.folder import context_length
    from lmalloy.io.tokenizer_files import first_vocab_difference, vocab_of

    for p in [cfg.large, *cfg.tuned, *cfg.untuned] + ([cfg.tuned_large] if cfg.tuned_large
                                                      else []):
        from lmalloy.proxy.model import check_folder

        conf = check_folder(p, cfg.allow_pickle)
        limit = context_length(conf)
        if cfg.perplexity and limit and cfg.seq_len > limit:
            raise UserError(f"`--seq-len` {cfg.seq_len} is above {p}'s context window of "
                            f"{limit} tokens")
    if cfg.tuned_large:  # from the files, before any weight loads
        va, vb = vocab_of(cfg.large), vocab_of(cfg.tuned_large)
        diff = first_vocab_difference(va, vb) if va is not None and vb is not None else None
        if diff:
            raise UserError(f"tokenizers of {cfg.large} and {cfg.tuned_large} differ: first "
                            f"differing token at {diff}")


def _tuned_large(cfg, proxy):
    """The directly tuned large model as a one-member ensemble (or None)."""
    if not cfg.tuned_large:
        return None
    from lmalloy.io.models import load_causal_lm
    from lmalloy.proxy.model import (
        Member,
        ProxyTuned,
        context_length,
        first_vocab_difference,
        load_tokenizer,
    )

    tl_tok = load_tokenizer(cfg.tuned_large) if (Path(cfg.tuned_large) / "tokenizer.json"
                                                ).is_file() else proxy.tokenizer
    diff = first_vocab_difference(proxy.tokenizer.get_vocab(), tl_tok.get_vocab())
    if diff:
        raise UserError(f"tokenizers of {cfg.large} and {cfg.tuned_large} differ: first "
                        f"differing token at {diff}")
    model = load_causal_lm(cfg.tuned_large, cfg.allow_pickle, cfg.dtype).to(cfg.device)
    return ProxyTuned(Member(cfg.tuned_large, "large", model, tl_tok, cfg.large_format,
                             context_length(model.config)), [], [])


def _perplexity_rows(cfg, corpus, fns: dict, rows: dict) -> None:
    """Loss, perplexity and bits per byte of each logits function, into `rows`."""
    from lmalloy.data.cache import packed
    from lmalloy.data.pack import load_tokens
    from lmalloy.data.tokenizer import Tok
    from lmalloy.train.heldout import evaluate

    tok = Tok.load(cfg.tokenizer or cfg.large)
    folder, meta = packed(corpus, tok, cfg.val_fraction, cfg.seed)
    splits = ["train", "val"] if cfg.split == "all" else [cfg.split]
    tb = tok.token_bytes()
    for name, fn in fns.items():
        nll = n = nbytes = 0.0
        for split in splits:
            tokens = load_tokens(folder, split, meta)
            spans = {d: tuple(v[split]) for d, v in meta["domains"].items()}
            r = evaluate(None, tokens, spans, cfg.seq_len, cfg.eval_tokens // len(splits),
                         tb, cfg.batch_size, logits_fn=fn)
            nll += r["nll"]
            n += r["tokens"]
            nbytes += r["bytes"]
        if not n:
            raise UserError(f"no {cfg.split} tokens to evaluate (documents shorter than "
                            f"--seq-len {cfg.seq_len}?)")
        rows[name].update(loss=nll / n, ppl=math.exp(min(nll / n, 50)), tokens=int(n),
                          bpb=nll / math.log(2) / nbytes if nbytes else float("nan"))


def _print_eval(rows: dict, gap: dict) -> None:
    def f(r: dict, k: str, spec: str) -> str:
        return format(r[k], spec) if k in r else "-"

    print(f"{'':<12} {'loss':>8} {'ppl':>9} {'bpb':>7} {'accuracy':>9}  model")
    for name, r in rows.items():
        print(f"{name:<12} {f(r, 'loss', '8.4f'):>8} {f(r, 'ppl', '9.2f'):>9} "
              f"{f(r, 'bpb', '7.4f'):>7} {f(r, 'accuracy', '9.3f'):>9}  {r['model']}")
    for k, v in gap.items():
        print(f"fraction of the large -> tuned-large gap closed ({k}): {v:.3f}")


def eval_main(cfg) -> int:
    import torch

    from lmalloy.proxy.model import ProxyTuned

    items = read_choices(cfg.choices) if cfg.choices else None
    _check_eval(cfg)
    corpus = None
    if cfg.perplexity:
        from lmalloy.data.corpus import corpus_from

        corpus = corpus_from(cfg)
    proxy = _load(cfg)
    tl = _tuned_large(cfg, proxy)
    large_alone = ProxyTuned(proxy.large, [], [])  # the same model, no pairs run
    steer = " + ".join(f"{a:g}*({t} - {u})" for a, t, u in zip(
        proxy.alphas, cfg.tuned, cfg.untuned, strict=True))
    selectors = {"large": large_alone, "proxy-tuned": proxy}
    rows: dict[str, dict] = {"large": {"model": cfg.large},
                             "proxy-tuned": {"model": f"{cfg.large} + {steer}"}}
    if tl is not None:
        selectors["tuned large"] = tl
        rows["tuned large"] = {"model": cfg.tuned_large}
    if corpus is not None:
        _perplexity_rows(cfg, corpus, {k: (lambda x, m=m: m.logits(x).to(x.device))
                                       for k, m in selectors.items()}, rows)
    if items is not None:
        with torch.no_grad():
            for k, m in selectors.items():
                rows[k]["accuracy"] = m.choose(items, cfg.batch_size, cfg.normalize)["accuracy"]
    gap = {}
    if tl is not None:
        for key in ("loss", "accuracy"):
            if key in rows["large"]:
                gap[key] = gap_closed(rows["large"][key], rows["proxy-tuned"][key],
                                      rows["tuned large"][key])
    if cfg.json_output:
        print(json.dumps({"rows": rows, "gap_closed": gap}, indent=2))
    else:
        _print_eval(rows, gap)
    return 0
