"""Demo stage 1: TinyLlama-style pretraining for several epochs on the built-in corpus.

TinyLlama's lesson: repeating the data for several epochs keeps helping. This stage trains
a byte-level BPE on the general pretraining domains, pretrains the `small` preset (`tiny`
in quick mode) for several epochs with the TinyLlama optimiser settings, and reports the
validation loss at the end of each epoch. Later stages start from its `final/` model.
"""

from __future__ import annotations

import json
from pathlib import Path

TITLE = "Pretraining, TinyLlama-style: do repeated epochs keep helping?"


def settings(ctx) -> dict:
    from lmalloy.demo.run import PRETRAIN_DOMAINS

    return dict(
        data=["stdlib"], domains=PRETRAIN_DOMAINS,
        max_chars_per_domain=ctx.pick(6_000, 20_000),
        preset=ctx.pick("tiny", "small"), vocab_size=ctx.pick(1024, 4096),
        seq_len=ctx.pick(128, 256), global_batch_tokens=ctx.pick(2048, 8192),
        micro_batch_size=ctx.pick(8, 16), epochs=ctx.pick(3, 4), lr=ctx.pick(3e-3, 2e-3),
        warmup_steps=ctx.pick(5, 20), eval_every=ctx.pick(5, 6), eval_tokens=ctx.pick(8192, 24576),
        val_fraction=0.1, log_every=ctx.pick(5, 5), keep_checkpoints=2, seed=0,
    )


def epoch_table(records: list[dict]) -> list[dict]:
    """Validation loss at (the first evaluation at or after) the end of each epoch."""
    evals = [r for r in records if "eval" in r]
    rows = []
    last_epoch = int(round(evals[-1]["epoch"])) if evals else 0
    for e in range(1, last_epoch + 1):
        hit = next((r for r in evals if r["epoch"] >= e - 1e-6), evals[-1])
        raw = hit["eval"]["raw"]
        rows.append({"epoch": e, "step": hit["step"], "loss": raw["loss"], "ppl": raw["ppl"],
                     "bpb": raw["bpb"]})
    return rows


def plot_epochs(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "eval" in r]
    train = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], color="0.7", lw=1,
            label="train loss")
    ax.plot([r["epoch"] for r in evals], [r["eval"]["raw"]["loss"] for r in evals], "o-",
            ms=3, label="validation loss")
    for e in range(1, int(round(evals[-1]["epoch"])) + 1):
        ax.axvline(e, color="0.85", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Pretraining: validation loss across repeated epochs")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def run(ctx) -> dict:
    from lmalloy.io.runs import METRICS_FILE
    from lmalloy.train.plot import read_metrics

    run_dir = ctx.out / "pretrain"
    s = settings(ctx)
    ctx.call("pretrain", out=str(run_dir), overwrite=True, threads=ctx.threads, **s)
    records = read_metrics(run_dir / METRICS_FILE)
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    rows = epoch_table(records)
    img = ctx.dir("figures") / "pretrain_epochs.png"
    plot_epochs(records, img)
    train = [r for r in records if "loss" in r]
    tps = sorted(r["tokens_per_s"] for r in train[1:] or train)
    mfu = sorted(r["mfu"] for r in train[1:] or train)
    from lmalloy.io.folder import open_model

    n_params = open_model(run_dir / "final").num_parameters
    gains = [rows[i - 1]["loss"] - rows[i]["loss"] for i in range(1, len(rows))]
    helped = all(g > 0 for g in gains)
    md = [
        f"A byte-level BPE ({meta['vocab_size']} tokens) and the `{s['preset']}` preset "
        f"({n_params / 1e6:.2f}M parameters) trained on {len(s['domains'])} standard-library "
        f"domains ({meta['train_tokens']:,} training tokens, {meta['val_tokens']:,} held-out "
        f"validation tokens, split by document per domain) for {s['epochs']} epochs: AdamW "
        f"(0.9, 0.95), weight decay 0.1, clip 1.0, peak lr {s['lr']}, cosine to lr/10. "
        f"Median throughput {tps[len(tps) // 2]:,.0f} tokens/s, MFU "
        f"{100 * mfu[len(mfu) // 2]:.0f}% of this machine's measured fp32 matmul peak.",
        "",
        "| epoch | step | val loss | perplexity | bits/byte | change vs previous epoch |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        d = "" if i == 0 else f"{-gains[i - 1]:+.3f}"
        md.append(f"| {r['epoch']} | {r['step']} | {r['loss']:.3f} | {r['ppl']:.1f} | "
                  f"{r['bpb']:.3f} | {d} |")
    md += ["", f"![validation loss per epoch](figures/{img.name})", ""]
    if gains:
        verdict = ("Yes: every repeated epoch lowered the validation loss"
                   if helped else "No: at least one repeated epoch did not lower the "
                   "validation loss")
        md.append(f"> {verdict} (epoch 1 → {len(rows)}: {rows[0]['loss']:.3f} → "
                  f"{rows[-1]['loss']:.3f} nats/token). Part of the later epochs' gain comes "
                  f"from the cosine schedule's decay, which a single-epoch run of the same "
                  f"length would also have.")
    return {"markdown": "\n".join(md), "numbers": {
        "model": str(run_dir / "final"), "tokenizer": str(run_dir / "tokenizer"),
        "params": n_params, "epochs": rows, "tokens_per_s": tps[len(tps) // 2],
        "mfu": mfu[len(mfu) // 2], "train_tokens": meta["train_tokens"],
        "repeated_epochs_helped": helped}}
