"""8B-sized merges on this machine: lmalloy vs mergekit 0.1.5, and the streaming limit.

Three Llama-3-8B-shaped bf16 models (hidden 4096, 32 layers, GQA 32/8, FFN 14336,
vocabulary 128256, untied: 8.03B parameters, ~16 GB each as 5 GB shards; random weights,
generated tensor by tensor in chunks so the generator itself stays small; the LM head in a
shard of its own so that reward-model folders can share the body's shards). Then, each
run a fresh process with its process tree's peak RSS and anonymous memory sampled:

- the limit: plain safetensors streaming of the same bytes (read every input tensor by
  tensor, write one output of the merge's size, fsynced) — what any merge must pay;
- `linear` (uniform over the three) and `ties` (base + two, density 0.5) through lmalloy
  and through mergekit-yaml with its memory options (`--lazy-unpickle --low-cpu-memory`,
  the same 5 GB output shards);
- `lmalloy average` over the three and `lmalloy reward warm` over three reward models
  whose bodies are the three LMs' shards (a score head of their own).

Free disk is checked first (the models, one output at a time, and headroom); every output
is removed after its measurement and the models at the end (`--keep` keeps them).

usage: .venv/bin/python bench/merge8b_bench.py [--setup] [--keep] [--methods linear,ties]
       [--no-mergekit] [--mergekit-methods linear] [--small]   (--small: a 1B-shaped smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmem import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "merge8b"
LM = ROOT / ".venv" / "bin" / "lmalloy"
MK = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml"
CFG_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
CFG_SMALL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SHARD = 5 * 1024**3
CHUNK = 1 << 24  # entries generated at a time


def shapes(c: dict) -> dict:
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (V, h)}
    for k in range(L):
        p = f"model.layers.{k}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i)}
    out["model.norm.weight"] = (h,)
    return out


def write_model(folder: Path, c: dict, seed: int) -> None:
    """A bf16 Llama of shape `c`, written shard by shard in generated chunks (the LM head
    alone in `head.safetensors`)."""
    import torch

    from lmalloy.io.writer import ShardedWriter

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    body = shapes(c)
    with ShardedWriter(folder, [(n, "BF16", s) for n, s in body.items()], SHARD) as w:
        for n, s in body.items():
            _fill(w, n, s, g)
    head = ("lm_head.weight", (c["vocab_size"], c["hidden_size"]))
    with ShardedWriter(folder, [(head[0], "BF16", head[1])], prefix="head") as w:
        _fill(w, *head, g)
    idx = folder / "model.safetensors.index.json"
    weight_map = (json.loads(idx.read_text())["weight_map"] if idx.is_file()
                  else {n: "model.safetensors" for n in body})
    weight_map[head[0]] = "head.safetensors"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **c,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "rope_theta": 500000.0, "hidden_act": "silu", "dtype": "bfloat16",
           "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _fill(w, name: str, shape: tuple, g) -> None:
    import math

    import torch

    n = math.prod(shape)
    w.begin(name, "BF16", shape)
    for a in range(0, n, CHUNK):
        k = min(CHUNK, n - a)
        x = torch.ones(k) if len(shape) == 1 else torch.randn(k, generator=g) * 0.02
        w.part(x.to(torch.bfloat16))
    w.end()


def reward_folder(lm: Path, out: Path, c: dict, seed: int) -> None:
    """A LlamaForSequenceClassification folder: the LM's body shards (hard links) plus a
    score head of its own."""
    import torch

    from lmalloy.io.writer import ShardedWriter

    out.mkdir(parents=True)
    idx = json.loads((lm / "model.safetensors.index.json").read_text())["weight_map"]
    body = sorted({f for n, f in idx.items() if n != "lm_head.weight"})
    for f in body:
        os.link(lm / f, out / f)
    g = torch.Generator().manual_seed(seed)
    with ShardedWriter(out, [("score.weight", "BF16", (1, c["hidden_size"]))],
                       prefix="score") as w:
        w.write("score.weight", (torch.randn(1, c["hidden_size"], generator=g) * 0.02)
                .to(torch.bfloat16))
    weight_map = {n: f for n, f in idx.items() if n != "lm_head.weight"}
    weight_map["score.weight"] = "score.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg = json.loads((lm / "config.json").read_text())
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
               pad_token_id=0)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "reward.json").write_text(json.dumps({"init_group": "bench"}))


STREAM = r"""
import sys, json, os, torch
from pathlib import Path
from safetensors import safe_open
sys.path.insert(0, sys.argv[1])
from lmalloy.io.writer import ShardedWriter
from lmalloy.io.folder import open_model
inputs = [open_model(p) for p in json.loads(sys.argv[2])]
out = Path(sys.argv[3]); out.mkdir()
ref = inputs[0]
plan = [(n, t.dtype, t.shape) for n, t in ref.tensors.items()]
with ShardedWriter(out, plan, 5 * 1024**3) as w:  # read every input, write one model
    for n, _, _ in plan:
        xs = [f.read(n) for f in inputs]
        w.write(n, xs[-1].clone())
        del xs
for f in out.iterdir():
    fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--small", action="store_true", help="1B-shaped models (smoke run)")
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--mergekit-methods", help="the methods mergekit also runs (default: "
                    "--methods; mergekit's TIES on 8B takes about an hour here)")
    a = ap.parse_args()
    c = CFG_SMALL if a.small else CFG_8B
    import math

    n_params = sum(math.prod(s) for s in shapes(c).values()) + c["vocab_size"] * c["hidden_size"]
    size = 2 * n_params
    need = 4 * size + 3e9  # three models, one output at a time, headroom
    WORK.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(WORK).free
    if free < need:
        print(f"needs {need / 1e9:.0f} GB free in {WORK}, has {free / 1e9:.0f}", file=sys.stderr)
        return 1
    print(f"uptime: {os.popen('uptime').read().strip()}", file=sys.stderr)
    models = [WORK / f"m{i}" for i in range(3)]
    t0 = time.perf_counter()
    for i, m in enumerate(models):
        if not (m / "model.safetensors.index.json").is_file():
            shutil.rmtree(m, ignore_errors=True)
            write_model(m, c, i)
    print(f"models ready ({n_params / 1e9:.2f}B parameters, {size / 1e9:.1f} GB each) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []

    def measure(label: str, cmd: list[str], n_in: int, env=None) -> None:
        out = WORK / "out"
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        r = run_measured(cmd + [str(out)] if cmd[-1] == "{out}" else cmd, env)
        gb = (n_in + 1) * size / 1e9
        rows.append((label, r["wall"], gb / r["wall"], r["rss"] / 1e9, r["anon"] / 1e9))
        print(f"{label}: {r['wall']:.1f} s, {gb / r['wall']:.2f} GB/s, peak RSS "
              f"{r['rss'] / 1e9:.2f} GB, anon {r['anon'] / 1e9:.2f} GB", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)

    py = str(ROOT / ".venv" / "bin" / "python")
    out = str(WORK / "out")
    measure("streaming limit (read 3, write 1)",
            [py, "-c", STREAM, str(ROOT / "src"), json.dumps([str(m) for m in models]), out], 3)
    for method in a.methods.split(","):
        y = WORK / f"{method}.yaml"
        if method == "linear":
            y.write_text("merge_method: linear\nmodels:\n" + "".join(
                f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
                + "dtype: bfloat16\n")
            n_in = 3
        else:
            y.write_text(f"merge_method: ties\nbase_model: {models[0]}\nmodels:\n" + "".join(
                f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                for m in models[1:]) + "parameters: {normalize: true}\ndtype: bfloat16\n")
            n_in = 3
        measure(f"lmalloy merge {method}", [str(LM), "merge", str(y), "--out", out,
                                            "--no-progress"], n_in)
        mk_methods = (a.mergekit_methods or a.methods).split(",")
        if not a.no_mergekit and MK.exists() and method in mk_methods:
            measure(f"mergekit {method}", [str(MK), str(y), out, "--lazy-unpickle",
                                           "--low-cpu-memory", "--out-shard-size", "2500M",
                                           "--no-copy-tokenizer", "--no-write-model-card",
                                           "--quiet"], n_in, {"HF_HUB_OFFLINE": "1"})
    measure("lmalloy average", [str(LM), "average", *map(str, models), "--out", out], 3)
    rms = [WORK / f"rm{i}" for i in range(3)]
    for i, (m, r) in enumerate(zip(models, rms, strict=True)):
        shutil.rmtree(r, ignore_errors=True)
        reward_folder(m, r, c, i)
    measure("lmalloy reward warm", [str(LM), "reward", "warm", *map(str, rms), "--out", out], 3)
    for r in rms:
        shutil.rmtree(r, ignore_errors=True)
    print(f"\n8B-shaped bf16 inputs: {n_params / 1e9:.2f}B parameters, {size / 1e9:.1f} GB "
          f"each; {os.cpu_count()} cores\n")
    print("| run | wall s | GB/s (in+out) | peak RSS GB | peak anon GB |")
    print("|---|---|---|---|---|")
    for label, wall, gbs, rss, anon in rows:
        print(f"| {label} | {wall:.1f} | {gbs:.2f} | {rss:.2f} | {anon:.2f} |")
    if not a.keep:
        for m in models:
            shutil.rmtree(m, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
