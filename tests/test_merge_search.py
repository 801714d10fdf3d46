"""`lmalloy merge search`: the search space syntax, a known optimum found, the written YAML
reproducing the output, in-memory and scratch-folder candidates scoring alike, a resume
after SIGKILL continuing as an uninterrupted search, multiple-choice accuracy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import assert_user_error, make_finetunes, make_llama, run_cli

pytest.importorskip("nevergrad")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("search")
    base, fts = make_finetunes(d, tokenizer_dir, 2)
    for dom, text in (("alpha", "def f(x):\n    return x + 1\n"),
                      ("beta", "class A:\n    def g(self):\n        pass\n")):
        (d / "data" / dom).mkdir(parents=True)
        for j in range(6):
            (d / "data" / dom / f"f{j}.py").write_text(f"# {j}\n" + text * 30)
    return {"dir": d, "base": base, "fts": fts, "data": d / "data"}


def space_yaml(z, path: Path, params: str = "lambda: {range: [0.1, 2.0], log: true}",
               model_params: tuple = ("{weight: {range: [0.0, 1.0]}}",) * 2,
               method: str = "task_arithmetic") -> Path:
    models = "".join(f"  - model: {m}\n    parameters: {p}\n"
                     for m, p in zip(z["fts"], model_params, strict=True))
    path.write_text(f"merge_method: {method}\nbase_model: {z['base']}\nmodels:\n{models}"
                    f"parameters:\n  {params}\n")
    return path


def flags(z, *extra) -> list[str]:
    return ["--data", str(z["data"]), "--domains", "alpha,beta", "--seq-len", "32",
            "--eval-tokens", "256", "--val-fraction", "0.3", "--no-progress", *map(str, extra)]


def records(log: Path) -> list[dict]:
    from lmalloy.merge.search import read_log

    return read_log(log)[1]


# ------------------------------------------------------------------ the space


def test_space_syntax_names_and_substitutes():
    from lmalloy.merge.space import find_variables, substitute

    params = {"lambda": {"range": [0.5, 2.0], "log": True},
              "density": [{"range": [0.1, 1.0]}, 0.5, {"range": [0.2, 0.9], "init": 0.3}],
              "normalize": {"choice": [True, False]},
              "gamma": [{"filter": "mlp", "value": {"range": [0.0, 0.1]}}, {"value": 0.01}]}
    models = [{"model": "a", "parameters": {"weight": {"range": [0, 1]}}}, {"model": "b"}]
    vs = find_variables(params, models)
    assert [v.path for v in vs] == ["lambda", "density[0]", "density[2]", "normalize",
                                    "gamma[0].value", "models[0].weight"]
    assert vs[0].start == pytest.approx(1.0)  # geometric middle of [0.5, 2]
    assert vs[2].start == 0.3 and vs[3].start is True
    p, m = substitute(params, models, vs, {v.path: i for i, v in enumerate(vs)})
    assert p == {"lambda": 0, "density": [1, 0.5, 2], "normalize": 3,
                 "gamma": [{"filter": "mlp", "value": 4}, {"value": 0.01}]}
    assert m == [{"model": "a", "parameters": {"weight": 5}}, {"model": "b"}]
    assert params["lambda"] == {"range": [0.5, 2.0], "log": True}  # not changed in place


@pytest.mark.parametrize("params,match", [
    ("lambda: {range: [1, 1]}", "is empty"),
    ("lambda: {range: [2, 1]}", "is reversed"),
    ("lambda: {range: [0, 1], log: true}", "above 0"),
    ("lambda: {range: [0, 1], init: 3}", "not in the range"),
    ("lambda: {rnage: [0, 1]}", "did you mean `range`"),
    ("lambda: {range: [0, 1], step: 0.1}", "unknown key `step`"),
    ("lambda: {choice: [1]}", "two or more"),
    ("lambda: {range: [0, 1], choice: [1, 2]}", "not both"),
    ("lambda: 1.0", "nothing to search"),
])
def test_bad_search_values_are_one_line(capsys, zoo, tmp_path, params, match):
    y = space_yaml(zoo, tmp_path / "s.yaml", params, ("{weight: 1.0}",) * 2)
    assert_user_error(capsys, "merge", "search", y, "--out", tmp_path / "o", *flags(zoo),
                      match=match)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.search").exists()


@pytest.mark.parametrize("params,model_params,method,match", [
    ("densty: {range: [0.1, 1]}", None, "ties", "did you mean `density`"),
    ("density: {range: [0.0, 1]}", None, "ties", "must be in (0, 1]"),
    ("normalize: {range: [0, 1]}", None, "ties", "choice: [true, false]"),
    ("lambda: 1.0", ("{lambda: {range: [0, 1]}}", "{weight: 1}"), "ties", "global parameter"),
    ("t: {range: [0, 1]}", None, "task_arithmetic", "has no parameter `t`"),
])
def test_parameters_the_method_does_not_take(capsys, zoo, tmp_path, params, model_params,
                                             method, match):
    y = space_yaml(zoo, tmp_path / "s.yaml", params, model_params or ("{weight: 1.0}",) * 2,
                   method)
    assert_user_error(capsys, "merge", "search", y, "--out", tmp_path / "o", *flags(zoo),
                      match=match)


def test_whole_number_parameters_are_searched_as_whole_numbers():
    from lmalloy.merge.config import SearchConfig
    from lmalloy.merge.methods import METHODS
    from lmalloy.merge.search import check_space, start_values

    cfg = SearchConfig(method="karcher", models=["a", "b"],
                       parameters={"max_iter": {"range": [2, 7]}})
    space = check_space(cfg, METHODS["karcher"])
    assert [kind for _, kind in space] == ["int"]
    assert start_values(space) == {"max_iter": 4}  # round(4.5)


# ------------------------------------------------------------------ the search


def search_cfg(z, out: Path, **kw):
    from lmalloy.config import validate
    from lmalloy.merge.config import SearchConfig

    data = dict(method="task_arithmetic", base_model=str(z["base"]), out=str(out),
                models=[{"model": str(m), "parameters": {"weight": {"range": [0.0, 1.0]}}}
                        for m in z["fts"]],
                data=[str(z["data"])], domains=["alpha", "beta"], seq_len=32, eval_tokens=256,
                val_fraction=0.3, progress=False)
    return validate(SearchConfig, {**data, **kw})


def test_finds_a_known_optimum(zoo, tmp_path, monkeypatch):
    """Scored by the distance of the merged weights to task arithmetic at weights (0.3,
    0.7), the search must land there: the optimizer, the space and the in-memory merge
    together."""
    from lmalloy.cli import main
    from lmalloy.io.models import load_causal_lm
    from lmalloy.merge import search as S

    assert main(["merge", "--method", "task_arithmetic", "--base-model", str(zoo["base"]),
                 "--models", f"{zoo['fts'][0]},{zoo['fts'][1]}", "--weights", "0.3,0.7",
                 "--out", str(tmp_path / "target"), "--no-progress"]) == 0
    target = dict(load_causal_lm(tmp_path / "target").named_parameters())

    def distance(cfg, ref):
        def score(model):
            return {"value": sum(float((p - target[n]).detach().square().sum())
                                 for n, p in model.named_parameters())}
        return S.Objective("distance", False, score, "the distance to the target")

    monkeypatch.setattr(S, "make_objective", distance)
    assert S.main(search_cfg(zoo, tmp_path / "o", budget=30)) == 0
    best = S.best_of(records(tmp_path / "o" / "search.jsonl"))
    assert best["params"]["models[0].weight"] == pytest.approx(0.3, abs=0.02)
    assert best["params"]["models[1].weight"] == pytest.approx(0.7, abs=0.02)


def test_beats_a_hand_set_grid_and_its_yaml_reproduces_it(capsys, zoo, tmp_path):
    from lmalloy.io.models import load_causal_lm
    from lmalloy.merge import search as S

    y = space_yaml(zoo, tmp_path / "s.yaml", "lambda: {range: [0.1, 2.0], log: true}",
                   ("{weight: 1.0}",) * 2)
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "merge", "search", y, "--out", out, "--budget", "10",
                         *flags(zoo))
    assert rc == 0, err
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "merge.yaml",
                                                "merge_config.yaml", "search.jsonl",
                                                "search.png", "config.json", "tokenizer.json"}
    assert not (tmp_path / ".o.search").exists()  # the work folder goes with success
    recs = records(out / "search.jsonl")
    assert len(recs) == 10 and all(r["score"] is not None for r in recs)
    best = min(r["value"] for r in recs)
    assert "best mean-domain-loss" in err
    # the written YAML makes the same tensors with plain `lmalloy merge`
    rc, _, err = run_cli(capsys, "merge", out / "merge.yaml", "--out", tmp_path / "again",
                         "--no-progress")
    assert rc == 0, err
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors").read_bytes()
    # the output scores what the log says, and hand-set λ merges, scored by the same
    # objective, are no better
    s = S.prepare(search_cfg(zoo, out, overwrite=True))
    assert s.objective.score(load_causal_lm(out))["value"] == pytest.approx(best, abs=1e-6)
    for lam in (0.25, 0.5, 1.0, 2.0):
        rc, _, err = run_cli(capsys, "merge", "--method", "task_arithmetic", "--base-model",
                             zoo["base"], "--models", f"{zoo['fts'][0]},{zoo['fts'][1]}",
                             "--weights", "1,1", "--parameters", f"lambda={lam}", "--out",
                             tmp_path / f"l{lam}",
                             "--no-progress")
        assert rc == 0, err
        hand = s.objective.score(load_causal_lm(tmp_path / f"l{lam}"))["value"]
        assert best <= hand + 1e-9, (lam, hand, best)


def test_infeasible_candidates_are_logged_not_fatal(zoo, tmp_path):
    from lmalloy.merge import search as S

    s = S.prepare(search_cfg(
        zoo, tmp_path / "o", method="della",
        models=[{"model": str(m), "parameters": {"weight": 1.0}} for m in zoo["fts"]],
        parameters={"density": {"range": [0.2, 0.9]}, "epsilon": {"range": [0.05, 0.5]}}))
    ev = S.Evaluator(s)
    ev.load()
    bad = ev({"density": 0.3, "epsilon": 0.45}, 1)  # density − epsilon < 0
    assert bad["score"] is None and "epsilon" in bad["error"]
    good = ev({"density": 0.5, "epsilon": 0.1}, 2)
    assert good["score"] is not None and good["merge_s"] > 0
    assert S.penalty([bad, good], False) == good["score"]


def test_resume_after_sigkill_continues_the_same_search(capsys, zoo, tmp_path):
    """A real subprocess killed mid-search (through the scratch folder) and resumed ends
    with the candidates, scores and output of one uninterrupted in-memory search."""
    y = space_yaml(zoo, tmp_path / "s.yaml")
    n = 14
    ref = tmp_path / "ref"
    rc, _, err = run_cli(capsys, "merge", "search", y, "--out", ref, "--budget", n,
                         "--in-memory", *flags(zoo))
    assert rc == 0, err
    out = tmp_path / "o"
    log = tmp_path / ".o.search" / "search.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "lmalloy.cli", "merge", "search", str(y), "--out", str(out),
           "--budget", str(n), "--no-in-memory", *flags(zoo)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 120:
        if log.is_file() and len(log.read_text().splitlines()) >= 1 + 4:
            break
        if proc.poll() is not None:
            pytest.fail(f"the search ended before it was killed: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = records(log)
    assert 4 <= len(done) < n and not out.exists()
    with open(log, "a") as f:  # as if the kill had come in the middle of a line
        f.write(f'{{"eval": {len(done) + 1}, "params": {{"lamb')
    line = assert_user_error(capsys, "merge", "search", y, "--out", out, "--budget", n,
                             *flags(zoo), match="--resume")
    assert "interrupted" in line
    other = y.with_name("other.yaml")
    other.write_text(y.read_text().replace("[0.0, 1.0]", "[0.0, 0.9]"))
    assert_user_error(capsys, "merge", "search", other, "--out", out, "--budget", n,
                      "--resume", *flags(zoo), match="another search (changed: models")
    rc, _, err = run_cli(capsys, "merge", "search", y, "--out", out, "--budget", n, "--resume",
                         *flags(zoo))
    assert rc == 0, err
    assert f"resumed from {len(done)} logged" in err and "replayed" in err
    got, want = records(out / "search.jsonl"), records(ref / "search.jsonl")
    assert len(got) == n
    assert got[: len(done)] == done  # the logged candidates were not evaluated again
    assert [r["params"] for r in got] == [r["params"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-6)
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------ multiple choice


def test_multiple_choice_accuracy(capsys, zoo, tmp_path):
    from lmalloy.data.jsonl import read_choices
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.models import load_causal_lm
    from lmalloy.train.heldout import choice_accuracy, choice_rows

    items = [{"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " b"],
              "answer": 0},
             {"context": "for i in", "choices": [" range(10):", " json"], "answer": 0},
             {"context": "import", "choices": [" json", " class"], "answer": 0},
             {"context": "", "choices": ["print(i)", "x"], "answer": 1}]
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(it) + "\n" for it in items))
    y = space_yaml(zoo, tmp_path / "s.yaml", "lambda: {range: [0.5, 1.5]}")
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "merge", "search", y, "--out", out, "--budget", "3",
                         "--choices", f, "--no-progress")
    assert rc == 0, err
    recs = records(out / "search.jsonl")
    best = max(r["value"] for r in recs)
    assert "best accuracy" in err and all(0 <= r["value"] <= 1 for r in recs)
    # the output scores what the log says; each choice by a hand-computed log-likelihood
    tok = Tok.load(zoo["base"])
    model = load_causal_lm(out)
    got = choice_accuracy(model, choice_rows(tok, read_choices(f)), items)
    assert got["accuracy"] == pytest.approx(best)
    preds = []
    with torch.no_grad():
        for it in items:
            ctx = [tok.eos_id, *tok.encode(it["context"])]
            lps = []
            for ch in it["choices"]:
                cont = tok.encode(it["context"] + ch)[len(ctx) - 1:]
                logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
                lp = logits.log_softmax(-1)[len(ctx) - 1:-1].gather(
                    -1, torch.tensor(cont)[:, None]).sum()
                lps.append(float(lp))
            preds.append(max(range(len(lps)), key=lps.__getitem__))
    assert got["predictions"] == preds
    line = assert_user_error(capsys, "merge", "search", y, "--out", tmp_path / "o2",
                             "--objective", "loss", "--choices", f, match="drop one")
    assert "--choices" in line


def test_in_memory_merge_is_the_written_one_with_tied_embeddings(tmp_path, tokenizer_dir):
    """Merged into a loaded model's own tensors (TIES, tied LM head), the model equals the
    one loaded from the folder `lmalloy merge` writes."""
    from lmalloy.average.weighted import StateSink
    from lmalloy.io.models import load_causal_lm
    from lmalloy.merge import search as S
    from lmalloy.merge.engine import execute, merge_into
    from lmalloy.merge.plan import plan

    base = make_llama(tmp_path / "base", tokenizer_dir, tie=True, dtype="bfloat16")
    fts = [make_llama(tmp_path / f"ft{i}", tokenizer_dir, seed=i + 1, noise_from=base,
                      noise=0.02, tie=True, dtype="bfloat16") for i in range(2)]
    cfg = S.SearchConfig(method="ties", base_model=str(base), out=str(tmp_path / "o"),
                         models=[{"model": str(m), "parameters": {"weight": 1.0}} for m in fts],
                         parameters={"density": {"range": [0.2, 1.0]}})
    mcfg = S.candidate(cfg, {"density": 0.4}, tmp_path / "written")
    execute(plan(mcfg))
    model = load_causal_lm(base)
    targets = S.model_targets(model, plan(mcfg))
    assert targets is not None and "lm_head.weight" not in targets
    merge_into(plan(mcfg), StateSink(targets))
    want = dict(load_causal_lm(tmp_path / "written").named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, want[n]), n
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_candidate_asked_again_is_not_merged_again(capsys, zoo, tmp_path):
    y = space_yaml(zoo, tmp_path / "s.yaml", "lambda: {choice: [0.5, 1.0]}",
                   ("{weight: 1.0}",) * 2)
    rc, _, err = run_cli(capsys, "merge", "search", y, "--out", tmp_path / "o", "--budget", "5",
                         *flags(zoo))
    assert rc == 0, err
    recs = records(tmp_path / "o" / "search.jsonl")
    fresh = [r for r in recs if "repeat_of" not in r]
    assert len(recs) == 5 and len(fresh) == len({r["params"]["lambda"] for r in recs}) <= 2
    for r in recs:
        if "repeat_of" in r:
            first = recs[r["repeat_of"] - 1]
            assert r["params"] == first["params"] and r["score"] == first["score"]
            assert r["merge_s"] == r["eval_s"] == 0.0
