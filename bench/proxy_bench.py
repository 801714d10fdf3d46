"""Proxy-tuning decode throughput against its bound, the no-cache loop, and cache memory.

Models: a large model of the `small` preset (~9.4M parameters) steered by a `tiny`-preset
pair (~1M each), random weights (throughput does not depend on them), one byte-level BPE
tokenizer trained on a stdlib domain. Per batch size (1 and 8) and 256 new tokens:

- each model's own cached decoding loop alone (prefill, then cached single-token steps
  with argmax, nothing else): t_large, t_tuned, t_untuned per step; the bound of a sequential ensemble
  is 1 / (t_large + t_tuned + t_untuned) steps/s;
- `ProxyTuned.generate` (sequential), and with `parallel=True` (the small pair in a second
  thread beside the large model) to try to beat that bound;
- the same loop without KV caches (each step re-runs every model on the whole sequence,
  what a naive logits processor does);
- the KV-cache memory of the three models after the run.

Each timing is the best of --repeats interleaved runs (the machine may be shared).

    .venv/bin/python bench/proxy_bench.py [--threads 2] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# Busy-waiting OpenMP threads collapse on a shared machine (a 2-thread step measured 15-20×
# slower than with passive waiting while other processes ran); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build(folder: Path, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.tokenizer import Tok, train_tokenizer
    from lmalloy.io.folder import AUX_FILES
    from lmalloy.train.presets import model_kwargs

    corpus = load_corpus(["stdlib"], ["json", "email"], [], 200_000, quiet=True)
    train_tokenizer((d.text for d in corpus.documents), 4096, folder / "tok")
    tok = Tok.load(folder / "tok")
    paths = {}
    for name, preset, seed in (("large", "small", 0), ("tuned", "tiny", 1), ("untuned", "tiny", 2)):
        torch.manual_seed(seed)
        kw = model_kwargs(preset, tok.vocab_size)
        kw.update(bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        m = LlamaForCausalLM(LlamaConfig(**kw))
        p = folder / name
        m.save_pretrained(p)
        for f in AUX_FILES:
            if (folder / "tok" / f).is_file():
                (p / f).write_bytes((folder / "tok" / f).read_bytes())
        paths[name] = str(p)
    prompts = [d.text[:200] for d in corpus.documents[:8]]
    return paths, prompts


def timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-cache-loop", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    import torch

    from lmalloy.io.folder import open_model
    from lmalloy.proxy.model import ProxyTuned, _State, left_pad

    torch.set_num_threads(args.threads)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        paths, texts = build(Path(d), args.device)
        params = {k: open_model(p).num_parameters for k, p in paths.items()}
        px = ProxyTuned.from_pretrained(paths["large"], paths["tuned"], paths["untuned"], 1.0,
                                        device=args.device)
        alone = {"large": px.large, "tuned": px.pairs[0][0], "untuned": px.pairs[0][1]}

        def own_loop(m, prompts):
            st = _State(m, *left_pad([px.encode_prompt(m, p) for p in prompts], px.pad_id),
                        True)
            last = None
            with torch.no_grad():
                for _ in range(n):
                    last = st.step(last, px.vocab).argmax(-1)
        rows = []
        for B in [int(b) for b in args.batches.split(",")]:
            prompts = (texts * B)[:B]
            kw = dict(max_new_tokens=n, stop_at_eos=False)
            px.generate(prompts, max_new_tokens=4)  # warm-up
            best: dict[str, float] = {}
            for _ in range(args.repeats):
                runs = {f"alone {k}": partial(own_loop, m, prompts) for k, m in alone.items()}
                runs["proxy"] = partial(px.generate, prompts, **kw)
                runs["proxy parallel"] = partial(px.generate, prompts, parallel=True, **kw)
                for name, fn in runs.items():
                    t = timed(fn, args.device)
                    best[name] = min(best.get(name, t), t)
                    if name == "proxy":
                        cache = dict(px.last_cache_bytes)
            if args.no_cache_loop:
                best["proxy no cache"] = timed(
                    partial(px.generate, prompts, use_cache=False, **kw), args.device)
            step = {k: best[f"alone {k}"] / n for k in alone}
            bound = B / sum(step.values())  # tokens/s of a sequential ensemble of cached steps
            tps = {k: B * n / v for k, v in best.items()}
            rows.append({"batch": B, "step_ms": {k: 1000 * v for k, v in step.items()},
                         "bound_tok_s": bound, "tok_s": tps,
                         "vs_bound": tps["proxy"] / bound,
                         "parallel_vs_bound": tps["proxy parallel"] / bound,
                         "vs_no_cache": (tps["proxy"] / tps["proxy no cache"]
                                         if "proxy no cache" in tps else None),
                         "cache_mib": {Path(k).name: v / 2**20 for k, v in cache.items()},
                         "prompt_tokens": max(len(px.encode_prompt(px.large, p))
                                              for p in prompts)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nModels: large {params['large'] / 1e6:.1f}M (`small` preset), tuned/untuned "
          f"{params['tuned'] / 1e6:.2f}M (`tiny`), vocabulary 4096, fp32, {args.device}, "
          f"{args.threads} threads; {n} new tokens, greedy; best of {args.repeats}.\n")
    print("| batch | t_large / t_tuned / t_untuned (ms per cached step) | bound tok/s | "
          "proxy tok/s (× bound) | parallel pair tok/s (× bound) | no-cache tok/s | "
          "cached ÷ no-cache | KV caches MiB (large + tuned + untuned) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, t, c = r["step_ms"], r["tok_s"], r["cache_mib"]
        nc = f"{t['proxy no cache']:.0f}" if "proxy no cache" in t else "-"
        ratio = f"{r['vs_no_cache']:.1f}×" if r["vs_no_cache"] else "-"
        print(f"| {r['batch']} | {s['large']:.2f} / {s['tuned']:.2f} / {s['untuned']:.2f} | "
              f"{r['bound_tok_s']:.0f} | {t['proxy']:.0f} ({r['vs_bound']:.2f}×) | "
              f"{t['proxy parallel']:.0f} ({r['parallel_vs_bound']:.2f}×) | {nc} | {ratio} | "
              f"{' + '.join(f'{v:.2f}' for v in c.values())} = {sum(c.values()):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
