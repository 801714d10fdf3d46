"""Calibration of the demo's model sizes on this machine: throughput and loss curves.

For each candidate size, at the full demo's tokenizer, corpus plan, sequence length, batch
and learning rate (`lmalloy.demo.stage_pretrain`): probe its throughput
(`lmalloy.demo.budget.probe`), then pretrain it for --steps steps with `lmalloy pretrain`
(one subprocess each), evaluating as it goes. The validation bits per byte a size reaches
after t seconds of training is read off its curve at t × the run's median training
tokens/s: which size is best for the time a stage can give it. The machine's load is recorded before and after
(on a shared machine the rates are pessimistic, the curves per token are not).

Writes the record to src/lmalloy/demo/calibration.json, which the demo report's appendix
shows as "recorded calibration" (the demo does not re-measure it).

    .venv/bin/python bench/demo_calibration.py [--steps 300] [--reuse]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmalloy.demo import stage_pretrain  # noqa: E402
from lmalloy.demo.budget import load_average, probe  # noqa: E402
from lmalloy.demo.run import PRETRAIN_DOMAINS  # noqa: E402

CANDIDATES = {  # name -> model_overrides of the `tiny` preset
    "tiny": {},
    "h128-l4": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4},
    "h192-l4": stage_pretrain.H192,
    "h256-l4": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                "num_attention_heads": 8, "num_key_value_heads": 4},
}
TIMES = [30, 60, 120, 240]  # seconds of training a stage might give a model
OUT = ROOT / "src" / "lmalloy" / "demo" / "calibration.json"


def _run(name: str, overrides: dict, args, tok: str | None) -> Path:
    out = Path(args.out) / name
    if args.reuse and (out / "final" / "config.json").is_file():
        return out
    s = {"max_chars_per_domain": 1_000_000, "seq_len": 256, "val_fraction": 0.05}
    cmd = [sys.executable, "-m", "lmalloy.cli", "pretrain", "--out", str(out), "--overwrite",
           "--data", "stdlib", "--domains", ",".join(PRETRAIN_DOMAINS),
           "--max-chars-per-domain", str(s["max_chars_per_domain"]),
           "--seq-len", str(s["seq_len"]), "--val-fraction", str(s["val_fraction"]),
           "--preset", "tiny", "--model-overrides", json.dumps(overrides),
           "--global-batch-tokens", "4096", "--micro-batch-size", "16",
           "--max-steps", str(args.steps), "--lr", str(args.lr), "--warmup-steps", "15",
           "--eval-every", str(max(1, args.steps // 12)), "--eval-tokens", "32768",
           "--log-every", "10", "--keep-checkpoints", "1", "--no-progress", "--seed", "0"]
    cmd += ["--tokenizer", tok] if tok else ["--vocab-size", "4096"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(cmd, check=True, env=env)
    return out


def _curve(run: Path) -> tuple[list[tuple[int, float]], float]:
    """(tokens, val bits/byte) at each evaluation, and the run's median training tokens/s."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    tps = sorted(r["tokens_per_s"] for r in recs if "tokens_per_s" in r)
    return [(r["tokens"], r["eval"]["raw"]["bpb"]) for r in recs if "eval" in r], \
        tps[len(tps) // 2]


def _at(curve: list[tuple[int, float]], tokens: float) -> float | None:
    """bits/byte at `tokens`, linear between evaluations (None past the curve's end)."""
    if tokens > curve[-1][0]:
        return None
    prev = (0, None)
    for t, b in curve:
        if t >= tokens:
            if prev[1] is None:
                return b
            return prev[1] + (b - prev[1]) * (tokens - prev[0]) / (t - prev[0])
        prev = (t, b)
    return curve[-1][1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "demo-calibration"))
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --out")
    args = ap.parse_args()
    from lmalloy.train.presets import model_kwargs

    load0 = load_average()
    runs, tok = [], None
    for name, over in CANDIDATES.items():
        p = probe(model_kwargs("tiny", 4096, over), 256, 16, 3.0)
        load = load_average()
        run = _run(name, over, args, tok)
        tok = tok or str(run / "tokenizer")
        curve, tps = _curve(run)
        runs.append({"name": name, "overrides": over, "params": p["params"],
                     "tokens_per_s": tps, "probe_tokens_per_s": p["train"],
                     "probe_eval_tokens_per_s": p["eval"], "load_at_probe": load,
                     "curve": curve, "bpb_at": [_at(curve, t * tps) for t in TIMES]})
        print(f"{name}: {p['params'] / 1e6:.2f}M, {tps:,.0f} tokens/s in training (probe "
              f"{p['train']:,.0f} at load {load:.2f}), final bpb {curve[-1][1]:.3f}",
              flush=True)
    rec = {"command": f"python bench/demo_calibration.py --steps {args.steps} --lr {args.lr}",
           "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": datetime.date.today().isoformat(), "load_start": load0,
           "load_end": load_average(), "times": TIMES, "steps": args.steps,
           "batch_tokens": 4096, "lr": args.lr, "runs": runs}
    OUT.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
