"""Demo stage: merge three domain experts of one base into one model.

Model soups (Wortsman et al. 2022), task arithmetic (Ilharco et al. 2022) and TIES (Yadav
et al. 2023) claim that fine-tunes of one base can be combined by weight arithmetic. This
stage fine-tunes the pretrained base on three standard-library domains held out of
pretraining (email, json, http), merges the three experts by uniform soup, task arithmetic
(a small λ sweep), TIES and greedy soup — the hand-picked merges — and by `lmalloy merge
search` (task arithmetic's three weights chosen by nevergrad on the mean held-out loss), and
tabulates each domain's held-out perplexity: does one merged model keep most of each
expert's gain over the base, and does the search find a merge at least as good as the best
hand-picked one? The MoE and proxy stages reuse these experts (numbers["experts"]).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import yaml

from lmalloy.demo.common import train_run

TITLE = "Merging: does one merged model keep most of each domain expert's gain?"
SEARCH_BUDGET = (10, 40)  # evaluations: quick, full


def settings(ctx, seq_len: int) -> dict:
    """Full: every document of the domain, 3 epochs (json is small, email the largest)."""
    return dict(
        data=["stdlib"], max_chars_per_domain=ctx.pick(40_000, None), seq_len=seq_len,
        global_batch_tokens=ctx.pick(2048, 8192), micro_batch_size=ctx.pick(8, 16),
        epochs=ctx.pick(None, 3.0), max_steps=ctx.pick(8, None), lr=ctx.pick(2e-3, 1e-3),
        warmup_steps=ctx.pick(2, 4), val_fraction=0.1, eval_every=1000,
        eval_tokens=ctx.pick(1024, 4096), log_every=ctx.pick(4, 8), keep_checkpoints=1, seed=0,
        progress=False,
    )


def _eval_all(models: dict[str, str], tokenizer: str, s: dict, domains: list[str],
              max_tokens: int) -> tuple[dict[str, dict[str, float]], dict]:
    """Held-out loss per domain (the fine-tunes' own validation split) for every model, and
    {model: {domain: per-window losses}} for the intervals."""
    import numpy as np

    from lmalloy.demo.common import evaluate_models, heldout

    data = heldout(tokenizer, domains, s["max_chars_per_domain"], s["val_fraction"], s["seed"],
                   s["data"])
    res = evaluate_models(models, data, s["seq_len"], max_tokens, per_domain=True,
                          per_window=True)
    losses = {name: {d: r[d]["loss"] for d in domains} for name, r in res.items()}
    windows = {name: {d: np.asarray(r[d]["windows"][d]) for d in domains}
               for name, r in res.items()}
    return losses, windows


def greedy_choice(merged: Path, experts: dict[str, str]) -> list[str]:
    """The domains whose experts greedy soup kept, from its `greedy_soup.json`, in the
    order of `experts` ({domain: model folder})."""
    chosen = {Path(m).resolve() for m in json.loads((Path(merged) / "greedy_soup.json")
                                                    .read_text())["chosen"]}
    return [d for d, m in experts.items() if Path(m).resolve() in chosen]


def _plot(losses: dict, domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(losses)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    width = 0.8 / len(domains)
    for j, d in enumerate(domains):
        ax.bar([i + j * width for i in range(len(names))], [losses[n][d] for n in names],
               width, label=d)
    ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right")
    lo = min(v for r in losses.values() for v in r.values())
    ax.set_ylim(lo * 0.9, None)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(title="domain")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Base, experts and merges on each expert's domain")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _finetune_experts(ctx, base: str, s: dict, work: Path, chars_per_token: float
                      ) -> dict[str, str]:
    """{domain: expert HF folder}: the base fine-tuned on each expert domain alone, the
    epochs scaled down when the measured throughput says they would overrun."""
    from lmalloy.data.corpus import load_corpus
    from lmalloy.demo.run import EXPERT_DOMAINS

    if s["epochs"]:
        corpus = load_corpus(s["data"], EXPERT_DOMAINS, [], s["max_chars_per_domain"],
                             quiet=True)
        tokens = sum(len(d.text) for d in corpus.held) / chars_per_token * (1 - s["val_fraction"])
        steps = int(s["epochs"] * tokens / s["global_batch_tokens"])
        unit = s["global_batch_tokens"] / ctx.budget.rates.get("train:large")
        chosen = ctx.clock.fit("expert fine-tune steps (all three)", steps, unit,
                               fraction=0.45, fixed_s=6.0, minimum=len(EXPERT_DOMAINS) * 4)
        s["epochs"] = round(s["epochs"] * chosen / max(steps, 1), 2)
    experts = {}
    for d in EXPERT_DOMAINS:
        out = work / f"expert-{d}"
        train_run(ctx, "finetune", out, "train:large", base_model=base, domains=[d],
                  **{k: v for k, v in s.items() if k != "progress"})
        experts[d] = str(out / "final")
    return experts


def _merge_all(ctx, base: str, experts: dict[str, str], s: dict, work: Path,
               eval_tokens: int) -> dict[str, str]:
    """{merge name: HF folder}: soup, task arithmetic (a λ sweep), TIES and greedy soup."""
    fts = list(experts.values())
    merges: dict[str, str] = {}

    def merge(name: str, **fields) -> None:
        out = work / f"merged-{name}"
        ctx.call("merge", out=str(out), overwrite=True, progress=False, **fields)
        merges[name] = str(out)

    merge("soup", method="soup", models=fts)
    for lam in ctx.pick([0.5, 1.0], [0.3, 0.5, 0.7, 1.0]):
        merge(f"task arithmetic λ={lam}", method="task_arithmetic", base_model=base, models=fts,
              parameters={"weight": 1.0, "lambda": lam})
    merge("TIES (density 0.5)", method="ties", base_model=base, models=fts,
          parameters={"weight": 1.0, "density": 0.5})
    merge("greedy soup", method="greedy_soup", models=fts, data=s["data"],
          domains=list(experts), max_chars_per_domain=s["max_chars_per_domain"],
          val_fraction=s["val_fraction"], seq_len=s["seq_len"],
          eval_tokens=eval_tokens * len(experts))
    return merges


def _search(ctx, base: str, experts: dict[str, str], s: dict, work: Path,
            eval_tokens: int) -> tuple[str, str, dict]:
    """(row name, HF folder, numbers) of `lmalloy merge search`: task arithmetic (λ = 1) with
    each expert's weight in [0, 1], started at the base (every weight 0, not at a hand-picked
    merge), scored as the table scores (each domain's held-out loss on up to `eval_tokens`
    tokens, averaged over the three)."""
    from lmalloy.merge.search import best_of, read_log

    n_params = sum(1 for _ in experts)  # weights searched
    unit = (len(experts) * eval_tokens / ctx.budget.rates.get("eval:large")
            + ctx.pick(0.05, 0.3))  # + merging one candidate in memory
    budget = ctx.clock.fit("merge-search evaluations", ctx.pick(*SEARCH_BUDGET), unit,
                           fraction=0.75, minimum=max(4, 2 * n_params))
    out = work / "merged-search"
    t0 = time.perf_counter()
    weight = {"range": [0.0, 1.0], "init": 0.0}
    ctx.call("merge search", method="task_arithmetic", base_model=base,
             models=[{"model": ft, "parameters": {"weight": weight}} for ft in experts.values()],
             parameters={"lambda": 1.0},
             objective="mean-domain-loss", budget=budget, data=s["data"],
             domains=list(experts), max_chars_per_domain=s["max_chars_per_domain"],
             val_fraction=s["val_fraction"], split_seed=s["seed"], seq_len=s["seq_len"],
             eval_tokens=eval_tokens, out=str(out), overwrite=True, progress=False,
             threads=ctx.threads)
    seconds = time.perf_counter() - t0
    records = read_log(out / "search.jsonl")[1]
    best = best_of(records)
    info = {"budget": budget, "evaluations": len(records), "seconds": round(seconds, 1),
            "best_evaluation": best["eval"], "mean_loss": best["value"],
            "scores": [r.get("value") for r in records],  # None: infeasible
            "candidate_seconds": [round(r["merge_s"] + r["eval_s"], 2) for r in records],
            "weights": {d: best["params"][f"models[{i}].weight"]
                        for i, d in enumerate(experts)}}
    return f"search (task arithmetic weights, {budget} evaluations)", str(out), info


def _search_verdict(losses: dict, hand: list[str], name: str, info: dict) -> tuple[list, dict]:
    """(markdown lines, numbers) comparing the search with the best hand-picked merge."""
    from lmalloy.merge.search import duration

    mean = {n: sum(r.values()) / len(r) for n, r in losses.items()}
    top = min(hand, key=lambda n: mean[n])
    ok = mean[name] <= mean[top] + 1e-9
    # the first evaluation at least as good as the best hand-picked merge, and when
    reached = next((i for i, v in enumerate(info["scores"]) if v is not None
                    and v <= mean[top] + 1e-9), None)
    w = ", ".join(f"{d} {v:.2f}" for d, v in info["weights"].items())
    md = [f"`lmalloy merge search` chose the three weights of task arithmetic (λ = 1, each "
          f"weight in [0, 1]) with nevergrad's NGOpt, scoring each candidate by the table's "
          f"mean loss (on the split it is reported on, as greedy soup), starting from the base "
          f"(every weight 0): {info['evaluations']} evaluations in "
          f"{duration(info['seconds'])} found weights {w} (at evaluation "
          f"{info['best_evaluation']}), mean loss {mean[name]:.4f} against "
          f"{mean[top]:.4f} for the best hand-picked merge, {top}: "
          + (f"at least as good, from evaluation {reached + 1} on (after "
             f"{duration(sum(info['candidate_seconds'][: reached + 1]))} of merging and "
             "scoring)." if ok and reached is not None else "at least as good." if ok
             else "worse.")]
    return md, {**info, "best_hand_picked": top, "best_hand_picked_mean_loss": mean[top],
                "mean_loss_reported": mean[name], "at_least_as_good": ok,
                "reached_at_evaluation": None if reached is None else reached + 1}


def gain_kept(losses: dict[str, dict[str, float]], merges, domains: list[str]
              ) -> dict[str, dict[str, float]]:
    """(base loss − merge loss) / (base loss − expert loss) per merge, on each expert's own
    domain; NaN where the expert is no better than the base."""
    gains = {}
    for name in merges:
        gains[name] = {}
        for d in domains:
            full = losses["base"][d] - losses[f"expert {d}"][d]
            got = losses["base"][d] - losses[name][d]
            gains[name][d] = got / full if full > 0 else float("nan")
    return gains


def _table(s: dict, losses: dict, gains: dict, eval_tokens: int) -> list[str]:
    """The setup paragraph and the per-model table (markdown lines)."""
    from lmalloy.demo.run import EXPERT_DOMAINS

    md = [
        "Three experts fine-tuned from the pretrained base ("
        + (f"{s['max_steps']} steps" if s["max_steps"] else f"{s['epochs']:g} epochs")
        + f" of {s['global_batch_tokens']:,}-token batches, lr {s['lr']}, sequence "
        f"{s['seq_len']}) on "
        f"one held-out standard-library domain each ({', '.join(EXPERT_DOMAINS)}), then merged "
        f"with `lmalloy merge`. Perplexity on each domain's held-out documents (the "
        f"fine-tunes' validation split, up to {eval_tokens:,} tokens per domain); *kept* = "
        f"(base loss − merge loss) / (base loss − expert loss) on the expert's own domain.",
        "",
        "| model | " + " | ".join(f"{d} ppl" for d in EXPERT_DOMAINS)
        + " | mean loss | " + " | ".join(f"{d} kept" for d in EXPERT_DOMAINS) + " |",
        "|---|" + "---|" * (2 * len(EXPERT_DOMAINS) + 1),
    ]
    for name, row in losses.items():
        mean = sum(row.values()) / len(row)
        kept = [f"{100 * gains[name][d]:.0f}%" if name in gains and not math.isnan(
            gains[name][d]) else ("—" if name in gains else "") for d in EXPERT_DOMAINS]
        md.append(f"| {name} | " + " | ".join(f"{math.exp(row[d]):.2f}" for d in EXPERT_DOMAINS)
                  + f" | {mean:.3f} | " + " | ".join(kept) + " |")
    return md


def _verdict(losses: dict, gains: dict, merges) -> tuple[list[str], str, bool]:
    """(markdown lines, the best merge by mean loss, whether it keeps most of every gain)."""
    from lmalloy.demo.run import EXPERT_DOMAINS

    md = []
    mean_loss = {n: sum(r.values()) / len(r) for n, r in losses.items()}
    best = min(merges, key=lambda n: mean_loss[n])
    improved = [d for d in EXPERT_DOMAINS if not math.isnan(gains[best][d])]
    failed = [d for d in EXPERT_DOMAINS if d not in improved]
    if failed:
        md.append(f"The {', '.join(failed)} expert did not beat the base on its own held-out "
                  f"documents (— in the table): its fine-tune overfitted or was too short, so "
                  f"there is no gain to keep there.")
        md.append("")
    kept = {d: gains[best][d] for d in improved}
    most = bool(kept) and all(v >= 0.5 for v in kept.values())
    shares = ", ".join(f"{d} {100 * v:.0f}%" for d, v in kept.items()) or "none"
    experts_mean = sum(losses[f"expert {d}"][d] for d in EXPERT_DOMAINS) / len(EXPERT_DOMAINS)
    md.append(
        f"> {'Yes' if most else 'No'}: the best merge by mean held-out loss, {best}, keeps "
        f"{shares} of each expert's gain over the base"
        + (f" (the {len(improved)} expert(s) that beat the base)" if failed else "")
        + (" — most of every expert's gain, in one model." if most else
           " — not most of every expert's gain: one merged model trades part of each "
           "expert's specialisation for coverage of all three domains.")
        + f" Mean loss over the three domains: base {mean_loss['base']:.3f}, best merge "
        f"{mean_loss[best]:.3f}, each expert on its own domain {experts_mean:.3f}.")
    return md, best, most


def _claims(windows: dict, losses: dict, best: str, search_name: str, top: str
            ) -> list[dict]:
    """The best merge keeps most of each expert's gain; the search beats every hand-picked
    merge. Intervals: windows resampled within each domain, paired across models."""
    import numpy as np

    from lmalloy.demo import stats as S
    from lmalloy.demo.run import EXPERT_DOMAINS

    parts, kept = [], {}
    for d in EXPERT_DOMAINS:
        kept[d] = S.gap_closed_interval(windows["base"][d], windows[best][d],
                                        windows[f"expert {d}"][d])
        parts.append(S.verdict(kept[d][1], kept[d][2], 0.5))
    worst = min(kept.values(), key=lambda k: k[0] if np.isfinite(k[0]) else -1e9)
    c1 = S.claim("One merged model keeps most (≥ 50%) of each domain expert's gain over the "
                 "base", "model soups, task arithmetic, TIES (2203.05482, 2212.04089, "
                 "2306.01708)", "one model keeps most of each fine-tune's gain",
                 f"{best}: " + ", ".join(f"{d} {S.fmt_interval(*k, pct=True)}"
                                         for d, k in kept.items()),
                 *worst, 0.5, verdict_=S.all_of(parts),
                 note="the best merge is chosen on the split it is reported on")
    sizes = [len(windows["base"][d]) for d in EXPERT_DOMAINS]
    a = np.concatenate([windows[search_name][d] for d in EXPERT_DOMAINS])
    b = np.concatenate([windows[top][d] for d in EXPERT_DOMAINS])
    edges = np.cumsum([0, *sizes])

    def diff(i):  # mean over domains of each domain's mean window loss
        return float(np.mean([(a[i[(i >= lo) & (i < hi)]] - b[i[(i >= lo) & (i < hi)]]).mean()
                              for lo, hi in zip(edges, edges[1:], strict=False)]))

    d = S.bootstrap(diff, sizes)
    c2 = S.claim("`merge search` beats every hand-picked merge (mean held-out loss)",
                 "LoraHub-style gradient-free search (2307.13269)",
                 "searched weights beat hand-set ones",
                 f"search − {top}: {S.fmt_interval(*d)} nats", *d, 0.0, higher=False)
    return [c1, c2]


def run(ctx) -> dict:
    from lmalloy.demo.run import EXPERT_DOMAINS

    pre = ctx.require("pretrain")["numbers"]
    base = pre["model"]
    run_cfg = yaml.safe_load((Path(base).parent / "config.yaml").read_text())
    s = settings(ctx, int(run_cfg["seq_len"]))
    work = ctx.dir("merging")
    eval_tokens = ctx.pick(1024, 8192)
    meta = json.loads((Path(base).parent / "data" / "meta.json").read_text())
    cpt = sum(d["train_bytes"] for d in meta["domains"].values()) / meta["train_tokens"]
    experts = _finetune_experts(ctx, base, s, work, cpt)
    merges = _merge_all(ctx, base, experts, s, work, eval_tokens)
    hand = list(merges)
    chosen_domains = greedy_choice(Path(merges["greedy soup"]), experts)
    search_name, merges[search_name], search = _search(ctx, base, experts, s, work, eval_tokens)

    models = {"base": base, **{f"expert {d}": experts[d] for d in EXPERT_DOMAINS}, **merges}
    losses, windows = _eval_all(models, pre["tokenizer"], s, EXPERT_DOMAINS, eval_tokens)
    gains = gain_kept(losses, merges, EXPERT_DOMAINS)
    img = ctx.dir("figures") / "merging_losses.png"
    _plot(losses, EXPERT_DOMAINS, img)
    verdict, best, most = _verdict(losses, gains, merges)
    search_md, search = _search_verdict(losses, hand, search_name, search)
    claims = _claims(windows, losses, best, search_name, search["best_hand_picked"])
    md = [*_table(s, losses, gains, eval_tokens),
          "", f"![losses per domain](figures/{img.name})", "",
          f"Greedy soup kept the experts for: {', '.join(chosen_domains)} (selected on the "
          f"same held-out split it is reported on, so its row is slightly optimistic).", "",
          *search_md, "", *verdict]
    return {"markdown": "\n".join(md), "claims": claims, "numbers": {
        "base": base, "tokenizer": pre["tokenizer"], "experts": experts, "merges": merges,
        "seq_len": s["seq_len"], "losses": losses, "gain_kept": gains, "best_merge": best,
        "greedy_soup_chose": chosen_domains, "search": search, "keeps_most": most,
        "finetune": json.loads(json.dumps(s))}}
