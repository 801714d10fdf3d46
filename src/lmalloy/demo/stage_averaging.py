"""Demo stage: early weight averaging during pretraining (Sanyal et al., 2306.03241), in small.

Sanyal et al. pretrain with a high peak learning rate (10× nanoGPT's) and keep LaWA — the
mean of the latest k = 5 checkpoints, 200 steps apart — from early on: the average reaches
a given validation loss in fewer steps than the raw model, the more so the higher the
learning rate, and beats EMA and SWA. Here the same small model, data and schedule run at
two peak learning rates: the pretraining stage's fresh run (the standard rate, which
already kept EMA, SWA and LaWA) and one more run at HIGH_LR × that rate. Every
evaluation scores all four sets of weights on the same validation windows, logging each
window's loss, so steps-to-loss has a paired bootstrap interval over windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TITLE = "Weight averaging during pretraining (EMA, SWA, LaWA): does it reach a loss sooner?"
NAMES = ["raw", "ema", "swa", "lawa"]
COLORS = {"raw": "C0", "ema": "C1", "swa": "C2", "lawa": "C3"}
HIGH_LR = 4.0  # × the standard peak lr (Sanyal et al.: 6e-3 against nanoGPT's 6e-4)
TARGET_AT = 0.5  # the target loss: the raw weights' loss at this share of the run


def first_step_below(evals: list[dict], name: str, target: float) -> int | None:
    """The first evaluated step at which `name`'s validation loss is <= target."""
    for r in evals:
        e = r["eval"].get(name)
        if e is not None and e["loss"] <= target:
            return r["step"]
    return None


def window_matrix(evals: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps (E,), {weights: (E, N) per-window losses}) of a run's evaluations; +inf where
    an average did not exist yet (SWA before its start)."""
    from lmalloy.demo.common import window_losses

    steps = np.asarray([r["step"] for r in evals])
    n = len(window_losses(evals[-1]["eval"]["raw"]))
    return steps, {name: np.stack([window_losses(r["eval"][name]) if name in r["eval"]
                                   else np.full(n, np.inf) for r in evals])
                   for name in NAMES if name in evals[-1]["eval"]}


def crossing(steps: np.ndarray, curve: np.ndarray, target: float) -> float:
    """The step at which `curve` (E,) first reaches `target`, linear between evaluations;
    one evaluation past the end when it never does."""
    hit = np.nonzero(curve <= target)[0]
    if not len(hit):
        return float(steps[-1] + (steps[-1] - steps[-2]))
    k = hit[0]
    if k == 0 or not np.isfinite(curve[k - 1]):
        return float(steps[k])
    frac = (curve[k - 1] - target) / (curve[k - 1] - curve[k])
    return float(steps[k - 1] + frac * (steps[k] - steps[k - 1]))


def target_of(raw: np.ndarray) -> float:
    """The raw weights' loss at TARGET_AT of the run."""
    return float(raw[max(0, int(round(TARGET_AT * len(raw))) - 1)])


def steps_saved(steps: np.ndarray, raw: np.ndarray, avg: np.ndarray) -> float:
    """Share of the raw weights' steps to their own loss at TARGET_AT of the run that the
    average saves (curves (E,)); negative when the average gets there later."""
    target = target_of(raw)
    s_raw = crossing(steps, raw, target)
    return (s_raw - crossing(steps, avg, target)) / s_raw


def saved_interval(steps, mats: dict, name: str) -> tuple[float, float, float]:
    from lmalloy.demo.stats import bootstrap

    raw, avg = mats["raw"], mats[name]
    return bootstrap(lambda i: steps_saved(steps, raw[:, i].mean(1), avg[:, i].mean(1)),
                     raw.shape[1])


def plot_curves(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), dpi=110,
                             squeeze=False)
    for ax, (label, records) in zip(axes[0], runs.items(), strict=True):
        evals = [r for r in records if "eval" in r]
        train = [r for r in records if "loss" in r]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.85", lw=1,
                label="train loss (raw)")
        for n in NAMES:
            pts = [(r["step"], r["eval"][n]["loss"]) for r in evals if n in r["eval"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=COLORS[n],
                    label=f"val loss: {n}")
        losses = sorted(r["eval"][n]["loss"] for r in evals for n in r["eval"])
        lo, hi = losses[0], losses[int(0.75 * (len(losses) - 1))]
        ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.1 * (hi - lo + 0.1))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _high_lr_run(ctx, pre: dict) -> tuple[list[dict], dict]:
    """The fresh run's recipe at HIGH_LR × its peak lr, averages kept, same evaluations."""
    from lmalloy.demo import stage_pretrain as P
    from lmalloy.demo.common import train_run

    cfg = dict(pre["small_config"])
    steps = cfg["max_steps"]
    unit = P.step_seconds(ctx, "small", cfg["global_batch_tokens"], cfg["eval_every"],
                          cfg["eval_tokens"], len(NAMES))
    n = ctx.clock.fit("steps of the high-lr run", steps, unit, fraction=0.95,
                      fixed_s=P.run_overhead(ctx) + 1.0, minimum=2 * P.EVALS,
                      multiple=P.EVALS)
    cfg.update(max_steps=n, eval_every=n // P.EVALS, warmup_steps=max(2, n // 20),
               lr=HIGH_LR * cfg["lr"])
    run = train_run(ctx, "pretrain", ctx.out / "averaging", "train:small", **cfg,
                    **P.averaging(n, ctx.quick))
    return run["records"], cfg


def _rows(steps, mats) -> list[dict]:
    rows = []
    target = target_of(mats["raw"].mean(1))
    for n in mats:
        curve = mats[n].mean(1)
        rows.append({"name": n, "target_step": crossing(steps, curve, target),
                     "final": float(curve[-1]), "best": float(curve.min()),
                     "saved": None if n == "raw" else saved_interval(steps, mats, n)})
    return rows


def _table(label: str, cfg: dict, rows: list[dict]) -> list[str]:
    from lmalloy.demo.stats import fmt_interval

    md = [f"**{label}** (peak lr {cfg['lr']:g}, {cfg['max_steps']} steps):", "",
          "| weights | first step at the raw half-way loss | steps saved (95%) | final val loss "
          "| best val loss |", "|---|---|---|---|---|"]
    for r in rows:
        saved = "" if r["saved"] is None else fmt_interval(*r["saved"], pct=True)
        at = r["target_step"]
        md.append(f"| {r['name']} | {at:.0f}{'' if at <= cfg['max_steps'] else ' (never)'} | "
                  f"{saved} "
                  f"| {r['final']:.4f} | {r['best']:.4f} |")
    return md + [""]


def _claims(res: dict) -> list[dict]:
    from lmalloy.demo import stats as S

    out = []
    for key, label in (("high", "the high"), ("standard", "a standard")):
        lawa = next(r for r in res[key]["rows"] if r["name"] == "lawa")["saved"]
        out.append(S.claim(f"At {label} learning rate, LaWA reaches the raw weights' half-way "
                           f"loss in fewer steps", "Sanyal et al. (2306.03241)",
                           "LaWA reaches a given loss earlier (more at high lr)",
                           f"{S.fmt_interval(*lawa, pct=True)} fewer steps",
                           *lawa, 0.0))
    (sh, mh), (ss, ms) = res["high"]["mats"], res["standard"]["mats"]
    n = min(mh["raw"].shape[1], ms["raw"].shape[1])

    def grow(i):
        return (steps_saved(sh, mh["raw"][:, i].mean(1), mh["lawa"][:, i].mean(1))
                - steps_saved(ss, ms["raw"][:, i].mean(1), ms["lawa"][:, i].mean(1)))

    g = S.bootstrap(grow, n)
    out.append(S.claim("LaWA's saving grows with the learning rate (high minus standard)",
                       "Sanyal et al. (2306.03241)", "gains grow with higher lr",
                       f"{S.fmt_interval(*g, pct=True)} of the steps", *g, 0.0))
    return out


def run(ctx) -> dict:
    from lmalloy.demo.common import evals_of
    from lmalloy.demo.stage_pretrain import averaging
    from lmalloy.io.runs import METRICS_FILE
    from lmalloy.train.plot import read_metrics

    pre = ctx.require("pretrain")["numbers"]
    standard = read_metrics(Path(pre["fresh_run"]) / METRICS_FILE)
    std_cfg = dict(pre["small_config"])
    high, high_cfg = _high_lr_run(ctx, pre)
    res = {}
    for key, records in (("high", high), ("standard", standard)):
        evals = evals_of(records)
        steps, mats = window_matrix(evals)
        res[key] = {"rows": _rows(steps, mats), "mats": (steps, mats)}
    img = ctx.dir("figures") / "averaging_curves.png"
    plot_curves({f"peak lr {high_cfg['lr']:g} (high)": high,
                 f"peak lr {std_cfg['lr']:g} (standard)": standard}, img)
    cl = _claims(res)
    avg = averaging(high_cfg["max_steps"], ctx.quick)
    md = [f"The pretraining stage's small model, data and schedule (cosine to lr/10, warmup "
          f"5%) at two peak learning rates: the standard one (the pretraining stage's fresh "
          f"run) and {HIGH_LR:g}× it. Beside the raw weights, three averages in fp32: **EMA** "
          f"(decay {avg['ema']['decay']}), **SWA** (the mean of every 2nd step from half-way), "
          f"**LaWA** (the mean of the latest {avg['lawa']['k']} snapshots, "
          f"{avg['lawa']['every']} steps apart, from the start — Sanyal et al.'s recipe "
          f"scaled to the run). All four are scored on the same {high_cfg['eval_tokens']:,} "
          f"validation tokens every {high_cfg['eval_every']} steps. *Steps saved*: how many "
          f"fewer steps than the raw weights an average needs to reach the raw weights' own "
          f"loss at half the run (linear between evaluations; negative: later; one evaluation "
          f"past the end when never), with a bootstrap interval over the validation "
          f"windows.", "",
          f"![validation loss of the raw weights and their averages](figures/{img.name})", "",
          *_table("High learning rate", high_cfg, res["high"]["rows"]),
          *_table("Standard learning rate", std_cfg, res["standard"]["rows"])]
    return {"markdown": "\n".join(md), "claims": cl, "numbers": {
        "run": str(ctx.out / "averaging"),
        "models": {n: str(ctx.out / "averaging" / "final" / n) for n in NAMES[1:]},
        "high_lr": high_cfg["lr"], "standard_lr": std_cfg["lr"],
        "rows": {k: [{**r, "saved": list(r["saved"]) if r["saved"] else None}
                     for r in v["rows"]] for k, v in res.items()}}}

