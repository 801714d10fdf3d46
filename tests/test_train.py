"""pretrain / finetune / eval: HF output, exact resume after SIGKILL, bad inputs.

More than one process (DDP, FSDP2, two nodes) is test_train_dist.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import assert_user_error, pretrain_args, run_cli, weights


@pytest.fixture(scope="module")
def run6(tmp_path_factory, tokenizer_dir):
    """A 6-step tiny pretraining run, checkpoints every 2 steps."""
    from lmalloy.cli import main

    out = tmp_path_factory.mktemp("run") / "r"
    assert main(pretrain_args(out, tokenizer_dir, "--max-steps", "6", "--eval-every", "2")) == 0
    return out


def test_pretrain_writes_loadable_hf_folders(run6):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for d in [run6 / "final", run6 / "checkpoints" / "step-000004"]:
        assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(run6 / "final")
    tok = AutoTokenizer.from_pretrained(run6 / "final")
    assert type(model).__name__ == "LlamaForCausalLM"
    x = torch.tensor([tok.encode("import json\n")])
    # logits of the folder == logits of a model built from the same weights by hand
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM(model.config)
    ref.load_state_dict(weights(run6 / "final"))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    recs = [json.loads(x) for x in (run6 / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert evals[-1]["eval"]["raw"]["loss"] < evals[0]["eval"]["raw"]["loss"]
    assert all(r["eval"]["raw"]["bpb"] > 0 for r in evals)
    assert (run6 / "loss.png").stat().st_size > 1000
    ts = torch.load(run6 / "checkpoints" / "step-000006" / "trainer_state.pt",
                    weights_only=True)
    assert ts["step"] == 6


def test_lr_schedule_tinyllama_shape():
    from lmalloy.train.trainer import lr_lambda

    f = lr_lambda(10, 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert f(55) == pytest.approx(0.55, abs=1e-6)


@pytest.fixture(scope="module")
def run24(tmp_path_factory, tokenizer_dir):
    """A 24-step tiny run, checkpoints every 2 steps: long enough for a kill mid-run."""
    from lmalloy.cli import main

    out = tmp_path_factory.mktemp("run") / "r24"
    assert main(pretrain_args(out, tokenizer_dir, "--max-steps", "24", "--eval-every", "2")
                ) == 0
    return out


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, tokenizer_dir, run24, monkeypatch):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = pretrain_args(out, tokenizer_dir, "--max-steps", "24", "--eval-every", "2")
    p = subprocess.Popen([sys.executable, "-m", "lmalloy", *args], env=env,
                         stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "step-000004"
    deadline = time.time() + 120
    while not ckpt.is_dir() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.is_dir(), "the run should have reached its step-4 checkpoint"
    # the kill landed mid-run: no final model, and checkpoints stop short of the end
    from lmalloy.io.runs import list_checkpoints

    assert not (out / "final").exists()
    assert list_checkpoints(out)[-1][0] < 24
    from lmalloy.cli import main

    # the README's flow, literally: the saved run config, only `--resume` given (the path
    # spelled differently: relative with a trailing slash)
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--out", "killed/", "--resume"]) == 0
    a, b = weights(out / "final"), weights(run24 / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(24) == 2  # one train + one eval record


def test_resume_applies_only_the_flags_given(tmp_path, tokenizer_dir, run6, capsys):
    from lmalloy.config import validate
    from lmalloy.train.config import PretrainConfig
    from lmalloy.train.run import resume_config

    cfg = validate(PretrainConfig, {"out": str(run6), "resume": True, "progress": True})
    new = resume_config(cfg, run6)
    assert new.max_steps == 6 and new.preset == "tiny" and new.progress is True
    assert new.tokenizer == str(tokenizer_dir)
    # a flag given with the run's own value changes nothing; one that differs is refused
    same = validate(PretrainConfig, {"out": str(run6), "resume": True, "lr": 3e-3})
    assert resume_config(same, run6).lr == 3e-3
    line = assert_user_error(capsys, "pretrain", "--out", run6, "--resume", "--epochs", "2",
                             match="changed config")
    assert "epochs" in line and "max_steps" not in line


def test_run_folder_bad_inputs(capsys, tmp_path, tokenizer_dir, run6):
    # output exists without --resume/--overwrite
    assert_user_error(capsys, *pretrain_args(run6, tokenizer_dir), match="already exists")
    # --resume on a missing run
    assert_user_error(capsys, *pretrain_args(tmp_path / "none", tokenizer_dir, "--resume"),
                      match="no run to resume")
    assert not (tmp_path / "none").exists()
    # --resume with a changed config names the keys
    copy = tmp_path / "copy"
    shutil.copytree(run6, copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(
        f"out: {run6}", f"out: {copy}"))
    line = assert_user_error(capsys, *pretrain_args(copy, tokenizer_dir, "--max-steps", "6",
                                                    "--eval-every", "2", "--lr", "1e-3",
                                                    "--resume"), match="changed config")
    assert "lr" in line
    # --resume on a corrupt checkpoint
    for s in ("000002", "000004"):
        shutil.rmtree(copy / "checkpoints" / f"step-{s}", ignore_errors=True)
    (copy / "checkpoints" / "step-000006" / "trainer_state.pt").write_bytes(b"garbage")
    assert_user_error(capsys, *pretrain_args(copy, tokenizer_dir, "--max-steps", "6",
                                             "--eval-every", "2", "--resume"), match="corrupt")


def test_pretrain_bad_inputs_write_nothing(capsys, tmp_path, tokenizer_dir):
    out = tmp_path / "o"
    assert_user_error(capsys, *pretrain_args(out, tokenizer_dir, "--seq-len", "4096"),
                      match="above")
    assert_user_error(capsys, "pretrain", "--preset", "tiny", "--vocab-size", "100",
                      "--out", out, match="at least 258")
    assert_user_error(capsys, *pretrain_args(out, tokenizer_dir, "--data",
                                             str(tmp_path / "*.none")), match="matches no files")
    assert_user_error(capsys, "pretrain", "--out", "/proc/lmalloy/out", "--preset", "tiny",
                      match="cannot write")
    assert_user_error(capsys, *pretrain_args(out, tokenizer_dir, "--global-batch-tokens", "100"),
                      match="multiple of")
    assert not out.exists()


def test_finetune_freeze_and_eval(capsys, tmp_path, run6):
    out = tmp_path / "ft"
    rc, _, err = run_cli(capsys, "finetune", "--init-from", run6 / "final", "--out", out,
                         "--domains", "tomllib", "--seq-len", "32", "--global-batch-tokens",
                         "256", "--micro-batch-size", "4", "--max-steps", "3", "--no-progress",
                         "--freeze", "embed_tokens", "--threads", "1")
    assert rc == 0, err
    a, b = weights(out / "final"), weights(run6 / "final")
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    rc, js, err = run_cli(capsys, "eval", run6 / "final", out / "final", "--domains",
                          "tomllib", "--seq-len", "32", "--json", "--per-domain")
    assert rc == 0, err
    r = json.loads(js)
    base, tuned = r[str(run6 / "final")], r[str(out / "final")]
    assert tuned["loss"] < base["loss"]
    for r_ in (base, tuned):
        assert r_["bytes"] > r_["tokens"] > 0
        assert r_["bpb"] == pytest.approx(r_["nll"] / math.log(2) / r_["bytes"])
        assert r_["loss"] == pytest.approx(r_["nll"] / r_["tokens"])
    assert_user_error(capsys, "finetune", "--init-from", run6 / "final", "--out", tmp_path / "x",
                      "--freeze", "no_such_param", match="matches no parameter")


def test_finetune_refuses_pickle(capsys, tmp_path, run6):
    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(run6 / "final" / "config.json", pk)
    torch.save(weights(run6 / "final"), pk / "pytorch_model.bin")
    assert_user_error(capsys, "finetune", "--init-from", pk, "--out", tmp_path / "o",
                      match="--allow-pickle")


def test_presets_sizes_and_tinyllama_exact():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.train.presets import model_kwargs

    def count(preset: str, vocab: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(
                LlamaConfig(**model_kwargs(preset, vocab))).parameters())

    n = count("tinyllama-1.1b", 32000)
    assert n == 1_100_048_384  # TinyLlama-1.1B's published parameter count
    assert 0.8e6 < count("tiny", 4096) < 1.3e6
    assert 8e6 < count("small", 4096) < 12e6
    assert 35e6 < count("base", 4096) < 45e6
    cfg = model_kwargs("tinyllama-1.1b", 32000)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (22, 2048, 32, 4, 5632)


def test_weights_are_gathered_one_layer_at_a_time(tmp_path):
    """`write_weights` asks for one decoder layer's tensors at a time and lets them go
    before the next: rank 0 of a sharded run holds one layer in full beside its shard,
    never the model (one extra tensor at the most: the last written). The folder holds
    the model's tensors under transformers' saved names (the tied head left out)."""
    import weakref

    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.train.checkpoint import layer_groups, write_weights

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=6, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    sd = model.state_dict()
    live: set[str] = set()
    peak = 0

    def fetch(k: str) -> torch.Tensor:
        nonlocal peak
        t = sd[k].clone()
        live.add(k)
        weakref.finalize(t, live.discard, k)
        peak = max(peak, sum(sd[n].numel() for n in live))
        return t

    write_weights(tmp_path, model, fetch)
    groups = layer_groups(list(sd))
    assert len(groups) == 7
    biggest = max(sum(sd[k].numel() for k in g) for g in groups)
    assert peak <= biggest + max(v.numel() for v in sd.values())
    assert peak < sum(v.numel() for v in sd.values()) / 3
    got = weights(tmp_path)
    assert "lm_head.weight" not in got and got.keys() == sd.keys() - {"lm_head.weight"}
    assert all(torch.equal(got[k], sd[k]) for k in got)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_has_the_eager_losses(tmp_path, tokenizer_dir, capsys):
    """`--compile` trains the same model: per-step losses within fp32 reassociation noise."""
    runs = {}
    for tag in ("eager", "compiled"):
        extra = ["--max-steps", "4"] + (["--compile"] if tag == "compiled" else [])
        rc, _, err = run_cli(capsys, *pretrain_args(tmp_path / tag, tokenizer_dir, *extra))
        assert rc == 0, err
        rows = [json.loads(x) for x in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()]
        runs[tag] = [r["loss"] for r in rows if "lr" in r]  # the training steps
    assert len(runs["eager"]) == 4
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5)


def test_activation_checkpointing_has_the_same_losses(tmp_path, tokenizer_dir, capsys):
    """`--activation-checkpointing` recomputes the layers in backward: the same steps, the
    same losses (recomputation is deterministic here), and a final model that loads."""
    runs = {}
    for tag in ("kept", "recomputed"):
        extra = ["--max-steps", "3"] + (["--activation-checkpointing"]
                                        if tag == "recomputed" else [])
        rc, _, err = run_cli(capsys, *pretrain_args(tmp_path / tag, tokenizer_dir, *extra))
        assert rc == 0, err
        rows = [json.loads(x) for x in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()]
        runs[tag] = [r["loss"] for r in rows if "lr" in r]
    assert len(runs["kept"]) == 3
    assert runs["recomputed"] == pytest.approx(runs["kept"], rel=1e-6)
    a, b = weights(tmp_path / "kept" / "final"), weights(tmp_path / "recomputed" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
