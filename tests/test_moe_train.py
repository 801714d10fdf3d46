"""MoE training: tiny-moe pretraining with the balance loss and expert load; router-only
fine-tuning of a composed MoE; the balance loss against transformers' for one layer."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from common import make_llama, run_cli

FAST = ["--domains", "json", "--seq-len", "32", "--global-batch-tokens", "256",
        "--micro-batch-size", "4", "--lr", "3e-3", "--eval-tokens", "1024", "--no-progress",
        "--threads", "1", "--log-every", "2", "--max-steps", "4", "--eval-every", "4",
        "--max-chars-per-domain", "40000"]


def test_router_aux_matches_transformers_for_one_layer():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from lmalloy.train.moe import router_aux

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=g) * 2
    aux, load = router_aux([logits], 8, 2)
    ref = load_balancing_loss_func((logits,), 8, 2)
    torch.testing.assert_close(aux, ref)
    assert load.shape == (1, 8) and float(load.sum()) == pytest.approx(1.0)
    # a perfectly balanced router (uniform probabilities) gives k
    uni, _ = router_aux([torch.zeros(8, 8)], 8, 2)
    assert float(uni) == pytest.approx(2.0)


def test_pretrain_tiny_moe_logs_expert_load(capsys, tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "pretrain", "--preset", "tiny-moe", *FAST, "--tokenizer",
                         tokenizer_dir, "--out", out)
    assert rc == 0, err
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert len(train) == 2
    for r in train:
        load = r["expert_load"]
        assert len(load) == 2 and len(load[0]) == 8
        assert sum(load[1]) == pytest.approx(1.0, abs=1e-5)
        assert 1.9 < r["aux_loss"] < 8.0  # ≥ k = 2 (balanced), ≤ E
    assert (out / "expert_load.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(m).__name__ == "MixtralForCausalLM"
    assert m.config.num_local_experts == 8 and m.config.router_aux_loss_coef == 0.01


def test_finetune_router_only_on_composed_moe(capsys, tmp_path, tiny_llama, tokenizer_dir):
    experts = [make_llama(tmp_path / f"e{i}", tokenizer_dir, seed=i, noise_from=tiny_llama,
                          noise=0.05) for i in range(2)]
    cfg = {"base_model": str(tiny_llama), "gate_mode": "cheap_embed",
           "experts": [{"source_model": str(experts[0]), "positive_prompts": ["import json\n"]},
                       {"source_model": str(experts[1]), "positive_prompts": ["class A:\n"]}]}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(cfg))
    moe = tmp_path / "moe"
    rc, _, err = run_cli(capsys, "moe", "build", tmp_path / "moe.yaml", "--out", moe)
    assert rc == 0, err
    out = tmp_path / "ft"
    rc, _, err = run_cli(capsys, "finetune", "--init-from", moe, "--train-only", "mlp.gate",
                         *FAST, "--out", out)
    assert rc == 0, err
    assert "training 128 of" in err  # 2 layers × 2 experts × 32 hidden
    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(moe).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    diff = {k for k in ma if not torch.equal(ma[k], mb[k])}
    assert diff == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
