"""lm-evaluation-harness through `lmalloy serve`: its `local-completions` model scores a small
multiple-choice task (log-likelihood of each choice, from echoed logprobs) against a
proxy-tuned model, and gets the accuracy — and per choice the log-likelihoods — that
`lmalloy proxy eval --choices` computes directly on the same items."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import test_serve
from common import run_cli
from test_serve import KEY, ensemble, start_server, stop_server

models = test_serve.models  # the served tiny models (a module fixture, built afresh here)

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

CONTEXTS = ["def add(a, b):", "class Point:", "import json", "for i in range(10):",
            "print(json.dumps", "if i % 2 == 0:", "self.x = x", "return a"]
CHOICES = ["\n    return a + b", " pass", "\n        print(i)", "({'a': 1})", " = y", " + b"]


def _items() -> list[dict]:
    out = []
    for i, ctx in enumerate(CONTEXTS * 2):
        ch = [CHOICES[(i + k) % len(CHOICES)] for k in range(3 + i % 2)]
        # no trailing whitespace: lm-eval moves it into the continuation, proxy eval does not
        out.append({"context": ctx, "choices": ch, "answer": i % len(ch)})
    return out


TASK = """task: lmalloy_tinymc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_matches_proxy_eval(models, tmp_path, capsys):
    items = _items()
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tinymc.yaml").write_text(TASK.format(items=data))
    # lmalloy proxy eval on the same items, computed directly
    rc, out, err = run_cli(capsys, "proxy", "eval", *ensemble(models), "--no-perplexity",
                           "--choices", data, "--json")
    assert rc == 0, err
    want = json.loads(out)["rows"]["proxy-tuned"]["accuracy"]
    p, url = start_server(*ensemble(models), "--api-key", KEY)
    try:
        env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
               "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
        args = (f"model=large,base_url={url}/completions,tokenizer={models['large']},"
                "tokenizer_backend=huggingface,tokenized_requests=True,max_length=255,"
                "num_concurrent=4,max_retries=1")
        r = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model",
                            "local-completions", "--model_args", args, "--tasks",
                            "lmalloy_tinymc", "--include_path", str(tasks), "--output_path",
                            str(tmp_path / "out"), "--log_samples"], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        stop_server(p)
    results = next((tmp_path / "out").rglob("results_*.json"))
    got = json.loads(results.read_text())["results"]["lmalloy_tinymc"]["acc,none"]
    assert got == pytest.approx(want, abs=1e-12)
    # the per-choice log-likelihoods agree too, not just the ranking
    from lmalloy.proxy.model import ProxyTuned

    px = ProxyTuned.from_pretrained(str(models["large"]), str(models["tuned"]),
                                    str(models["small"]), 1.0)
    samples = [json.loads(x) for x in next((tmp_path / "out").rglob("samples_*.jsonl"))
               .read_text().splitlines()]
    assert len(samples) == len(items)
    for s in samples:
        it = items[s["doc_id"]]
        direct = px.score([it["context"]] * len(it["choices"]), it["choices"])
        for resp, d in zip(s["resps"], direct, strict=True):
            assert math.isclose(float(resp[0][0]), d["logprob"], abs_tol=1e-3)
