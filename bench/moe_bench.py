"""MoE benchmarks, side by side in one run.

    python bench/moe_bench.py            # prints a markdown section (append it to docs/benchmarks.md)

1. Training step time (forward + backward + AdamW, fp32, 2 threads) of `small-moe`
   (8 experts × FFN 432, top-2, with lmalloy's balance loss) against dense `small`
   (FFN 864: the same active parameters per token), and of small-moe under each of
   transformers' expert implementations that run on CPU (`eager` loop over experts,
   `batched_mm`, `grouped_mm`, the default). Steps alternate between the variants
   (A, B, C, A, B, C, ...) so a shared machine's load hits all alike; medians reported.
2. `lmalloy moe build` (compose, gate_mode hidden) against `mergekit-moe` 0.1.5 (in
   bench/.venv-mergekit, the merge benchmark's venv) with the same mergekit YAML: base +
   3 bf16 Llama fine-tunes (hidden 768, 12 layers, FFN 2048, vocabulary 32000; random
   weights, fine-tunes = base + noise), each tool a separate process, alternating; wall
   time and peak RSS / anonymous RSS sampled from /proc every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from procmem import run_measured

ROOT = Path(__file__).resolve().parents[1]
MK = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-moe"
LM = ROOT / ".venv" / "bin" / "lmalloy"
OUT = ROOT / "bench" / "out" / "moe"
CFG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
           num_attention_heads=12, num_key_value_heads=12)
PROMPTS = [["def parse(self, text):\n    return json.loads(text)\n", "import json\n"],
           ["from email.message import EmailMessage\nmsg = EmailMessage()\n"],
           ["class HTTPConnection:\n    def request(self, method, url):\n"]]


# ----------------------------------------------------------------------------- step time


def step_times(steps: int, batch: int, seq: int, impls: tuple[str, ...]
               ) -> dict[str, list[float]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from lmalloy.train.moe import router_aux
    from lmalloy.train.presets import model_kwargs

    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {"small (dense)": LlamaForCausalLM(LlamaConfig(**model_kwargs("small", 4096)))}
    for impl in impls:
        torch.manual_seed(0)
        m = MixtralForCausalLM(MixtralConfig(**model_kwargs("small-moe", 4096)))
        m.set_experts_implementation(impl)
        models[f"small-moe ({impl})"] = m
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4096, (batch, seq + 1), generator=g)
    times: dict[str, list[float]] = {n: [] for n in models}

    def one(name: str) -> float:
        m, opt = models[name], opts[name]
        t0 = time.perf_counter()
        moe = hasattr(m.config, "num_local_experts")
        out = m(input_ids=x[:, :-1], output_router_logits=moe) if moe else m(input_ids=x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        if moe:
            aux, _ = router_aux(out.router_logits, 8, 2)
            loss = loss + 0.01 * aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for i in range(steps + 2):
        for name in models:
            t = one(name)
            if i >= 2:  # two warm-up rounds
                times[name].append(t)
    return times


# ----------------------------------------------------------------------------- build vs mergekit


def make_models() -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file

    from lmalloy.data.tokenizer import train_tokenizer

    h, inter, n_layers, vocab = (CFG["hidden_size"], CFG["intermediate_size"],
                                 CFG["num_hidden_layers"], CFG["vocab_size"])
    names = ["base", "ft0", "ft1", "ft2"]
    folders = [OUT / "models" / n for n in names]
    if all((f / "model.safetensors").is_file() for f in folders):
        return folders[0], folders[1:]
    tok = OUT / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        texts = [p for ps in PROMPTS for p in ps] * 50
        train_tokenizer(texts, 512, tok, min_frequency=1)
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,),
              "lm_head.weight": (vocab, h)}
    for k in range(n_layers):
        p = f"model.layers.{k}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                   p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **CFG,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "rope_theta": 10000.0, "hidden_act": "silu",
              "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) if len(s) == 2
            else torch.ones(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    for j, f in enumerate(folders):
        f.mkdir(parents=True, exist_ok=True)
        sd = base if j == 0 else {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)
                                      ).to(torch.bfloat16) for k, v in base.items()}
        save_file(sd, f / "model.safetensors", metadata={"format": "pt"})
        (f / "config.json").write_text(json.dumps(config, indent=2))
        for t in tok.iterdir():
            shutil.copyfile(t, f / t.name)
    return folders[0], folders[1:]


def compose_yaml(base: Path, fts: list[Path], mode: str = "hidden") -> str:
    import yaml

    return yaml.safe_dump({
        "base_model": str(base), "gate_mode": mode, "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [{"source_model": str(f), "positive_prompts": p}
                    for f, p in zip(fts, PROMPTS, strict=True)]})


def same_tensors(a: Path, b: Path) -> tuple[int, int, float, float]:
    """(tensors, identical, max abs difference of non-router tensors, of routers) between
    two Mixtral folders, compared in transformers 5's fused layout (mergekit-moe 0.1.5
    writes fused tensors, lmalloy the per-expert layout by default)."""
    import torch

    from lmalloy.io import open_model
    from lmalloy.moe.layout import per_expert_to_fused

    def load(p: Path) -> dict:
        m = open_model(p)
        return per_expert_to_fused({n: m.read(n).float() for n in m.names()})

    sa, sb = load(a), load(b)
    n = same = 0
    worst = [0.0, 0.0]
    for name, x in sa.items():
        y = sb.get(name)
        if y is None or y.shape != x.shape:
            continue
        n += 1
        same += int(torch.equal(x, y))
        i = int(name.endswith("mlp.gate.weight"))
        worst[i] = max(worst[i], float((x - y).abs().max()))
    return n, same, worst[0], worst[1]


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gate-modes", default="hidden,cheap_embed",
                    help="router init(s) compared in the build benchmark")
    ap.add_argument("--skip-steps", action="store_true", help="only the build benchmark")
    ap.add_argument("--skip-build", action="store_true", help="only the step-time benchmark")
    args = ap.parse_args()
    lines = ["", "## MoE: step time (small-moe vs dense small) and `moe build` vs mergekit-moe",
             "", f"Command: `.venv/bin/python bench/moe_bench.py {' '.join(sys.argv[1:])}` (2 CPU "
             "threads; a shared 2-core machine, so ratios from alternating runs, not absolute "
             "times, are the result).", ""]
    if args.skip_steps:
        print("\n".join(lines), flush=True)
        return build_bench(args)
    times = step_times(args.steps, 8, 256, ("grouped_mm", "eager"))
    med = {n: statistics.median(t) for n, t in times.items()}
    dense = med["small (dense)"]
    lines += ["Training step, 8 × 256 tokens, fp32, forward + backward + AdamW "
              f"(median of {args.steps}, alternating):", "",
              "| model | step (s) | vs dense small |", "|---|---|---|"]
    for n, t in med.items():
        lines.append(f"| {n} | {t:.3f} | {t / dense:.2f}× |")
    best = min((t, n) for n, t in med.items() if n != "small (dense)")
    lines += ["", f"Goal ≤ 1.15× the dense step with the same active parameters: best "
              f"{best[1]} at {best[0] / dense:.2f}× — "
              f"{'met' if best[0] / dense <= 1.15 else 'not met'}.", ""]
    # batched_mm gathers every token's expert weights, (N·k, 2I, H): ~4.5 GB per layer at
    # 8 × 256 tokens, kept for backward; so all three are compared at 1 × 128 tokens
    small = step_times(args.steps, 1, 128, ("grouped_mm", "batched_mm", "eager"))
    med2 = {n: statistics.median(t) for n, t in small.items()}
    lines += ["Expert implementations at 1 × 128 tokens (`batched_mm` gathers each token's "
              "expert weights — (N·k, 2I, H) floats, about 4.5 GB per layer at 8 × 256 tokens, "
              "which ran this machine out of memory):", "",
              "| model | step (s) | vs dense small |", "|---|---|---|"]
    for n, t in med2.items():
        lines.append(f"| {n} | {t:.3f} | {t / med2['small (dense)']:.2f}× |")
    lines.append("")
    print("\n".join(lines), flush=True)
    return 0 if args.skip_build else build_bench(args)


def build_bench(args) -> int:
    if not MK.exists():
        print("mergekit-moe not found in bench/.venv-mergekit: build comparison skipped.")
        return 0
    base, fts = make_models()
    for mode in args.gate_modes.split(","):
        build_one(args, base, fts, mode)
    return 0


def build_one(args, base: Path, fts: list[Path], mode: str) -> None:
    cfg = OUT / f"compose-{mode}.yml"
    cfg.write_text(compose_yaml(base, fts, mode))
    runs: dict[str, list[dict]] = {"lmalloy": [], "mergekit": []}
    for _ in range(args.reps):
        for tool in ("lmalloy", "mergekit"):
            out = OUT / f"out-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ([str(LM), "moe", "build", str(cfg), "--out", str(out), "--threads", "2"]
                   if tool == "lmalloy" else [str(MK), str(cfg), str(out), "--device", "cpu"])
            runs[tool].append(run_measured(cmd))
    n, same, worst, worst_router = same_tensors(OUT / "out-lmalloy", OUT / "out-mergekit")

    def m(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[tool])

    gb = 1024**3
    h, inter, n_layers, vocab = (CFG["hidden_size"], CFG["intermediate_size"],
                                 CFG["num_hidden_layers"], CFG["vocab_size"])
    per_model = 2 * vocab * h + n_layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    lines2 = [f"`moe build` (compose, gate_mode {mode}, bf16) vs `mergekit-moe` 0.1.5, the same "
              f"YAML: base + 3 Llama fine-tunes of {per_model / 1e6:.0f}M parameters each "
              "(hidden 768, 12 layers, FFN 2048, vocabulary 32000) → a 3-expert Mixtral; "
              "median of "
              f"{args.reps} alternating runs, separate processes:", "",
              "| tool | wall (s) | peak RSS (GiB) | peak anon RSS (GiB) |", "|---|---|---|---|"]
    for tool in runs:
        lines2.append(f"| {tool} | {m(tool, 'wall'):.1f} | {m(tool, 'rss') / gb:.2f} | "
                      f"{m(tool, 'anon') / gb:.2f} |")
    lines2 += ["", f"Ratios (mergekit / lmalloy): wall time {m('mergekit', 'wall') / m('lmalloy', 'wall'):.2f}×, "
               f"peak RSS {m('mergekit', 'rss') / m('lmalloy', 'rss'):.2f}×, peak anon RSS "
               f"{m('mergekit', 'anon') / max(1, m('lmalloy', 'anon')):.2f}×. "
               f"Outputs compared in the fused layout: {same} of {n} tensors identical; max abs "
               f"difference {worst:.3g} outside the routers, {worst_router:.3g} in the router "
               "rows" + (" (mergekit runs the base in bf16 on a padded batch of prompts, "
                         "lmalloy in fp32 one prompt at a time)." if mode == "hidden" else "."),
               ""]
    print("\n".join(lines2))


if __name__ == "__main__":
    sys.exit(main())
