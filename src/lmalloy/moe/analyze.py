"""`lmalloy moe analyze`: how an MoE routes tokens (Mixtral, arXiv 2401.04088).

Per layer and data domain: the share of consecutive tokens with the same top-1 expert and
with overlapping top-k sets against the random baselines for the model's E and k (Table
5), and against the same model at initialisation (`--init`); expert shares per domain as
bar charts (Figure 7); a page of text with each token coloured by its top-1 expert at
chosen layers (Figure 8); total vs active parameters from the config alone.

The router logits come from transformers (`output_router_logits=True`), so any
transformers MoE that returns them works: Mixtral (either tensor layout), Qwen2-MoE,
Qwen3-MoE, OLMoE. Layers that a Qwen MoE keeps dense have no router and are skipped;
the layers reported are the sparse ones, in order.
Legend: L layers, N tokens, E experts, k experts per token.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np

from lmalloy.errors import UserError
from lmalloy.moe.layout import detect_layout
from lmalloy.moe.stats import (
    baseline_overlap,
    baseline_same_top1,
    consecutive_stats,
    expert_shares,
    param_counts,
    topk_from_logits,
)

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac", "#1b9e77", "#d95f02", "#7570b3", "#e7298a",
           "#66a61e", "#e6ab02"]


def check_moe(folder, label: str = "") -> dict:
    """The folder's config with `num_local_experts`, `num_experts_per_tok` and
    `num_hidden_layers` set as analysed (E, k, sparse layers), or a UserError when it is
    not an MoE."""
    from lmalloy.train.moe import moe_spec

    spec = moe_spec(folder.config)
    if detect_layout(folder.tensors) is None or spec is None:
        raise UserError(f"{label}{folder.path} is a dense model ({folder.architecture}, no "
                        "router); `moe analyze` needs an MoE (Mixtral, Qwen2-MoE, "
                        "Qwen3-MoE, OLMoE; build one with `lmalloy moe build`)")
    return {**folder.config, "num_local_experts": spec.experts,
            "num_experts_per_tok": spec.top_k, "num_hidden_layers": len(spec.sparse_layers),
            "_config": folder.config}


def router_logits(model, sequences: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(S, T) token ids -> (L, S·T, E) router logits (float32)."""
    import torch

    per_layer: list[list[np.ndarray]] | None = None
    model.eval()
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            x = torch.as_tensor(np.asarray(sequences[i:i + batch_size], dtype=np.int64))
            out = model(input_ids=x, output_router_logits=True)
            logits = [r.float().reshape(-1, r.shape[-1]).numpy() for r in out.router_logits]
            if per_layer is None:
                per_layer = [[] for _ in logits]
            for acc, r in zip(per_layer, logits, strict=True):
                acc.append(r)
    return np.stack([np.concatenate(a) for a in per_layer or []])


def routing_tables(logits: np.ndarray, seq_len: int, k: int) -> dict:
    """(L, N, E) logits of sequences of seq_len tokens -> per layer: stats and shares."""
    n_layers, n, n_e = logits.shape
    seq_ids = np.arange(n) // seq_len
    rows = []
    for layer in range(n_layers):
        topk = topk_from_logits(logits[layer], k)
        rows.append({**consecutive_stats(topk, seq_ids),
                     "shares": expert_shares(topk, n_e).tolist(),
                     "top1": topk[:, 0].tolist() if n <= 4096 else None})
    return {"layers": rows}


def domain_sequences(tokens: np.ndarray, span: tuple[int, int], seq_len: int,
                     max_tokens: int) -> np.ndarray:
    """(S, seq_len) consecutive windows from the start of one domain's span."""
    a, b = span
    n = min((b - a) // seq_len, max(1, max_tokens // seq_len))
    if n <= 0:
        return np.zeros((0, seq_len), dtype=np.int64)
    return np.asarray(tokens[a:a + n * seq_len], dtype=np.int64).reshape(n, seq_len)


def analyze_model(model, seqs: dict[str, np.ndarray], seq_len: int, k: int,
                  batch_size: int = 8) -> dict:
    """{domain: {layers: [{same_top1, overlap, pairs, shares}]}} for one loaded model."""
    out = {}
    for dom, s in seqs.items():
        if len(s):
            t = routing_tables(router_logits(model, s, batch_size), seq_len, k)
            for r in t["layers"]:
                r.pop("top1", None)
            out[dom] = t
    return out


def plot_shares(result: dict, n_experts: int, layers: list[int], path: Path,
                title: str = "") -> Path:
    """Mixtral Figure 7 style: per chosen layer, each expert's share of assignments by domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(result)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.2 * len(layers) + 0.6), dpi=110,
                             squeeze=False)
    width = 0.8 / max(1, len(domains))
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        for j, d in enumerate(domains):
            shares = result[d]["layers"][layer]["shares"]
            ax.bar(np.arange(n_experts) + (j - (len(domains) - 1) / 2) * width, shares, width,
                   label=d, color=PALETTE[j % len(PALETTE)])
        ax.axhline(1 / n_experts, color="0.4", ls="--", lw=0.8)
        ax.set_ylabel(f"layer {layer}")
        ax.set_xticks(range(n_experts))
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("expert (dashed: uniform share 1/E)")
    axes[0, 0].legend(ncol=min(4, len(domains)), fontsize=8, loc="upper right")
    fig.suptitle(title or "Share of top-k assignments per expert, by domain")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def token_html(pieces: list[str], top1: dict[int, list[int]], n_experts: int,
               title: str = "Tokens coloured by top-1 expert") -> str:
    """An HTML page: the text once per layer, each token's background its top-1 expert."""
    css = ("body{font-family:sans-serif;margin:2em}pre{font-family:monospace;"
           "white-space:pre-wrap;line-height:1.5;border:1px solid #ddd;padding:1em}"
           "span{border-radius:2px}")
    legend = " ".join(f'<span style="background:{PALETTE[e % len(PALETTE)]};padding:0 6px">'
                      f"{e}</span>" for e in range(n_experts))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
             f"<style>{css}</style></head><body><h1>{title}</h1><p>experts: {legend}</p>"]
    for layer, ids in top1.items():
        spans = "".join(f'<span style="background:{PALETTE[e % len(PALETTE)]}99" '
                        f'title="expert {e}">{html.escape(p)}</span>'
                        for p, e in zip(pieces, ids, strict=False))
        parts.append(f"<h2>layer {layer}</h2><pre>{spans}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def colour_text(model, tok, text: str, layers: list[int], k: int, n_experts: int,
                max_tokens: int) -> tuple[str, dict]:
    """(html, {layer: top-1 ids}) for one text."""
    ids = tok.encode(text)[:max_tokens]
    if not ids:
        raise UserError("--text: the text has no tokens")
    logits = router_logits(model, np.asarray([ids]), 1)  # (L, T, E)
    top1 = {layer: topk_from_logits(logits[layer], k)[:, 0].tolist() for layer in layers}
    pieces = [tok.decode([i]) for i in ids]
    return token_html(pieces, top1, n_experts), top1


def default_layers(n_layers: int) -> list[int]:
    return sorted({0, n_layers // 2, n_layers - 1})


def table_markdown(res: dict, init: dict | None, n_e: int, k: int) -> str:
    b1, b2 = baseline_same_top1(n_e), baseline_overlap(n_e, k)
    head = (f"| layer | domain | same top-1 | top-{k} overlap |"
            + (" init same top-1 | init overlap |" if init else ""))
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    n_layers = len(next(iter(res.values()))["layers"])
    for layer in range(n_layers):
        for d, r in res.items():
            x = r["layers"][layer]
            row = f"| {layer} | {d} | {100 * x['same_top1']:.1f}% | {100 * x['overlap']:.1f}% |"
            if init and d in init:
                y = init[d]["layers"][layer]
                row += f" {100 * y['same_top1']:.1f}% | {100 * y['overlap']:.1f}% |"
            lines.append(row)
    lines.append(f"| random | — | {100 * b1:.1f}% | {100 * b2:.1f}% |"
                 + (f" {100 * b1:.1f}% | {100 * b2:.1f}% |" if init else ""))
    return "\n".join(lines)


def _check(cfg) -> tuple[dict, list[int], str | None]:
    """Every check the headers and configs reveal: (MoE config, html layers, --text)."""
    from lmalloy.io import check_output, open_model

    folder = open_model(cfg.model)
    mcfg = check_moe(folder)
    n_e, n_layers = mcfg["num_local_experts"], mcfg["num_hidden_layers"]
    if cfg.init:
        icfg = check_moe(open_model(cfg.init), "--init ")
        if (icfg["num_local_experts"], icfg["num_hidden_layers"]) != (n_e, n_layers):
            raise UserError(f"--init {cfg.init} has {icfg['num_local_experts']} experts and "
                            f"{icfg['num_hidden_layers']} layers; the model has {n_e} and "
                            f"{n_layers}")
    folder.check_seq_len(cfg.seq_len)
    layers = cfg.html_layers or default_layers(n_layers)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise UserError(f"`--html-layers`: layer {bad[0]} does not exist (0..{n_layers - 1})")
    text = None
    if cfg.text:
        if not Path(cfg.text).is_file():
            raise UserError(f"--text: file not found: {cfg.text}")
        text = Path(cfg.text).read_text(errors="replace")
    check_output(cfg.out, cfg.overwrite, [cfg.model] + ([cfg.init] if cfg.init else []))
    return mcfg, layers, text


def _sequences(cfg, tok) -> dict[str, np.ndarray]:
    """Per domain, up to --eval-tokens of the chosen split as (n, seq_len) rows."""
    from lmalloy.data.cache import packed
    from lmalloy.data.corpus import corpus_from
    from lmalloy.data.pack import load_tokens

    corpus = corpus_from(cfg)
    folder, meta = packed(corpus, tok, cfg.val_fraction, cfg.seed)
    splits = ["train", "val"] if cfg.split == "all" else [cfg.split]
    seqs: dict[str, np.ndarray] = {}
    for split in splits:
        tokens = load_tokens(folder, split, meta)
        for d, info in meta["domains"].items():
            s = domain_sequences(tokens, tuple(info[split]), cfg.seq_len,
                                 cfg.eval_tokens // len(splits))
            seqs[d] = np.concatenate([seqs[d], s]) if d in seqs else s
    seqs = {d: s for d, s in seqs.items() if len(s)}
    if not seqs:
        raise UserError(f"no {cfg.split} sequences of --seq-len {cfg.seq_len} tokens in the "
                        "corpus (use a shorter --seq-len or --split all)")
    return seqs


def _print(cfg, report: dict, out: Path) -> None:
    if cfg.json_output:
        print(json.dumps(report, indent=1))
        return
    n_e, k, counts = report["experts"], report["top_k"], report["params"]
    print(f"{cfg.model}: {n_e} experts, top-{k}; parameters "
          f"NonFF + {n_e}·FF = {counts['total'] / 1e6:,.2f}M total, NonFF + {k}·FF = "
          f"{counts['active'] / 1e6:,.2f}M active per token "
          f"(NonFF {counts['non_ff'] / 1e6:,.2f}M, FF {counts['ff_per_expert'] / 1e6:,.2f}M)")
    print(table_markdown(report["domains"], report["init_domains"], n_e, k))
    print(f"wrote {out / 'routing.json'}, {out / 'expert_shares.png'}, {out / 'tokens.html'}",
          file=sys.stderr)


def main(cfg) -> int:
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.models import load_causal_lm
    from lmalloy.io.writer import atomic_output

    mcfg, layers, text = _check(cfg)
    n_e, k = mcfg["num_local_experts"], mcfg["num_experts_per_tok"]
    tok = Tok.load(cfg.tokenizer or cfg.model)
    seqs = _sequences(cfg, tok)
    model = load_causal_lm(cfg.model)
    res = analyze_model(model, seqs, cfg.seq_len, k, cfg.batch_size)
    if text is None:
        text = tok.decode(seqs[next(iter(seqs))][0].tolist())
    page, _ = colour_text(model, tok, text, layers, k, n_e, cfg.max_html_tokens)
    del model
    init = None
    if cfg.init:
        init = analyze_model(load_causal_lm(cfg.init), seqs, cfg.seq_len, k, cfg.batch_size)
    report = {"model": cfg.model, "init": cfg.init, "experts": n_e, "top_k": k,
              "baseline_same_top1": baseline_same_top1(n_e),
              "baseline_overlap": baseline_overlap(n_e, k),
              "params": param_counts(mcfg["_config"]),
              "domains": res, "init_domains": init}
    out = Path(cfg.out)
    with atomic_output(out, cfg.overwrite) as tmp:
        (tmp / "tokens.html").write_text(page)
        plot_shares(res, n_e, layers, tmp / "expert_shares.png")
        (tmp / "routing.json").write_text(json.dumps(report, indent=1))
    _print(cfg, report, out)
    return 0
