"""Demo stage: early weight averaging during pretraining (Sanyal et al., 2306.03241), in small.

Sanyal et al. pretrain with a high peak learning rate and keep LaWA — the mean of the
latest k = 5 checkpoints, 200 steps apart — from early on; the average reaches a given
validation loss in fewer steps than the raw model and beats EMA and SWA. This stage runs
the same experiment at demo scale: one pretraining run with a peak lr well above the
pretraining stage's, EMA, SWA and LaWA kept beside the raw weights and all four evaluated
on the same validation tokens at every evaluation. It reports the curves, the step at
which each first reaches two loss levels, the final losses, and whether averaging helped.
"""

from __future__ import annotations

from pathlib import Path

TITLE = "Weight averaging during pretraining (EMA, SWA, LaWA): does it reach a loss sooner?"
NAMES = ["raw", "ema", "swa", "lawa"]
COLORS = {"raw": "C0", "ema": "C1", "swa": "C2", "lawa": "C3"}


def first_step_below(evals: list[dict], name: str, target: float) -> int | None:
    """The first evaluated step at which `name`'s validation loss is <= target."""
    for r in evals:
        e = r["eval"].get(name)
        if e is not None and e["loss"] <= target:
            return r["step"]
    return None


def plot_curves(records: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "eval" in r]
    train = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.3), dpi=110)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.8", lw=1,
            label="train loss (raw)")
    for n in NAMES:
        pts = [(r["step"], r["eval"][n]["loss"]) for r in evals if n in r["eval"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=COLORS[n],
                    label=f"val loss: {n}")
    losses = [r["eval"][n]["loss"] for r in evals for n in r["eval"]]
    if losses:  # zoom on the part where the curves differ
        lo, hi = min(losses), sorted(losses)[int(0.8 * (len(losses) - 1))]
        ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.1 * (hi - lo + 0.1))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _train(ctx) -> tuple[Path, dict, dict]:
    """One high-lr pretraining run with EMA, SWA and LaWA kept beside the raw weights.
    Returns (run folder, its settings, the averaging settings)."""
    from lmalloy.demo import stage_pretrain

    tokenizer = ctx.require("pretrain")["numbers"]["tokenizer"]
    s = stage_pretrain.settings(ctx)
    steps = ctx.pick(120, 400)
    every = ctx.pick(6, 20)  # LaWA spacing (Sanyal et al.: 200 of ~70k steps)
    s.update(preset="tiny", seq_len=ctx.pick(128, 256), global_batch_tokens=ctx.pick(2048, 4096),
             micro_batch_size=ctx.pick(8, 16), max_steps=steps, lr=ctx.pick(8e-3, 8e-3),
             warmup_steps=ctx.pick(10, 30), eval_every=ctx.pick(10, 25),
             eval_tokens=ctx.pick(8192, 16384), save_every=steps, keep_checkpoints=1)
    s.pop("epochs", None)
    averaging = dict(average=["ema", "swa", "lawa"],
                     ema={"decay": ctx.pick(0.95, 0.98)},
                     swa={"start": 0.5, "every": 2},
                     lawa={"k": 5, "every": every})
    run_dir = ctx.out / "averaging"
    ctx.call("pretrain", out=str(run_dir), overwrite=True, threads=ctx.threads,
             tokenizer=tokenizer, **s, **averaging)
    return run_dir, s, averaging


def loss_table(evals: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """(per set of weights: first steps at two loss levels, final and best loss; the two
    levels). The levels: the raw model's loss at 40% of the run, and the lowest loss that
    every curve reaches (the best of the worst), so each column is defined for all."""
    final = {n: evals[-1]["eval"][n]["loss"] for n in NAMES if n in evals[-1]["eval"]}
    early = evals[max(0, int(0.4 * len(evals)) - 1)]["eval"]["raw"]["loss"]
    late = max(min(r["eval"][n]["loss"] for r in evals if n in r["eval"]) for n in final)
    rows = []
    for n in final:
        rows.append({"name": n, "early": first_step_below(evals, n, early),
                     "late": first_step_below(evals, n, late), "final": final[n],
                     "best": min(r["eval"][n]["loss"] for r in evals if n in r["eval"])})
    return rows, {"early": early, "late": late}


def _verdict(rows: list[dict], late: float) -> tuple[str, bool, float]:
    """(the verdict line, whether averaging helped, the best average's final gain)."""
    raw = next(r for r in rows if r["name"] == "raw")
    best = min((r for r in rows if r["name"] != "raw"), key=lambda r: r["final"])
    gain = raw["final"] - best["final"]
    raw_late = raw["late"]
    earlier = [r for r in rows if r["name"] != "raw" and r["late"] is not None
               and raw_late is not None and r["late"] < raw_late]
    helped = gain > 0.005 or bool(earlier)
    if not helped:
        return (f"> No, averaging did not help in this run: the raw weights end at "
                f"{raw['final']:.3f} and the best average ({best['name'].upper()}) at "
                f"{best['final']:.3f} ({-gain:+.3f} nats/token), and no average reached "
                f"loss {late:.3f} before the raw weights did. While the loss still falls "
                f"steeply, an average lags behind the moving weights more than it gains "
                f"from cancelling their noise; Sanyal et al.'s gains came from runs "
                f"thousands of steps long.", helped, gain)
    bits = []
    if gain > 0.005:
        bits.append(f"{best['name'].upper()} ends {gain:.3f} nats/token below the raw "
                    f"weights ({best['final']:.3f} vs {raw['final']:.3f})")
    if earlier:
        e = min(earlier, key=lambda r: r["late"])
        bits.append(f"{e['name'].upper()} reaches loss {late:.3f} at step {e['late']}, "
                    f"the raw weights at step {raw_late} "
                    f"({100 * (1 - e['late'] / raw_late):.0f}% fewer steps)")
    return "> Yes, averaging helped in this run: " + "; ".join(bits) + ".", helped, gain


def run(ctx) -> dict:
    from lmalloy.io.runs import METRICS_FILE
    from lmalloy.train.plot import read_metrics

    run_dir, s, averaging = _train(ctx)
    records = read_metrics(run_dir / METRICS_FILE)
    evals = [r for r in records if "eval" in r]
    rows, targets = loss_table(evals)
    early, late = targets["early"], targets["late"]
    final = {r["name"]: r["final"] for r in rows}
    img = ctx.dir("figures") / "averaging_curves.png"
    plot_curves(records, img, f"Peak lr {s['lr']}: raw weights vs their averages")
    verdict, helped, gain = _verdict(rows, late)
    fmt = lambda v: "—" if v is None else str(v)  # noqa: E731
    md = [
        f"One pretraining run of the `{s['preset']}` preset ({s['max_steps']} steps of "
        f"{s['global_batch_tokens']:,} tokens, the pretraining stage's corpus and tokenizer) "
        f"with a high peak learning rate ({s['lr']}, warmup {s['warmup_steps']}, cosine to "
        f"lr/10), with three averages of its weights kept in fp32: **EMA** (decay "
        f"{averaging['ema']['decay']}), **SWA** (equal-weight mean of every 2nd step from "
        f"half-way), **LaWA** (mean of the latest 5 snapshots, {averaging['lawa']['every']} "
        f"steps apart, from the start — Sanyal et al.'s recipe scaled down). All four models "
        f"are evaluated on the same {s['eval_tokens']:,} validation tokens every "
        f"{s['eval_every']} steps.",
        "",
        f"![validation loss of the raw weights and their averages](figures/{img.name})",
        "",
        f"| weights | first step at loss ≤ {early:.3f} | first step at loss ≤ {late:.3f} "
        f"| final val loss | best val loss |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(f"| {r['name']} | {fmt(r['early'])} | {fmt(r['late'])} | "
                  f"{r['final']:.4f} | {r['best']:.4f} |")
    md += ["", verdict]
    return {"markdown": "\n".join(md), "numbers": {
        "run": str(run_dir), "models": {n: str(run_dir / "final" / n) for n in final
                                        if n != "raw"},
        "final_loss": final, "targets": targets, "rows": rows,
        "lr": s["lr"], "steps": s["max_steps"], "helped": helped, "gain_nats": gain}}
