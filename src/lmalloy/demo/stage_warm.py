"""Demo stage: WARM, weight-averaged reward models (arXiv 2401.12187), in small.

Preference data without people: from the pretraining domains, a real snippet of code is
preferred to a corrupted copy (token swaps, shuffled lines, truncation), with 25% of the
training labels flipped, as in the paper's noisy setting. M reward models are fine-tuned
from the pretrained base with one shared init and diverse learning rates, dropout and data
orders; WARM is their uniform weight average, ENS the mean of their scores. They are
compared in distribution (held-out snippets, same corruptions), out of distribution (the
held-out email/json/http domains; corruptions never trained on), on memorisation of the
flipped training labels, and in best-of-N selection of the base model's samples judged by
a gold RM trained on the same pairs with clean labels.
"""

from __future__ import annotations

import json
from pathlib import Path

TITLE = "WARM: does averaging reward models' weights beat one RM and their ensemble?"

TRAIN_KINDS = ["swap", "shuffle", "truncate"]
OOD_KINDS = ["repeat", "typo", "foreign"]
PAPER_BON_WIN = 0.794  # WARM (M=6) policy vs single-RM policy, the paper's headline


def settings(ctx) -> dict:
    return dict(
        num_models=4, label_noise=0.25,
        train_pairs=ctx.pick(96, 400), test_pairs=ctx.pick(48, 400),
        lr=ctx.pick([3e-4, 1e-3], [2e-4, 8e-4]), dropout=[0.0, 0.1],
        epochs=ctx.pick(1.0, 2.0), batch_size=16, seq_len=96,
        gold_lr=ctx.pick(1e-3, 4e-4), gold_epochs=2.0,
        bon_n=ctx.pick(4, 8), bon_prompts=ctx.pick(8, 48), max_new_tokens=ctx.pick(16, 24),
        max_chars_per_domain=ctx.pick(20_000, 200_000),
    )


def _pair_tokens(tokenizer: str, path: Path) -> float:
    """Mean tokens of one scored sequence (prompt + answer) in a pairs file."""
    from lmalloy.data.tokenizer import Tok
    from lmalloy.reward.data import read_pairs

    tok = Tok.load(tokenizer)
    pairs = read_pairs(path)[:64]
    return sum(len(tok.encode(p.prompt + p.chosen)) for p in pairs) / max(len(pairs), 1)


def _plan(ctx, s: dict, tokenizer: str, pairs_file: Path) -> None:
    """Scale RM training (epochs) to the time left, keeping time for the evaluation."""
    r = ctx.budget.rates
    seq = min(s["seq_len"], _pair_tokens(tokenizer, pairs_file))
    evals = (3 * s["test_pairs"] + s["train_pairs"]) * 2 * seq * (s["num_models"] + 1)
    eval_s = evals / r.get("eval:large") + s["bon_prompts"] * s["bon_n"] * 0.05
    per_epoch = s["train_pairs"] * 2 * seq / r.get("train:rm", "train:large", 0.8)
    tenths = ctx.clock.fit("reward-model training (tenths of an epoch, each of M + gold)",
                           int(10 * s["epochs"]), per_epoch / 10 * (s["num_models"] + 1),
                           fraction=0.95, fixed_s=eval_s + 8.0, minimum=5)
    s["epochs"] = tenths / 10
    s["gold_epochs"] = min(s["gold_epochs"], max(s["epochs"], 1.0))


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def plot(rows: dict[str, dict[str, float]], cols: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    names = list(rows)
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [100 * rows[n][c] for c in cols], width, label=n)
    ax.set_xticks(range(len(cols)), [c.replace(": ", ":\n") for c in cols])
    ax.axhline(50, color="0.5", lw=0.8, ls="--")
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of pairs")
    ax.set_title("Reward models: accuracy (higher is better), memorisation (lower)")
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def run(ctx) -> dict:
    from lmalloy.demo.run import EXPERT_DOMAINS, PRETRAIN_DOMAINS

    pre = ctx.require("pretrain")["numbers"]
    base = pre["model"]
    s = {**settings(ctx), "params": pre["params"]}
    d = ctx.dir("warm")
    common = dict(data=["stdlib"], max_chars_per_domain=s["max_chars_per_domain"],
                  overwrite=True, seed=0)
    files = {
        "train": dict(domains=PRETRAIN_DOMAINS, kinds=TRAIN_KINDS, split="train",
                      num_pairs=s["train_pairs"], label_noise=s["label_noise"]),
        "gold_train": dict(domains=PRETRAIN_DOMAINS, kinds=TRAIN_KINDS, split="train",
                           num_pairs=s["train_pairs"], label_noise=0.0),
        "in_distribution": dict(domains=PRETRAIN_DOMAINS, kinds=TRAIN_KINDS, split="test",
                                num_pairs=s["test_pairs"]),
        "ood_domains": dict(domains=EXPERT_DOMAINS, kinds=TRAIN_KINDS,
                            num_pairs=s["test_pairs"]),
        "ood_corruptions": dict(domains=PRETRAIN_DOMAINS, kinds=OOD_KINDS, split="test",
                                num_pairs=s["test_pairs"]),
    }
    for name, f in files.items():
        ctx.call("reward data", out=str(d / f"{name}.jsonl"), **common, **f)
    _plan(ctx, s, pre["tokenizer"], d / "train.jsonl")
    train_common = dict(base_model=[base], batch_size=s["batch_size"], seq_len=s["seq_len"],
                        overwrite=True, threads=ctx.threads, progress=False)
    ctx.call("reward train", pairs=[str(d / "train.jsonl")], out=str(d / "rms"),
             num_models=s["num_models"], lr=s["lr"], dropout=s["dropout"],
             epochs=s["epochs"], **train_common)
    ctx.call("reward train", pairs=[str(d / "gold_train.jsonl")], out=str(d / "gold"),
             num_models=1, lr=[s["gold_lr"]], epochs=s["gold_epochs"], seed=100,
             **train_common)
    ctx.call("reward warm", models=[str(d / "rms")], out=str(d / "warm"), overwrite=True)
    tests = ["in_distribution", "ood_domains", "ood_corruptions"]
    ctx.call("reward eval", models=[str(d / "rms")], warm=str(d / "warm"),
             pairs=[str(d / f"{t}.jsonl") for t in tests], train_pairs=str(d / "train.jsonl"),
             policy=base, gold=str(d / "gold" / "rm-00"), bon_n=s["bon_n"],
             bon_prompts=s["bon_prompts"], max_new_tokens=s["max_new_tokens"],
             seq_len=s["seq_len"], out=str(d / "results.json"), per_pair=True,
             threads=ctx.threads, overwrite=True)
    res = json.loads((d / "results.json").read_text())
    train_meta = json.loads((d / "rms" / "reward_train.json").read_text())
    tps = [m["tokens_per_s"] for m in train_meta["models"] if m.get("tokens_per_s")]
    if tps:
        ctx.budget.rates.observe("train:rm", sorted(tps)[len(tps) // 2], "reward train")
    return report(ctx, s, res, train_meta, tests)


def _accuracy_md(s: dict, rows: dict, cols: dict, train_meta: dict, img: Path) -> list[str]:
    """The setup paragraph and the accuracy/memorisation table (markdown lines)."""
    hp = ", ".join(f"{m['lr']:.1e}/{m['dropout']:.2f}" for m in train_meta["models"])
    md = [
        f"{s['num_models']} reward models (`LlamaForSequenceClassification`, score read at "
        f"the closing EOS) were fine-tuned from the pretrained base with one shared head "
        f"init on {train_meta['pairs']} preference pairs (real code ≻ code with "
        f"{', '.join(TRAIN_KINDS)}), {cols['memorisation ↓']['pairs']} of them "
        f"({_fmt(s['label_noise'])}%) with "
        f"flipped labels. Learning rate / dropout per model: {hp}. Accuracy is the share of "
        f"held-out pairs ranked correctly (in %; 50 = chance); memorisation is the share of "
        f"the flipped training pairs on which the model agrees with the *wrong* label "
        f"(lower is better); each with its 95% Wilson interval. \"Best\" is the best single "
        f"RM in each column, chosen after the fact (a different RM may win each column).",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    from lmalloy.demo.stats import wilson

    for label, r in rows.items():
        cells = []
        for c in cols:
            lo, hi = wilson(r[c] * cols[c]["pairs"], cols[c]["pairs"])
            cells.append(f"{_fmt(r[c])} [{_fmt(lo)}, {_fmt(hi)}]")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    md.append("| pairs | " + " | ".join(str(v["pairs"]) for v in cols.values()) + " |")
    return md + ["", f"![accuracy and memorisation](figures/{img.name})", ""]


def _best_of_n_md(res: dict) -> list[str]:
    """The best-of-N win rates and the gold scores of the picks (markdown lines)."""
    bon = res["best_of_n"]
    wr = bon["win_rate"]
    md = [
        f"Best-of-{bon['n']}: the base model sampled {bon['n']} continuations for each of "
        f"{bon['prompts']} held-out prompts; each selector kept its top-scored one, and the "
        f"gold RM (same pairs, clean labels) judged the picks (a tie counts one half; 95% "
        f"interval over prompts).",
        "",
        "| comparison | win rate | 95% interval | wins / ties / losses |",
        "|---|---|---|---|",
    ]
    for label, key in (("WARM over a single RM", "warm_vs_single"),
                       ("ENS over a single RM", "ensemble_vs_single"),
                       ("WARM over ENS", "warm_vs_ensemble")):
        x = wr[key]
        md.append(f"| {label} | {_fmt(x['rate'])}% | {_fmt(x['lo'])}–{_fmt(x['hi'])}% | "
                  f"{x['wins']} / {x['ties']} / {x['losses']} |")
    g = bon["gold_of_pick"]
    singles = [g[m] for m in res["models"]]
    return md + ["", f"Mean gold score of the pick: WARM {g['warm']:.3f}, ENS "
                 f"{g['ensemble']:.3f}, single RMs {sum(singles) / len(singles):.3f} (a random "
                 f"sample: {bon['gold_random']:.3f}; the gold RM's own pick: "
                 f"{bon['gold_best']:.3f}).", ""]


def paired_claims(s: dict, res: dict, tests: list[str]) -> list[dict]:
    """WARM's claims from each pair's outcome per selector (paired bootstrap over pairs)."""
    import numpy as np

    from lmalloy.demo import stats as S

    names = res["models"]
    paper = "WARM (2401.12187)"

    def out(group: dict, key: str) -> np.ndarray:
        o = group["outcomes"]
        return (np.mean([o[n] for n in names], axis=0) if key == "mean"
                else np.asarray(o[key], dtype=float))

    acc = res["accuracy"]
    rows = []
    d = S.mean_interval(out(acc[tests[0]], "warm") - out(acc[tests[0]], "mean"))
    rows.append(S.claim("In distribution, WARM is more accurate than the mean single RM",
                        paper, "WA above the individual RMs", f"WARM − mean single "
                        f"{S.fmt_interval(*d, pct=True)} points of accuracy", *d, 0.0))
    for t, label in ((tests[1], "new domains"), (tests[2], "new corruptions")):
        d = S.mean_interval(out(acc[t], "warm") - out(acc[t], "ensemble"))
        rows.append(S.claim(f"Out of distribution ({label}), WARM is more accurate than ENS",
                            paper, "WA above ENS under distribution shift",
                            f"WARM − ENS {S.fmt_interval(*d, pct=True)} points", *d, 0.0))
    mem = res["memorisation"]
    de = S.mean_interval(out(mem, "warm") - out(mem, "ensemble"))
    dm = S.mean_interval(out(mem, "warm") - out(mem, "mean"))
    rows.append(S.claim("WARM memorises the flipped training labels less than ENS and the "
                        "mean single RM", paper, "WA memorises corrupted labels less (§4.2)",
                        f"WARM − ENS {S.fmt_interval(*de, pct=True)}, WARM − mean single "
                        f"{S.fmt_interval(*dm, pct=True)} points ({mem['pairs']} flipped pairs)",
                        *de, 0.0, higher=False, verdict_=S.all_of([
                            S.verdict(de[1], de[2], 0.0, higher=False),
                            S.verdict(dm[1], dm[2], 0.0, higher=False)])))
    w = res["best_of_n"]["win_rate"]["warm_vs_single"]
    rows.append(S.claim(f"Best-of-{res['best_of_n']['n']} picks of WARM beat a single RM's "
                        f"(gold-judged win rate > 50%)", paper,
                        f"{100 * PAPER_BON_WIN:.1f}% (an RL policy, M = 6)",
                        f"{S.fmt_interval(w['rate'], w['lo'], w['hi'], pct=True)} over "
                        f"{w['prompts']} prompts", w["rate"], w["lo"], w["hi"], 0.5,
                        note="the paper's 79.4% is an RL-trained policy on real preferences, "
                        "not best-of-N on a small code model"))
    return rows


def _verdict(s: dict, claims: list[dict], cols: dict) -> str:
    held = [c["claim"] for c in claims if c["verdict"] == "held"]
    n_test = min(v["pairs"] for v in list(cols.values())[:3])
    return (f"> Held in this run: {'; '.join(held) if held else 'none of the claims'}. "
            f"The rest did not hold or are inconclusive (the claims table). With {n_test} "
            f"test pairs per column, one accuracy is uncertain by about "
            f"±{196 * 0.5 / n_test ** 0.5:.0f} points (95%); the comparisons are paired, "
            f"pair by pair, so their intervals are narrower. WARM costs 1/{s['num_models']} "
            f"of the ensemble's inference.")


def report(ctx, s: dict, res: dict, train_meta: dict, tests: list[str]) -> dict:
    acc, mem = res["accuracy"], res["memorisation"]
    cols = {"in distribution": acc[tests[0]], "OOD: new domains": acc[tests[1]],
            "OOD: new corruptions": acc[tests[2]], "memorisation ↓": mem}
    who = {"individual RM (mean)": "mean", "individual RM (best per column)": "best",
           f"ENS ({s['num_models']} forward passes)": "ensemble",
           "WARM (1 forward pass)": "warm"}
    rows = {label: {c: v[key] for c, v in cols.items()} for label, key in who.items()}
    img = ctx.dir("figures") / "warm_accuracy.png"
    plot(rows, list(cols), img)
    wr = res["best_of_n"]["win_rate"]
    claims = paired_claims(s, res, tests)
    md = [*_accuracy_md(s, rows, cols, train_meta, img), *_best_of_n_md(res),
          _verdict(s, claims, cols)]
    numbers = {"rows": rows, "win_rate": wr, "gold_of_pick": res["best_of_n"]["gold_of_pick"],
               "paper_bon_win_rate": PAPER_BON_WIN, "settings": s,
               "warm_model": str(Path(ctx.out) / "warm" / "warm"),
               "train_pairs_per_s": sum(x["pairs_per_s"] for x in train_meta["models"])
               / len(train_meta["models"])}
    return {"markdown": "\n".join(md), "claims": claims, "numbers": numbers}
