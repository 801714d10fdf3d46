"""`lmalloy proxy generate` and `lmalloy proxy eval`.

Both validate every input (folders, tokenizers, α, prompt files and lengths, sampling
options) before generating or evaluating anything, and `generate --out` writes its JSONL
atomically, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from lmalloy.data.jsonl import iter_jsonl
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


def read_choices(path: str) -> list[dict]:
    """Multiple-choice items: {"context": str, "choices": [str, ...], "answer": int}."""
    items = []
    for n, it in iter_jsonl(path, "choices file"):
        ok = (isinstance(it, dict) and isinstance(it.get("context"), str)
              and isinstance(it.get("choices"), list) and len(it["choices"]) >= 2
              and all(isinstance(c, str) for c in it["choices"])
              and isinstance(it.get("answer"), int) and 0 <= it["answer"] < len(it["choices"]))
        if not ok:
            raise UserError(f"{path} line {n}: expected {{\"context\": str, \"choices\": [2 or "
                            "more str], \"answer\": index}}")
        items.append(it)
    if not items:
        raise UserError(f"{path}: no items (the file is empty)")
    return items


def _check_out_file(out: str, overwrite: bool) -> Path:
    p = Path(out)
    if p.is_dir():
        raise UserError(f"--out {out} is a folder; expected a .jsonl file path")
    if p.exists() and not overwrite:
        raise UserError(f"--out {out} exists (pass --overwrite to replace it)")
    if not p.parent.exists():
        raise UserError(f"--out {out}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise UserError(f"--out {out}: folder {p.parent} is not writable")
    return p


def _load(cfg):
    import torch

    from lmalloy.proxy.model import ProxyTuned

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return ProxyTuned.from_pretrained(cfg.large, cfg.tuned, cfg.untuned, cfg.alphas(),
                                      formats=cfg.formats(), tokenizer=cfg.tokenizer,
                                      dtype=cfg.dtype, device=cfg.device,
                                      allow_pickle=cfg.allow_pickle)


def generate_main(cfg) -> int:
    prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts)
    out = _check_out_file(cfg.out, cfg.overwrite) if cfg.out else None
    proxy = _load(cfg)
    proxy.check_lengths(prompts)  # every prompt fits before the first token is generated
    stream = out is None and not cfg.json_output and len(prompts) == 1
    results = []
    for s in range(0, len(prompts), cfg.batch_size):
        batch = prompts[s : s + cfg.batch_size]
        gens = proxy.generate(
            batch, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
            stop=cfg.stop, seed=cfg.seed + s, stop_at_eos=cfg.stop_at_eos,
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
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {len(results)} generations to {out}", file=sys.stderr)
    return 0


def gap_closed(large: float, proxy: float, tuned_large: float) -> float:
    """(proxy − large) / (tuned_large − large): 1 = proxy-tuning matches direct tuning."""
    d = tuned_large - large
    return (proxy - large) / d if d else float("nan")


def eval_main(cfg) -> int:
    import torch

    from lmalloy.data.tokenizer import Tok
    from lmalloy.eval.perplexity import evaluate, load_causal_lm
    from lmalloy.proxy.model import (
        Member,
        ProxyTuned,
        check_folder,
        context_length,
        first_vocab_difference,
        load_tokenizer,
    )

    items = read_choices(cfg.choices) if cfg.choices else None
    for p in [cfg.large, *cfg.tuned, *cfg.untuned] + ([cfg.tuned_large] if cfg.tuned_large
                                                      else []):
        conf = check_folder(p, cfg.allow_pickle)
        limit = conf.get("max_position_embeddings")
        if cfg.perplexity and limit and cfg.seq_len > limit:
            raise UserError(f"`--seq-len` {cfg.seq_len} is above {p}'s context window of "
                            f"{limit} tokens")
    if cfg.perplexity:
        from lmalloy.data.corpus import load_corpus

        corpus = load_corpus(cfg.data, cfg.domains, cfg.exclude_domains,
                             cfg.max_chars_per_domain)
    proxy = _load(cfg)
    tl = None
    if cfg.tuned_large:
        tl_tok = load_tokenizer(cfg.tuned_large) if (Path(cfg.tuned_large) / "tokenizer.json"
                                                    ).is_file() else proxy.tokenizer
        diff = first_vocab_difference(proxy.tokenizer.get_vocab(), tl_tok.get_vocab())
        if diff:
            raise UserError(f"tokenizers of {cfg.large} and {cfg.tuned_large} differ: first "
                            f"differing token at {diff}")
        model = load_causal_lm(cfg.tuned_large, cfg.allow_pickle, cfg.dtype).to(cfg.device)
        tl = ProxyTuned(Member(cfg.tuned_large, "large", model, tl_tok, cfg.large_format,
                               context_length(model.config)), [], [])
    large_alone = ProxyTuned(proxy.large, [], [])  # the same model, no pairs run
    steer = " + ".join(f"{a:g}*({t} - {u})" for a, t, u in zip(
        proxy.alphas, cfg.tuned, cfg.untuned, strict=True))
    rows: dict[str, dict] = {"large": {"model": cfg.large},
                             "proxy-tuned": {"model": f"{cfg.large} + {steer}"}}
    if tl is not None:
        rows["tuned large"] = {"model": cfg.tuned_large}
    if cfg.perplexity:
        from lmalloy.data.pack import load_tokens, pack
        from lmalloy.eval.perplexity import cache_dir

        tok = Tok.load(cfg.tokenizer or cfg.large)
        folder = cache_dir() / "packed" / tok.fingerprint()
        meta = pack(corpus, tok, folder, cfg.val_fraction, cfg.seed)
        splits = ["train", "val"] if cfg.split == "all" else [cfg.split]
        tb = tok.token_bytes()
        fns = {"large": lambda x: large_alone.logits(x).to(x.device),
               "proxy-tuned": lambda x: proxy.logits(x).to(x.device)}
        if tl is not None:
            fns["tuned large"] = lambda x: tl.logits(x).to(x.device)
        for name, fn in fns.items():
            nll = n = nbytes = 0.0
            for split in splits:
                tokens = load_tokens(folder, split, meta)
                spans = {d: tuple(v[split]) for d, v in meta["domains"].items()}
                r = evaluate(None, tokens, spans, cfg.seq_len, cfg.max_tokens // len(splits),
                             tb, cfg.batch_size, logits_fn=fn)
                nll += r["loss"] * r["tokens"] if r["tokens"] else 0
                n += r["tokens"]
                nbytes += r["loss"] * r["tokens"] / math.log(2) / r["bpb"] if r["bpb"] else 0
            if not n:
                raise UserError(f"no {cfg.split} tokens to evaluate (documents shorter than "
                                f"--seq-len {cfg.seq_len}?)")
            rows[name].update(loss=nll / n, ppl=math.exp(min(nll / n, 50)), tokens=int(n),
                              bpb=nll / math.log(2) / nbytes if nbytes else float("nan"))
    if items is not None:
        with torch.no_grad():
            rows["large"]["accuracy"] = large_alone.choose(items, cfg.batch_size,
                                                           cfg.normalize)["accuracy"]
            rows["proxy-tuned"]["accuracy"] = proxy.choose(items, cfg.batch_size,
                                                           cfg.normalize)["accuracy"]
            if tl is not None:
                rows["tuned large"]["accuracy"] = tl.choose(items, cfg.batch_size,
                                                            cfg.normalize)["accuracy"]
    gap = {}
    if tl is not None:
        for key in ("loss", "accuracy"):
            if key in rows["large"]:
                gap[key] = gap_closed(rows["large"][key], rows["proxy-tuned"][key],
                                      rows["tuned large"][key])
    if cfg.json_output:
        print(json.dumps({"rows": rows, "gap_closed": gap}, indent=2))
        return 0
    print(f"{'':<12} {'loss':>8} {'ppl':>9} {'bpb':>7} {'accuracy':>9}  model")
    def f(r: dict, k: str, spec: str) -> str:
        return format(r[k], spec) if k in r else "-"

    for name, r in rows.items():
        print(f"{name:<12} {f(r, 'loss', '8.4f'):>8} {f(r, 'ppl', '9.2f'):>9} "
              f"{f(r, 'bpb', '7.4f'):>7} {f(r, 'accuracy', '9.3f'):>9}  {r['model']}")
    for k, v in gap.items():
        print(f"fraction of the large -> tuned-large gap closed ({k}): {v:.3f}")
    return 0
