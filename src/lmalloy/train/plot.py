"""Loss curves as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (none if it is missing)."""
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def plot_run(records: list[dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    if train:
        ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train],
                color="0.7", lw=1, label="train loss")
    names: list[str] = []
    for r in evals:
        for n in r["eval"]:
            if n not in names:
                names.append(n)
    for n in names:
        pts = [(r["tokens"] / 1e6, r["eval"][n]["loss"]) for r in evals if n in r["eval"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                label=f"val loss ({n})" if n != "raw" else "val loss")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    if train and train[-1].get("epoch"):
        per_epoch = train[-1]["tokens"] / train[-1]["epoch"] / 1e6
        n_ep = int(train[-1]["epoch"])
        for e in range(1, n_ep + 1):
            ax.axvline(e * per_epoch, color="0.85", ls="--", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
