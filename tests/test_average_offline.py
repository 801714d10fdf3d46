"""`lmalloy average`: offline uniform / last-K / EMA averaging against hand references."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from common import assert_user_error, make_llama, run_cli
from lmalloy.io.folder import open_model


def weights(folder):
    m = open_model(folder)
    return {n: m.read(n) for n in m.names()}


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_llama, tokenizer_dir):
    """Three perturbed copies of one tiny Llama (fp32), oldest first."""
    d = tmp_path_factory.mktemp("avg_in")
    return [make_llama(d / f"m{i}", tokenizer_dir, seed=i + 1, noise_from=tiny_llama, noise=0.05)
            for i in range(3)]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, three):
    """A run folder whose checkpoints/step-N/ are the three models (plus trainer files)."""
    run = tmp_path_factory.mktemp("avg_run") / "run"
    for step, m in zip((100, 200, 300), three, strict=True):
        shutil.copytree(m, run / "checkpoints" / f"step-{step:06d}")
        (run / "checkpoints" / f"step-{step:06d}" / "trainer_state.pt").write_bytes(b"x")
    return run


def test_uniform_equals_fp32_mean_bitwise(three, tmp_path, capsys):
    out = tmp_path / "avg"
    rc, _, err = run_cli(capsys, "average", *three, "--output", out)
    assert rc == 0, err
    got, ins = weights(out), [weights(m) for m in three]
    assert got.keys() == ins[0].keys()
    assert not torch.equal(ins[0]["model.norm.weight"], ins[1]["model.norm.weight"])
    for n, v in got.items():
        assert v.dtype == torch.float32
        assert torch.equal(v, (ins[0][n] + ins[1][n] + ins[2][n]) / 3), n
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_bf16_inputs_accumulate_in_fp32(tmp_path, tiny_llama, capsys):
    ms = [make_llama(tmp_path / f"b{i}", seed=i, noise_from=tiny_llama, noise=0.05,
                     dtype="bfloat16") for i in range(2)]
    rc, _, err = run_cli(capsys, "average", *ms, "--output", tmp_path / "o16")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "average", *ms, "--output", tmp_path / "o32",
                         "--dtype", "float32")
    assert rc == 0, err
    a, b = weights(ms[0]), weights(ms[1])
    o16, o32 = weights(tmp_path / "o16"), weights(tmp_path / "o32")
    for n in a:
        ref = (a[n].float() + b[n].float()) / 2
        assert torch.equal(o32[n], ref)
        assert o16[n].dtype == torch.bfloat16 and torch.equal(o16[n], ref.bfloat16())
    assert json.loads((tmp_path / "o32" / "config.json").read_text())["dtype"] == "float32"


def test_last_k_of_a_run_folder(run_folder, three, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "average", run_folder, "--last", "2", "--output",
                         tmp_path / "lawa")
    assert rc == 0, err
    got, b, c = weights(tmp_path / "lawa"), weights(three[1]), weights(three[2])
    for n, v in got.items():
        assert torch.equal(v, (b[n] + c[n]) / 2), n


def test_ema_over_an_ordered_list(three, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "average", *three, "--method", "ema", "--decay", "0.7",
                         "--output", tmp_path / "ema")
    assert rc == 0, err
    ins = [weights(m) for m in three]
    for n, v in weights(tmp_path / "ema").items():
        ref = ins[0][n].double()
        for m in ins[1:]:
            ref = 0.7 * ref + 0.3 * m[n].double()
        torch.testing.assert_close(v, ref.float(), rtol=1e-6, atol=1e-7)


def test_python_api_returns_sizes(three, tmp_path):
    from lmalloy.average import average_folders

    r = average_folders(three, tmp_path / "api", progress=False)
    assert r["bytes_in"] == 3 * r["bytes_out"] > 0


# ----------------------------------------------------------------------------- bad inputs


def _nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_bad_tensor_name(three, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "in" / "no_norm"  # the same config, one tensor short
    shutil.copytree(three[0], other)
    sd = load_file(other / "model.safetensors")
    del sd["model.layers.1.input_layernorm.weight"]
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "o"
    out.parent.mkdir()
    assert_user_error(capsys, "average", three[1], other, "--output", out,
                      match="has 1 tensor(s)")
    _nothing_written(out)
    assert_user_error(capsys, "average", other, three[1], "--output", out,
                      match="lacks 1 tensor(s) of")
    _nothing_written(out)
    deeper = make_llama(tmp_path / "in" / "l3", layers=3)  # another architecture's size
    assert_user_error(capsys, "average", three[0], deeper, "--output", out,
                      match="differ in `num_hidden_layers`")
    _nothing_written(out)


def test_bad_shape(three, tmp_path, capsys):
    other = make_llama(tmp_path / "in" / "wide", intermediate=96)
    out = tmp_path / "out" / "o"
    out.parent.mkdir()
    line = assert_user_error(capsys, "average", three[0], other, "--output", out,
                             match="differ in `intermediate_size`")
    assert str(other) in line
    _nothing_written(out)


def test_bad_architecture(three, tmp_path, capsys):
    other = tmp_path / "in" / "mistral"
    shutil.copytree(three[1], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures":
                                                   ["MistralForCausalLM"]}))
    out = tmp_path / "out" / "o"
    out.parent.mkdir()
    assert_user_error(capsys, "average", three[0], other, "--output", out,
                      match="different architectures")
    _nothing_written(out)


def test_nan_tensor_is_named_and_nothing_written(three, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "in" / "nan"
    shutil.copytree(three[2], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.self_attn.v_proj.weight"][0, 3] = float("inf")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "o"
    out.parent.mkdir()
    assert_user_error(capsys, "average", three[0], bad, "--output", out,
                      match="tensor `model.layers.1.self_attn.v_proj.weight` contains NaN or Inf")
    _nothing_written(out)


@pytest.mark.parametrize("decay", ["1.0", "0", "-0.5", "1.5"])
def test_bad_decay(three, tmp_path, capsys, decay):
    out = tmp_path / "o"
    assert_user_error(capsys, "average", *three, "--method", "ema", "--decay", decay,
                      "--output", out, match="`--decay`: must be in (0, 1)")
    assert not out.exists()


def test_ema_needs_decay(three, tmp_path, capsys):
    assert_user_error(capsys, "average", *three, "--method", "ema", "--output", tmp_path / "o",
                      match="needs `--decay`")


def test_empty_list(tmp_path, capsys):
    assert_user_error(capsys, "average", "--output", tmp_path / "o", match="no input folders")
    assert not (tmp_path / "o").exists()


def test_last_k_larger_than_available(run_folder, tmp_path, capsys):
    assert_user_error(capsys, "average", run_folder, "--last", "4", "--output", tmp_path / "o",
                      match="has only 3 checkpoint(s)")
    assert not (tmp_path / "o").exists()


def test_run_folder_without_checkpoints(tmp_path, capsys):
    run = tmp_path / "empty_run"
    (run / "checkpoints").mkdir(parents=True)
    assert_user_error(capsys, "average", run, "--last", "2", "--output", tmp_path / "o",
                      match="no checkpoints")
    assert not (tmp_path / "o").exists()


def test_last_takes_one_run_folder(three, tmp_path, capsys):
    assert_user_error(capsys, "average", *three, "--last", "2", "--output", tmp_path / "o",
                      match="takes one run folder")


def test_output_exists(three, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert_user_error(capsys, "average", *three, "--output", tmp_path / "o",
                      match="already exists")
