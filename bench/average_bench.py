"""Benchmark of weight averaging: per-step update overhead, and offline averaging speed/memory.

Part 1 — the cost of one averaging update after an optimizer step, fp32 on CPU, for the
`small` and `base` presets, side by side in one process (methods interleaved round by
round, medians): lmalloy's EMA and SWA; torch.optim.swa_utils.AveragedModel with
get_ema_multi_avg_fn / get_swa_multi_avg_fn; timm's ModelEmaV3. Each is also given as a
share of one training step (forward + backward + AdamW, micro batch B × seq T).

timm: ModelEmaV3 is loaded from timm's own `timm/utils/model_ema.py` (timm installed in
bench/.venv-timm with `pip install --no-deps timm`): the timm package's __init__ imports
torchvision, which has no build matching the CPU torch here; that file imports only torch.

Part 2 — offline average of 5 checkpoints of the `base` preset: GB/s = (bytes read +
bytes written) / wall time, and peak RSS, lmalloy's streaming `average_folders` against a
plain torch average (safetensors.load_file of every input, sum, divide, save_file). Each
run is its own subprocess; peak memory is its VmHWM (reset after imports); lmalloy is also run on
2 checkpoints to show that its peak does not grow with the number of inputs.

    .venv/bin/python bench/average_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_timm_ema():
    hits = glob.glob(str(ROOT / "bench/.venv-timm/lib/python*/site-packages/timm/utils/"
                         "model_ema.py"))
    if not hits:
        return None
    spec = importlib.util.spec_from_file_location("timm_model_ema", hits[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ModelEmaV3


def build(preset: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.train.presets import model_kwargs

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**model_kwargs(preset, 4096)))


def time_calls(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead(preset: str, rounds: int, train_steps: int, B: int, T: int) -> dict:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

    from lmalloy.average import EMA, SWA

    model = build(preset)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 4096, (B, T))

    def train_step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # warm-up (AdamW state allocation)
    step_s = time_calls({"step": train_step}, train_steps)["step"]
    ema, swa = EMA(model, decay=0.999), SWA(model, start=1)
    am_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    am_swa = AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())
    fns = {"lmalloy EMA": lambda: ema.update(model),
           "torch AveragedModel EMA": lambda: am_ema.update_parameters(model),
           "lmalloy SWA": lambda: swa.update(model),
           "torch AveragedModel SWA": lambda: am_swa.update_parameters(model)}
    ModelEmaV3 = load_timm_ema()
    if ModelEmaV3 is not None:
        timm_ema = ModelEmaV3(model, decay=0.999)
        fns["timm ModelEmaV3"] = lambda: timm_ema.update(model)
    for f in fns.values():  # first calls copy the weights; time the steady state
        f()
        f()
    upd = time_calls(fns, rounds)
    return {"preset": preset, "params": n, "step_s": step_s, "B": B, "T": T, "update_s": upd}


# ----------------------------------------------------------------------------- offline

CHILD = r"""
import json, sys, time
from pathlib import Path
mode, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
import torch, safetensors.torch as st
from lmalloy.average.offline import average_folders
def status(key):  # kB; VmHWM = peak resident set (anonymous + mapped file pages)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
rss0 = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
t0 = time.perf_counter()
if mode == "lmalloy":
    r = average_folders(paths, out, progress=False)
    nin, nout = r["bytes_in"], r["bytes_out"]
else:  # plain torch: load everything, average, save
    import shutil
    sds = [st.load_file(str(Path(p) / "model.safetensors")) for p in paths]
    avg = {k: sum(sd[k].float() for sd in sds) / len(sds) for k in sds[-1]}
    Path(out).mkdir()
    st.save_file(avg, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(Path(paths[-1]) / "config.json", Path(out) / "config.json")
    nin = sum(v.numel() * v.element_size() for sd in sds for v in sd.values())
    nout = sum(v.numel() * v.element_size() for v in avg.values())
dt = time.perf_counter() - t0
rss = status("VmHWM")
print(json.dumps({"seconds": dt, "bytes": nin + nout, "peak_mb": rss / 1024,
                  "over_import_mb": (rss - rss0) / 1024}))
"""


def offline(preset: str, n: int, repeats: int, baseline: str | None = None) -> dict:
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="avgbench-"))
    paths = []
    for i in range(n):
        m = build(preset, seed=i)
        p = tmp / f"ck{i}"
        m.save_pretrained(p)
        paths.append(str(p))
        del m
    res = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    runs = [("torch", "torch", paths, env), ("lmalloy", "lmalloy", paths, env),
            ("lmalloy, 2 inputs", "lmalloy", paths[:2], env)]
    if baseline:  # an earlier lmalloy source tree, side by side
        runs.append(("lmalloy baseline", "lmalloy", paths,
                     {**os.environ, "PYTHONPATH": baseline}))
    for _rep in range(repeats):  # alternate; keep each one's fastest run
        for name, mode, ps, e in runs:
            out = tmp / f"out-{name.replace(' ', '-').replace(',', '')}-{len(ps)}"
            shutil.rmtree(out, ignore_errors=True)
            r = subprocess.run([sys.executable, "-c", CHILD, mode, str(out), *ps], env=e,
                               capture_output=True, text=True, check=True)
            got = json.loads(r.stdout.strip().splitlines()[-1])
            if name not in res or got["seconds"] < res[name]["seconds"]:
                res[name] = got
    a = {k: v for k, v in _read(tmp / "out-lmalloy-5").items()} if n == 5 else {}
    b = _read(tmp / f"out-torch-{n}")
    same = all(torch.equal(a[k], b[k]) for k in b) if a else None
    shutil.rmtree(tmp, ignore_errors=True)
    return {"preset": preset, "n": n, "runs": res, "identical": same}


def _read(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny preset, few rounds (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", help="an earlier lmalloy `src` folder: its offline average "
                    "runs side by side with this tree's")
    ap.add_argument("--offline-only", action="store_true", help="skip the update-overhead part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = ["tiny"] if args.quick else ["small", "base"]
    rounds = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    for p in [] if args.offline_only else presets:
        r = overhead(p, rounds, 3, B=4 if p != "tiny" else 2, T=256)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| preset | params | train step (B×T) | method | update ms | % of step | "
          "time vs lmalloy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        u = r["update_s"]
        for m, s in u.items():
            ref = u["lmalloy EMA" if ("EMA" in m or "Ema" in m) else "lmalloy SWA"]
            print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['step_s'] * 1e3:.0f} ms "
                  f"({r['B']}×{r['T']}) | {m} | {s * 1e3:.2f} | "
                  f"{100 * s / r['step_s']:.2f}% | {s / ref:.2f}× |")
    off = offline("tiny" if args.quick else "base", 5, 1 if args.quick else 2, args.baseline)
    print(json.dumps(off), flush=True)
    print("\n| offline average, 5 checkpoints | wall s | GB/s (in+out) | peak RSS MB | "
          "peak over RSS after imports MB |")
    print("|---|---|---|---|---|")
    for name, r in off["runs"].items():
        print(f"| {name} | {r['seconds']:.2f} | {r['bytes'] / r['seconds'] / 1e9:.2f} | "
              f"{r['peak_mb']:.0f} | {r['over_import_mb']:.0f} |")
    t, lm = off["runs"]["torch"], off["runs"]["lmalloy"]
    print(f"\nlmalloy speed vs plain torch: {t['seconds'] / lm['seconds']:.2f}×; outputs "
          f"bitwise identical: {off['identical']}")
    if "lmalloy baseline" in off["runs"]:
        b = off["runs"]["lmalloy baseline"]
        print(f"lmalloy speed vs the baseline tree: {b['seconds'] / lm['seconds']:.2f}×")


if __name__ == "__main__":
    main()
