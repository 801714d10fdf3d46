"""The family conformance matrix: every command on tiny random models of every family users
bring, built from transformers' own config classes (`common.FAMILIES`: tied embeddings for
Qwen2/Qwen3/Gemma, padded vocabularies everywhere: 384 embedding rows for a 320-token
tokenizer).

Each (family, command) cell either works — its outputs load in transformers with finite
logits, tied models stay tied — or is refused with one clear line where the family has no
counterpart (an MoE build from a family without one, a sequence classifier transformers
does not have). `docs/families.md` holds the same table; a test keeps the two equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common import FAMILIES, MOE_FAMILIES, make_family, run_cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "families.md"
COMMANDS = ["inspect", "eval", "finetune", "average", "merge", "reward", "proxy", "moe build",
            "moe analyze"]
MOE_BUILD = {"llama": "Mixtral", "mistral": "Mixtral", "qwen2": "Qwen2-MoE",
             "qwen3": "Qwen3-MoE"}
NO_SEQ_CLASSIFIER = {"olmoe"}  # transformers has no OlmoeForSequenceClassification
FAMS = list(FAMILIES)


def expected(family: str, command: str) -> str:
    """The matrix: ✓, or why the command refuses this family."""
    if command == "moe build":
        if family in MOE_FAMILIES:
            return "already an MoE"
        return f"✓ (-> {MOE_BUILD[family]})" if family in MOE_BUILD else "no MoE counterpart"
    if command == "moe analyze":
        return "✓" if family in MOE_FAMILIES else "dense: no router"
    if command == "reward" and family in NO_SEQ_CLASSIFIER:
        return "no sequence classifier in transformers"
    return "✓"


_MODELS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def data(root):
    d = root / "data"
    for name, text in (("alpha", "def f(x):\n    return x + 1\n"),
                       ("beta", "class A:\n    def g(self):\n        pass\n")):
        (d / name).mkdir(parents=True)
        for j in range(4):
            (d / name / f"f{j}.py").write_text(text * 40)
    return d


def family(root: Path, fam: str, tok: Path) -> dict:
    """base and two fine-tunes (perturbed copies) of one family, built once."""
    if fam not in _MODELS:
        d = root / fam
        base = make_family(d / "base", fam, tok)
        fts = [make_family(d / f"ft{i}", fam, tok, seed=i + 1, noise_from=base, noise=0.02)
               for i in range(2)]
        _MODELS[fam] = {"dir": d, "base": base, "fts": fts}
    return _MODELS[fam]


def loads(path: Path, tied: bool | None = None, seq_cls: bool = False):
    """The folder loads in transformers and gives finite outputs; tying as expected."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.randint(2, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=x).logits
    assert torch.isfinite(out).all(), path
    if tied is not None:
        assert bool(model.config.tie_word_embeddings) == tied, path
        files = sorted(Path(path).glob("*.safetensors"))
        names = set()
        for f in files:
            with safe_open(str(f), "pt") as h:
                names |= set(h.keys())
        assert ("lm_head.weight" in names) == (not tied), f"{path}: {sorted(names)[:3]}"
    return model


def ok(capsys, *args):
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    return out


def refused(capsys, *args) -> str:
    rc, out, err = run_cli(capsys, *args)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tied(fam: str) -> bool:
    import transformers

    cls_name, extra = FAMILIES[fam]
    return bool(getattr(transformers, cls_name)(**extra).tie_word_embeddings)


TRAIN = ["--seq-len", "32", "--global-batch-tokens", "128", "--micro-batch-size", "4",
         "--max-steps", "2", "--eval-every", "2", "--eval-tokens", "128", "--no-progress"]


@pytest.mark.parametrize("fam", FAMS)
def test_inspect(fam, root, tokenizer_dir, capsys):
    m = family(root, fam, tokenizer_dir)
    s = json.loads(ok(capsys, "inspect", m["base"], "--json"))
    ref = loads(m["base"], _tied(fam))
    assert s["parameters"] == sum(p.numel() for p in ref.parameters())  # a tied head once
    assert s["vocab_size"] == 384 and s["tokenizer_vocab_size"] == 320  # padded rows


@pytest.mark.parametrize("fam", FAMS)
def test_eval(fam, root, tokenizer_dir, data, capsys):
    m = family(root, fam, tokenizer_dir)
    r = json.loads(ok(capsys, "eval", m["base"], *m["fts"], "--data", data, "--seq-len", "32",
                      "--eval-tokens", "256", "--json"))
    assert all(0 < v["loss"] < 20 for v in r.values())


@pytest.mark.parametrize("fam", FAMS)
def test_finetune(fam, root, tokenizer_dir, data, capsys):
    m = family(root, fam, tokenizer_dir)
    out = m["dir"] / "run"
    ok(capsys, "finetune", "--base-model", m["base"], "--data", data, *TRAIN, "--out", out)
    loads(out / "final", _tied(fam))  # a tied model stays tied
    # and the fine-tune merges and averages with its own base
    ok(capsys, "merge", "--method", "ties", "--base-model", m["base"], "--models",
       out / "final", "--parameters", "weight=1,density=0.5", "--out", m["dir"] / "ft-ties",
       "--no-progress")
    loads(m["dir"] / "ft-ties", _tied(fam))


@pytest.mark.parametrize("fam", FAMS)
def test_average(fam, root, tokenizer_dir, capsys):
    m = family(root, fam, tokenizer_dir)
    ok(capsys, "average", m["base"], *m["fts"], "--out", m["dir"] / "avg")
    loads(m["dir"] / "avg", _tied(fam))


def merge_args(method: str, m: dict, data: Path) -> list:
    """A valid merge command line of `method` for this family's models."""
    from lmalloy.merge.methods import METHODS

    spec = METHODS[method]
    base, fts = m["base"], m["fts"]
    hi = spec.n_models[1]
    models = fts[:hi] if hi else fts
    args = ["--method", method, "--models", ",".join(map(str, models))]
    if spec.needs_base or spec.optional_base:
        args += ["--base-model", base]
    names = {p.name for p in spec.model_params + spec.global_params if p.default is None}
    params = [f"{k}={v}" for k, v in (("weight", 1), ("t", 0.5)) if k in names]
    if any(p.name == "density" for p in spec.model_params):
        params.append("density=0.6")
    if params:
        args += ["--parameters", ",".join(params)]
    if method == "greedy_soup":
        args += ["--data", data, "--seq-len", "32", "--eval-tokens", "256"]
    return args


@pytest.mark.parametrize("fam", FAMS)
def test_merge_every_method(fam, root, tokenizer_dir, data, capsys):
    from lmalloy.merge.config import LORA_METHODS, METHOD_NAMES

    m = family(root, fam, tokenizer_dir)
    for method in [x for x in METHOD_NAMES if x not in LORA_METHODS]:
        out = m["dir"] / f"merge-{method}"
        ok(capsys, "merge", *merge_args(method, m, data), "--out", out, "--no-progress")
        loads(out, _tied(fam))


@pytest.mark.parametrize("fam", FAMS)
def test_reward(fam, root, tokenizer_dir, capsys):
    m = family(root, fam, tokenizer_dir)
    pairs = m["dir"] / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "def f", "chosen": "(x): return x",
                                         "rejected": "x x x"}) + "\n" for _ in range(8)))
    args = ["reward", "train", "--base-model", m["base"], "--pairs", pairs, "--num-models",
            "2", "--max-steps", "2", "--seq-len", "32", "--no-progress", "--out",
            m["dir"] / "rms"]
    if fam in NO_SEQ_CLASSIFIER:
        assert "sequence classifier" in refused(capsys, *args)
        return
    ok(capsys, *args)
    ok(capsys, "reward", "warm", m["dir"] / "rms", "--out", m["dir"] / "warm")
    loads(m["dir"] / "warm", seq_cls=True)
    ok(capsys, "reward", "eval", m["dir"] / "rms", "--pairs", pairs, "--warm", m["dir"] / "warm",
       "--seq-len", "32")


@pytest.mark.parametrize("fam", FAMS)
def test_proxy(fam, root, tokenizer_dir, data, capsys):
    m = family(root, fam, tokenizer_dir)
    pair = ["--large", m["fts"][0], "--tuned", m["fts"][1], "--untuned", m["base"]]
    rec = json.loads(ok(capsys, "proxy", "generate", *pair, "--prompt", "def f",
                        "--max-new-tokens", "4", "--json").strip().splitlines()[-1])
    assert rec["tokens"] >= 1
    r = json.loads(ok(capsys, "proxy", "eval", *pair, "--data", data, "--seq-len", "32",
                      "--eval-tokens", "256", "--json"))
    assert 0 < r["rows"]["proxy-tuned"]["loss"] < 20


@pytest.mark.parametrize("fam", FAMS)
def test_moe_build(fam, root, tokenizer_dir, capsys):
    m = family(root, fam, tokenizer_dir)
    out = m["dir"] / "upcycled"
    args = ["moe", "build", "--method", "upcycle", "--base-model", m["base"],
            "--num-experts", "4", "--gate-mode", "random", "--out", out]
    if fam not in MOE_BUILD:
        line = refused(capsys, *args)
        assert ("already a mixture of experts" if fam in MOE_FAMILIES
                else "no MoE counterpart") in line
        return
    ok(capsys, *args)
    dense, moe = loads(m["base"], _tied(fam)), loads(out, _tied(fam))
    x = torch.randint(2, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # upcycling is exact: identical experts compute the dense FFN
        torch.testing.assert_close(moe(input_ids=x).logits, dense(input_ids=x).logits,
                                   atol=1e-5, rtol=1e-5)
    # compose the two fine-tunes (routers from their hidden states) and analyse it
    experts = [{"source_model": str(f), "positive_prompts": [p]}
               for f, p in zip(m["fts"], ["def f(x):", "class A:"], strict=True)]
    cfg = {"base_model": str(m["base"]), "gate_mode": "hidden", "experts": experts}
    if fam == "qwen2":  # Qwen2-MoE's shared expert, as mergekit-moe's YAML gives it
        cfg["shared_experts"] = [{"source_model": str(m["base"]),
                                  "positive_prompts": ["import os"]}]
    y = m["dir"] / "compose.json"
    y.write_text(json.dumps(cfg))
    ok(capsys, "moe", "build", "--config", y, "--out", m["dir"] / "composed")
    loads(m["dir"] / "composed", _tied(fam))


@pytest.mark.parametrize("fam", FAMS)
def test_moe_analyze(fam, root, tokenizer_dir, data, capsys):
    m = family(root, fam, tokenizer_dir)
    args = ["moe", "analyze", m["base"], "--data", data, "--seq-len", "32", "--eval-tokens",
            "256", "--out", m["dir"] / "analysis", "--json"]
    if fam not in MOE_FAMILIES:
        assert "is a dense model" in refused(capsys, *args)
        return
    r = json.loads(ok(capsys, *args))
    assert r["experts"] == 4 and r["top_k"] == 2 and len(r["domains"]["alpha"]["layers"]) == 2


def table() -> str:
    head = "| family | " + " | ".join(COMMANDS) + " |"
    rows = [head, "|---" * (len(COMMANDS) + 1) + "|"]
    for fam in FAMS:
        rows.append(f"| {fam} | " + " | ".join(expected(fam, c) for c in COMMANDS) + " |")
    return "\n".join(rows)


def test_the_docs_table_is_the_tested_matrix():
    text = DOCS.read_text()
    got = re.search(r"(\| family \|.*?)\n\n", text + "\n\n", re.S)
    assert got is not None, f"{DOCS} has no family table"
    assert got.group(1).strip() == table(), "docs/families.md differs from the tested " \
        "matrix; regenerate it with `python -c 'import test_families as t; print(t.table())'`"


def test_tied_folders_of_every_writer_combine(root, tokenizer_dir, data, capsys):
    """A tied model written by transformers (embedding only), by an older writer (a stored
    `lm_head.weight` duplicate) and by lmalloy's trainer merge, average and upcycle together;
    the outputs store what save_pretrained stores."""
    import shutil

    from safetensors.torch import load_file, save_file

    m = family(root, "qwen2", tokenizer_dir)
    dup = m["dir"] / "dup"
    shutil.copytree(m["fts"][0], dup)
    sd = load_file(dup / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, dup / "model.safetensors", metadata={"format": "pt"})
    run = m["dir"] / "run"
    if not (run / "final").is_dir():
        ok(capsys, "finetune", "--base-model", m["base"], "--data", data, *TRAIN,
           "--out", run)
    folders = [m["base"], dup, run / "final"]
    ok(capsys, "average", *folders, "--out", m["dir"] / "mix-avg")
    loads(m["dir"] / "mix-avg", tied=True)
    ok(capsys, "merge", "--method", "ties", "--base-model", m["base"], "--models",
       f"{dup},{run / 'final'}", "--parameters", "weight=1,density=0.5", "--out",
       m["dir"] / "mix-ties", "--no-progress")
    loads(m["dir"] / "mix-ties", tied=True)
    ok(capsys, "moe", "build", "--method", "upcycle", "--base-model", dup, "--num-experts", "2",
       "--gate-mode", "random", "--out", m["dir"] / "mix-moe")
    loads(m["dir"] / "mix-moe", tied=True)
    # configs that disagree on tying are refused by name
    untied = m["dir"] / "untied"
    shutil.copytree(dup, untied)
    cfg = json.loads((untied / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(cfg))
    line = refused(capsys, "average", m["base"], untied, "--out", m["dir"] / "never")
    assert "tie_word_embeddings" in line and not (m["dir"] / "never").exists()
