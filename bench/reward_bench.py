"""Reward-model benchmark: WARM vs the ensemble at inference, and RM training throughput.

One run, side by side on the same machine, model and pairs:

1. scoring cost per preference pair: the ensemble of M reward models (M forward passes
   per text) against WARM (their weight average: one forward pass), plus the weights each
   must hold in memory;
2. the one-off cost of `reward warm` (streamed average of M folders on disk);
3. training throughput of `reward train`'s Bradley–Terry step (pairs/s, tokens/s) against
   a plain causal-LM training step on the same token sequences (same body, AdamW), the
   two interleaved step by step.

    .venv/bin/python bench/reward_bench.py --preset small --models 4 --threads 2

Prints a markdown section (for docs/benchmarks.md) and writes bench/out/reward_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--models", type=int, default=4, help="M")
    ap.add_argument("--pairs", type=int, default=128, help="pairs scored / trained on")
    ap.add_argument("--steps", type=int, default=12, help="training steps timed")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.average.weighted import Combination, write_average
    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.tokenizer import train_tokenizer
    from lmalloy.io.folder import open_model
    from lmalloy.reward.data import generate
    from lmalloy.reward.model import Encoder, reward_from_causal_lm, score
    from lmalloy.reward.train import save_reward_model
    from lmalloy.train.presets import model_kwargs
    from lmalloy.train.trainer import param_groups

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="reward_bench_"))
    corpus = load_corpus(["stdlib"], ["json", "email", "http"], quiet=True)
    train_tokenizer([d.text for d in corpus.documents], 4096, tmp / "tok")
    kw = model_kwargs(args.preset, 4096)
    from lmalloy.data.tokenizer import Tok

    tok = Tok.load(tmp / "tok")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**kw, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
                                      pad_token_id=tok.pad_id))
    base = tmp / "base"
    lm.save_pretrained(base)
    for f in (tmp / "tok").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    pairs = generate(corpus.documents, ["swap", "shuffle", "truncate"], args.pairs, seed=0)
    enc = Encoder(base, tok.pad_id, args.max_len)
    ids = list(zip(enc([p.prompt for p in pairs], [p.chosen for p in pairs]),
                   enc([p.prompt for p in pairs], [p.rejected for p in pairs]), strict=True))
    seqs = [s for pair in ids for s in pair]
    n_tok = sum(len(s) for s in seqs)
    rm = reward_from_causal_lm(base, head_seed=0)
    n_params = sum(p.numel() for p in rm.parameters())
    res: dict = {"preset": args.preset, "params": n_params, "M": args.models,
                 "pairs": len(pairs), "mean_tokens_per_text": n_tok / len(seqs),
                 "threads": args.threads}

    # -- training throughput: Bradley–Terry steps (train_one's step) vs causal-LM steps on
    # the same sequences, interleaved step by step; median step times (robust to other load)
    from lmalloy.reward.model import bt_loss, forward_scores, pad_batch

    B = args.batch_size
    opt_rm = torch.optim.AdamW(param_groups(rm, 0.1), lr=1e-4, betas=(0.9, 0.95))
    opt_lm = torch.optim.AdamW(param_groups(lm, 0.1), lr=1e-4, betas=(0.9, 0.95))
    rm.train()
    lm.train()
    t_rm, t_lm, batch_tokens = [], [], []
    for step in range(args.steps + 1):
        idx = [(step * B + j) % len(ids) for j in range(B)]
        batch = [ids[i][0] for i in idx] + [ids[i][1] for i in idx]
        t0 = time.perf_counter()
        r = forward_scores(rm, batch, tok.pad_id)
        loss = bt_loss(r[:B], r[B:])
        opt_rm.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt_rm.step()
        t1 = time.perf_counter()
        x, mask, pos = pad_batch(batch, tok.pad_id)
        labels = x.masked_fill(mask == 0, -100)
        loss = lm(input_ids=x, attention_mask=mask, position_ids=pos, labels=labels).loss
        opt_lm.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt_lm.step()
        t2 = time.perf_counter()
        if step:  # the first step warms up
            t_rm.append(t1 - t0)
            t_lm.append(t2 - t1)
            batch_tokens.append(sum(len(q) for q in batch))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    tok_step = sum(batch_tokens) / len(batch_tokens)
    rm.eval()
    res["train"] = {"rm_pairs_per_s": B / med(t_rm), "rm_tokens_per_s": tok_step / med(t_rm),
                    "lm_tokens_per_s": tok_step / med(t_lm),
                    "rm_vs_lm_tokens_ratio": med(t_lm) / med(t_rm)}

    # -- M reward models (perturbed copies of the trained one), on disk
    folders = []
    g = torch.Generator().manual_seed(0)
    models = []
    for i in range(args.models):
        m = reward_from_causal_lm(base, head_seed=0)
        m.load_state_dict(rm.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        f = tmp / f"rm-{i:02d}"
        f.mkdir()
        save_reward_model(m, f, base, {})
        folders.append(f)
        models.append(m.eval())
    t0 = time.perf_counter()
    write_average([open_model(f) for f in folders], Combination.uniform(args.models),
                  tmp / "warm")
    res["warm_build_s"] = time.perf_counter() - t0
    warm = reward_from_causal_lm(tmp / "warm", head_seed=0).eval()

    # -- scoring cost per pair: ensemble (M passes) vs WARM (1 pass), alternated 3 times;
    # the fastest of each (least disturbed by other processes)
    score(warm, seqs[:32], tok.pad_id)
    ens_t, warm_t = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        for m in models:
            score(m, seqs, tok.pad_id, batch_size=32)
        ens_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        score(warm, seqs, tok.pad_id, batch_size=32)
        warm_t.append(time.perf_counter() - t0)
    ens_s, warm_s = min(ens_t), min(warm_t)
    res["inference"] = {"ensemble_ms_per_pair": 1e3 * ens_s / len(pairs),
                        "warm_ms_per_pair": 1e3 * warm_s / len(pairs),
                        "ensemble_over_warm": ens_s / warm_s,
                        "ensemble_weights_mb": args.models * n_params * 4 / 1e6,
                        "warm_weights_mb": n_params * 4 / 1e6}
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "reward_bench.json").write_text(json.dumps(res, indent=1) + "\n")

    t, inf = res["train"], res["inference"]
    cmd = (f".venv/bin/python bench/reward_bench.py --preset {args.preset} --models "
           f"{args.models} --pairs {args.pairs} --steps {args.steps} --threads {args.threads}")
    print(f"""
## Reward models and WARM

`{cmd}` — `{args.preset}` preset as a reward model ({n_params / 1e6:.2f}M parameters), M =
{args.models}, {len(pairs)} generated pairs (mean {res['mean_tokens_per_text']:.0f} tokens per
text), {args.threads} CPU thread(s), one run. Times are the fastest of 3 alternated
repeats (scoring) and median step times of interleaved steps (training), to resist other
load on the machine.

| measure | ensemble of {args.models} RMs | WARM (1 RM) | ratio |
|---|---|---|---|
| scoring time per pair (2 texts) | {inf['ensemble_ms_per_pair']:.1f} ms | {inf['warm_ms_per_pair']:.1f} ms | {inf['ensemble_over_warm']:.2f}× |
| weights held at inference (fp32) | {inf['ensemble_weights_mb']:.1f} MB | {inf['warm_weights_mb']:.1f} MB | {args.models:.0f}× |

Building WARM (`reward warm`, streamed average of the {args.models} folders): {res['warm_build_s']:.2f} s, once.

| training loop | tokens/s | pairs/s | ratio |
|---|---|---|---|
| reward-model step (Bradley–Terry, {args.batch_size} pairs = {2 * args.batch_size} texts) | {t['rm_tokens_per_s']:,.0f} | {t['rm_pairs_per_s']:.1f} | {t['rm_vs_lm_tokens_ratio']:.2f}× the LM step |
| causal-LM training step on the same {2 * args.batch_size} texts | {t['lm_tokens_per_s']:,.0f} | — | 1 |
""")
    print(json.dumps(res), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
