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
import torch
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


def run_mergekit(folder: Path, cfgs: dict[str, str]) -> None:
    """Each config as `folder/NAME.yaml`, merged by mergekit into `folder/mk_NAME` (one
    subprocess for all)."""
    jobs = []
    for name, text in cfgs.items():
        (folder / f"{name}.yaml").write_text(text)
        jobs.append((str(folder / f"{name}.yaml"), str(folder / f"mk_{name}")))
    r = subprocess.run([str(MK_PY), "-c", RUNNER, json.dumps(jobs)], capture_output=True,
                       text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]


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
        "breadcrumbs": f"""merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 1.0, density: 0.5, gamma: 0.05}}}}
  - {{model: {m[1]}, parameters: {{weight: [0.3, 0.9], density: 0.6}}}}
  - {{model: {m[2]}, parameters: {{weight: 0.8, density: [{{filter: mlp, value: 0.3}}, {{value: 0.7}}], gamma: 0.1}}}}
parameters: {{lambda: 0.9}}
dtype: float32
""",
        "breadcrumbs_ties": f"""merge_method: breadcrumbs_ties
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 0.7, density: 0.4, gamma: 0.02}}}}
  - {{model: {m[1]}, parameters: {{weight: 1.0, density: 0.5, gamma: 0.05}}}}
  - {{model: {m[2]}, parameters: {{weight: 0.5, density: 0.6}}}}
parameters: {{normalize: true, rescale: true}}
dtype: float32
""",
        "della": f"""merge_method: della
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 1.0, density: 0.5, epsilon: 0.15}}}}
  - {{model: {m[1]}, parameters: {{weight: 1.0, density: 0.5, epsilon: 0.15}}}}
  - {{model: {m[2]}, parameters: {{weight: 1.0, density: 0.5, epsilon: 0.15}}}}
dtype: float32
""",
        "della_linear": f"""merge_method: della_linear
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 0.5, density: 0.4, epsilon: 0.2}}}}
  - {{model: {m[1]}, parameters: {{weight: 0.5, density: 0.4, epsilon: 0.2}}}}
  - {{model: {m[2]}, parameters: {{weight: 0.5, density: 0.4, epsilon: 0.2}}}}
parameters: {{lambda: 1.2}}
dtype: float32
""",
        "della_no_rescale": f"""merge_method: della_linear
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 0.5, density: 0.4, epsilon: 0.2}}}}
  - {{model: {m[1]}, parameters: {{weight: 0.5, density: 0.4, epsilon: 0.2}}}}
  - {{model: {m[2]}, parameters: {{weight: 0.5, density: 0.4, epsilon: 0.2}}}}
parameters: {{rescale: false}}
dtype: float32
""",
        "sce": f"""merge_method: sce
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
  - {{model: {m[2]}}}
parameters: {{select_topk: 0.5}}
dtype: float32
""",
        "sce_all": f"""merge_method: sce
base_model: {base}
models:
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
dtype: float32
""",
        "nuslerp": f"""merge_method: nuslerp
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 0.3}}}}
  - {{model: {m[1]}, parameters: {{weight: [0.2, 0.9]}}}}
dtype: float32
""",
        "nuslerp_no_base_row_wise": f"""merge_method: nuslerp
models:
  - {{model: {m[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {m[1]}, parameters: {{weight: 2.0}}}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: float32
""",
        "nuslerp_no_base_rows": f"""merge_method: nuslerp
models:
  - {{model: {m[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {m[2]}, parameters: {{weight: 1.0}}}}
parameters: {{nuslerp_flatten: false}}
dtype: float32
""",
        "multislerp": f"""merge_method: multislerp
base_model: {base}
models:
  - {{model: {m[0]}, parameters: {{weight: 0.5}}}}
  - {{model: {m[1]}, parameters: {{weight: 0.3}}}}
  - {{model: {m[2]}, parameters: {{weight: [0.1, 0.6]}}}}
dtype: float32
""",
        "multislerp_no_base": f"""merge_method: multislerp
models:
  - {{model: {m[0]}, parameters: {{weight: 1.0}}}}
  - {{model: {m[1]}, parameters: {{weight: 2.0}}}}
parameters: {{normalize_weights: false}}
dtype: float32
""",
        "karcher": f"""merge_method: karcher
base_model: {base}
models:
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
  - {{model: {m[2]}}}
parameters: {{max_iter: 20, tol: 1.0e-6}}
dtype: float32
""",
        "karcher_no_base": f"""merge_method: karcher
models:
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
dtype: float32
""",
        "nearswap": f"""merge_method: nearswap
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m[0]}}}
parameters:
  t: [{{filter: mlp, value: 0.01}}, {{value: 0.03}}]
dtype: float32
""",
        "arcee_fusion": f"""merge_method: arcee_fusion
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m[1]}}}
dtype: float32
""",
        "ram": f"""merge_method: ram
base_model: {base}
models:
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
  - {{model: {m[2]}}}
parameters: {{epsilon: 0.02}}
dtype: float32
""",
        "ramplus_tl": f"""merge_method: ramplus_tl
base_model: {base}
models:
  - {{model: {m[0]}}}
  - {{model: {m[1]}}}
  - {{model: {m[2]}}}
parameters: {{epsilon: 0.02, r: 0.5, alpha: 0.6}}
dtype: float32
""",
    }


# random drops: compared by statistics (different generators in the two tools). The bound
# on mean |change|: 3%, except where the rescale rules differ (DELLA: lmalloy 1/p per entry,
# mergekit the L1 norm: the same in expectation per task vector, not for |Σ|; 2-4% measured)
RANDOM = {"dare_linear": 0.03, "dare_ties": 0.03, "della": 0.06, "della_linear": 0.06,
          "della_no_rescale": 0.03}


def test_same_tensors_as_mergekit(tmp_path, tokenizer_dir, capsys):
    base = make_llama(tmp_path / "base", tokenizer_dir, seed=0, hidden=64, intermediate=128)
    fts = [make_llama(tmp_path / f"ft{i}", tokenizer_dir, seed=i + 1, hidden=64,
                      intermediate=128, noise_from=base, noise=0.02) for i in range(3)]
    cfgs = configs(base, fts)
    run_mergekit(tmp_path, cfgs)
    B = load_file(base / "model.safetensors")
    report, bad = {}, []
    for name in cfgs:
        rc, _, err = run_cli(capsys, "merge", tmp_path / f"{name}.yaml", "--output",
                             tmp_path / f"lm_{name}", "--no-progress")
        assert rc == 0, (name, err)
        mk = load_file(tmp_path / f"mk_{name}" / "model.safetensors")
        lm = load_file(tmp_path / f"lm_{name}" / "model.safetensors")
        assert set(mk) == set(lm), name
        if name in RANDOM:
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
            kept = abs(same["mk"] - same["lm"]) / n
            ratio = change["mk"] / change["lm"] - 1
            report[name] = f"share at base differs by {kept:.4f}, mean |change| by {ratio:+.4f}"
            if kept >= 0.01 or abs(ratio) >= RANDOM[name]:
                bad.append((name, same, change, n))
            continue
        worst = 0.0
        for k in mk:
            a, b = mk[k].float(), lm[k].float()
            rel = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
            worst = max(worst, rel)
            if rel > 1e-6:
                bad.append((name, k, rel))
        report[name] = f"max relative difference {worst:.2e}"
    print("\n".join(f"{k}: {v}" for k, v in report.items()))
    assert not bad, bad


def test_union_tokenizer_same_tensors_as_mergekit(tmp_path, tokenizer_dir, capsys):
    """`tokenizer: {source: union}` on two fine-tunes that each added a token (and a base
    without them): mergekit's permuted embeddings, linear and TIES."""
    from transformers import AutoTokenizer

    def tok_with(name: str, tokens: list[str]) -> Path:
        t = AutoTokenizer.from_pretrained(tokenizer_dir)
        t.add_tokens(tokens)
        t.save_pretrained(tmp_path / name)
        return tmp_path / name

    base = make_llama(tmp_path / "base", tokenizer_dir, seed=0, hidden=64, intermediate=128,
                      vocab=384)
    fa = make_llama(tmp_path / "fa", tok_with("ta", ["<a>"]), seed=1, hidden=64,
                    intermediate=128, vocab=384, noise_from=base, noise=0.02)
    fb = make_llama(tmp_path / "fb", tok_with("tb", ["<b>", "<c>"]), seed=2, hidden=64,
                    intermediate=128, vocab=384, noise_from=base, noise=0.02)
    cfgs = {
        "union_linear": f"""merge_method: linear
models:
  - {{model: {fa}, parameters: {{weight: 0.6}}}}
  - {{model: {fb}, parameters: {{weight: 0.4}}}}
tokenizer: {{source: union}}
dtype: float32
""",
        "union_ties": f"""merge_method: ties
base_model: {base}
models:
  - {{model: {fa}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {fb}, parameters: {{weight: 1.0, density: 0.5}}}}
tokenizer: {{source: union, pad_to_multiple_of: 8}}
dtype: float32
""",
    }
    run_mergekit(tmp_path, cfgs)
    for name in cfgs:
        rc, _, err = run_cli(capsys, "merge", tmp_path / f"{name}.yaml", "--out",
                             tmp_path / f"lm_{name}", "--no-progress")
        assert rc == 0, (name, err)
        mk = load_file(tmp_path / f"mk_{name}" / "model.safetensors")
        lm = load_file(tmp_path / f"lm_{name}" / "model.safetensors")
        assert set(mk) == set(lm), name
        # mergekit appends the other models' tokens in the order of a Python set (it varies
        # between runs); lmalloy in the order the models are listed: compare rows by token
        vm = AutoTokenizer.from_pretrained(tmp_path / f"mk_{name}").get_vocab()
        vl = AutoTokenizer.from_pretrained(tmp_path / f"lm_{name}").get_vocab()
        assert set(vm) == set(vl), name
        assert [vl[t] for t in ("<a>", "<b>", "<c>")] == [320, 321, 322]
        order_m = torch.tensor([vm[t] for t in sorted(vl, key=vl.get)])
        order_l = torch.tensor(sorted(vl.values()))
        for k in mk:
            a, b = mk[k], lm[k]
            assert a.shape == b.shape, (name, k, a.shape, b.shape)
            if "embed_tokens" in k or "lm_head" in k:
                pad_m, pad_l = a[len(vm):], b[len(vl):]
                a, b = a[order_m], b[order_l]
                torch.testing.assert_close(pad_m, pad_l, rtol=1e-5, atol=1e-6)
            rel = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
            assert rel < 1e-5, (name, k, rel)
