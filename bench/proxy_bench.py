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

`--parts speculative` — exact speculative decoding against the plain proxy decoder on
*trained* models (acceptance depends on the weights): the demo's proxy-stage models
(`--demo runs/demo-quick`, read from its stages/proxy.json), explicit `--large/--tuned/
--untuned` folders, or, with neither, models this script trains first (`small` preset large,
`tiny` pair, stdlib `json` domain expert; a few minutes). At batch 1 and 8, greedy and
sampled, for each K in --ks and adaptive K: tokens/s, the speed-up over plain, the acceptance
rate; the best K. Greedy outputs are checked to be identical to the plain decoder's.

`--parts server` — `lmalloy serve` over the same ensemble on 127.0.0.1: a bounded load of
--requests completions (greedy, --server-tokens each) from 1, 4 and 16 concurrent clients:
requests/s and p50/p95 latency, against the same requests one by one in-process.

    .venv/bin/python bench/proxy_bench.py [--parts decode,speculative,server] [--demo RUN]
        [--threads 2] [--repeats 2] [--device cpu] [--quick]
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


def decode_part(args) -> None:
    import torch

    from lmalloy.io.folder import open_model
    from lmalloy.proxy.model import ProxyTuned, _State, left_pad

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


# ---------------------------------------------------------------- trained models


def _cli(*args) -> None:
    import subprocess

    cmd = [sys.executable, "-m", "lmalloy.cli", *map(str, args)]
    print("$", " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True)


def train_models(folder: Path, quick: bool) -> dict[str, str]:
    """A large base, a small base and its expert on the stdlib `json` domain (the demo's
    proxy experiment in miniature), so that acceptance rates are those of real weights."""
    common = ["--data", "stdlib", "--max-chars-per-domain", 40_000 if quick else 400_000,
              "--seq-len", 128 if quick else 256, "--no-progress", "--overwrite"]
    tiny = ["--model-overrides", '{"hidden_size": 32, "intermediate_size": 64, '
            '"num_hidden_layers": 1}'] if quick else []
    _cli("pretrain", "--out", folder / "large", "--preset", "tiny" if quick else "small",
         "--max-steps", 3 if quick else 300, "--vocab-size", 512 if quick else 4096, *common)
    tok = folder / "large" / "tokenizer"
    _cli("pretrain", "--out", folder / "small", "--preset", "tiny", "--tokenizer", tok,
         "--max-steps", 3 if quick else 300, *tiny, *common)
    _cli("finetune", "--out", folder / "expert", "--base-model", folder / "small" / "final",
         "--domains", "json", "--max-steps", 2 if quick else 60, "--lr", "1e-3", *common)
    return {"large": str(folder / "large" / "final"), "tuned": str(folder / "expert" / "final"),
            "untuned": str(folder / "small" / "final")}


def ensemble_paths(args, folder: Path) -> dict[str, str]:
    if args.demo:
        f = Path(args.demo) / "stages" / "proxy.json"
        if not f.is_file():
            sys.exit(f"{f}: no proxy stage here (run `lmalloy demo --stages proxy` first)")
        n = json.loads(f.read_text())["numbers"]
        return {"large": n["large"], "tuned": n["small_expert"], "untuned": n["small_base"]}
    if args.large:
        return {"large": args.large, "tuned": args.tuned, "untuned": args.untuned}
    return train_models(folder, args.quick)


def domain_prompts(n: int, chars: int) -> list[str]:
    """Held-out-ish prompts: the starts of the `json` domain's last documents."""
    from lmalloy.data.corpus import load_corpus

    docs = load_corpus(["stdlib"], ["json"], [], None, quiet=True).documents[::-1]
    return [d.text[:chars] for d in docs[:n]]


# ---------------------------------------------------------------- speculative vs plain


def _into(box: list, fn) -> None:
    box.append(fn())


def speculative_part(args, paths: dict[str, str], prompts: list[str]) -> dict:
    from lmalloy.proxy.model import ProxyTuned

    px = ProxyTuned.from_pretrained(paths["large"], paths["tuned"], paths["untuned"], 1.0,
                                    device=args.device)
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        batch = (prompts * B)[:B]
        for temp in [float(t) for t in args.temperatures.split(",")]:
            kw = dict(max_new_tokens=args.new_tokens, stop_at_eos=False, temperature=temp,
                      seed=0)
            px.generate(batch, max_new_tokens=4, speculative=2)  # warm-up
            runs = {"plain": {}} | {f"K={k}": {"speculative": k} for k in ks} | {
                f"adaptive ≤{max(ks)}": {"speculative": max(ks), "adaptive_k": True}}
            best: dict[str, float] = {}
            stats: dict[str, dict] = {}
            ref = None
            for _ in range(args.repeats):
                for name, extra in runs.items():
                    res: list = []
                    t = timed(partial(_into, res, partial(px.generate, batch, **kw, **extra)),
                              args.device)
                    out = res[0]
                    best[name] = min(best.get(name, t), t)
                    if extra:
                        stats[name] = dict(px.last_speculative)
                    if temp == 0:
                        toks = [g.tokens for g in out]
                        ref = toks if ref is None else ref
                        assert toks == ref, f"{name}: greedy output differs from plain"
            tps = {k: B * args.new_tokens / v for k, v in best.items()}
            fixed = {k: v for k, v in tps.items() if k.startswith("K=")}
            rows.append({"batch": B, "temperature": temp, "tok_s": tps,
                         "speedup": {k: v / tps["plain"] for k, v in tps.items()},
                         "acceptance": {k: s["acceptance_rate"] for k, s in stats.items()},
                         "best_k": max(fixed, key=fixed.get)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print("\n| batch | temperature | plain tok/s | best K | best K tok/s (× plain) | "
          "acceptance at best K | adaptive tok/s (× plain) | all K: × plain (acceptance) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ad = next(k for k in r["tok_s"] if k.startswith("adaptive"))
        allk = ", ".join(f"{k[2:]}: {r['speedup'][k]:.2f}× ({r['acceptance'][k]:.2f})"
                         for k in r["tok_s"] if k.startswith("K="))
        b = r["best_k"]
        print(f"| {r['batch']} | {r['temperature']:g} | {r['tok_s']['plain']:.0f} | {b[2:]} | "
              f"{r['tok_s'][b]:.0f} ({r['speedup'][b]:.2f}×) | {r['acceptance'][b]:.2f} | "
              f"{r['tok_s'][ad]:.0f} ({r['speedup'][ad]:.2f}×) | {allk} |")
    return {"rows": rows}


# ---------------------------------------------------------------- the server under load


def _start_server(paths: dict[str, str], args, extra: list[str]):
    import subprocess

    cmd = [sys.executable, "-m", "lmalloy.cli", "serve", "--large", paths["large"], "--tuned",
           paths["tuned"], "--untuned", paths["untuned"], "--port", "0", "--max-batch", "16",
           "--max-queue", "256", "--threads", str(args.threads), "--device", args.device,
           "--name", "bench", *extra]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    if " on http://" not in line:
        p.kill()
        sys.exit(f"server did not start: {line}{p.stderr.read()}")
    return p, line.split(" on ")[1].split()[0]


def load(url: str, prompts: list[str], clients: int, tokens: int) -> dict:
    """Each prompt once, from `clients` threads at a time (a bounded load, 127.0.0.1 only)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(prompt: str, h) -> float:
        t = time.perf_counter()
        r = h.post(f"{url}/completions", json={"model": "bench", "prompt": prompt,
                                                "max_tokens": tokens, "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - t

    hs = [httpx.Client(timeout=600) for _ in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = sorted(pool.map(lambda ip: one(ip[1], hs[ip[0] % clients]), enumerate(prompts)))
    wall = time.perf_counter() - t0
    for h in hs:
        h.close()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]  # noqa: E731
    return {"clients": clients, "req_s": len(prompts) / wall, "p50_s": q(0.5), "p95_s": q(0.95),
            "tok_s": len(prompts) * tokens / wall}


def server_part(args, paths: dict[str, str], prompts: list[str]) -> dict:
    import signal

    from lmalloy.proxy.model import ProxyTuned

    reqs = (prompts * args.requests)[: args.requests]
    px = ProxyTuned.from_pretrained(paths["large"], paths["tuned"], paths["untuned"], 1.0,
                                    device=args.device)
    px.generate(reqs[:1], max_new_tokens=4)
    lat = []
    t0 = time.perf_counter()
    for r in reqs:  # the same requests one by one, in-process, no HTTP
        t = time.perf_counter()
        px.generate([r], max_new_tokens=args.server_tokens)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    lat.sort()
    rows = [{"clients": "one by one (in-process)", "req_s": len(reqs) / wall,
             "p50_s": lat[len(lat) // 2], "p95_s": lat[min(len(lat) - 1, int(.95 * len(lat)))]}]
    del px
    for label, extra in [("server", [])] + ([(f"server, speculative K={args.serve_speculative}",
                                             ["--speculative", str(args.serve_speculative)])]
                                           if args.serve_speculative else []):
        p, url = _start_server(paths, args, extra)
        try:
            load(url, reqs[:2], 1, 4)  # warm-up
            for c in [int(x) for x in args.clients.split(",")]:
                rows.append({"mode": label, **load(url, reqs, c, args.server_tokens)})
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(120)
    print(f"\n{len(reqs)} requests of {args.server_tokens} greedy tokens each.\n")
    print("| mode | clients | requests/s | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.get('mode', 'in-process')} | {r['clients']} | {r['req_s']:.2f} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} |")
    return {"rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="decode,speculative,server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-cache-loop", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--demo", help="a demo run folder whose proxy-stage models to use")
    ap.add_argument("--large")
    ap.add_argument("--tuned")
    ap.add_argument("--untuned")
    ap.add_argument("--ks", default="1,2,3,4,6,8", help="speculative K values to try")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--server-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--serve-speculative", type=int, default=0,
                    help="also load the server with --speculative K")
    ap.add_argument("--quick", action="store_true", help="a smoke test with tiny sizes")
    ap.add_argument("--json-out", help="write every part's numbers here")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.new_tokens, args.ks, args.requests = 1, 12, "1,3", 6
        args.server_tokens, args.clients, args.batches = 8, "1,4", "1,2"

    import torch

    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    out = {}
    if "decode" in parts:
        decode_part(args)
    if "speculative" in parts or "server" in parts:
        with tempfile.TemporaryDirectory() as d:
            paths = ensemble_paths(args, Path(d))
            prompts = domain_prompts(8, 200)
            if "speculative" in parts:
                out["speculative"] = speculative_part(args, paths, prompts)
            if "server" in parts:
                out["server"] = server_part(args, paths, prompts)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
