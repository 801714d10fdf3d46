"""Demo stage: proxy-tuning (Liu et al. 2024, arXiv 2401.08565) — domain adaptation in small.

The paper steers a large base with a small tuned/untuned pair and closes 88–91% of the gap
to tuning the large model directly. Here, on a standard-library domain held out of
pretraining (`email`):

- large base  = the pretraining stage's base model (≥ 3× the small one's parameters);
- small base  = the pretraining stage's small model trained on fresh data (the same data
  plan, tokenizer and sequence length);
- small expert = the small base fine-tuned on the domain; tuned large = the large base
  fine-tuned the same way (the reference that proxy-tuning tries to approach);
- proxy-tuned = large + α·(small expert − small base), with α swept over 0..2.

One forward pass per model and evaluation batch gives every α's loss and next-line exact
match (the greedy continuation reproduces the next line token for token, teacher forced),
per validation window, on documents no model trained on; the intervals are a paired
bootstrap over those windows. Last, exact speculative decoding (`lmalloy.proxy.speculative`,
the small expert drafting) against plain decoding of the same proxy-tuned model, greedy,
prompt by prompt: its speed-up, its acceptance rate, and whether the text is the same.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

TITLE = "Proxy-tuning: does a small tuned/untuned pair steer a larger model toward a domain?"

DOMAIN = "email"  # quick mode uses the smaller `json` domain
ALPHAS = [0.0, 0.5, 1.0, 1.5, 2.0]
SPEC_K = 4  # drafts per speculative round, at most


def next_line_hits(pred, y, newline) -> tuple[int, int]:
    """(lines reproduced exactly, lines) in one window. pred, y (T,) int tensors; newline
    (V,) bool: tokens containing a line break. A line is the tokens after one line-break
    token up to and including the next; lines of a single token are skipped."""
    ends = newline[y].nonzero().flatten().tolist()
    hits = n = 0
    for a, b in zip(ends, ends[1:], strict=False):
        if b - a < 2:
            continue
        n += 1
        hits += bool((pred[a + 1 : b + 1] == y[a + 1 : b + 1]).all())
    return hits, n


def evaluate_all(proxy, tuned_large, tokens, seq_len: int, max_tokens: int, newline,
                 batch_size: int = 8) -> dict:
    """Loss and next-line accuracy of: large, small base, tuned large, small expert, and the
    proxy-tuned model at every α in ALPHAS, on non-overlapping windows of `tokens`; with
    each window's loss, line hits and lines (`w_loss`, `w_hits`, `w_lines`)."""
    import torch
    import torch.nn.functional as F

    from lmalloy.proxy.sampling import combine

    n_win = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    names = ["large", "small base", "tuned large", "small expert"] + [
        f"proxy a={a:g}" for a in ALPHAS]
    acc = {k: {"w_loss": [], "w_hits": [], "w_lines": []} for k in names}
    with torch.no_grad():
        for s in range(0, n_win, batch_size):
            rows = [tokens[i * seq_len : i * seq_len + seq_len + 1]
                    for i in range(s, min(n_win, s + batch_size))]
            t = torch.tensor([list(map(int, r)) for r in rows], dtype=torch.long)
            x, y = t[:, :-1], t[:, 1:]
            z_large, [(z_tuned, z_small)] = proxy.member_logits(x)
            zs = {"large": z_large, "small base": z_small, "tuned large": tuned_large.logits(x),
                  "small expert": z_tuned}
            for a in ALPHAS:
                zs[f"proxy a={a:g}"] = combine(z_large, [(z_tuned, z_small)], [a])
            for k, z in zs.items():
                z = z.float()
                nll = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1),
                                      reduction="none").view(y.shape)  # (B, T)
                pred = z.argmax(-1)
                for j in range(len(rows)):
                    h, n = next_line_hits(pred[j], y[j], newline)
                    acc[k]["w_loss"].append(float(nll[j].mean()))
                    acc[k]["w_hits"].append(h)
                    acc[k]["w_lines"].append(n)
    out = {}
    for k, v in acc.items():
        loss = sum(v["w_loss"]) / len(v["w_loss"])
        out[k] = {"loss": loss, "ppl": math.exp(loss),
                  "line_acc": sum(v["w_hits"]) / max(sum(v["w_lines"]), 1),
                  "lines": sum(v["w_lines"]), "tokens": len(v["w_loss"]) * seq_len, **v}
    return out


def plot_sweep(res: dict, out: Path, domain: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for ax, key, label in ((axes[0], "loss", "validation loss (nats/token)"),
                           (axes[1], "line_acc", "next-line exact match")):
        ax.plot(ALPHAS, [res[f"proxy a={a:g}"][key] for a in ALPHAS], "o-",
                label="proxy-tuned large")
        ax.axhline(res["large"][key], color="C3", ls="--", label="large base")
        ax.axhline(res["tuned large"][key], color="C2", ls="--", label="large tuned directly")
        ax.axhline(res["small expert"][key], color="0.5", ls=":", label="small expert")
        ax.set_xlabel("α")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Proxy-tuning on the held-out `{domain}` domain: α sweep")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _train_models(ctx, pre: dict, root: Path, domain: str
                  ) -> tuple[dict[str, Path], dict, dict[str, float]]:
    """Fine-tune the small base and the large base on `domain` with one recipe, the epochs
    scaled to the time this stage has. Returns ({"small", "small_expert", "large_tuned": HF
    folder}, the recipe, seconds)."""
    from lmalloy.data.corpus import load_corpus
    from lmalloy.demo.common import train_run

    cfg = pre["large_config"]
    ft = dict(data=["stdlib"], domains=[domain], max_chars_per_domain=None,
              seq_len=cfg["seq_len"], global_batch_tokens=ctx.pick(1024, 4096),
              micro_batch_size=ctx.pick(8, 16), epochs=2.0, lr=ctx.pick(2e-3, 1e-3),
              warmup_steps=ctx.pick(2, 5), val_fraction=0.2, eval_every=10_000,
              eval_tokens=ctx.pick(4096, 8192), log_every=5, keep_checkpoints=1, seed=0)
    chars = sum(len(d.text) for d in load_corpus(["stdlib"], [domain], [], None,
                                                 quiet=True).held)
    meta = json.loads((Path(pre["model"]).parent / "data" / "meta.json").read_text())
    cpt = sum(d["train_bytes"] for d in meta["domains"].values()) / meta["train_tokens"]
    steps = int(ft["epochs"] * chars / cpt * (1 - ft["val_fraction"]) / ft["global_batch_tokens"])
    r = ctx.budget.rates
    unit = ft["global_batch_tokens"] * (1 / r.get("train:large") + 1 / r.get("train:small"))
    n = ctx.clock.fit("fine-tune steps (small and large, each)", steps, unit, fraction=0.55,
                      fixed_s=6.0, minimum=4)
    ft["epochs"] = round(ft["epochs"] * n / max(steps, 1), 2)
    small = Path(pre["small_base"])
    secs = {}
    for name, base, rate in (("small_expert", small, "train:small"),
                             ("large_tuned", Path(pre["model"]), "train:large")):
        secs[f"fine-tune {name}"] = train_run(ctx, "finetune", root / name, rate,
                                              base_model=str(base), **ft)["seconds"]
    paths = {"small": small, "small_expert": root / "small_expert" / "final",
             "large_tuned": root / "large_tuned" / "final"}
    return paths, ft, secs


def _load(ctx, large: str, paths: dict[str, Path]):
    """(the proxy-tuned ensemble at α = 1, the directly tuned large model as an ensemble
    of one)."""
    from lmalloy.io.models import load_causal_lm
    from lmalloy.proxy.model import Member, ProxyTuned, context_length, load_tokenizer

    proxy = ProxyTuned.from_pretrained(large, str(paths["small_expert"]), str(paths["small"]),
                                       1.0)
    lt = str(paths["large_tuned"])
    lt_model = load_causal_lm(lt)
    tuned_large = ProxyTuned(Member(lt, "large", lt_model, load_tokenizer(lt),
                                    ctx_len=context_length(lt_model.config)), [], [])
    return proxy, tuned_large


def _samples(ctx, proxy, tuned_large, val, eos: int) -> tuple[list[str], dict[str, list[str]]]:
    """(prompts: the first 32 tokens of two validation documents, {model: greedy texts})."""
    import numpy as np

    from lmalloy.proxy.model import ProxyTuned

    docs = [d for d in np.split(val, np.nonzero(val == eos)[0]) if len(d) > 40][:2]
    prompts = [proxy.tokenizer.decode([int(t) for t in d[:32] if t != eos]) for d in docs]
    gen = dict(max_new_tokens=ctx.pick(24, 40), repetition_penalty=1.2)
    expert = ProxyTuned(proxy.pairs[0][0], [], [])
    samples = {}
    for name, model, alphas in (("large base", proxy, [0.0]),
                                ("proxy-tuned (α = 1)", proxy, [1.0]),
                                ("large tuned directly", tuned_large, []),
                                ("small expert", expert, [])):
        samples[name] = [g.text for g in model.generate(prompts, alphas=alphas, **gen)]
    return prompts, samples


def _tables_md(res: dict, ft: dict, domain: str, n_large: int, n_small: int, img: Path
               ) -> list[str]:
    """The setup paragraph, the model table and the α sweep (markdown lines)."""
    md = [
        f"Large base: the pretraining stage's base model ({n_large / 1e6:.2f}M parameters). "
        f"Small base: the pretraining stage's small model trained on fresh data "
        f"({n_small / 1e6:.2f}M parameters, {n_large / n_small:.1f}× fewer; the same data, "
        f"tokenizer and sequence length). Both were fine-tuned with one recipe on the "
        f"`{domain}` domain (held out of pretraining; {ft['epochs']:g} epochs, lr {ft['lr']}); "
        f"the table is on its validation documents ({res['large']['tokens']:,} tokens, "
        f"{res['large']['lines']} lines), which no model trained on. Proxy-tuned = large + "
        f"α·(small expert − small base), with each model's own KV cache at decoding.",
        "",
        "| model | val loss | perplexity | next-line exact match |",
        "|---|---|---|---|",
    ]
    for name, key in (("large base", "large"), ("small base", "small base"),
                      ("proxy-tuned large (α = 1)", "proxy a=1"),
                      ("large fine-tuned directly", "tuned large"),
                      ("small expert (the steering model)", "small expert")):
        r = res[key]
        md.append(f"| {name} | {r['loss']:.3f} | {r['ppl']:.1f} | {100 * r['line_acc']:.1f}% |")
    md += ["", "| α | " + " | ".join(f"{a:g}" for a in ALPHAS) + " |",
           "|---|" + "---|" * len(ALPHAS),
           "| val loss | " + " | ".join(f"{res[f'proxy a={a:g}']['loss']:.3f}"
                                       for a in ALPHAS) + " |",
           "| next-line exact match | " + " | ".join(
               f"{100 * res[f'proxy a={a:g}']['line_acc']:.1f}%" for a in ALPHAS) + " |",
           "", f"![alpha sweep](figures/{img.name})", ""]
    return md


def speculative_bench(ctx, proxy, val, eos: int) -> dict:
    """Greedy proxy-tuned decoding (α = 1) of validation openings, prompt by prompt, plain
    and with exact speculative decoding (the small expert drafts, adaptive K ≤ SPEC_K).
    Returns per-prompt seconds of both, the acceptance counts and whether the texts match."""
    import numpy as np

    docs = [d for d in np.split(val, np.nonzero(val == eos)[0]) if len(d) > 40]
    prompts = [proxy.tokenizer.decode([int(t) for t in d[:32] if t != eos]) for d in docs]
    gen = dict(max_new_tokens=ctx.pick(24, 64), alphas=[1.0])
    t0 = time.perf_counter()
    proxy.generate(prompts[:1], **gen)  # warm-up, and the cost of one prompt
    per = 2.2 * (time.perf_counter() - t0)
    n = ctx.clock.fit("speculative-decoding prompts", min(len(prompts), ctx.pick(3, 12)), per,
                      fraction=0.9, minimum=2)
    out = {"plain_s": [], "spec_s": [], "drafted": 0, "accepted": 0, "same": 0,
           "prompts": n, "new_tokens": gen["max_new_tokens"], "k": SPEC_K}
    for p in prompts[:n]:
        t0 = time.perf_counter()
        plain = proxy.generate([p], **gen)[0].text
        t1 = time.perf_counter()
        spec = proxy.generate([p], speculative=SPEC_K, adaptive_k=True, **gen)[0].text
        t2 = time.perf_counter()
        st = proxy.last_speculative
        out["plain_s"].append(t1 - t0)
        out["spec_s"].append(t2 - t1)
        out["drafted"] += st.get("drafted", 0)
        out["accepted"] += st.get("accepted", 0)
        out["same"] += plain == spec
    return out


def _claims(res: dict, spec: dict, n_large: int, n_small: int) -> list[dict]:
    import numpy as np

    from lmalloy.demo import stats as S

    w = {k: np.asarray(v["w_loss"]) for k, v in res.items()}
    ratio = n_large / n_small
    better = S.mean_interval(w["large"] - w["small base"])
    c0 = S.claim("The large model is ≥ 3× the small pair's parameters and clearly better "
                 "(lower loss on the domain before tuning)", "Proxy-tuning (2401.08565)",
                 "13B/70B steered by a 7B pair",
                 f"{ratio:.1f}× the parameters; large − small {S.fmt_interval(*better)} nats",
                 *better, 0.0, higher=False, verdict_=S.all_of([
                     S.HELD if ratio >= 3 else S.NOT_HELD,
                     S.verdict(better[1], better[2], 0.0, higher=False)]))
    gap = S.gap_closed_interval(w["large"], w["proxy a=1"], w["tuned large"])
    c1 = S.claim("Proxy-tuning at α = 1 closes ≥ 80% of the loss gap to tuning the large model "
                 "directly", "Proxy-tuning (2401.08565)", "88–91% of the gap (5 metrics)",
                 f"{S.fmt_interval(*gap, pct=True)} of the gap", *gap, 0.8)
    hits = {k: np.asarray(res[k]["w_hits"], dtype=float) for k in ("large", "proxy a=1",
                                                                   "tuned large")}
    lines = np.asarray(res["large"]["w_lines"], dtype=float)

    def em_gap(i):
        acc = {k: h[i].sum() / max(lines[i].sum(), 1) for k, h in hits.items()}
        den = acc["tuned large"] - acc["large"]
        return (acc["proxy a=1"] - acc["large"]) / den if den > 0 else float("nan")

    em = S.bootstrap(em_gap, len(lines))
    c2 = S.claim("…and ≥ 80% of the next-line exact-match gap", "Proxy-tuning (2401.08565)",
                 "88–91% of the gap (5 metrics)",
                 f"{S.fmt_interval(*em, pct=True)} (exact match: large "
                 f"{100 * res['large']['line_acc']:.1f}%, proxy "
                 f"{100 * res['proxy a=1']['line_acc']:.1f}%, tuned "
                 f"{100 * res['tuned large']['line_acc']:.1f}%)", *em, 0.8)
    speed = S.mean_interval(np.asarray(spec["plain_s"]) / np.asarray(spec["spec_s"]))
    acc = spec["accepted"] / max(spec["drafted"], 1)
    c3 = S.claim("Exact speculative decoding gives the same greedy text, faster", "Leviathan "
                 "et al. (2211.17192)", "2–3× faster, identical outputs (T5-XXL)",
                 f"{speed[0]:.2f}× [{speed[1]:.2f}, {speed[2]:.2f}] faster, acceptance "
                 f"{100 * acc:.0f}%, same text on {spec['same']}/{spec['prompts']} prompts",
                 *speed, 1.0, verdict_=S.all_of([
                     S.HELD if spec["same"] == spec["prompts"] else S.NOT_HELD,
                     S.verdict(speed[1], speed[2], 1.0)]))
    return [c0, c1, c2, c3]


def _samples_md(prompts: list[str], samples: dict[str, list[str]]) -> list[str]:
    md = ["Greedy samples with repetition penalty 1.2 (the prompt is the first 32 tokens of "
          "a validation document):", ""]
    for i, p in enumerate(prompts):
        md += [f"**Prompt {i + 1}**", "", "```", p.replace("```", "'''"), "```"]
        for name, texts in samples.items():
            md += [f"**{name}**", "", "```", texts[i].replace("```", "'''") or "(empty)",
                   "```"]
    return md


def _verdict(res: dict, gap: dict, best: float) -> str:
    p1, closes = res["proxy a=1"], gap["loss"]
    line_gap = (f"{100 * gap['line_acc']:.0f}% of the next-line exact-match gap"
                if math.isfinite(gap["line_acc"]) else
                "next-line exact match does not separate the large models here")
    word = ("closes most of" if closes >= 0.5 else "closes part of" if closes > 0
            else "does not close")
    return (f"> Proxy-tuning {word} the gap: at α = 1 it closes {100 * closes:.0f}% of the "
            f"large → directly-tuned loss gap ({res['large']['loss']:.3f} → {p1['loss']:.3f}; "
            f"tuned large {res['tuned large']['loss']:.3f}); {line_gap}. The paper reports "
            f"88–91% on its tasks. The best α here is {best:g}.")


def run(ctx) -> dict:
    import numpy as np
    import torch

    from lmalloy.data.pack import load_tokens
    from lmalloy.io.folder import open_model
    from lmalloy.proxy.run import gap_closed

    pre = ctx.require("pretrain")["numbers"]
    large = pre["model"]
    root, domain = ctx.dir("proxy"), ctx.pick("json", DOMAIN)
    paths, ft, secs = _train_models(ctx, pre, root, domain)

    # every model and every α on the domain's validation documents
    t0 = time.perf_counter()
    proxy, tuned_large = _load(ctx, large, paths)
    data_dir = root / "large_tuned" / "data"
    meta = json.loads((data_dir / "meta.json").read_text())
    val = np.asarray(load_tokens(data_dir, "val", meta))
    vocab = proxy.tokenizer.convert_ids_to_tokens(list(range(proxy.vocab)))
    newline = torch.tensor(["Ċ" in (t or "") for t in vocab])  # byte-level BPE's "\n"
    res = evaluate_all(proxy, tuned_large, val, ft["seq_len"], ctx.pick(4096, 16384), newline)
    secs["evaluate"] = time.perf_counter() - t0
    img = ctx.dir("figures") / "proxy_alpha_sweep.png"
    plot_sweep(res, img, domain)
    gap = {k: gap_closed(res["large"][k], res["proxy a=1"][k], res["tuned large"][k])
           for k in ("loss", "line_acc")}
    best = min(ALPHAS, key=lambda a: res[f"proxy a={a:g}"]["loss"])

    t0 = time.perf_counter()
    eos = meta.get("eos_id", proxy.eos_id)
    prompts, samples = _samples(ctx, proxy, tuned_large, val, eos)
    secs["samples"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = speculative_bench(ctx, proxy, val, eos)
    secs["speculative"] = time.perf_counter() - t0
    print("proxy stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()),
          file=sys.stderr)
    n_large = open_model(large).num_parameters
    n_small = open_model(paths["small"]).num_parameters
    sp = (f"**Speculative decoding.** The same proxy-tuned model (α = 1) decoded greedily, "
          f"{spec['new_tokens']} new tokens from each of {spec['prompts']} validation "
          f"openings, one prompt at a time: plain {sum(spec['plain_s']):.1f} s in all, exact "
          f"speculative decoding (the small expert drafts up to {SPEC_K} tokens a round, "
          f"adaptive K) {sum(spec['spec_s']):.1f} s; {spec['accepted']} of "
          f"{spec['drafted']} drafts kept; the same text on {spec['same']} of "
          f"{spec['prompts']} prompts.")
    md = [*_tables_md(res, ft, domain, n_large, n_small, img),
          *_samples_md(prompts, samples), "", sp, "", _verdict(res, gap, best)]
    slim = {k: {m: v for m, v in r.items() if not m.startswith("w_")} for k, r in res.items()}
    return {"markdown": "\n".join(md), "claims": _claims(res, spec, n_large, n_small),
            "numbers": {
        "domain": domain, "large": large, "small_base": str(paths["small"]),
        "small_expert": str(paths["small_expert"]), "large_tuned": str(paths["large_tuned"]),
        "large_params": n_large, "small_params": n_small, "results": slim,
        "gap_closed": gap, "best_alpha": best, "seconds": secs, "samples": samples,
        "prompts": prompts, "speculative": spec, "finetune": ft}}
