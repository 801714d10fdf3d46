"""`slices:` (layer stacking): the same tensors as mergekit 0.1.5 on its documented shapes of
config (a passthrough frankenmerge, gradient SLERP over slices, per-slice TIES), an output
transformers loads with the stacked layer count, and a `merge_config.yaml` that repeats it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import make_family, make_llama, run_cli
from test_merge_compat import MK_PY, run_mergekit


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("slices")
    base = make_llama(root / "base", tokenizer_dir, seed=0, hidden=64, intermediate=128,
                      layers=4)
    fts = [make_llama(root / f"ft{i}", tokenizer_dir, seed=i + 1, hidden=64, intermediate=128,
                      layers=4, noise_from=base, noise=0.02) for i in range(2)]
    deep = make_llama(root / "deep", tokenizer_dir, seed=9, hidden=64, intermediate=128,
                      layers=6)
    return {"root": root, "base": base, "ft": fts, "deep": deep}


def configs(z) -> dict[str, str]:
    b, (f0, f1), deep = z["base"], z["ft"], z["deep"]
    return {
        # mergekit's examples/orcamini-platy-44layer.yml: two models' layers, overlapping
        "frankenmerge": f"""slices:
  - sources:
    - model: {f0}
      layer_range: [0, 3]
  - sources:
    - model: {deep}
      layer_range: [1, 6]
merge_method: passthrough
dtype: float32
""",
        # a model's own layers repeated, attention outputs scaled in the repeated part
        "self_stack": f"""slices:
  - sources: [{{model: {f0}, layer_range: [0, 3]}}]
  - sources: [{{model: {f0}, layer_range: [1, 4]}}]
    parameters:
      scale: [{{filter: o_proj, value: 0.5}}, {{filter: down_proj, value: 0.5}}, {{value: 1.0}}]
merge_method: passthrough
dtype: float32
""",
        # mergekit's examples/gradient-slerp.yml
        "gradient_slerp": f"""slices:
  - sources:
      - model: {f0}
        layer_range: [0, 4]
      - model: {f1}
        layer_range: [0, 4]
merge_method: slerp
base_model: {f0}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
        # per-slice parameters over the global ones, source ones over both
        "ties_slices": f"""slices:
  - sources:
      - {{model: {b}, layer_range: [0, 2]}}
      - {{model: {f0}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}
      - {{model: {f1}, layer_range: [0, 2]}}
    parameters: {{density: 0.3}}
  - sources:
      - {{model: {b}, layer_range: [2, 4]}}
      - {{model: {f0}, layer_range: [2, 4]}}
      - {{model: {f1}, layer_range: [2, 4], parameters: {{density: 0.8}}}}
merge_method: ties
base_model: {b}
parameters: {{weight: 1.0, density: 0.5}}
dtype: float32
""",
        # a weighted average with a gradient over the layers of each slice
        "linear_slices": f"""slices:
  - sources:
      - {{model: {f0}, layer_range: [0, 3], parameters: {{weight: [0.2, 1.0]}}}}
      - {{model: {f1}, layer_range: [1, 4], parameters: {{weight: 0.5}}}}
  - sources:
      - {{model: {f1}, layer_range: [3, 4]}}
      - {{model: {f0}, layer_range: [0, 1]}}
merge_method: linear
parameters: {{weight: 1.0}}
dtype: float32
""",
    }


def _merge(capsys, yaml_path: Path, out: Path) -> dict:
    rc, _, err = run_cli(capsys, "merge", yaml_path, "--out", out, "--no-progress")
    assert rc == 0, err
    return load_file(out / "model.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not MK_PY.is_file(), reason="mergekit venv bench/.venv-mergekit not "
                    "present (run `python bench/merge_bench.py --setup`)")
def test_slices_same_tensors_as_mergekit(zoo, tmp_path, capsys):
    cfgs = configs(zoo)
    run_mergekit(tmp_path, cfgs)
    bad = []
    for name in cfgs:
        lm = _merge(capsys, tmp_path / f"{name}.yaml", tmp_path / f"lm_{name}")
        mk = load_file(tmp_path / f"mk_{name}" / "model.safetensors")
        assert set(mk) == set(lm), (name, set(mk) ^ set(lm))
        for k in mk:
            a, b = mk[k].float(), lm[k].float()
            rel = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
            if rel > 1e-6:
                bad.append((name, k, rel))
        mk_cfg = json.loads((tmp_path / f"mk_{name}" / "config.json").read_text())
        lm_cfg = json.loads((tmp_path / f"lm_{name}" / "config.json").read_text())
        assert mk_cfg["num_hidden_layers"] == lm_cfg["num_hidden_layers"], name
    assert not bad, bad


def test_frankenmerge_is_the_layers_stacked_and_loads(zoo, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    (tmp_path / "f.yaml").write_text(configs(zoo)["frankenmerge"])
    out = _merge(capsys, tmp_path / "f.yaml", tmp_path / "out")
    f0 = load_file(zoo["ft"][0] / "model.safetensors")
    deep = load_file(zoo["deep"] / "model.safetensors")
    for name, t in out.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            src, j = (f0, i) if i < 3 else (deep, i - 3 + 1)
            want = src[name.replace(f".layers.{i}.", f".layers.{j}.")]
        else:  # the embedding from the first slice, the norm and head from the last
            want = (f0 if "embed_tokens" in name else deep)[name]
        assert torch.equal(t, want), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == len(model.model.layers) == 8
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[2, 3, 4, 5]])).logits).all()


def test_merge_config_repeats_a_stacked_merge(zoo, tmp_path, capsys):
    (tmp_path / "t.yaml").write_text(configs(zoo)["ties_slices"])
    first = _merge(capsys, tmp_path / "t.yaml", tmp_path / "a")
    again = _merge(capsys, tmp_path / "a" / "merge_config.yaml", tmp_path / "b")
    assert set(first) == set(again)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_whole_model_slice_equals_models_syntax(zoo, tmp_path, capsys):
    """One slice over every layer is the `models:` merge (mergekit's rewrite of it)."""
    (tmp_path / "s.yaml").write_text(configs(zoo)["gradient_slerp"])
    sliced = _merge(capsys, tmp_path / "s.yaml", tmp_path / "s")
    text = configs(zoo)["gradient_slerp"].split("merge_method:")[1]
    (tmp_path / "m.yaml").write_text(f"models:\n  - model: {zoo['ft'][0]}\n  - model: "
                                     f"{zoo['ft'][1]}\nmerge_method:{text}")
    whole = _merge(capsys, tmp_path / "m.yaml", tmp_path / "m")
    assert all(torch.equal(sliced[k], whole[k]) for k in whole)


def test_per_layer_config_lists_follow_the_layers(tmp_path, tokenizer_dir, capsys):
    """Qwen2's `layer_types` (one entry per layer) is rebuilt for the stacked layers."""
    from transformers import AutoModelForCausalLM

    a = make_family(tmp_path / "a", "qwen2", tokenizer_dir, seed=1)
    cfg = json.loads((a / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    types = ["sliding_attention" if i % 2 else "full_attention" for i in range(n)]
    cfg.update(layer_types=types, use_sliding_window=True, sliding_window=16)
    (a / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "q.yaml").write_text(f"""slices:
  - sources: [{{model: {a}, layer_range: [0, {n}]}}]
  - sources: [{{model: {a}, layer_range: [{n - 1}, {n}]}}]
merge_method: passthrough
""")
    _merge(capsys, tmp_path / "q.yaml", tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == n + 1
    assert out["layer_types"] == types + types[-1:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == n + 1
