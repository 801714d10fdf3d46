"""Training throughput of `lmalloy pretrain` vs litgpt's pretrain, side by side, and the
start-up time of `lmalloy --help`.

Both train lmalloy's `small` preset architecture (hidden 320, 6 layers, 8 heads / 4 KV
heads, SwiGLU 864, vocab 4096, RMSNorm, RoPE) on the same packed tokens, at the same
sequence length, global batch, micro batch, fp32, and thread count. Runs alternate
(lmalloy, litgpt, lmalloy, litgpt, ...) so that machine noise hits both; throughput is
the median of per-step tokens/s after the first two steps (litgpt: tokens over its own
`time` column). litgpt runs in its own venv (bench/.venv-litgpt: `pip install litgpt
requests torch==2.13.0`); it calls torch.compile unconditionally, so both are measured
eager (`--compile 0`) and, with `--compile 1`, compiled.

usage: .venv/bin/python bench/pretrain_bench.py [--steps 8] [--rounds 2] [--compile 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LMALLOY = [str(ROOT / ".venv" / "bin" / "python"), "-m", "lmalloy"]
LITGPT_PY = ROOT / "bench" / ".venv-litgpt" / "bin" / "python"
T, GLOBAL_TOKENS, MICRO = 256, 16384, 16
# the same threads and OpenMP wait policy for both (OpenMP's default, ACTIVE; the lmalloy
# CLI otherwise defaults to PASSIVE, which is safer on a shared machine)
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}


def run_lmalloy(work: Path, tok: Path, steps: int, compile_: bool, tag: str,
                src: str | None = None) -> float:
    out = work / f"lm-{tag}"
    cmd = [*LMALLOY, "pretrain", "--preset", "small", "--domains", "email,json,asyncio",
           "--tokenizer", str(tok), "--out", str(out), "--max-steps", str(steps),
           "--seq-len", str(T), "--global-batch-tokens", str(GLOBAL_TOKENS),
           "--micro-batch-size", str(MICRO), "--log-every", "1", "--eval-every", "100000",
           "--no-progress", "--overwrite", "--threads", "2"]
    if compile_:
        cmd.append("--compile")
    env = {**ENV, "PYTHONPATH": src} if src else ENV  # an earlier source tree, if given
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, env=env)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in recs if "loss" in r and r["step"] > 2)


def run_litgpt(work: Path, data: Path, steps: int, compile_: bool, tag: str) -> float:
    out = work / f"lit-{tag}"
    subprocess.run([str(LITGPT_PY), str(ROOT / "bench" / "litgpt_driver.py"),
                    str(data / "train.bin"), "uint16", str(out), str(steps), str(T),
                    str(GLOBAL_TOKENS // T), str(MICRO), "4096", "1" if compile_ else "0"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=ENV)
    rows = list(csv.DictReader(open(next(out.glob("logs/csv/*/metrics.csv")))))
    accum = GLOBAL_TOKENS // (T * MICRO)
    steps_rows = [r for r in rows if int(r["iter"]) % accum == 0]
    rates = []
    for a, b in zip(steps_rows, steps_rows[1:], strict=False):
        if int(b["step"]) > 2:
            rates.append((int(b["tokens"]) - int(a["tokens"])) /
                         (float(b["time"]) - float(a["time"])))
    return statistics.median(rates)


def startup(cmd: list[str], n: int = 5) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", type=int, default=0)
    ap.add_argument("--baseline", help="an earlier lmalloy `src` folder, run alternately too")
    ap.add_argument("--no-litgpt", action="store_true", help="lmalloy (and baseline) only")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmalloy-bench-"))
    prep = work / "prep"
    subprocess.run([*LMALLOY, "pretrain", "--preset", "small", "--domains",
                    "email,json,asyncio", "--out", str(prep), "--max-steps", "1",
                    "--no-progress", "--vocab-size", "4096", "--seq-len", str(T),
                    "--global-batch-tokens", str(GLOBAL_TOKENS), "--micro-batch-size",
                    str(MICRO)], check=True, stderr=subprocess.DEVNULL)
    lm, lit, base = [], [], []
    for r in range(a.rounds):
        lm.append(run_lmalloy(work, prep / "tokenizer", a.steps, bool(a.compile), str(r)))
        if not a.no_litgpt:
            lit.append(run_litgpt(work, prep / "data", a.steps, bool(a.compile), str(r)))
        if a.baseline:
            base.append(run_lmalloy(work, prep / "tokenizer", a.steps, bool(a.compile),
                                    f"b{r}", a.baseline))
        print(f"round {r}: lmalloy {lm[-1]:,.0f} tok/s"
              + (f", litgpt {lit[-1]:,.0f} tok/s" if lit else "")
              + (f", baseline {base[-1]:,.0f} tok/s" if base else ""), file=sys.stderr)
    m_lm = statistics.median(lm)
    m_lit = statistics.median(lit) if lit else float("nan")
    help_s = startup([str(ROOT / ".venv" / "bin" / "lmalloy"), "--help"])
    lit_cfg = (float("nan") if a.no_litgpt else
               startup([str(LITGPT_PY), "-c", "import litgpt.config"], 3))
    res = {"compile": bool(a.compile), "steps": a.steps, "rounds": a.rounds,
           "lmalloy_tokens_per_s": m_lm, "litgpt_tokens_per_s": m_lit,
           "ratio_lmalloy_over_litgpt": m_lm / m_lit, "lmalloy_help_s": help_s,
           "litgpt_import_config_s": lit_cfg}
    if base:
        res["baseline_tokens_per_s"] = statistics.median(base)
        res["ratio_lmalloy_over_baseline"] = m_lm / res["baseline_tokens_per_s"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
