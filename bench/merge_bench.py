"""lmalloy merge vs mergekit 0.1.5: the same YAML through both, in alternation, in one run.

    python bench/merge_bench.py --setup   # mergekit 0.1.5 in bench/.venv-mergekit (CPU torch pin)
    python bench/merge_bench.py           # models in bench/out/merge, results appended to stdout

Three ~374M-parameter bf16 Llama fine-tunes of one base (random weights: a base plus small
Gaussian noise per fine-tune; hidden 1024, 24 layers, MLP 2816, vocabulary 32000) are merged
by `linear` and `ties` with each tool. Each run is a separate process; measured: wall time,
peak RSS and peak anonymous RSS (RssAnon, sampled every 20 ms from /proc), GB/s = (input +
output bytes) / wall time. Runs alternate (lmalloy, mergekit, lmalloy, mergekit, ...) so the
page cache is warm for both alike after the first. Also `--help` start-up of both CLIs and
the LoRA `linear` (A and B averaged separately) vs exact error table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from procmem import run_measured

ROOT = Path(__file__).resolve().parents[1]
MK_VENV = ROOT / "bench" / ".venv-mergekit"
LM = ROOT / ".venv" / "bin" / "lmalloy"
OUT = ROOT / "bench" / "out" / "merge"
CFG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
           num_attention_heads=16, num_key_value_heads=16)


def setup() -> None:
    py = MK_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build, not CUDA
    subprocess.run([*pip, "mergekit==0.1.5", "torch==2.13.0"], check=True)


def make_models(n: int = 3, noise: float = 0.01) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file

    h, i, L, V = (CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"],
                  CFG["vocab_size"])
    shapes = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,),
              "lm_head.weight": (V, h)}
    for k in range(L):
        p = f"model.layers.{k}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                   p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **CFG,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "rope_theta": 10000.0, "hidden_act": "silu", "dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2}
    names = ["base"] + [f"ft{k}" for k in range(n)]
    folders = [OUT / "models" / x for x in names]
    if all((f / "model.safetensors").is_file() for f in folders):
        return folders[0], folders[1:]
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) if len(s) == 2
            else torch.ones(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    for j, f in enumerate(folders):
        f.mkdir(parents=True, exist_ok=True)
        sd = base if j == 0 else {k: (v.float() + noise * 0.02 * torch.randn(
            v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
        save_file(sd, f / "model.safetensors", metadata={"format": "pt"})
        (f / "config.json").write_text(json.dumps(config, indent=2))
        del sd
    return folders[0], folders[1:]


def yaml_for(method: str, base: Path, fts: list[Path]) -> str:
    if method == "linear":
        models = "".join(f"  - model: {f}\n    parameters: {{weight: {1 / len(fts):.6f}}}\n"
                         for f in fts)
        return f"merge_method: linear\nmodels:\n{models}dtype: bfloat16\n"
    models = f"  - model: {base}\n" + "".join(
        f"  - model: {f}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for f in fts)
    return f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}" \
           f"parameters: {{normalize: true}}\ndtype: bfloat16\n"


def startup(cmd: list[str], reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def lora_error_table() -> list[tuple[int, int, float, float]]:
    """(adapters, rank, mean, max) relative error of `linear` vs the exact Σ wᵢBᵢAᵢ."""
    import torch

    from lmalloy.merge.lora import Adapter, merge_linear

    rows = []
    g = torch.Generator().manual_seed(0)
    for n in (2, 3):
        for r in (4, 8, 16):
            ads = [Adapter(Path(f"a{j}"), {"r": r}, {
                f"m{k}": (torch.randn(r, 256, generator=g), torch.randn(256, r, generator=g))
                for k in range(8)}, 1.0) for j in range(n)]
            _, err = merge_linear(ads, [1 / n] * n)
            e = list(err.values())
            rows.append((n, r, sum(e) / len(e), max(e)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", action="store_true", help="create the mergekit venv and exit")
    ap.add_argument("--reps", type=int, default=2, help="runs per tool for linear")
    ap.add_argument("--ties-reps", type=int, default=1, help="runs per tool for ties")
    ap.add_argument("--keep", action="store_true", help="keep the models afterwards")
    ap.add_argument("--baseline", help="an earlier lmalloy `src` folder, run side by side as "
                    "`lmalloy-baseline` (its output flag: --baseline-flag)")
    ap.add_argument("--baseline-flag", default="--out", help="the baseline's output flag")
    ap.add_argument("--methods", default="linear,ties", help="methods to run")
    a = ap.parse_args()
    if a.setup:
        setup()
        return 0
    mk_yaml = MK_VENV / "bin" / "mergekit-yaml"
    if not mk_yaml.exists():
        print("mergekit venv missing: run `python bench/merge_bench.py --setup`", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    base, fts = make_models()
    print(f"models ready in {time.perf_counter() - t0:.0f}s: {base.parent}", file=sys.stderr)
    size = (base / "model.safetensors").stat().st_size
    results: dict = {}
    env = {"HF_HUB_OFFLINE": "1"}
    tools = ["lmalloy", "mergekit"] + (["lmalloy-baseline"] if a.baseline else [])
    methods = [m for m in ("linear", "ties") if m in a.methods.split(",")]
    load0 = os.getloadavg()
    for method, reps in [(m, a.reps if m == "linear" else a.ties_reps) for m in methods]:
        # TIES also without the fused kernel: what `--compile` buys
        tools_m = tools + (["lmalloy-eager"] if method == "ties" else [])
        y = OUT / f"{method}.yaml"
        y.write_text(yaml_for(method, base, fts))
        n_in = len(fts) + (method == "ties")
        gb = (n_in + 1) * size / 1e9
        for rep in range(reps):
            for tool in tools_m:
                out = OUT / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                e = env
                if tool in ("lmalloy", "lmalloy-eager"):
                    cmd = [str(LM), "merge", str(y), "--out", str(out), "--no-progress"]
                    if tool == "lmalloy-eager":
                        cmd.append("--no-compile")
                elif tool == "lmalloy-baseline":
                    cmd = [sys.executable, "-m", "lmalloy", "merge", str(y), a.baseline_flag,
                           str(out), "--no-progress"]
                    e = {**env, "PYTHONPATH": a.baseline}
                else:
                    cmd = [str(mk_yaml), str(y), str(out), "--no-copy-tokenizer",
                           "--no-write-model-card", "--quiet"]
                os.sync()  # no other run's writeback in flight during this one
                r = run_measured(cmd, e)
                r["gbps"] = gb / r["wall"]
                results.setdefault((method, tool), []).append(r)
                print(f"{method:7s} {tool:9s} rep {rep}: {r['wall']:6.1f}s "
                      f"{r['gbps']:.2f} GB/s  peak RSS {r['rss'] / 1e9:.2f} GB  anon "
                      f"{r['anon'] / 1e9:.2f} GB", file=sys.stderr)
        # same tensors? (bf16 outputs; TIES: mergekit computes in bf16, lmalloy in fp32)
        from safetensors import safe_open

        def first_file(p: Path) -> Path:
            return sorted(p.glob("*.safetensors"))[0]

        with safe_open(str(first_file(OUT / f"out-lmalloy-{method}")), "pt") as f1, \
                safe_open(str(first_file(OUT / f"out-mergekit-{method}")), "pt") as f2:
            common = sorted(set(f1.keys()) & set(f2.keys()))[:20]
            worst = 0.0
            for k in common:
                x, z = f1.get_tensor(k).float(), f2.get_tensor(k).float()
                worst = max(worst, float((x - z).abs().max()) / max(float(z.abs().max()),
                                                                      1e-12))
        results[(method, "maxrel")] = worst
    t_lm = startup([str(LM), "merge", "--help"])
    t_mk = startup([str(mk_yaml), "--help"])
    lora = lora_error_table()

    def med(method, tool, key):
        return statistics.median(r[key] for r in results[(method, tool)])

    cmd_line = "python bench/merge_bench.py"
    lines = ["", "## Merging: lmalloy merge vs mergekit 0.1.5", "",
             f"Reproduce: `{cmd_line} --setup && {cmd_line}` (3 fine-tunes + base of "
             f"{size / 2e6:.0f}M-parameter bf16 Llama, random weights; "
             f"{os.cpu_count()} CPU cores; the same YAML through both tools, alternating, "
             f"median of {a.reps} (linear) / {a.ties_reps} (ties) run(s) per tool; each run a "
             f"fresh process, so start-up is included).", "",
             "| method | tool | wall s | GB/s (in+out) | peak RSS GB | peak anon GB |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        for tool in tools + (["lmalloy-eager"] if method == "ties" else []):
            lines.append(f"| {method} | {tool} | {med(method, tool, 'wall'):.1f} | "
                         f"{med(method, tool, 'gbps'):.2f} | {med(method, tool, 'rss') / 1e9:.2f} |"
                         f" {med(method, tool, 'anon') / 1e9:.2f} |")
    lines += ["", "| ratio (mergekit / lmalloy) | wall time | peak anon memory |", "|---|---|---|"]
    for method in methods:
        lines.append(f"| {method} | {med(method, 'mergekit', 'wall') / med(method, 'lmalloy', 'wall'):.2f}× "
                     f"| {med(method, 'mergekit', 'anon') / max(med(method, 'lmalloy', 'anon'), 1):.2f}× |")
    if a.baseline:
        lines += ["", "| ratio (baseline / this tree) | wall time | peak anon memory |",
                  "|---|---|---|"]
        for method in methods:
            lines.append(f"| {method} | {med(method, 'lmalloy-baseline', 'wall') / med(method, 'lmalloy', 'wall'):.2f}× "
                         f"| {med(method, 'lmalloy-baseline', 'anon') / max(med(method, 'lmalloy', 'anon'), 1):.2f}× |")
    if set(methods) == {"linear", "ties"}:
        lin = med("linear", "lmalloy", "wall")
        lines += ["", f"TIES / linear (lmalloy's own): {med('ties', 'lmalloy', 'wall') / lin:.2f}× "
                  f"with the fused kernel, {med('ties', 'lmalloy-eager', 'wall') / lin:.2f}× "
                  "eager (`--no-compile`)."]
    lines += ["", f"Load average (1, 5, 15 min) at the start: {load0[0]:.2f}, {load0[1]:.2f}, "
              f"{load0[2]:.2f}; at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
              + "."]
    diffs = ", ".join(f"{m} {results[(m, 'maxrel')]:.2e}" for m in methods)
    lines += ["", f"Largest relative difference between the two outputs (first 20 tensors): "
              f"{diffs} "
              f"(bf16 outputs, whose rounding step is 2⁻⁸ ≈ 3.9e-3 relative: linear differs by "
              f"summation order before that rounding; ties also because mergekit computes in "
              f"the YAML's bf16 `dtype` and lmalloy in fp32; with `dtype: float32` both agree "
              f"to 1e-6, tests/test_merge_compat.py).",
              "", f"Start-up, `--help` (median of 3): lmalloy merge {t_lm:.2f} s, mergekit-yaml "
              f"{t_mk:.2f} s.", "",
              "LoRA `linear` (A and B averaged separately, equal weights) vs the exact "
              "Σ wᵢBᵢAᵢ: relative Frobenius error over 8 random 256×256 modules "
              "(`lora_error_table()` in the same script):", "",
              "| adapters | rank | mean error | max error |", "|---|---|---|---|"]
    lines += [f"| {n} | {r} | {m:.3f} | {x:.3f} |" for n, r, m, x in lora]
    print("\n".join(lines))
    if not a.keep:
        shutil.rmtree(OUT, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
