"""In-training averagers: EMA / SWA / LaWA against plain references, bf16, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from common import assert_user_error, run_cli
from lmalloy.average import EMA, SWA, LaWA


def tiny_model(dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def sgd_like_steps(model, n, scale=1e-2, seed=1):
    """Yield after each of n random 'optimizer steps' (in-place weight changes)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(1, n + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
        yield step


def snapshot(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- API vs references


@pytest.mark.parametrize("kw", [dict(decay=0.9), dict(decay=0.99, warmup=True, gamma=1.0,
                                                       power=0.75, start=3, update_every=2,
                                                       min_decay=0.1)])
def test_ema_equals_python_reference_loop(kw):
    model = tiny_model()
    ema = EMA(model, **kw)
    ref = {n: v.double() for n, v in snapshot(model).items()}  # fp64 reference
    decay, start, every = kw["decay"], kw.get("start", 0), kw.get("update_every", 1)
    for step in sgd_like_steps(model, 12):
        ema.update(model)
        if step % every:
            continue
        t = step - start - 1  # timm: decay 0 (a copy) for t <= 0
        if t <= 0:
            d = 0.0
        elif kw.get("warmup"):
            d = max(min(1 - (1 + t / kw["gamma"]) ** -kw["power"], decay), kw["min_decay"])
        else:
            d = decay
        w = snapshot(model)
        for n in ref:
            ref[n] = d * ref[n] + (1 - d) * w[n].double()
    for n, v in ema.average().items():  # equal up to fp32 rounding
        torch.testing.assert_close(v, ref[n].float(), rtol=1e-6, atol=1e-7)
    assert ema.step == 12


def test_swa_equals_mean_of_its_steps():
    model = tiny_model()
    swa = SWA(model, start=4, every=3)
    taken = []
    for step in sgd_like_steps(model, 13):
        swa.update(model)
        if step >= 4 and (step - 4) % 3 == 0:
            taken.append(snapshot(model))
    assert swa.n == len(taken) == 4  # steps 4, 7, 10, 13
    for n, v in swa.average().items():
        ref = torch.stack([s[n].double() for s in taken]).mean(0).float()
        torch.testing.assert_close(v, ref, rtol=1e-6, atol=1e-7)  # up to fp32 rounding


@pytest.mark.parametrize("disk", [False, True])
def test_lawa_equals_mean_of_last_k_snapshots_bitwise(tmp_path, disk):
    model = tiny_model()
    lawa = LaWA(model, k=3, every=2, start=2, folder=tmp_path / "snaps" if disk else None)
    assert lawa.average() is None
    taken = {}
    for step in sgd_like_steps(model, 11):
        lawa.update(model)
        if step % 2 == 0:
            taken[step] = snapshot(model)
    assert lawa.steps == [6, 8, 10]
    last = [taken[s] for s in (6, 8, 10)]
    for n, v in lawa.average().items():
        ref = (last[0][n] + last[1][n] + last[2][n]) / 3  # fp32, in order
        assert torch.equal(v, ref), n
    if disk:  # nothing persisted: only the window stays on disk
        assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [
            "step-000006.safetensors", "step-000008.safetensors", "step-000010.safetensors"]


def test_bf16_model_keeps_fp32_shadows(tmp_path):
    model = tiny_model(torch.bfloat16)
    ema, swa, lawa = EMA(model, decay=0.999), SWA(model, start=1), LaWA(model, k=2, every=1)
    start = snapshot(model)
    for _ in sgd_like_steps(model, 5, scale=1e-3):
        for a in (ema, swa, lawa):
            a.update(model)
    for a in (ema, swa, lawa):
        assert all(v.dtype == torch.float32 for v in a.average().values())
    # a 0.001 share of each bf16 step moves the fp32 shadow, though a bf16 shadow would
    # round most of those moves away
    moved = sum(int((ema.average()[n] != start[n]).sum()) for n in start)
    total = sum(v.numel() for v in start.values())
    assert moved > 0.9 * total
    # saved in the model's dtype by default, fp32 on request
    from lmalloy.io.folder import open_model

    ema.save(tmp_path / "ema")
    ema.save(tmp_path / "ema32", dtype=torch.float32)
    assert {t.dtype for t in open_model(tmp_path / "ema").tensors.values()} == {"BF16"}
    m32 = open_model(tmp_path / "ema32")
    for n, v in ema.average().items():
        assert torch.equal(m32.read(n), v)


def test_state_dict_round_trip_is_exact():
    model = tiny_model()
    a = [EMA(model, decay=0.9), SWA(model, start=2), LaWA(model, k=2, every=2)]
    steps = sgd_like_steps(model, 6)
    for _ in range(3):
        next(steps)
        for x in a:
            x.update(model)
    saved = [x.state_dict() for x in a]
    buf = __import__("io").BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    b = [EMA(model, decay=0.9), SWA(model, start=2), LaWA(model, k=2, every=2)]
    for x, sd in zip(b, loaded, strict=True):
        x.load_state_dict(sd)
    for _ in steps:
        for x, y in zip(a, b, strict=True):
            x.update(model)
            y.update(model)
    for x, y in zip(a, b, strict=True):
        for n, v in x.average().items():
            assert torch.equal(v, y.average()[n])


# ----------------------------------------------------------------------------- in the trainer

TRAIN = ["pretrain", "--preset", "tiny", "--domains", "json", "--seq-len", "32",
         "--global-batch-tokens", "256", "--micro-batch-size", "8", "--max-steps", "8",
         "--eval-every", "4", "--eval-tokens", "256", "--save-every", "2", "--threads", "1",
         "--no-progress", "--max-chars-per-domain", "40000", "--average", "ema,swa,lawa",
         "--ema.decay", "0.8", "--swa.start", "0.5", "--swa.lr", "1e-4",
         "--swa.anneal", "constant", "--lawa.k", "3", "--lawa.every", "2"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tokenizer_dir):
    """An uninterrupted 8-step run with all three averagers (LaWA on disk)."""
    out = tmp_path_factory.mktemp("avg") / "a"
    from lmalloy.cli import main

    rc = main([*TRAIN, "--tokenizer", str(tokenizer_dir), "--lawa.mode", "disk",
               "--out", str(out)])
    assert rc == 0
    return out


def _read(folder):
    from lmalloy.io.folder import open_model

    m = open_model(folder)
    return {n: m.read(n) for n in m.names()}


def test_trainer_writes_and_evaluates_averages(run_a):
    recs = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in recs if "eval" in r]
    assert set(evals[-1]) == {"raw", "ema", "swa", "lawa"}
    # SWA starts at step 4: its first average is the raw model at step 4
    assert evals[0]["swa"]["loss"] == evals[0]["raw"]["loss"]
    for step in (4, 8):
        for name in ("ema", "swa", "lawa"):
            assert (run_a / "checkpoints" / f"step-{step:06d}" / name / "config.json").is_file()
    for name in ("ema", "swa", "lawa"):
        assert (run_a / "final" / name / "tokenizer.json").is_file()
    # the SWA lr phase: the peak lr's schedule until step 4, then a constant 1e-4
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert lrs[8] == pytest.approx(1e-4)


def test_trainer_lawa_equals_mean_of_its_checkpoints(run_a):
    """final/lawa at step 8 = the fp32 mean of the raw checkpoints at steps 4, 6, 8."""
    ck = [_read(run_a / "checkpoints" / f"step-{s:06d}") for s in (4, 6, 8)]
    lawa = _read(run_a / "final" / "lawa")
    for n, v in lawa.items():
        assert torch.equal(v, (ck[0][n] + ck[1][n] + ck[2][n]) / 3), n


def test_resume_restores_averagers_exactly(run_a, tmp_path, tokenizer_dir, capsys):
    b = tmp_path / "b"
    shutil.copytree(run_a, b)
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    (b / "config.yaml").write_text(yaml.safe_dump({**cfg, "out": str(b)}))
    shutil.rmtree(b / "checkpoints" / "step-000008")  # as if killed after step 6's checkpoint
    shutil.rmtree(b / "final")
    rc, _, err = run_cli(capsys, *TRAIN, "--tokenizer", tokenizer_dir, "--lawa.mode", "disk",
                         "--out", b, "--resume")
    assert rc == 0, err
    for name in ("", "ema", "swa", "lawa"):
        got, want = _read(b / "final" / name), _read(run_a / "final" / name)
        assert got.keys() == want.keys()
        for n in want:
            assert torch.equal(got[n], want[n]), (name, n)
    from lmalloy.train.checkpoint import read_state

    sa = read_state(run_a / "checkpoints/step-000008")
    sb = read_state(b / "checkpoints/step-000008")
    for name in ("EMA", "SWA"):
        key = name.lower()
        tensors = sa["callbacks"]["Averaging"][key]
        tensors = tensors["shadow"] if key == "ema" else tensors["avg"]
        other = sb["callbacks"]["Averaging"][key]
        other = other["shadow"] if key == "ema" else other["avg"]
        assert all(torch.equal(tensors[n], other[n]) for n in tensors)


def test_bf16_training_keeps_fp32_shadows(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "bf"
    rc, _, err = run_cli(capsys, *TRAIN, "--tokenizer", tokenizer_dir, "--precision", "bf16",
                         "--max-steps", "4", "--out", out)
    assert rc == 0, err
    from lmalloy.train.checkpoint import read_state

    cb = read_state(out / "checkpoints/step-000004")["callbacks"]["Averaging"]
    assert {v.dtype for v in cb["ema"]["shadow"].values()} == {torch.float32}
    assert {v.dtype for s in cb["lawa"]["snapshots"] for v in s.values()} == {torch.float32}


@pytest.mark.parametrize("flags,match", [
    (["--average", "ema,foo"], "unknown averager `foo`"),
    (["--average", "ema", "--ema.decay", "1.5"], "`--ema.decay`: must be in (0, 1)"),
    (["--average", "ema", "--ema.decay", "0"], "`--ema.decay`: must be in (0, 1)"),
    (["--average", "swa", "--swa.start", "2.5"], "`--swa.start`"),
    (["--average", "lawa", "--lawa.k", "0"], "`--lawa.k`"),
])
def test_bad_training_flags(tmp_path, capsys, flags, match):
    out = tmp_path / "bad"
    assert_user_error(capsys, "pretrain", "--out", out, *flags, match=match)
    assert not out.exists()


def test_swa_lr_phase_shapes():
    from lmalloy.average.averagers import swa_lr_lambda

    base = lambda s: 1.0 - s / 100  # noqa: E731
    const = swa_lr_lambda(base, 50, 0.1, "constant")
    assert [const(s) for s in (0, 49, 50, 99)] == [1.0, base(49), 0.1, 0.1]
    cos = swa_lr_lambda(base, 50, 0.1, "cos", steps=10)
    assert cos(49) == base(49) and cos(50) == pytest.approx(base(50))
    assert cos(55) == pytest.approx(0.1 + (0.5 - 0.1) * 0.5)
    assert cos(60) == pytest.approx(0.1) and cos(90) == pytest.approx(0.1)


def test_average_config_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, lmalloy.cli as c; c.parse('average', ['a', '--output', 'o']); "
            "c.parse('pretrain', ['--average', 'ema,lawa', '--lawa.k', '3']); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
