"""LoRA adapters through `lmalloy merge`: cat and svd exact, linear's error, bake, LoraHub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import MODULES, assert_user_error, make_adapter, run_cli


def delta_of(path: Path) -> dict[str, torch.Tensor]:
    cfg = json.loads((path / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    w = load_file(path / "adapter_model.safetensors")
    return {m: s * w[f"base_model.model.{m}.lora_B.weight"].float()
            @ w[f"base_model.model.{m}.lora_A.weight"].float() for m in MODULES}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("lora")
    return [make_adapter(d / "a", tiny_llama, 4, 8, 1), make_adapter(d / "b", tiny_llama, 8, 16, 2),
            make_adapter(d / "c", tiny_llama, 4, 4, 3)]


def merge(capsys, *args) -> tuple[Path, str]:
    rc, _, err = run_cli(capsys, "merge", *args, "--no-progress")
    assert rc == 0, err
    return Path(args[list(args).index("--output") + 1]), err


def test_cat_is_exact_and_ranks_add(capsys, adapters, tmp_path):
    a, b, _ = adapters
    out, err = merge(capsys, "--method", "cat", "--models", f"{a},{b}", "--weights", "0.7,-0.4",
                     "--output", tmp_path / "cat")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12
    got, da, db = delta_of(out), delta_of(a), delta_of(b)
    for m in MODULES:
        torch.testing.assert_close(got[m], 0.7 * da[m] - 0.4 * db[m], rtol=1e-5, atol=1e-6)


def test_svd_exact_at_full_rank_and_reports_energy(capsys, adapters, tmp_path):
    a, b, c = adapters
    out, err = merge(capsys, "--method", "svd", "--models", f"{a},{b},{c}", "--rank", "16",
                     "--output", tmp_path / "svd")
    got = delta_of(out)
    ref = {m: sum(delta_of(x)[m] for x in adapters) for m in MODULES}
    for m in MODULES:
        torch.testing.assert_close(got[m], ref[m], rtol=1e-4, atol=1e-5)
    assert "retained energy mean 100.00%" in err
    out, err = merge(capsys, "--method", "svd", "--models", f"{a},{b},{c}", "--rank", "4",
                     "--output", tmp_path / "svd4")
    got = delta_of(out)
    m = MODULES[0]
    S = torch.linalg.svdvals(ref[m])
    best = torch.linalg.matrix_norm(ref[m] - got[m])  # Eckart–Young: the optimal rank-4 error
    torch.testing.assert_close(best, (S[4:] ** 2).sum().sqrt(), rtol=1e-4, atol=1e-6)
    assert "retained energy mean" in err and "100.00%" not in err


def test_linear_is_an_approximation_with_error_printed(capsys, adapters, tmp_path):
    a, _, c = adapters
    out, err = merge(capsys, "--method", "linear", "--models", f"{a},{c}", "--output",
                     tmp_path / "lin")
    assert "relative error" in err
    mean_err = float(err.split("relative error of B·A against the exact sum, mean ")[1][:5])
    assert 0.3 < mean_err < 1.5  # METHODS.md: 0.7-1.0 for two random rank-8 adapters
    out, err = merge(capsys, "--method", "linear", "--models", str(a), "--weights", "1",
                     "--output", tmp_path / "lin1")
    torch.testing.assert_close(delta_of(out)[MODULES[0]], delta_of(a)[MODULES[0]],
                               rtol=1e-5, atol=1e-6)  # one adapter: exact


def test_bake_into_base(capsys, adapters, tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    a = adapters[1]
    out, _ = merge(capsys, "--method", "bake", "--models", str(a), "--base-model", tiny_llama,
                   "--output", tmp_path / "baked")
    base, baked, d = load_file(tiny_llama / "model.safetensors"), load_file(
        out / "model.safetensors"), delta_of(a)
    for k in base:
        m = k[: -len(".weight")]
        want = base[k] + d[m] if m in d else base[k]
        torch.testing.assert_close(baked[k], want, rtol=1e-5, atol=1e-6)
    AutoModelForCausalLM.from_pretrained(out)  # loads as a plain HF model


def test_bad_adapters(capsys, adapters, tmp_path, tiny_llama, tokenizer_dir):
    from common import make_llama

    a = adapters[0]
    other_base = make_llama(tmp_path / "other", tokenizer_dir, hidden=64, heads=4, kv_heads=2)
    x = make_adapter(tmp_path / "x", other_base, 4, 8, 5)
    out = tmp_path / "out"
    assert_user_error(capsys, "merge", "--method", "cat", "--models", f"{a},{x}", "--output",
                      out, match="different base models")
    y = make_adapter(tmp_path / "y", tiny_llama, 4, 8, 6, modules=MODULES[:2])
    assert_user_error(capsys, "merge", "--method", "cat", "--models", f"{a},{y}", "--output",
                      out, match="target different modules")
    assert_user_error(capsys, "merge", "--method", "linear", "--models", f"{a},{adapters[1]}",
                      "--output", out, match="needs equal ranks")
    assert_user_error(capsys, "merge", "--method", "bake", "--models", str(x), "--base-model",
                      tiny_llama, "--output", out, match="not this adapter's base model")
    assert_user_error(capsys, "merge", "--method", "cat", "--models", str(tiny_llama),
                      "--output", out, match="merges PEFT adapter folders")
    cut = tmp_path / "cut"
    shutil.copytree(a, cut)
    p = cut / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    assert_user_error(capsys, "merge", "--method", "cat", "--models", f"{a},{cut}", "--output",
                      out, match="truncated")
    assert not out.exists()


def test_lorahub_learns_weights(capsys, adapters, tmp_path, tiny_llama):
    pytest.importorskip("nevergrad")
    from common import TEXTS

    data = tmp_path / "task.txt"
    data.write_text("".join(TEXTS[:8]))
    a, _, c = adapters
    rc, _, err = run_cli(capsys, "merge", "lorahub", str(a), str(c), "--base", tiny_llama,
                         "--data", data, "--examples", "4", "--seq-len", "32", "--budget", "12",
                         "--output", tmp_path / "hub")
    assert rc == 0, err
    res = json.loads((tmp_path / "hub" / "lorahub.json").read_text())
    assert len(res["weights"]) == 2
    assert all(-1.5 <= w <= 1.5 for w in res["weights"].values())
    assert res["objective"] <= res["objective_at_zero"] + 1e-9
    cfg = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert cfg["r"] == 4
