"""The same YAML through mergekit 0.1.5 and lmalloy gives the same tensors.

Runs only where the benchmark's mergekit venv exists (`bench/.venv-mergekit`, made by
`bench/merge_bench.py --setup`); mergekit runs there in one subprocess for all configs.
Deterministic methods: equal to 1e-6 relative. DARE draws different random masks in the two
tools (and mergekit 0.1.5 rescales survivors to the L1 norm where lmalloy uses the paper's
1/density), so it is compared by statistics: the share of entries left at the base and the
mean |change|.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from common import make_llama, run_cli

MK_PY = Path(__file__).resolve().parents[1] / "bench" / ".venv-mergekit" / "bin" / "python"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not MK_PY.is_file(), reason="mergekit venv bench/.venv-mergekit not present (run "
    "`python bench/merge_bench.py --setup` to create it)")]

RUNNER = textwrap.dedent("""
    import json, sys, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    for cfg_path, out in json.loads(sys.argv[1]):
        cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
        run_merge(cfg, out, options=MergeOptions(write_model_card=False, copy_tokenizer=False,
                                                 quiet=True, random_seed=0))
""")


def configs(base: Path, f: list[Path]) -> dict[str, str]:
    m = [str(x) for x in f]
    return {
        "linear": f"""merge_method: linear
models:
  - {{model: {m[0]}, parameters: {{weight: 0.5}}}}
  - {{model: {m[1]}, parameters: {{weight: [0.2, 1.0]}}}}
  - {{model: {m[2]}, parameters: {{weight: [{{filter: mlp, value: 0.1}}, {{value: 0.7}}]}}}}
parameters: {{normalize: true}}
dtype: float32
""",
        "linear_unnormalized": f"""merge_method: linear
models:
  - {{model: {m[0]}, parameters: {{weight: 0.6}}}}
  - {{model: {m[1]}, parameters: {{weight: 0.6}}}}
parameters: {{normalize: false}}
dtype: float32
""",
        "task_arithmetic": f"""merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {m[1]}, parameters: {{weight: [0.3, 0.9]}}}}
  - {{model: {m[2]}, parameters: {{weight: -0.5}}}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
        "ties": f"""merge_method: ties
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 0.7, density: 0.5}}}}
  - {{model: {m[1]}, parameters: {{weight: [0.2, 1.0], density: 0.3}}}}
  - {{model: {m[2]}, parameters: {{weight: 0.5, density: [{{filter: mlp, value: 0.4}}, {{value: 0.8}}]}}}}
parameters: {{normalize: true, lambda: 1.1}}
dtype: float32
""",
        "slerp": f"""merge_method: slerp
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m[0]}}}
parameters:
  t:
    - {{filter: self_attn, value: [0.1, 0.9]}}
    - {{value: 0.35}}
dtype: float32
""",
        "model_stock": f"""merge_method: model_stock
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
  - {{model: {m[2]}}}
dtype: float32
""",
        "model_stock_filter_wise": f"""merge_method: model_stock
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
parameters: {{filter_wise: true}}
dtype: float32
""",
        "dare_linear": f"""merge_method: dare_linear
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {m[1]}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {m[2]}, parameters: {{weight: 1.0, density: 0.5}}}}
dtype: float32
""",
        "dare_ties": f"""merge_method: dare_ties
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 1.0, density: 0.4}}}}
  - {{model: {m[1]}, parameters: {{weight: 1.0, density: 0.4}}}}
  - {{model: {m[2]}, parameters: {{weight: 1.0, density: 0.4}}}}
dtype: float32
""",
    }


def test_same_tensors_as_mergekit(tmp_path, tokenizer_dir, capsys):
    base = make_llama(tmp_path / "base", tokenizer_dir, seed=0, hidden=64, intermediate=128)
    fts = [make_llama(tmp_path / f"ft{i}", tokenizer_dir, seed=i + 1, hidden=64,
                      intermediate=128, noise_from=base, noise=0.02) for i in range(3)]
    jobs = []
    cfgs = configs(base, fts)
    for name, text in cfgs.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        jobs.append((str(tmp_path / f"{name}.yaml"), str(tmp_path / f"mk_{name}")))
    r = subprocess.run([str(MK_PY), "-c", RUNNER, json.dumps(jobs)], capture_output=True,
                       text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    B = load_file(base / "model.safetensors")
    for name in cfgs:
        rc, _, err = run_cli(capsys, "merge", tmp_path / f"{name}.yaml", "--output",
                             tmp_path / f"lm_{name}", "--no-progress")
        assert rc == 0, err
        mk = load_file(tmp_path / f"mk_{name}" / "model.safetensors")
        lm = load_file(tmp_path / f"lm_{name}" / "model.safetensors")
        assert set(mk) == set(lm), name
        if name.startswith("dare"):
            same = {"mk": 0, "lm": 0}
            change = {"mk": 0.0, "lm": 0.0}
            n = 0
            for k in B:
                if B[k].numel() < 2048:
                    continue
                for tag, t in (("mk", mk[k]), ("lm", lm[k])):
                    same[tag] += int((t == B[k]).sum())
                    change[tag] += float((t - B[k]).abs().sum())
                n += B[k].numel()
            assert abs(same["mk"] - same["lm"]) / n < 0.01, (name, same, n)
            assert abs(change["mk"] / change["lm"] - 1) < 0.03, (name, change)
            continue
        for k in mk:
            a, b = mk[k].float(), lm[k].float()
            rel = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
            assert rel <= 1e-6, (name, k, rel)
