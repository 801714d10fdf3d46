"""`moe build` and `moe analyze`: exactness, provenance, router init, statistics, bad input."""

from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest
import torch
import yaml

from common import assert_user_error, make_llama, run_cli

PROMPTS = [
    (["def add(a, b):\n    return a + b\n"], ["import json\n"]),
    (["class Point:\n    def __init__(self, x, y):\n"], []),
    (["for i in range(10):\n    print(i)\n", "import json\nprint(1)\n"], ["class A:\n"]),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama, tokenizer_dir):
    root = tmp_path_factory.mktemp("moe")
    experts = [make_llama(root / f"ft{i}", tokenizer_dir, seed=10 + i, noise_from=tiny_llama,
                          noise=0.05) for i in range(3)]
    return {"root": root, "base": tiny_llama, "experts": experts}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tensors(path) -> dict:
    from lmalloy.io import open_model

    m = open_model(path)
    return {n: m.read(n) for n in m.names()}


def _yaml(path, models, gate_mode="hidden", **extra):
    cfg = {"base_model": str(models["base"]), "gate_mode": gate_mode, "dtype": "float32",
           "experts": [{"source_model": str(p), "positive_prompts": pos,
                        "negative_prompts": neg}
                       for p, (pos, neg) in zip(models["experts"], PROMPTS, strict=True)],
           "experts_per_token": 2, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- upcycle


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_upcycle_reproduces_dense_logits(capsys, models, layout):
    out = models["root"] / f"up-{layout}"
    rc, _, err = run_cli(capsys, "moe", "build", "--method", "upcycle", "--base-model",
                         models["base"], "--num-experts", "4", "--layout", layout, "--out", out)
    assert rc == 0, err
    dense, moe = _load(models["base"]), _load(out)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
    names = _tensors(out)
    if layout == "per_expert":
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    else:
        assert names["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 128, 32)
    assert (out / "tokenizer.json").is_file() and (out / "moe_build.yaml").is_file()


def test_upcycle_noise_perturbs_copies(capsys, models):
    out = models["root"] / "up-noise"
    rc, _, err = run_cli(capsys, "moe", "build", "--method", "upcycle", "--base-model",
                         models["base"], "--num-experts", "2", "--noise", "0.1",
                         "--gate-mode", "zero", "--out", out)
    assert rc == 0, err
    t, b = _tensors(out), _tensors(models["base"])
    w0 = t["model.layers.1.block_sparse_moe.experts.0.w1.weight"]
    w1 = t["model.layers.1.block_sparse_moe.experts.1.w1.weight"]
    src = b["model.layers.1.mlp.gate_proj.weight"]
    assert not torch.equal(w0, w1)
    rel = (w0 - src).std() / src.std()
    assert 0.05 < float(rel) < 0.2
    assert t["model.layers.1.block_sparse_moe.gate.weight"].abs().sum() == 0


# ----------------------------------------------------------------------------- compose / btx


def test_compose_provenance_and_hidden_router(capsys, models):
    cfg = _yaml(models["root"] / "compose.yaml", models)
    out = models["root"] / "compose"
    rc, _, err = run_cli(capsys, "moe", "build", cfg, "--out", out)
    assert rc == 0, err
    t, base = _tensors(out), _tensors(models["base"])
    for i, p in enumerate(models["experts"]):
        ft = _tensors(p)
        for layer in range(2):
            q = f"model.layers.{layer}.block_sparse_moe.experts.{i}"
            src = f"model.layers.{layer}.mlp"
            assert torch.equal(t[f"{q}.w1.weight"], ft[f"{src}.gate_proj.weight"])
            assert torch.equal(t[f"{q}.w3.weight"], ft[f"{src}.up_proj.weight"])
            assert torch.equal(t[f"{q}.w2.weight"], ft[f"{src}.down_proj.weight"])
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.1.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(t[n], base[n])
    # router rows: reference computation straight from transformers' hidden states
    from lmalloy.data.tokenizer import Tok

    tok = Tok.load(models["base"])
    dense = _load(models["base"])

    def last_hidden(prompts):  # (L, H): input of each layer at the last token, mean over prompts
        hs = []
        for p in prompts:
            ids = torch.tensor([[0] + tok.encode(p)])  # BOS = 0
            with torch.no_grad():
                o = dense(input_ids=ids, output_hidden_states=True)
            hs.append(torch.stack([o.hidden_states[j][0, -1] for j in range(2)]))
        return torch.stack(hs).mean(0)

    for i, (pos, neg) in enumerate(PROMPTS):
        v = last_hidden(pos) - (last_hidden(neg) if neg else 0)
        v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # layer 0: same last token -> 0
        for layer in range(2):
            got = t[f"model.layers.{layer}.block_sparse_moe.gate.weight"][i]
            torch.testing.assert_close(got, v[layer], atol=1e-5, rtol=1e-4)
    assert type(_load(out)).__name__ == "MixtralForCausalLM"


def test_cheap_embed_router_reference(capsys, models):
    cfg = _yaml(models["root"] / "cheap.yaml", models, gate_mode="cheap_embed")
    out = models["root"] / "cheap"
    rc, _, err = run_cli(capsys, "moe", "build", cfg, "--out", out, "--layout", "fused")
    assert rc == 0, err
    from lmalloy.data.tokenizer import Tok

    tok = Tok.load(models["base"])
    emb = _tensors(models["base"])["model.embed_tokens.weight"]

    def summed(prompts):
        s = sum(emb[[0] + tok.encode(p)].sum(0) for p in prompts)
        return s / s.norm()

    t = _tensors(out)
    for i, (pos, neg) in enumerate(PROMPTS):
        v = summed(pos) - (summed(neg) if neg else 0)
        v = v / v.norm()
        for layer in range(2):
            torch.testing.assert_close(t[f"model.layers.{layer}.mlp.gate.weight"][i], v,
                                       atol=1e-5, rtol=1e-4)
    _load(out)


def test_btx_averages_non_ffn(capsys, models):
    out = models["root"] / "btx"
    rc, _, err = run_cli(capsys, "moe", "build", "--method", "btx", "--base-model",
                         models["base"], "--experts", ",".join(map(str, models["experts"])),
                         "--gate-mode", "random", "--out", out)
    assert rc == 0, err
    t = _tensors(out)
    fts = [_tensors(p) for p in models["experts"]]
    for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.1.post_attention_layernorm.weight", "lm_head.weight"):
        torch.testing.assert_close(t[n], sum(f[n] for f in fts) / 3, atol=1e-6, rtol=1e-6)
    assert torch.equal(t["model.layers.1.block_sparse_moe.experts.2.w2.weight"],
                       fts[2]["model.layers.1.mlp.down_proj.weight"])
    g = t["model.layers.0.block_sparse_moe.gate.weight"]
    assert g.shape == (3, 32) and 0.5 < float(g.std()) < 1.5  # N(0, 1) as mergekit
    _load(out)


def test_collinear_router_warns(capsys, models, tmp_path):
    cfg = {"base_model": str(models["base"]), "gate_mode": "cheap_embed",
           "experts": [{"source_model": str(p), "positive_prompts": ["def f(x):\n"]}
                       for p in models["experts"][:2]]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(capsys, "moe", "build", tmp_path / "c.yaml", "--out", tmp_path / "o")
    assert rc == 0 and "nearly collinear" in err


def test_layout_conversion_both_ways():
    from lmalloy.moe.layout import fused_to_per_expert, per_expert_to_fused

    g = torch.Generator().manual_seed(0)
    fused = {"model.layers.0.mlp.gate.weight": torch.randn(4, 8, generator=g),
             "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 12, 8, generator=g),
             "model.layers.0.mlp.experts.down_proj": torch.randn(4, 8, 6, generator=g),
             "model.norm.weight": torch.randn(8, generator=g)}
    per = fused_to_per_expert(fused)
    assert torch.equal(per["model.layers.0.block_sparse_moe.experts.2.w1.weight"],
                       fused["model.layers.0.mlp.experts.gate_up_proj"][2, :6])
    assert torch.equal(per["model.layers.0.block_sparse_moe.experts.2.w3.weight"],
                       fused["model.layers.0.mlp.experts.gate_up_proj"][2, 6:])
    back = per_expert_to_fused(per)
    assert set(back) == set(fused)
    for k, v in fused.items():
        assert torch.equal(back[k], v)


# ----------------------------------------------------------------------------- statistics


def test_routing_statistics_hand_made():
    from lmalloy.moe.stats import consecutive_stats, expert_shares, topk_from_logits

    # top-2 per token, best first; two sequences of 4 tokens
    topk = np.array([[0, 1], [0, 2], [3, 2], [4, 5],    # seq 0: pairs same/ovl: Y/Y, N/Y, N/N
                     [1, 0], [1, 0], [2, 3], [3, 2]])   # seq 1: Y/Y, N/N, N/Y
    seq = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = consecutive_stats(topk, seq)
    assert s["pairs"] == 6
    assert s["same_top1"] == pytest.approx(2 / 6)
    assert s["overlap"] == pytest.approx(4 / 6)
    sh = expert_shares(topk, 8)
    assert sh.sum() == pytest.approx(1) and sh[0] == pytest.approx(4 / 16) and sh[7] == 0
    logits = np.array([[0.1, 2.0, -1.0, 0.5], [3.0, 3.0, 0.0, 1.0]])
    assert topk_from_logits(logits, 2).tolist() == [[1, 3], [0, 1]]


def test_random_routing_matches_baselines():
    from lmalloy.moe.stats import baseline_overlap, baseline_same_top1, consecutive_stats

    assert baseline_same_top1(8) == 0.125
    assert baseline_overlap(8, 2) == pytest.approx(1 - 15 / 28)  # ≈ 46.4%
    assert baseline_overlap(4, 2) == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    rng = np.random.default_rng(0)
    topk = np.stack([rng.permutation(8)[:2] for _ in range(20000)])
    s = consecutive_stats(topk)
    assert s["same_top1"] == pytest.approx(0.125, abs=0.01)
    assert s["overlap"] == pytest.approx(baseline_overlap(8, 2), abs=0.015)


def test_param_accounting_mixtral_8x7b():
    from lmalloy.moe.stats import param_counts

    cfg = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False}
    c = param_counts(cfg)
    assert round(c["total"] / 1e9, 1) == 46.7
    assert round(c["active"] / 1e9, 1) == 12.9
    assert c["total"] == c["non_ff"] + 8 * c["ff_per_expert"]


def test_param_accounting_matches_transformers(models, capsys, tmp_path):
    out = tmp_path / "up"
    rc, _, err = run_cli(capsys, "moe", "build", "--method", "upcycle", "--base-model",
                         models["base"], "--num-experts", "4", "--out", out)
    assert rc == 0, err
    from lmalloy.moe.stats import param_counts

    m = _load(out)
    c = param_counts(json.loads((out / "config.json").read_text()))
    assert c["total"] == sum(p.numel() for p in m.parameters())
    expert = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n) // 4
    assert c["ff_per_expert"] == expert and c["active"] == c["total"] - 2 * expert


def test_analyze_cli(capsys, models, tmp_path):
    data = tmp_path / "data"
    for d in ("alpha", "beta"):
        (data / d).mkdir(parents=True)
        for j in range(3):
            (data / d / f"f{j}.py").write_text(
                ("def f(x):\n    return x + 1\n" if d == "alpha" else
                 "class A:\n    def g(self):\n        pass\n") * 30)
    out = tmp_path / "an"
    moes = []
    for seed in (0, 1):  # two upcycled MoEs whose random routers differ
        moes.append(tmp_path / f"up{seed}")
        rc, _, err = run_cli(capsys, "moe", "build", "--method", "upcycle", "--base-model",
                             models["base"], "--num-experts", "4", "--seed", str(seed),
                             "--out", moes[-1])
        assert rc == 0, err
    common = ["--data", data, "--split", "all", "--seq-len", "32", "--eval-tokens", "256"]
    rc, stdout, err = run_cli(capsys, "moe", "analyze", moes[0], *common, "--out", out,
                              "--init", moes[1])
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "moe", "analyze", moes[1], *common, "--out", tmp_path / "an1")
    assert rc == 0, err
    r = json.loads((out / "routing.json").read_text())
    assert r["experts"] == 4 and r["baseline_overlap"] == pytest.approx(1 - 1 / 6)
    assert set(r["domains"]) == {"alpha", "beta"}
    lay = r["domains"]["alpha"]["layers"][0]
    assert 0 <= lay["same_top1"] <= 1 and sum(lay["shares"]) == pytest.approx(1)
    # --init is analysed exactly as the model itself would be, and its routing differs
    alone = json.loads((tmp_path / "an1" / "routing.json").read_text())
    assert r["init_domains"] == alone["domains"]
    assert r["init_domains"] != r["domains"]
    assert (out / "expert_shares.png").stat().st_size > 1000
    assert "<span" in (out / "tokens.html").read_text()
    assert "NonFF + 4·FF" in stdout and "random" in stdout


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(capsys, models, tmp_path, tokenizer_dir):
    base, ex = models["base"], models["experts"]
    out = tmp_path / "never"
    build = ("moe", "build")
    # expert of another shape
    other = make_llama(tmp_path / "wide", tokenizer_dir, hidden=64)
    assert_user_error(capsys, *build, "--base-model", base, "--experts", f"{ex[0]},{other}",
                      "--gate-mode", "random", "--out", out, match="differ in `hidden_size`")
    # expert of another architecture
    from transformers import MistralConfig, MistralForCausalLM

    mis = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2)).save_pretrained(mis)
    assert_user_error(capsys, *build, "--base-model", base, "--experts", f"{ex[0]},{mis}",
                      "--gate-mode", "random", "--out", out, match="MistralForCausalLM")
    # top-k > E, E < 2
    assert_user_error(capsys, *build, "--base-model", base, "--experts", f"{ex[0]},{ex[1]}",
                      "--gate-mode", "random", "--experts-per-token", "3", "--out", out,
                      match="more than the 2 experts")
    assert_user_error(capsys, *build, "--base-model", base, "--experts", str(ex[0]),
                      "--gate-mode", "random", "--out", out, match="at least 2 experts")
    assert_user_error(capsys, *build, "--method", "upcycle", "--base-model", base,
                      "--num-experts", "1", "--out", out, match="at least 2 experts")
    # hidden without prompts
    assert_user_error(capsys, *build, "--base-model", base, "--experts", f"{ex[0]},{ex[1]}",
                      "--out", out, match="has no positive_prompts")
    # unsupported dense architecture
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=320)
                    ).save_pretrained(gpt)
    line = assert_user_error(capsys, *build, "--method", "upcycle", "--base-model", gpt,
                             "--out", out, match="GPT2LMHeadModel (gpt2) has no MoE counterpart")
    assert "llama (-> MixtralForCausalLM)" in line and "qwen3 (-> Qwen3MoeForCausalLM)" in line
    # an MoE as the dense base
    assert_user_error(capsys, *build, "--method", "upcycle", "--base-model",
                      models["root"] / "compose", "--out", out, match="already a mixture")
    # analyze on a dense model
    assert_user_error(capsys, "moe", "analyze", base, "--out", out, match="is a dense model")
    # prompt longer than the context
    long_cfg = _yaml(tmp_path / "long.yaml", models)
    d = yaml.safe_load(long_cfg.read_text())
    d["experts"][1]["positive_prompts"] = ["x = 1\n" * 400]
    long_cfg.write_text(yaml.safe_dump(d))
    assert_user_error(capsys, *build, long_cfg, "--out", out, match="longer than the base's "
                      "context of 256")
    # unknown mergekit-moe key is reported, known engine-only keys are accepted
    d["experts"][1]["positive_prompts"] = ["x"]
    d["tokenizer_source"] = "base"
    d["frobnicate"] = 1
    long_cfg.write_text(yaml.safe_dump(d))
    assert_user_error(capsys, *build, long_cfg, "--out", out, match="unknown config key")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
