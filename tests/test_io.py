"""HF folder I/O: lazy reading, streaming sharded writing, atomicity, safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import assert_user_error, make_llama, run_cli
from lmalloy.errors import UserError
from lmalloy.io import ShardedWriter, atomic_output, open_model, st_dtype, write_state_dict


def test_open_lists_without_loading(tiny_llama):
    m = open_model(tiny_llama)
    assert m.architecture == "LlamaForCausalLM"
    info = m.tensors["model.embed_tokens.weight"]
    assert info.shape == (320, 32) and info.dtype == "F32"
    from safetensors.torch import load_file

    ref = load_file(tiny_llama / "model.safetensors")
    for name in ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]:
        assert torch.equal(m.read(name), ref[name])


def test_sharded_write_round_trips_through_transformers(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(tiny_llama)
    state = src.state_dict()
    out = tmp_path / "sharded"
    with atomic_output(out) as tmp:
        src.config.save_pretrained(tmp)
        write_state_dict(tmp, state, max_shard_bytes=20_000, aux_from=tiny_llama)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    m = open_model(out)
    assert set(m.tensors) == set(state)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    x = torch.tensor([[0, 5, 17, 42, 99]])
    with torch.no_grad():
        assert torch.equal(src(x).logits, loaded(x).logits)
    assert (out / "tokenizer.json").is_file()


def test_writer_streams_bf16_and_scalars(tmp_path):
    ts = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.tensor(2.5), "c": torch.arange(7)}
    plan = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in ts.items()]
    w = ShardedWriter(tmp_path, plan)
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    from safetensors.torch import load_file

    back = load_file(tmp_path / "model.safetensors")
    for k in ts:
        assert torch.equal(back[k], ts[k])


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


KILL_SCRIPT = """
import sys, time, torch
from lmalloy.io import atomic_output, write_state_dict
state = {f"t{i}": torch.randn(256, 256) for i in range(40)}
with atomic_output(sys.argv[1]) as tmp:
    (tmp / "config.json").write_text("{}")
    print("writing", flush=True)
    for i in range(1000):
        write_state_dict(tmp, state, max_shard_bytes=1_000_000)
        time.sleep(0.01)
"""


def test_killed_writer_leaves_no_complete_folder(tmp_path):
    target = tmp_path / "model"
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(x.name.startswith(".model.tmp-") for x in leftovers)


def test_pickle_refused_then_loaded_weights_only(tmp_path, capsys):
    folder = tmp_path / "pk"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"w": torch.ones(2, 2)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="allow-pickle"):
        open_model(folder)
    m = open_model(folder, allow_pickle=True)
    assert torch.equal(m.read("w"), torch.ones(2, 2))
    assert_user_error(capsys, "inspect", folder, match="--allow-pickle")


def test_truncated_safetensors_is_reported(tmp_path, tiny_llama):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        open_model(bad)


def test_inspect_prints_breakdown(capsys, tiny_llama):
    rc, out, _ = run_cli(capsys, "inspect", tiny_llama)
    assert rc == 0
    assert "LlamaForCausalLM" in out and "layers.*.self_attn" in out and "vocabulary     320" in out
    rc, out, _ = run_cli(capsys, "inspect", tiny_llama, "--json")
    s = json.loads(out)
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    assert s["parameters"] == n and s["dtypes"] == {"F32": n}


def test_inspect_bf16_and_missing(capsys, tmp_path, tokenizer_dir):
    p = make_llama(tmp_path / "bf", tokenizer_dir, dtype="bfloat16")
    rc, out, _ = run_cli(capsys, "inspect", p)
    assert rc == 0 and "BF16 100.0%" in out
    assert_user_error(capsys, "inspect", tmp_path / "nope", match="not found")
