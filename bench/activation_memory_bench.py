"""Peak memory and time of one `tinyllama-1.1b` training step, with and without activation
checkpointing (`--activation-checkpointing`, transformers' gradient checkpointing of each
decoder layer), on this machine's CPU in fp32.

Each variant runs in its own process (so one's peak does not hide in the other's): it builds
the preset's LlamaForCausalLM through the trainer's own `adamw()`, runs two steps of
forward, backward, gradient clipping and AdamW on one random sequence of --seq-len tokens
(the first step allocates the optimizer state; the second is timed), and reports its peak
resident memory (ru_maxrss). The weights, gradients and AdamW moments alone are 16 bytes
per parameter (17.6 GB); what checkpointing saves is the activations above that.

    .venv/bin/python bench/activation_memory_bench.py [--seq-len 512] [--modes off,on]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def worker(seq_len: int, checkpointing: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.train.presets import model_kwargs
    from lmalloy.train.trainer import adamw

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**model_kwargs("tinyllama-1.1b", 32000)))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    opt = adamw(model, 0.1, 4e-4, (0.9, 0.95), torch.device("cpu"))
    x = torch.randint(0, 32000, (1, seq_len + 1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        loss = model(input_ids=x[:, :-1], labels=x[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"params": sum(p.numel() for p in model.parameters()),
            "after_build_gb": base / 1e9,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "step_s": times[-1], "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--modes", default="off,on", help="which variants to run (e.g. `on` "
                    "alone where the other does not fit in memory)")
    ap.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(worker(a.seq_len, a.worker == "on")))
        return
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rows = {}
    for mode in a.modes.split(","):
        p = subprocess.run([sys.executable, __file__, "--worker", mode, "--seq-len",
                            str(a.seq_len), "--threads", str(a.threads)],
                           capture_output=True, text=True)
        if p.returncode:
            print(f"{mode}: failed (exit {p.returncode}): {p.stderr.strip()[-300:]}")
            continue
        rows[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"tinyllama-1.1b, fp32, 1 sequence of {a.seq_len} tokens, {a.threads} threads")
    print("| activation checkpointing | peak RSS (GB) | above the built model (GB) | "
          "step (s) |")
    print("|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_gb']:.2f} | {r['peak_gb'] - r['after_build_gb']:.2f} | "
              f"{r['step_s']:.1f} |")
    if len(rows) == 2:
        print(f"checkpointing: peak × {rows['on']['peak_gb'] / rows['off']['peak_gb']:.2f}, "
              f"step time × {rows['on']['step_s'] / rows['off']['step_s']:.2f}")


if __name__ == "__main__":
    main()
