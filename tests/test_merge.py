"""`lmalloy merge`: every method against a hand-written reference on tiny models, the
streaming bound, atomic output and every bad input of the issue."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import assert_user_error, make_finetunes, make_llama, run_cli


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("zoo")
    base, fts = make_finetunes(d, tokenizer_dir, 3)
    return {"dir": d, "base": base, "fts": fts}


def sd(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(path / "model.safetensors").items()}


def merge(capsys, *args) -> Path:
    rc, out, err = run_cli(capsys, "merge", *args, "--no-progress")
    assert rc == 0, err
    i = list(args).index("--output")
    return Path(args[i + 1])


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), \
        float((a - b).abs().max())


def test_methods_registry_matches_config_names():
    from lmalloy.merge.config import METHOD_NAMES
    from lmalloy.merge.methods import METHODS

    assert set(METHOD_NAMES) == set(METHODS)


def test_linear_soup_task_arithmetic(capsys, zoo, tmp_path):
    b, fts = zoo["base"], zoo["fts"]
    B, X = sd(b), [sd(f) for f in fts]
    w = [0.2, 0.3, 0.5]
    out = merge(capsys, "--method", "linear", "--models", ",".join(map(str, fts)), "--weights",
                "0.2,0.3,0.5", "--output", tmp_path / "lin")
    M = sd(out)
    for k in B:
        close(M[k], sum(wi * x[k] for wi, x in zip(w, X, strict=False)) / sum(w))
    out = merge(capsys, "--method", "linear", "--models", ",".join(map(str, fts[:2])),
                "--weights", "2,1", "--parameters", "normalize=false", "--output",
                tmp_path / "lin_nn")
    M = sd(out)
    for k in B:
        close(M[k], 2 * X[0][k] + X[1][k])
    M = sd(merge(capsys, "--method", "soup", "--models", ",".join(map(str, fts)), "--output",
                 tmp_path / "soup"))
    for k in B:
        close(M[k], (X[0][k] + X[1][k] + X[2][k]) / 3)
    M = sd(merge(capsys, "--method", "task_arithmetic", "--base-model", b, "--models",
                 ",".join(map(str, fts)), "--weights", "1,0.5,-1", "--parameters", "lambda=0.7",
                 "--output", tmp_path / "ta"))
    for k in B:
        close(M[k], B[k] + 0.7 * sum(wi * (x[k] - B[k]) for wi, x in zip([1, .5, -1], X, strict=False)))


def ties_reference(B, X, w, dens, normalize=True, lam=1.0, whole=False):
    """TIES with mergekit's weighted vote, written with a full sort (fine for tests)."""
    D = {k: [x[k] - B[k] for x in X] for k in B}
    if whole:
        thr = []
        for i in range(len(X)):
            flat = torch.cat([D[k][i].abs().reshape(-1) for k in B])
            kk = max(1, int(dens[i] * flat.numel()))
            thr.append(flat.sort(descending=True).values[kk - 1])
    out = {}
    for k in B:
        trimmed = []
        for i, d in enumerate(D[k]):
            if whole:
                trimmed.append(d * (d.abs() >= thr[i]))
                continue
            flat = d.abs().reshape(-1)
            kk = max(1, int(dens[i] * flat.numel()))
            keep = torch.zeros_like(flat)
            keep[flat.argsort(descending=True)[:kk]] = 1
            trimmed.append(d * keep.view_as(d))
        wd = torch.stack([wi * t for wi, t in zip(w, trimmed, strict=False)])
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = (wd.sign() == sign).float()
        mixed = (wd * mask).sum(0)
        if normalize:
            div = (torch.tensor(w).view(-1, *[1] * B[k].dim()) * mask).sum(0)
            div[div == 0] = 1
            mixed = mixed / div
        out[k] = B[k] + lam * mixed
    return out


def test_ties_per_tensor_and_whole_model(capsys, zoo, tmp_path):
    b, fts = zoo["base"], zoo["fts"]
    B, X = sd(b), [sd(f) for f in fts]
    yml = tmp_path / "ties.yaml"
    yml.write_text(
        f"merge_method: ties\nbase_model: {b}\nmodels:\n"
        f"  - model: {fts[0]}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
        f"  - model: {fts[1]}\n    parameters: {{weight: 0.4, density: 0.3}}\n"
        f"  - model: {fts[2]}\n    parameters: {{weight: 1.0, density: 0.2}}\n"
        "parameters: {normalize: true, lambda: 0.9}\ndtype: float32\n")
    M = sd(merge(capsys, yml, "--output", tmp_path / "ties"))
    ref = ties_reference(B, X, [0.7, 0.4, 1.0], [0.5, 0.3, 0.2], lam=0.9)
    for k in B:
        close(M[k], ref[k])
    M = sd(merge(capsys, "--method", "ties", "--base-model", b, "--models",
                 ",".join(map(str, fts)), "--parameters", "weight=1,density=0.2",
                 "--ties-trim", "model", "--output", tmp_path / "ties_whole"))
    ref = ties_reference(B, X, [1, 1, 1], [0.2] * 3, whole=True)
    for k in B:
        close(M[k], ref[k])


def test_dare_is_seeded_and_drops_the_right_share(capsys, zoo, tmp_path):
    b, fts = zoo["base"], zoo["fts"]
    B, X = sd(b), sd(fts[0])
    args = ["--method", "dare_linear", "--base-model", b, "--models", fts[0], "--parameters",
            "weight=1,density=0.3"]
    m1 = sd(merge(capsys, *args, "--output", tmp_path / "d1"))
    m2 = sd(merge(capsys, *args, "--output", tmp_path / "d2"))
    m3 = sd(merge(capsys, *args, "--seed", "1", "--output", tmp_path / "d3"))
    kept = total = 0
    for k in B:
        assert torch.equal(m1[k], m2[k])
        d, o = X[k] - B[k], m1[k] - B[k]
        on = o != 0
        close(o[on], d[on] / 0.3, 1e-5)  # survivors rescaled by 1/density
        kept += int(on.sum())
        total += o.numel()
    assert abs(kept / total - 0.3) < 0.01
    assert any(not torch.equal(m1[k], m3[k]) for k in B)
    # dare_ties: a seeded drop, then TIES' weighted sign vote over the survivors
    m = sd(merge(capsys, "--method", "dare_ties", "--base-model", b, "--models",
                 ",".join(map(str, fts)), "--parameters", "weight=1,density=0.5", "--output",
                 tmp_path / "dt"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert (m[k] != B[k]).float().mean() > 0.5  # 1 - 0.5^3 of entries have a survivor


def test_slerp_with_layer_gradient(capsys, zoo, tmp_path):
    b, fts = zoo["base"], zoo["fts"]
    B, X = sd(b), sd(fts[0])

    def ref(t, v0, v1):
        u0, u1 = v0 / v0.norm(), v1 / v1.norm()
        dot = float((u0 * u1).sum())
        if abs(dot) > 0.9995:
            return (1 - t) * v0 + t * v1
        th = math.acos(dot)
        return math.sin((1 - t) * th) / math.sin(th) * v0 + math.sin(t * th) / math.sin(th) * v1

    M = sd(merge(capsys, "--method", "slerp", "--base-model", b, "--models", fts[0],
                 "--parameters", "t=0.3", "--output", tmp_path / "s"))
    for k in B:
        close(M[k], ref(0.3, B[k], X[k]), 1e-5)
    yml = tmp_path / "slerp.yaml"
    yml.write_text(f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n"
                   f"  - model: {fts[0]}\nparameters:\n  t:\n    - filter: self_attn\n"
                   f"      value: [0, 1]\n    - value: 0.5\n")
    M = sd(merge(capsys, yml, "--output", tmp_path / "s2"))
    for k in B:
        if "self_attn" in k:  # a gradient over 2 layers: layer 0 -> t=0, layer 1 -> t=1
            close(M[k], B[k] if ".layers.0." in k else X[k], 1e-6)
        else:
            close(M[k], ref(0.5, B[k], X[k]), 1e-5)


def test_model_stock_and_passthrough(capsys, zoo, tmp_path):
    b, fts = zoo["base"], zoo["fts"]
    B, X = sd(b), [sd(f) for f in fts]
    M = sd(merge(capsys, "--method", "model_stock", "--base-model", b, "--models",
                 ",".join(map(str, fts)), "--output", tmp_path / "ms"))
    for k in B:
        d = [x[k].reshape(-1) - B[k].reshape(-1) for x in X]
        cos = [float(d[i] @ d[j] / (d[i].norm() * d[j].norm())) for i in range(3)
               for j in range(i + 1, 3)]
        c = sum(cos) / 3
        t = 3 * c / (1 + 2 * c)
        close(M[k], t * sum(x[k] for x in X) / 3 + (1 - t) * B[k], 1e-5)
    M = sd(merge(capsys, "--method", "passthrough", "--models", fts[1], "--output",
                 tmp_path / "pt"))
    for k in B:
        assert torch.equal(M[k], X[1][k])


def test_output_dtype_files_and_config(capsys, zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge(capsys, "--method", "soup", "--models", ",".join(map(str, zoo["fts"])),
                "--dtype", "bfloat16", "--max-shard-size", "60000", "--output", tmp_path / "bf")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "generation_config.json", "merge_config.yaml",
            "model.safetensors.index.json"} <= files
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    # merge_config.yaml re-runs the same merge
    again = merge(capsys, out / "merge_config.yaml", "--output", tmp_path / "again")
    a = load_file(again / "model.safetensors") if (again / "model.safetensors").exists() else None
    assert a is None  # sharded again
    idx = json.loads((again / "model.safetensors.index.json").read_text())["weight_map"]
    assert idx == json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def test_vocab_padding_rows(capsys, zoo, tmp_path, tokenizer_dir):
    big = make_llama(tmp_path / "big", tokenizer_dir, vocab=336, seed=7)
    B, G, X = sd(zoo["base"]), sd(big), sd(zoo["fts"][0])
    M = sd(merge(capsys, "--method", "linear", "--models", f"{zoo['fts'][0]},{big}",
                 "--weights", "1,1", "--output", tmp_path / "v"))
    k = "model.embed_tokens.weight"
    assert M[k].shape == X[k].shape  # the reference's (first model's) rows
    close(M[k], (X[k] + G[k][:320]) / 2)
    del B


class LiveReads:
    """Count the bytes of input tensors alive at once (weakref finalizers on every read)."""

    def __init__(self, monkeypatch):
        from lmalloy.io import folder

        self.live = self.peak = 0
        orig = folder.ModelFolder.read

        def read(this, name, dtype=None):
            t = orig(this, name, dtype)
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
            return t

        monkeypatch.setattr(folder.ModelFolder, "read", read)

    def _free(self, n):
        self.live -= n


def test_streaming_memory_does_not_grow_with_layers(capsys, tmp_path, tokenizer_dir,
                                                    monkeypatch):
    peaks = {}
    for layers in (2, 8):
        d = tmp_path / f"l{layers}"
        b = make_llama(d / "b", tokenizer_dir, layers=layers, hidden=64, intermediate=256)
        f = [make_llama(d / f"f{i}", tokenizer_dir, layers=layers, hidden=64, intermediate=256,
                        seed=i + 1, noise_from=b, noise=0.01) for i in range(2)]
        with monkeypatch.context() as mp:
            live = LiveReads(mp)
            merge(capsys, "--method", "ties", "--base-model", b, "--models", f"{f[0]},{f[1]}",
                  "--parameters", "weight=1,density=0.5", "--output", d / "out")
        files = [q for m in (b, *f) for q in m.glob("*.safetensors")]
        biggest = max(load_file(files[0])[k].numel() * 4 for k in load_file(files[0]))
        peaks[layers] = (live.peak, sum(q.stat().st_size for q in files), biggest)
    # a few tensors in flight (this one and the prefetched next, for 3 inputs), whatever
    # the number of layers; the 8-layer inputs are several times larger than that bound
    for peak, _total, biggest in peaks.values():
        assert peak <= 2 * 3 * biggest, peaks
    assert 2 * 3 * peaks[8][2] < 0.25 * peaks[8][1], peaks


def test_atomic_output_on_failure_mid_merge(capsys, zoo, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(zoo["fts"][1], bad)
    s = load_file(bad / "model.safetensors")
    s["model.norm.weight"][3] = float("inf")  # the last tensors are written after others
    save_file(s, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    assert_user_error(capsys, "merge", "--models", f"{zoo['fts'][0]},{bad}", "--output", out,
                      match="`model.norm.weight` contains NaN or Inf")
    nothing_written(out)


# ------------------------------------------------------------------- bad inputs


def _bad(capsys, tmp_path, *args, match):
    out = tmp_path / "out"
    line = assert_user_error(capsys, "merge", *args, "--no-progress", "--output", out,
                             match=match)
    nothing_written(out)
    return line


def _copy_edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    s = load_file(dst / "model.safetensors")
    edit(s)
    save_file(s, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_bad_architecture_tensors_shapes(capsys, zoo, tmp_path):
    f0, f1 = zoo["fts"][:2]
    mis = tmp_path / "mistral"
    shutil.copytree(f1, mis)
    cfg = json.loads((mis / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mis / "config.json").write_text(json.dumps(cfg))
    _bad(capsys, tmp_path, "--models", f"{f0},{mis}", match="different architectures")
    miss = _copy_edit(f1, tmp_path / "miss", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    _bad(capsys, tmp_path, "--models", f"{f0},{miss}",
         match="lacks 1 tensor(s)")
    shp = _copy_edit(f1, tmp_path / "shape", lambda s: s.update({
        "model.layers.0.self_attn.o_proj.weight": torch.zeros(32, 16)}))
    line = _bad(capsys, tmp_path, "--models", f"{f0},{shp}",
                match="`model.layers.0.self_attn.o_proj.weight` is [32, 16]")
    assert "[32, 32]" in line


def test_bad_nan_input_is_named(capsys, zoo, tmp_path):
    b, f0 = zoo["base"], zoo["fts"][0]
    nan = _copy_edit(zoo["fts"][1], tmp_path / "nan",
                     lambda s: s["model.layers.0.mlp.down_proj.weight"].__setitem__(0, math.nan))
    for method, params in (("linear", "weight=1"), ("ties", "weight=1"),
                           ("della", "weight=1,density=0.5"), ("breadcrumbs_ties", "weight=1"),
                           ("ram", "epsilon=0.01")):
        line = _bad(capsys, tmp_path, "--method", method, "--base-model", b, "--models",
                    f"{f0},{nan}", "--parameters", params, match="contains NaN or Inf")
        assert "model.layers.0.mlp.down_proj.weight" in line and "nan" in line


def test_bad_method_and_parameters(capsys, zoo, tmp_path):
    b, f0, f1 = zoo["base"], *zoo["fts"][:2]
    _bad(capsys, tmp_path, "--method", "tise", "--models", f0, match="did you mean `ties`")
    line = _bad(capsys, tmp_path, "--method", "ties", "--base-model", b, "--models", f"{f0},{f1}",
                "--parameters", "weight=1,density=1.5", match="`density`")
    assert "(0, 1]" in line and "1.5" in line
    _bad(capsys, tmp_path, "--models", f"{f0},{f1}", "--weights", "1,nan", match="finite")
    yml = tmp_path / "w.yaml"
    yml.write_text(f"merge_method: linear\nmodels:\n  - model: {f0}\n    parameters: "
                   f"{{weight: .nan}}\n  - model: {f1}\n    parameters: {{weight: 1}}\n")
    _bad(capsys, tmp_path, yml, match="finite")
    _bad(capsys, tmp_path, "--method", "task_arithmetic", "--base-model", b, "--models",
         f"{f0},{f1}", match="missing parameter `weight`")
    _bad(capsys, tmp_path, "--method", "ties", "--models", f"{f0},{f1}", "--parameters",
         "weight=1", match="needs a base model")
    _bad(capsys, tmp_path, "--method", "slerp", "--base-model", b, "--models", f"{f0},{f1}",
         "--parameters", "t=0.5", match="exactly two models")
    _bad(capsys, tmp_path, "--method", "slerp", "--base-model", b, "--models", f0,
         "--parameters", "t=1.5", match="`t` must be in [0, 1]")
    _bad(capsys, tmp_path, "--method", "soup", "--models", f"{f0},{f1}", "--parameters",
         "densty=0.5", match="no parameter `densty`")


def test_bad_files_and_output(capsys, zoo, tmp_path):
    f0, f1 = zoo["fts"][:2]
    cut = tmp_path / "cut"
    shutil.copytree(f1, cut)
    p = cut / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    _bad(capsys, tmp_path, "--models", f"{f0},{cut}", match="truncated safetensors")
    pk = tmp_path / "pickle"
    pk.mkdir()
    shutil.copyfile(f1 / "config.json", pk / "config.json")
    torch.save(load_file(f1 / "model.safetensors"), pk / "pytorch_model.bin")
    _bad(capsys, tmp_path, "--models", f"{f0},{pk}", match="--allow-pickle")
    inside = f0 / "merged"
    assert_user_error(capsys, "merge", "--models", f"{f0},{f1}", "--output", inside,
                      match="inside the input folder")
    assert not inside.exists()
    # with --allow-pickle the same inputs merge
    out = merge(capsys, "--models", f"{f0},{pk}", "--allow-pickle", "--output", tmp_path / "ok")
    assert (out / "model.safetensors").is_file()


def test_disk_full_cleans_up(capsys, zoo, tmp_path, monkeypatch):
    """ENOSPC on a real 64 KiB tmpfs when this process may mount one (root in a container);
    otherwise OSError(28) injected at the writer's write boundary."""
    f0, f1 = zoo["fts"][:2]
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        if not mounted:
            from lmalloy.io.writer import ShardedWriter

            def full(self, name, tensor):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(ShardedWriter, "write", full)
        out = mnt / "merged"
        if mounted:  # known before writing: the merge needs more than the 64 KiB there
            assert_user_error(capsys, "merge", "--no-progress", "--models", f"{f0},{f1}",
                              "--output", out, match="GB free; nothing was written")
            assert list(mnt.iterdir()) == []
            from lmalloy.io import writer

            monkeypatch.setattr(writer, "check_free_space", lambda *a, **k: None)
            from lmalloy.merge import plan as plan_mod

            monkeypatch.setattr(plan_mod, "check_free_space", lambda *a, **k: None,
                                raising=False)
        assert_user_error(capsys, "merge", "--no-progress", "--models", f"{f0},{f1}",
                          "--output", out, match="disk full")
        assert list(mnt.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


def test_greedy_soup_skips_a_model_that_hurts(capsys, zoo, tmp_path, tokenizer_dir):
    from common import TEXTS

    data = tmp_path / "data"
    data.mkdir()
    for i, t in enumerate(TEXTS[:40]):
        (data / f"doc{i}.py").write_text(t * 4)
    bad = make_llama(tmp_path / "bad", tokenizer_dir, seed=9, noise_from=zoo["base"], noise=0.5)
    f0, f1 = zoo["fts"][:2]
    out = merge(capsys, "--method", "greedy_soup", "--models", f"{f0},{bad},{f1}", "--data",
                data, "--seq-len", "32", "--eval-tokens", "4096", "--val-fraction", "0.5",
                "--output", tmp_path / "g")
    notes = (out / "merge_config.yaml").read_text()
    assert f"greedy_soup + {bad}: " in notes and "skipped" in notes.split(f"+ {bad}:")[1][:20]
    chose = [x for x in notes.splitlines() if "greedy_soup chose:" in x][0]
    kept = chose.split("chose: ")[1].split(", ")
    assert str(bad) not in kept and len(kept) >= 1
    M, S = sd(out), [sd(Path(k)) for k in kept]
    for k in M:
        close(M[k], sum(s[k] for s in S) / len(S))


def test_help_is_fast_and_imports_no_torch():
    import sys

    code = ("import sys, time; t = time.perf_counter(); from lmalloy.cli import main\n"
            "try:\n    main(['merge', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, "
            "time.perf_counter() - t, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    torch_in, tf_in, secs = r.stderr.split()
    assert torch_in == "False" and tf_in == "False"
    assert float(secs) < 1.0


def test_mergekit_yaml_keys(capsys, zoo, tmp_path):
    f0, f1 = zoo["fts"][:2]
    yml = tmp_path / "mk.yaml"
    yml.write_text(f"merge_method: linear\nmodels:\n  - model: {f0}\n    parameters:\n"
                   f"  - model: {f1}\n    parameters: {{weight: 3}}\n"
                   "out_dtype: bfloat16\ntokenizer:\n  source: base\n")
    out = merge(capsys, yml, "--output", tmp_path / "mk")
    M, X0, X1 = sd(out), sd(f0), sd(f1)
    for k in M:
        close(M[k], ((X0[k] + 3 * X1[k]) / 4).bfloat16().float(), 1e-2)
    assert load_file(out / "model.safetensors")[k].dtype == torch.bfloat16


def _with_added_token(src_tok: Path, dst: Path, token: str) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_tok)
    tok.add_tokens([token])
    tok.save_pretrained(dst)
    return dst


def test_union_tokenizer_reindexes_rows(capsys, tmp_path, tokenizer_dir):
    """Two fine-tunes that each added a token: `tokenizer_source: union` gives both tokens,
    each row built from the model that has it, the shared rows merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ta = _with_added_token(tokenizer_dir, tmp_path / "tok_a", "<a>")
    tb = _with_added_token(tokenizer_dir, tmp_path / "tok_b", "<b>")
    a = make_llama(tmp_path / "a", ta, seed=1, vocab=384)
    b = make_llama(tmp_path / "b", tb, seed=2, vocab=384)
    out = merge(capsys, "--models", f"{a},{b}", "--tokenizer-source", "union", "--output",
                tmp_path / "u")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids(["<a>", "<b>"])
    assert ids == [320, 321] and len(tok) == 322
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.vocab_size == 322
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    so = load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        o, x, y = so[name], sa[name], sb[name]
        assert o.shape == (322, 32)
        torch.testing.assert_close(o[:320], (x[:320] + y[:320]) / 2)  # shared tokens
        torch.testing.assert_close(o[320], x[320])  # only a has <a>
        torch.testing.assert_close(o[321], y[320])  # only b has <b>, at its id 320
    # the tokenizer really is the union: both tokens encode to their new ids
    assert tok("<a><b>", add_special_tokens=False)["input_ids"] == [320, 321]
    # without a source, differing tokenizers are refused; base keeps a's vocabulary
    assert_user_error(capsys, "merge", "--models", f"{a},{b}", "--output", tmp_path / "x",
                      match="tokenizer_source: union")
    out = merge(capsys, "--models", f"{a},{b}", "--tokenizer-source", "base", "--output",
                tmp_path / "bb")
    so = load_file(out / "model.safetensors")
    assert so["model.embed_tokens.weight"].shape == (321, 32)
    torch.testing.assert_close(so["model.embed_tokens.weight"][320], sa["model.embed_tokens.weight"][320])


def test_union_refuses_different_base_vocabularies(capsys, tmp_path, tokenizer_dir):
    from common import make_tokenizer

    other = make_tokenizer(tmp_path / "tok2", vocab_size=300)
    a = make_llama(tmp_path / "a", tokenizer_dir, seed=1)
    b = make_llama(tmp_path / "b", other, seed=2)
    assert_user_error(capsys, "merge", "--models", f"{a},{b}", "--tokenizer-source", "union",
                      "--output", tmp_path / "o", match="cannot be unioned")
    assert not (tmp_path / "o").exists()
