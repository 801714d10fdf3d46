"""`lmalloy merge extract-lora`: fine-tune − base as a PEFT adapter, checked through PEFT.

The adapter is loaded with `PeftModel.from_pretrained` on the base and merged with
`merge_and_unload()`; its weights must equal the fine-tune's at full rank and be off by
exactly the printed relative error at lower ranks (the Eckart–Young optimum, computed here
independently from the singular values).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import assert_user_error, make_llama, run_cli

LINE = re.compile(r"^(\S+): rank (\d+) of (\d+), relative error (\S+)$", re.M)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("extract")
    base = make_llama(d / "base", tokenizer_dir, seed=0)
    ft = make_llama(d / "ft", tokenizer_dir, seed=1, noise_from=base, noise=0.02)
    return base, ft


def extract(capsys, *args) -> tuple[Path, dict[str, tuple[int, float]]]:
    rc, _, err = run_cli(capsys, "merge", "extract-lora", *args)
    assert rc == 0, err
    out = Path(args[list(args).index("--out" if "--out" in args else "--output") + 1])
    return out, {m: (int(k), float(e)) for m, k, _, e in LINE.findall(err)}


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def extracted(capsys, pair, *flags):
    """Extract with `flags`; (adapter, {module: (rank, error)}, base, fine-tune, PEFT-merged)."""
    base, ft = pair
    out, mods = extract(capsys, ft, "--base-model", base, *flags)
    return out, mods, weights(base), weights(ft), peft_merged(base, out)


def rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - b).norm() / ref.norm())


def test_full_rank_through_peft_is_the_fine_tune(capsys, pair, tmp_path):
    out, mods, B, F, M = extracted(capsys, pair, "--energy", "1.0", "--out", tmp_path / "full")
    assert len(mods) == 14  # 7 linear modules x 2 layers; embeddings only with --embed-lora
    for m, (k, err) in mods.items():
        w = f"{m}.weight"
        assert k == min(F[w].shape) and err < 1e-5, (m, k, err)
        assert rel(M[w], F[w], F[w] - B[w]) < 1e-5, m
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(M[k], B[k])  # not carried: the base's
    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "extract_lora.yaml"]
    keys = load_file(out / "adapter_model.safetensors")
    A = keys["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    Bk = keys["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert A.shape == (16, 32) and Bk.shape == (16, 16)  # (r, in), (out, r)


def test_fixed_rank_error_is_the_printed_one_and_optimal(capsys, pair, tmp_path):
    out, mods, B, F, M = extracted(capsys, pair, "--rank", "4", "--output", tmp_path / "r4")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (4, 4, {})
    for m, (k, err) in mods.items():
        w = f"{m}.weight"
        dw = F[w] - B[w]
        s2 = torch.linalg.svdvals(dw.double()) ** 2
        best = float((s2[4:].sum() / s2.sum()).sqrt())  # Eckart–Young
        assert k == 4 and 0.3 < err < 1
        assert abs(rel(M[w], F[w], dw) - err) < 1e-4, (m, err)
        assert abs(err - best) < 1e-4, (m, err, best)
    # lmalloy's own adapter reader agrees: baking it gives PEFT's merged weights
    rc, _, err = run_cli(capsys, "merge", "--method", "bake", "--models", out, "--base-model",
                         pair[0], "--output", tmp_path / "baked", "--no-progress")
    assert rc == 0, err
    baked = weights(tmp_path / "baked")
    for m in mods:
        assert rel(baked[f"{m}.weight"], M[f"{m}.weight"], F[f"{m}.weight"]) < 1e-6


def test_energy_picks_the_smallest_rank_per_module(capsys, pair, tmp_path):
    out, mods, B, F, M = extracted(capsys, pair, "--energy", "0.6", "--out", tmp_path / "e")
    cfg = json.loads((out / "adapter_config.json").read_text())
    keys = load_file(out / "adapter_model.safetensors")
    ranks = {m: k for m, (k, _) in mods.items()}
    assert len(set(ranks.values())) > 1  # k_proj (16 x 32) needs fewer than q_proj (32 x 32)
    for m, (k, err) in mods.items():
        w = f"{m}.weight"
        s2 = torch.linalg.svdvals((F[w] - B[w]).double()) ** 2
        frac = s2.cumsum(0) / s2.sum()
        assert frac[k - 1] >= 0.6 > frac[k - 2], (m, k)
        assert keys[f"base_model.model.{m}.lora_A.weight"].shape[0] == k
        assert cfg["rank_pattern"].get(m, cfg["r"]) == k == cfg["alpha_pattern"].get(m, cfg["r"])
        assert abs(rel(M[w], F[w], F[w] - B[w]) - err) < 1e-4
        assert err <= (1 - 0.6) ** 0.5 + 1e-6


def test_embed_lora_carries_embeddings_and_head(capsys, pair, tmp_path):
    out, mods, B, F, M = extracted(capsys, pair, "--energy", "1", "--embed-lora", "--out",
                                   tmp_path / "emb")
    assert {"model.embed_tokens", "lm_head"} <= set(mods)
    keys = load_file(out / "adapter_model.safetensors")
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (32, 320)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 32)
    for w in ("model.embed_tokens.weight", "lm_head.weight"):
        assert rel(M[w], F[w], F[w] - B[w]) < 1e-5, w
    # lmalloy's adapter merging does not read embedding LoRA: a clear refusal, not a drop
    assert_user_error(capsys, "merge", "--method", "bake", "--models", out, "--base-model",
                      pair[0], "--output", tmp_path / "baked", match="embedding LoRA")


def test_bad_inputs_write_nothing(capsys, pair, tmp_path, tokenizer_dir):
    base, ft = pair
    out = tmp_path / "out"

    def bad(*args, match: str) -> None:
        assert_user_error(capsys, "merge", "extract-lora", *args, "--out", out, match=match)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    wide = make_llama(tmp_path / "wide", tokenizer_dir, seed=2, intermediate=48)
    bad(wide, "--base-model", base, "--rank", "2", match="differ in `intermediate_size`")
    shp = make_llama(tmp_path / "vocab", tokenizer_dir, seed=2, vocab=352)
    bad(shp, "--base-model", base, "--rank", "2", match="shape mismatch")
    line = assert_user_error(capsys, "merge", "extract-lora", ft, "--base-model", base,
                             "--rank", "20", "--out", out, match="`--rank` 20 exceeds")
    assert "model.layers.0.self_attn.k_proj" in line and "16 x 32" in line
    bad(ft, "--base-model", base, match="exactly one of `--rank`")
    bad(ft, "--base-model", base, "--rank", "2", "--energy", "0.5", match="exactly one of")
    bad(ft, "--base-model", base, "--energy", "1.5", match="--energy")
    bad(ft, "--base-model", base, "--rank", "2", "--output", tmp_path / "other",
        match="`--out`")
    bad(ft, "--base-model", ft, "--rank", "2", match="the same folder")
    out.mkdir()
    assert_user_error(capsys, "merge", "extract-lora", ft, "--base-model", base, "--rank", "2",
                      "--out", out, match="already exists")
    assert not any(out.iterdir())
