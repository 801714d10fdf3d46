"""Demo stage: sparse mixtures of experts built from the dense domain experts.

From the base and the domain experts of the merging stage (or, while that stage is
absent, experts fine-tuned here the same way): upcycle the base (Sparse Upcycling: at
initialisation it must compute exactly the base), compose the experts as mergekit-moe
does (attention from the base, one FFN per expert, routers from the base's hidden states
on prompts from each domain), build the Branch-Train-MiX variant (non-FFN averaged), and
fine-tune only the composed model's routers briefly on the mixed domains. The report
compares per-domain perplexity with the experts (and the dense merges when the merging
stage has them), counts total vs active parameters, and analyses routing as Mixtral did
(arXiv 2401.04088, Table 5, Figures 7-8): consecutive-token agreement against the random
baselines and the router's initialisation, expert shares per domain, and a Python snippet
coloured by expert — do indentation tokens share an expert?
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from pathlib import Path

GENERAL = "toplevel"  # a pretraining domain: prompts for the base as generalist expert
TITLE = "Mixture of experts: upcycled and composed Mixtrals, and how they route"


def settings(ctx) -> dict:
    return dict(max_chars_per_domain=ctx.pick(40_000, 150_000), val_fraction=0.1, seed=0,
                seq_len=ctx.pick(128, 256), expert_steps=ctx.pick(8, 40),
                router_steps=ctx.pick(6, 30), eval_tokens=ctx.pick(2048, 16384),
                global_batch_tokens=ctx.pick(1024, 4096), micro_batch_size=ctx.pick(8, 16),
                n_prompts=3, prompt_chars=ctx.pick(200, 300))


def _finetune_experts(ctx, base: str, s: dict) -> dict[str, str]:
    """Fallback while no merging stage exists: one quick fine-tune of the base per domain."""
    from lmalloy.demo.run import EXPERT_DOMAINS

    out = {}
    for d in EXPERT_DOMAINS:
        run = ctx.dir("moe") / f"expert-{d}"
        if not (run / "final" / "config.json").is_file():
            ctx.call("finetune", base_model=base, out=str(run), overwrite=True,
                     data=["stdlib"], domains=[d], max_chars_per_domain=s["max_chars_per_domain"],
                     val_fraction=s["val_fraction"], seed=s["seed"], seq_len=s["seq_len"],
                     global_batch_tokens=s["global_batch_tokens"],
                     micro_batch_size=s["micro_batch_size"], max_steps=s["expert_steps"],
                     lr=ctx.pick(2e-3, 1e-3), warmup_steps=2, eval_every=10_000,
                     eval_tokens=2048, keep_checkpoints=1, progress=False,
                     threads=ctx.threads)
        out[d] = str(run / "final")
    return out


def _sources(ctx, s: dict) -> tuple[str, dict[str, str], dict[str, str], str]:
    """(base, {domain: expert}, {name: dense merge}, where they came from)."""
    from lmalloy.demo.run import STAGES

    if "merging" in STAGES:
        nums = ctx.require("merging")["numbers"]
        ft = nums.get("finetune") or {}
        for key in ("max_chars_per_domain", "val_fraction", "seed", "seq_len"):
            if key in ft:  # evaluate on the documents the experts held out
                s[key] = ft[key]
        v = nums.get("merges") or {}
        keep = [n for n in ("soup", nums.get("best_merge")) if n in v]
        merges = {n: v[n] for n in dict.fromkeys(keep) if (Path(v[n]) / "config.json").is_file()}
        return nums["base"], dict(nums["experts"]), merges, "the merging stage's"
    base = ctx.require("pretrain")["numbers"]["model"]
    return base, _finetune_experts(ctx, base, s), {}, "quickly fine-tuned (no merging stage)"


def _prompts(domains: list[str], s: dict) -> dict[str, list[str]]:
    """A few short openings of each domain's training documents (positive prompts)."""
    from lmalloy.data.corpus import load_corpus

    corpus = load_corpus(["stdlib"], domains, [], s["max_chars_per_domain"], quiet=True)
    out = {}
    for d, docs in corpus.domains().items():
        texts = [doc.text for doc in docs if len(doc.text) > 400] or [doc.text for doc in docs]
        # skip licence headers: start at the first line that holds code
        picks = []
        for t in texts[1:] + texts[:1]:
            lines = t.splitlines()
            start = next((i for i, x in enumerate(lines) if x.startswith(("def ", "class ",
                                                                        "import ", "from "))),
                         0)
            picks.append("\n".join(lines[start:])[: s["prompt_chars"]])
            if len(picks) == s["n_prompts"]:
                break
        out[d] = picks
    return out


def snippet() -> str:
    import textwrap

    return inspect.getsource(textwrap.dedent)


def render_tokens_png(pieces: list[str], top1: list[int], n_experts: int, path: Path,
                      title: str) -> Path:
    """The text in a monospace grid, each token's cells coloured by its top-1 expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    from lmalloy.moe.analyze import PALETTE

    cells = []  # (row, col, text, expert)
    row = col = 0
    for p, e in zip(pieces, top1, strict=False):
        parts = p.split("\n")
        for j, seg in enumerate(parts):
            if j:
                row, col = row + 1, 0
            if seg:
                cells.append((row, col, seg, e))
                col += len(seg)
    width = max((c + len(t) for _, c, t, _ in cells), default=1)
    fs = min(9.0, 0.98 * 12 * 72 / width / 0.6)  # monospace glyphs are 0.6 em wide
    fig_w = width * fs * 0.6 / 72 / 0.98
    row_in = 1.5 * fs / 72
    body = (row + 1.4) * row_in
    fig_h = body + 0.75
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    ax = fig.add_axes((0.01, 0.01, 0.98, body / fig_h))
    for r, c, t, e in cells:
        ax.add_patch(Rectangle((c, -r - 1), len(t), 1, facecolor=PALETTE[e % len(PALETTE)],
                               alpha=0.55, edgecolor="white", lw=0.4))
        ax.text(c, -r - 0.5, t, family="monospace", fontsize=fs, va="center", ha="left")
    ax.set_xlim(0, width)
    ax.set_ylim(-row - 1.2, 0.2)
    ax.axis("off")
    fig.legend(handles=[Patch(color=PALETTE[e], alpha=0.55, label=f"expert {e}")
                        for e in range(n_experts)], ncol=n_experts, loc="upper center",
               bbox_to_anchor=(0.5, 1 - 0.3 / fig_h), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10, y=1 - 0.05 / fig_h, va="top")
    fig.savefig(path)
    plt.close(fig)
    return path


def indentation(pieces: list[str], top1: list[int]) -> dict:
    """Indentation tokens (spaces only, possibly after a newline): how concentrated their
    top-1 expert is, against the same expert's share of all tokens."""
    import numpy as np

    ind = [e for p, e in zip(pieces, top1, strict=False) if p.strip() == "" and "  " in p]
    if not ind:
        return {"tokens": 0}
    counts = np.bincount(ind, minlength=max(top1) + 1)
    e = int(counts.argmax())
    return {"tokens": len(ind), "expert": e, "share": float(counts[e] / len(ind)),
            "share_all": float(np.mean(np.asarray(top1) == e))}


def run(ctx) -> dict:
    import numpy as np

    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.pack import load_tokens, pack
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.models import load_causal_lm
    from lmalloy.moe import analyze as A
    from lmalloy.moe.build import build
    from lmalloy.moe.config import MoeBuildConfig
    from lmalloy.moe.stats import baseline_overlap, baseline_same_top1, param_counts
    from lmalloy.train.heldout import evaluate

    s = settings(ctx)
    clock = [time.perf_counter()]
    secs: dict[str, float] = {}

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        secs[name] = round(clock[-1] - clock[-2], 1)

    base, experts, merges, origin = _sources(ctx, s)
    lap("experts")
    domains = list(experts)
    work = ctx.dir("moe")
    prompts = _prompts([*domains, GENERAL], s)

    # -- build: upcycle (4 experts, top-2), compose and btx (one expert per domain)
    k = 2
    mk = dict(base_model=base, experts_per_token=k, overwrite=True, seed=0)
    built = {}
    built["upcycled"] = build(MoeBuildConfig(method="upcycle", num_experts=4,
                                             gate_mode="random", out=str(work / "upcycled"),
                                             **mk), quiet=True)
    # BTX keeps the seed model as one more (generalist) expert: E = domains + 1
    sources = {**experts, "base": base}
    ex = [{"source_model": sources[d], "positive_prompts": prompts[GENERAL if d == "base" else d],
           "negative_prompts": [p for o in domains if o != d for p in prompts[o][:1]]}
          for d in sources]
    built["composed"] = build(MoeBuildConfig(method="compose", gate_mode="hidden", experts=ex,
                                             out=str(work / "composed"), **mk), quiet=True)
    built["btx"] = build(MoeBuildConfig(method="btx", gate_mode="hidden", experts=ex,
                                        out=str(work / "btx"), **mk), quiet=True)
    lap("build")

    # -- router fine-tuning of the composed MoE on the mixed domains (routers only)
    tuned_run = work / "composed-router-ft"
    ctx.call("finetune", base_model=str(work / "composed"), out=str(tuned_run), overwrite=True,
             train_only=["mlp.gate"], data=["stdlib"], domains=domains,
             max_chars_per_domain=s["max_chars_per_domain"], val_fraction=s["val_fraction"],
             seed=s["seed"], seq_len=s["seq_len"], global_batch_tokens=s["global_batch_tokens"],
             micro_batch_size=s["micro_batch_size"], max_steps=s["router_steps"], lr=3e-3,
             warmup_steps=2, eval_every=10_000, eval_tokens=2048, keep_checkpoints=1,
             progress=False, threads=ctx.threads)
    tuned = str(tuned_run / "final")
    lap("router fine-tune")

    # -- per-domain perplexity on held-out documents of the expert domains
    tok = Tok.load(base)
    corpus = load_corpus(["stdlib"], domains, [], s["max_chars_per_domain"], quiet=True)
    meta = pack(corpus, tok, work / "data", s["val_fraction"], s["seed"])
    val = load_tokens(work / "data", "val", meta)
    spans = {d: tuple(meta["domains"][d]["val"]) for d in domains}
    tb = tok.token_bytes()
    models = {"base (dense)": base, **{f"expert {d}": p for d, p in experts.items()},
              **{f"merge {n}": p for n, p in merges.items()},
              "upcycled MoE (init)": str(work / "upcycled"),
              "composed MoE (hidden init)": str(work / "composed"),
              "composed MoE + router fine-tune": tuned, "BTX MoE (hidden init)": str(work / "btx")}
    ppl: dict[str, dict] = {}
    for name, path in models.items():
        m = load_causal_lm(path)
        r = evaluate(m, val, spans, s["seq_len"], s["eval_tokens"], tb, 8)
        ppl[name] = {"all": r["ppl"], **{d: r["domains"][d]["ppl"] for d in r["domains"]}}
        del m
    lap("perplexity")

    # -- routing analysis of the router-tuned composed MoE vs its initialisation
    seqs = {d: A.domain_sequences(val, spans[d], s["seq_len"], s["eval_tokens"] // 2)
            for d in domains}
    seqs = {d: x for d, x in seqs.items() if len(x)}
    tuned_m = load_causal_lm(tuned)
    res = A.analyze_model(tuned_m, seqs, s["seq_len"], k)
    init_m = load_causal_lm(str(work / "composed"))
    init = A.analyze_model(init_m, seqs, s["seq_len"], k)
    del init_m
    n_e = len(sources)
    names = list(sources)
    n_layers = tuned_m.config.num_hidden_layers
    figs = ctx.dir("figures")
    layers = A.default_layers(n_layers)
    A.plot_shares(res, n_e, layers, figs / "moe_expert_shares.png",
                  "Composed MoE after router fine-tuning: share of assignments by domain")
    code = snippet()
    ids = tok.encode(code)[:300]
    logits = A.router_logits(tuned_m, np.asarray([ids]), 1)  # (L, T, E)
    pieces = [tok.decode([i]) for i in ids]
    top1 = {layer: A.topk_from_logits(logits[layer], k)[:, 0].tolist() for layer in layers}
    (figs / "moe_tokens.html").write_text(A.token_html(pieces, top1, n_e,
                                                       "textwrap.dedent by top-1 expert"))
    last = layers[-1]
    render_tokens_png(pieces, top1[last], n_e, figs / "moe_snippet.png",
                      f"textwrap.dedent, each token coloured by its top-1 expert at layer {last}")
    indent = {layer: indentation(pieces, top1[layer]) for layer in layers}
    del tuned_m
    lap("routing")

    # -- report
    counts = param_counts(json.loads((work / "composed" / "config.json").read_text()))
    from lmalloy.io import open_model

    dense_n = open_model(base).num_parameters
    b1, b2 = baseline_same_top1(n_e), baseline_overlap(n_e, k)
    cols = ["all", *domains]
    md = [f"Base: the pretraining stage's model; experts: {origin} fine-tunes on "
          f"{', '.join(domains)}. The composed MoE has {n_e} experts — one per domain plus "
          f"the base itself as a generalist, as Branch-Train-MiX keeps the seed model "
          f"(experts {', '.join(f'{i} = {n}' for i, n in enumerate(names))}) — top-{k}; its "
          f"routers start from the base's hidden states on {s['n_prompts']} openings of each "
          f"domain's files (the base: of `{GENERAL}` files; minus one opening of each other "
          f"domain), mergekit-moe's `hidden` mode, then {s['router_steps']} steps train only "
          f"the routers (`--train-only mlp.gate`, load-balancing coefficient 0.01) on the "
          f"mixed domains. The upcycled MoE copies the base's FFN into 4 experts with a random "
          f"router. BTX: as composed, attention and embeddings averaged over the fine-tunes.",
          "",
          f"**Parameters** (from the config): NonFF {counts['non_ff'] / 1e6:.2f}M + "
          f"{n_e}·FF {counts['ff_per_expert'] / 1e6:.2f}M = {counts['total'] / 1e6:.2f}M total; "
          f"NonFF + {k}·FF = {counts['active'] / 1e6:.2f}M active per token (the dense base: "
          f"{dense_n / 1e6:.2f}M).",
          "",
          "Perplexity on held-out documents (lower is better):",
          "",
          "| model | " + " | ".join(cols) + " |",
          "|---" * (len(cols) + 1) + "|"]
    for name, r in ppl.items():
        md.append(f"| {name} | " + " | ".join(f"{r.get(c, float('nan')):.2f}" for c in cols)
                  + " |")
    up_gap = abs(ppl["upcycled MoE (init)"]["all"] - ppl["base (dense)"]["all"])
    md += ["", f"The upcycled MoE computes the base exactly at initialisation (perplexity "
           f"difference {up_gap:.2g}).", "",
           f"Routing of the router-tuned composed MoE on held-out text, consecutive tokens "
           f"(Mixtral Table 5); random baselines for E = {n_e}, k = {k}: same top-1 "
           f"{100 * b1:.1f}%, overlapping top-{k} {100 * b2:.1f}%:", "",
           A.table_markdown(res, init, n_e, k), "",
           "![expert shares](figures/moe_expert_shares.png)", "",
           "![snippet coloured by expert](figures/moe_snippet.png)", "",
           "All chosen layers, interactive: `figures/moe_tokens.html`.", ""]
    moe_ppl = ppl["composed MoE + router fine-tune"]
    closes, gap_txt = {}, []
    for d in domains:
        b, e, m_ = ppl["base (dense)"][d], ppl[f"expert {d}"][d], moe_ppl[d]
        if e < b:
            closes[d] = (b - m_) / (b - e)
            gap_txt.append(f"{100 * closes[d]:.0f}% on {d}")
        else:
            gap_txt.append(f"none to recover on {d} (its expert is no better than the base)")
    ind = indent[last]
    ind_txt = ("no indentation tokens in the snippet" if not ind["tokens"] else
               f"{100 * ind['share']:.0f}% of its {ind['tokens']} indentation tokens go to "
               f"expert {ind['expert']} at layer {last}, which takes {100 * ind['share_all']:.0f}% "
               f"of all its tokens")
    agree = [r["layers"][la]["same_top1"] for r in res.values() for la in range(n_layers)]
    md.append("> Of each domain expert's gain over the base, the router-tuned composed MoE "
              "recovers " + "; ".join(gap_txt) + ", with "
              f"{counts['active'] / 1e6:.2f}M of its {counts['total'] / 1e6:.2f}M parameters "
              f"active per token. Consecutive tokens share their top-1 expert "
              f"{100 * min(agree):.0f}-{100 * max(agree):.0f}% of the time (random: "
              f"{100 * b1:.0f}%). Indentation: {ind_txt}"
              + (" — they share an expert, as Mixtral found." if ind.get("tokens") and
                 ind["share"] > max(0.5, ind["share_all"] + 0.1) else "."))
    print(f"moe stage: composed+router-ft ppl {moe_ppl['all']:.2f}", file=sys.stderr)
    return {"markdown": "\n".join(md), "numbers": {
        "base": base, "experts": experts, "upcycled": str(work / "upcycled"),
        "composed": str(work / "composed"), "composed_router_ft": tuned,
        "btx": str(work / "btx"), "ppl": ppl, "params": counts,
        "routing": {d: [{"same_top1": x["same_top1"], "overlap": x["overlap"]}
                        for x in r["layers"]] for d, r in res.items()},
        "routing_init": {d: [{"same_top1": x["same_top1"], "overlap": x["overlap"]}
                             for x in r["layers"]] for d, r in init.items()},
        "baselines": {"same_top1": b1, "overlap": b2}, "gap_closed": closes,
        "indentation": {str(k_): v for k_, v in indent.items()},
        "seconds": secs, "expert_names": names,
        "finite": all(math.isfinite(v) for r in ppl.values() for v in r.values())}}
