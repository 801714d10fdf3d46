"""Demo stage 1: TinyLlama-style pretraining, and what repeated epochs are worth.

TinyLlama (2401.02385) trains about 3 epochs over its data: repeated epochs keep helping.
Muennighoff et al. (2305.16264) find that up to about 4 epochs, repeated data changes the
loss negligibly against as much unique data. This stage

1. trains a byte-level BPE on the training documents of the pretraining domains;
2. probes the training and evaluation throughput of the demo's two model sizes (the
   budget plans every stage from these rates, `lmalloy.demo.budget`);
3. trains the small size twice, one recipe, the same steps and cosine schedule: 4 epochs
   over a quarter of the tokens (`--unique-tokens`) and one epoch over four times as many
   unique tokens, every evaluation logging its per-window losses, so that each epoch's
   change and the repeated-vs-fresh difference have paired intervals. The fresh run also
   keeps EMA, SWA and LaWA (the averaging stage's standard learning rate) and is the
   proxy stage's small base;
4. trains the large size, the demo's base model, on unique data for the time left; later
   stages start from its `final/`.

Sizes and planned steps come from the recorded calibration (the report's appendix); the
budget scales the steps down when the probe says the machine is slower.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TITLE = "Pretraining, TinyLlama-style: do repeated epochs keep helping?"

EPOCHS = 4  # of the repeated run
EVALS = 16  # evaluations per small run; every epoch boundary is one
H192 = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 6, "num_key_value_heads": 2}
# size -> mode -> (preset, overrides, lr, batch tokens, planned steps)
SIZES = {
    "small": {"quick": ("tiny", {"hidden_size": 48, "intermediate_size": 128,
                                 "num_hidden_layers": 1}, 3e-3, 2048, 160),
              "full": ("tiny", {"hidden_size": 64, "intermediate_size": 176}, 3e-3, 4096,
                       320)},
    "large": {"quick": ("tiny", {}, 3e-3, 2048, 160),
              "full": ("tiny", H192, 3e-3, 4096, 480)},
}
AVERAGES = ["ema", "swa", "lawa"]


def settings(ctx) -> dict:
    """The data plan and recipe every pretraining run of the demo shares."""
    from lmalloy.demo.run import PRETRAIN_DOMAINS

    return dict(data=["stdlib"], domains=PRETRAIN_DOMAINS,
                max_chars_per_domain=ctx.pick(60_000, 1_000_000),
                vocab_size=ctx.pick(1024, 4096), seq_len=ctx.pick(128, 256),
                micro_batch_size=16, val_fraction=0.05, seed=0, log_every=5,
                keep_checkpoints=1)


def recipe(ctx, size: str) -> dict:
    """{preset, model_overrides, lr, global_batch_tokens, planned_steps} of a size."""
    preset, over, lr, batch, steps = SIZES[size][ctx.pick("quick", "full")]
    return {"preset": preset, "model_overrides": dict(over), "lr": lr,
            "global_batch_tokens": batch, "planned_steps": steps}


def averaging(steps: int, quick: bool) -> dict:
    """EMA, SWA and LaWA settings for a run of `steps` (LaWA: 5 snapshots, Sanyal et al.'s
    window of 5 × 200 of ~70k steps scaled to the run: snapshots every steps/16)."""
    return dict(average=AVERAGES, ema={"decay": 0.95 if quick else 0.98},
                swa={"start": 0.5, "every": 2}, lawa={"k": 5, "every": max(2, steps // 16)})


def model_kwargs(ctx, size: str) -> dict:
    from lmalloy.train.presets import model_kwargs as kw

    r = recipe(ctx, size)
    return kw(r["preset"], settings(ctx)["vocab_size"], r["model_overrides"])


def _tokenizer(ctx, s: dict, out: Path) -> Path:
    """The byte-level BPE of every run, trained on the training documents only."""
    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.pack import train_documents
    from lmalloy.data.tokenizer import train_tokenizer
    from lmalloy.io.writer import atomic_output

    corpus = load_corpus(s["data"], s["domains"], [], s["max_chars_per_domain"], quiet=True)
    with atomic_output(out, overwrite=True) as tmp:
        train_tokenizer(train_documents(corpus, s["val_fraction"], s["seed"]),
                        s["vocab_size"], tmp, model_max_length=s["seq_len"])
    return out


def _probe(ctx, s: dict) -> dict:
    """Measured tokens/s of both sizes; they seed the budget's rates."""
    from lmalloy.demo.budget import load_average, probe

    out = {}
    for size in ("small", "large"):
        load = load_average()
        r = probe(model_kwargs(ctx, size), s["seq_len"], s["micro_batch_size"],
                  ctx.pick(0.5, 2.0))
        out[size] = {**r, "load": load}
        for kind in ("train", "eval"):
            ctx.budget.rates.observe(f"{kind}:{size}", r[kind], "probe")
    return out


def run_overhead(ctx) -> float:
    """Seconds a training run costs beyond its steps and evaluations (packing the data,
    building the model, saving, plotting), as measured here."""
    return ctx.pick(3.0, 5.0)


def step_seconds(ctx, size: str, batch: int, eval_every: int, eval_tokens: int,
                 models: int = 1) -> float:
    """Estimated seconds per optimizer step, the evaluations' share included."""
    rates = ctx.budget.rates
    return (batch / rates.get(f"train:{size}")
            + models * eval_tokens / rates.get(f"eval:{size}") / eval_every)


def small_runs(ctx, s: dict, tok: Path, root: Path, eval_tokens: int) -> dict:
    """The repeated and the fresh run of the small size (same steps, same schedule)."""
    from lmalloy.demo.common import train_run

    r = recipe(ctx, "small")
    batch = r["global_batch_tokens"]
    unit = (step_seconds(ctx, "small", batch, r["planned_steps"] // EVALS, eval_tokens, 1)
            + step_seconds(ctx, "small", batch, r["planned_steps"] // EVALS, eval_tokens,
                           1 + len(AVERAGES)))
    steps = ctx.clock.fit("steps of each small run (repeated and fresh)", r["planned_steps"],
                          unit, fraction=0.4, fixed_s=2 * run_overhead(ctx),
                          minimum=2 * EVALS, multiple=EVALS)
    common = dict(s, preset=r["preset"], model_overrides=r["model_overrides"], lr=r["lr"],
                  global_batch_tokens=batch, max_steps=steps, tokenizer=str(tok),
                  warmup_steps=max(2, steps // 20), eval_every=steps // EVALS,
                  eval_tokens=eval_tokens, eval_windows=True)
    common.pop("vocab_size")
    runs = {}
    runs["repeated"] = train_run(ctx, "pretrain", root / "small-repeated", "train:small",
                                 unique_tokens=steps * batch // EPOCHS, **common)
    runs["fresh"] = train_run(ctx, "pretrain", root / "small-fresh", "train:small",
                              **common, **averaging(steps, ctx.quick))
    return {"runs": runs, "steps": steps, "config": common}


def large_run(ctx, s: dict, tok: Path, root: Path, eval_tokens: int) -> dict:
    from lmalloy.demo.common import train_run

    r = recipe(ctx, "large")
    batch, evals = r["global_batch_tokens"], 8
    unit = step_seconds(ctx, "large", batch, max(1, r["planned_steps"] // evals), eval_tokens)
    steps = ctx.clock.fit("steps of the large (base) model", r["planned_steps"], unit,
                          fraction=0.97, fixed_s=run_overhead(ctx) + 2.0, minimum=evals,
                          multiple=evals)
    cfg = dict(s, preset=r["preset"], model_overrides=r["model_overrides"], lr=r["lr"],
               global_batch_tokens=batch, max_steps=steps, tokenizer=str(tok),
               warmup_steps=max(2, steps // 20), eval_every=steps // evals,
               eval_tokens=eval_tokens)
    cfg.pop("vocab_size")
    return {"run": train_run(ctx, "pretrain", root / "large", "train:large", **cfg),
            "steps": steps, "config": cfg}


def at_step(records: list[dict], step: int) -> dict:
    """The evaluation logged at `step`."""
    return next(r["eval"] for r in records if "eval" in r and r["step"] == step)


def epoch_rows(small: dict) -> list[dict]:
    """Per epoch boundary of the repeated run: both runs' loss there (same step)."""
    from lmalloy.demo.common import window_losses

    per = small["steps"] // EPOCHS
    rows = []
    for e in range(1, EPOCHS + 1):
        rep = at_step(small["runs"]["repeated"]["records"], e * per)["raw"]
        fre = at_step(small["runs"]["fresh"]["records"], e * per)["raw"]
        rows.append({"epoch": e, "step": e * per, "repeated": rep["loss"],
                     "repeated_bpb": rep["bpb"], "fresh": fre["loss"], "fresh_bpb": fre["bpb"],
                     "w_repeated": window_losses(rep), "w_fresh": window_losses(fre)})
    return rows


def claims(rows: list[dict]) -> list[dict]:
    """Each repeated epoch lowers the loss (TinyLlama); 4 repeated epochs keep most of the
    gain that fresh data gives over the same steps (Muennighoff et al.)."""
    from lmalloy.demo import stats as S

    parts, deltas = [], []
    for a, b in zip(rows, rows[1:], strict=False):
        d = S.mean_interval(b["w_repeated"] - a["w_repeated"])
        deltas.append(d)
        parts.append(S.verdict(d[1], d[2], 0.0, higher=False))
    last = deltas[-1]
    first, end = rows[0], rows[-1]
    c1 = S.claim("Every repeated epoch lowers the validation loss",
                 "TinyLlama (2401.02385)", "~3 epochs over 950B tokens, loss still falling",
                 f"epoch 1 → {len(rows)}: {first['repeated']:.3f} → {end['repeated']:.3f}; "
                 f"last epoch {S.fmt_interval(*last)} nats (every epoch's interval below 0: "
                 f"{sum(p == S.HELD for p in parts)} of {len(parts)})",
                 *last, 0.0, higher=False, verdict_=S.all_of(parts))
    r1, re_, f1, fe = (first["w_repeated"], end["w_repeated"], first["w_fresh"],
                       end["w_fresh"])

    def kept(i):
        den = f1[i].mean() - fe[i].mean()
        return (r1[i].mean() - re_[i].mean()) / den if den > 0 else float("nan")

    k = S.bootstrap(kept, len(r1))
    c2 = S.claim(f"{len(rows)} repeated epochs are about as good as fresh data: the repeated "
                 f"run keeps ≥ 90% of the gain the fresh run makes after epoch 1 (same steps)",
                 "Muennighoff et al. (2305.16264)", "negligible loss change up to ~4 epochs",
                 f"{S.fmt_interval(*k, pct=True)} of the fresh run's gain (final loss "
                 f"{end['repeated']:.3f} repeated vs {end['fresh']:.3f} fresh)",
                 *k, 0.9, note="90% is this project's reading of 'negligible'")
    return [c1, c2]


def plot(small: dict, large: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    ax = axes[0]
    for name, color in (("repeated", "C3"), ("fresh", "C0")):
        ev = [r for r in small["runs"][name]["records"] if "eval" in r]
        ax.plot([r["step"] for r in ev], [r["eval"]["raw"]["loss"] for r in ev], "o-", ms=3,
                color=color, label=f"{name}" + (f" ({EPOCHS} epochs over ¼ of the tokens)"
                                                 if name == "repeated" else " (one epoch)"))
    for e in range(1, EPOCHS):
        ax.axvline(e * small["steps"] / EPOCHS, color="0.85", ls="--", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Small size: repeated vs fresh data, same schedule")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for label, recs in (("large (the demo's base)", large["run"]["records"]),
                        ("small, fresh", small["runs"]["fresh"]["records"])):
        ev = [r for r in recs if "eval" in r]
        ax.plot([r["tokens"] / 1e6 for r in ev], [r["eval"]["raw"]["bpb"] for r in ev], "o-",
                ms=3, label=label)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Base model vs the small size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _markdown(ctx, s: dict, meta: dict, small: dict, large: dict, rows: list[dict],
              params: dict, img: Path) -> list[str]:
    sr, lr_ = recipe(ctx, "small"), recipe(ctx, "large")
    lr_final = large["run"]["records"]
    last = [r for r in lr_final if "eval" in r][-1]
    md = [
        f"A byte-level BPE ({s['vocab_size']} tokens) trained on the training documents of "
        f"{len(s['domains'])} standard-library domains (up to {s['max_chars_per_domain']:,} "
        f"characters each: {meta['train_tokens']:,} training tokens, {meta['val_tokens']:,} "
        f"validation tokens, split by document per domain). Every run: AdamW (0.9, 0.95), "
        f"weight decay 0.1, clip 1.0, cosine to lr/10, sequence {s['seq_len']}.",
        "",
        f"**Repeated vs fresh data.** The small size ({params['small'] / 1e6:.2f}M parameters) "
        f"trained twice for {small['steps']} steps of {sr['global_batch_tokens']:,} tokens "
        f"(peak lr {sr['lr']}): {EPOCHS} epochs over a seeded random {100 // EPOCHS}% of the "
        f"training sequences (`--unique-tokens`), and one pass over as many unique tokens as "
        f"it trains on. Both are evaluated at the same steps on the same "
        f"{small['config']['eval_tokens']:,} validation tokens; intervals are paired over "
        f"the {len(rows[0]['w_repeated'])} validation windows.",
        "",
        "| epoch | step | repeated: val loss | bits/byte | change vs previous epoch (95%) "
        "| fresh: val loss | bits/byte |",
        "|---|---|---|---|---|---|---|",
    ]
    from lmalloy.demo import stats as S

    for i, r in enumerate(rows):
        d = "" if i == 0 else S.fmt_interval(*S.mean_interval(
            r["w_repeated"] - rows[i - 1]["w_repeated"]))
        md.append(f"| {r['epoch']} | {r['step']} | {r['repeated']:.3f} | "
                  f"{r['repeated_bpb']:.3f} | {d} | {r['fresh']:.3f} | {r['fresh_bpb']:.3f} |")
    md += ["", f"![validation loss: repeated vs fresh; the base model](figures/{img.name})", "",
           f"**The base model.** The large size ({params['large'] / 1e6:.2f}M parameters, "
           f"{params['large'] / params['small']:.1f}× the small one) trained on unique data "
           f"for {large['steps']} steps of {lr_['global_batch_tokens']:,} tokens (peak lr "
           f"{lr_['lr']}, {last['epoch']:.2f} epochs, {large['run']['seconds']:.0f} s at "
           f"{large['run']['tokens_per_s']:,.0f} tokens/s): validation loss "
           f"{last['eval']['raw']['loss']:.3f}, {last['eval']['raw']['bpb']:.3f} bits/byte "
           f"(the fresh small run: {rows[-1]['fresh_bpb']:.3f}). Every later stage starts "
           f"from it."]
    return md


def run(ctx) -> dict:
    from lmalloy.io.folder import open_model

    s = settings(ctx)
    root = ctx.dir("pretrain")
    secs, t0 = {}, time.perf_counter()
    tok = _tokenizer(ctx, s, root / "tokenizer")
    secs["tokenizer"] = time.perf_counter() - t0
    throughput = _probe(ctx, s)
    secs["probe"] = time.perf_counter() - t0 - secs["tokenizer"]
    eval_tokens = ctx.pick(4096, 16384)
    small = small_runs(ctx, s, tok, root, eval_tokens)
    large = large_run(ctx, s, tok, root, 2 * eval_tokens)
    meta = json.loads((root / "large" / "data" / "meta.json").read_text())
    rows = epoch_rows(small)
    params = {"small": open_model(root / "small-fresh" / "final").num_parameters,
              "large": open_model(root / "large" / "final").num_parameters}
    img = ctx.dir("figures") / "pretrain_epochs.png"
    plot(small, large, img)
    cl = claims(rows)
    md = _markdown(ctx, s, meta, small, large, rows, params, img)
    last = [r for r in large["run"]["records"] if "eval" in r][-1]["eval"]["raw"]
    secs.update({f"small {k}": v["seconds"] for k, v in small["runs"].items()},
                large=large["run"]["seconds"])
    return {"markdown": "\n".join(md), "claims": cl, "numbers": {
        "model": str(root / "large" / "final"), "tokenizer": str(tok),
        "params": params["large"], "small_params": params["small"],
        "small_base": str(root / "small-fresh" / "final"),
        "fresh_run": str(root / "small-fresh"), "small_steps": small["steps"],
        "small_config": small["config"], "large_steps": large["steps"],
        "large_config": large["config"], "settings": s, "train_tokens": meta["train_tokens"],
        "val_loss": last["loss"], "val_bpb": last["bpb"], "throughput": throughput,
        "rates": dict(ctx.budget.rates.tps), "seconds": secs,
        "epochs": [{k: v for k, v in r.items() if not k.startswith("w_")} for r in rows]}}
