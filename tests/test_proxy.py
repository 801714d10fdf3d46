"""Proxy-tuning: generation and scoring against hand-written references, and the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from common import assert_user_error, make_llama, run_cli

PROMPTS = ["def add(a, b):", "class Point:\n    def __init__(self", "import json\n", "for"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread; on a busy machine it only waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("proxy")
    small = make_llama(d / "small", tokenizer_dir, seed=1)
    return {
        "large": make_llama(d / "large", tokenizer_dir, seed=0, hidden=64, layers=3),
        "small": small,
        "small_copy": make_llama(d / "small_copy", tokenizer_dir, seed=1),
        "tuned": make_llama(d / "tuned", tokenizer_dir, seed=2, noise_from=small, noise=0.2),
        "tuned2": make_llama(d / "tuned2", tokenizer_dir, seed=3, noise_from=small, noise=0.2),
        # same tokenizer, head padded to 384 rows
        "padded": make_llama(d / "padded", tokenizer_dir, seed=4, vocab=384),
        # a speculative-decoding draft that is none of the ensemble's models
        "draft": make_llama(d / "draft", tokenizer_dir, seed=7, noise_from=small, noise=0.1),
    }


def _proxy(models, large="large", tuned=("tuned",), untuned=("small",), alpha=(1.0,), **kw):
    from lmalloy.proxy.model import ProxyTuned

    return ProxyTuned.from_pretrained(str(models[large]), [str(models[t]) for t in tuned],
                                      [str(models[u]) for u in untuned], list(alpha), **kw)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(tok, text):
    return tok(text)["input_ids"]


@torch.no_grad()
def _reference_greedy(model, ids, n, vocab=None):
    """The plain loop: re-run the whole sequence, take the argmax of the last position."""
    ids = list(ids)
    out = []
    for _ in range(n):
        z = model(input_ids=torch.tensor([ids])).logits[0, -1]
        t = int(z[:vocab].argmax())
        out.append(t)
        ids.append(t)
    return out


def test_alpha_zero_reproduces_large_greedy(models):
    px = _proxy(models, alpha=(0.0,))
    large = _hf(models["large"])
    gens = px.generate(PROMPTS, max_new_tokens=10, stop_at_eos=False)
    for p, g in zip(PROMPTS, gens, strict=True):
        assert g.tokens == _reference_greedy(large, _ids(px.tokenizer, p), 10)
        assert g.finish_reason == "length"


def test_tuned_equal_untuned_reproduces_large(models):
    px = _proxy(models, tuned=("small_copy",), untuned=("small",), alpha=(1.0,))
    large = _hf(models["large"])
    gens = px.generate(PROMPTS[:2], max_new_tokens=8, stop_at_eos=False)
    for p, g in zip(PROMPTS, gens, strict=False):
        assert g.tokens == _reference_greedy(large, _ids(px.tokenizer, p), 8)


def test_steering_changes_the_output(models):
    px = _proxy(models)
    a = px.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False, alphas=[0.0])
    b = px.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False, alphas=[4.0])
    assert [g.tokens for g in a] != [g.tokens for g in b]


def test_batched_equals_unbatched(models):
    px = _proxy(models)
    batch = px.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False, return_scores=True)
    for p, g in zip(PROMPTS, batch, strict=True):
        one = px.generate([p], max_new_tokens=8, stop_at_eos=False, return_scores=True)[0]
        assert g.tokens == one.tokens
        for a, b in zip(g.scores, one.scores, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_cached_equals_uncached(models):
    px = _proxy(models)
    c = px.generate(PROMPTS, max_new_tokens=10, stop_at_eos=False, return_scores=True)
    u = px.generate(PROMPTS, max_new_tokens=10, stop_at_eos=False, return_scores=True,
                    use_cache=False)
    assert sum(px.last_cache_bytes.values()) == 0  # the uncached run kept no cache
    for gc, gu in zip(c, u, strict=True):
        assert gc.tokens == gu.tokens
        for a, b in zip(gc.scores, gu.scores, strict=True):
            assert (a - b).abs().max() < 1e-5


def test_parallel_small_pair_equals_sequential(models):
    px = _proxy(models)
    a = px.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False)
    b = px.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False, parallel=True)
    assert [g.tokens for g in a] == [g.tokens for g in b]


@torch.no_grad()
def test_multiple_pairs_follow_the_formula(models):
    alphas = (0.5, -1.5)
    px = _proxy(models, tuned=("tuned", "tuned2"), untuned=("small", "small"), alpha=alphas)
    g = px.generate(PROMPTS[:1], max_new_tokens=6, stop_at_eos=False, return_scores=True)[0]
    L, T1, T2, S = (_hf(models[k]) for k in ("large", "tuned", "tuned2", "small"))
    ids = _ids(px.tokenizer, PROMPTS[0])
    for step, score in enumerate(g.scores):
        x = torch.tensor([ids + g.tokens[:step]])

        def z(m, x=x):
            return m(input_ids=x).logits[0, -1]

        ref = z(L) + alphas[0] * (z(T1) - z(S)) + alphas[1] * (z(T2) - z(S))
        torch.testing.assert_close(score, ref, atol=1e-5, rtol=0)
        assert int(ref.argmax()) == g.tokens[step]


@torch.no_grad()
def test_padded_head_is_cut_to_the_common_vocabulary(models):
    px = _proxy(models, large="padded", alpha=(0.0,))
    assert px.vocab == 320
    big = _hf(models["padded"])
    assert big.config.vocab_size == 384
    g = px.generate(PROMPTS[:2], max_new_tokens=8, stop_at_eos=False, return_scores=True)
    for p, gen in zip(PROMPTS, g, strict=False):
        assert gen.scores[0].shape == (320,)
        assert gen.tokens == _reference_greedy(big, _ids(px.tokenizer, p), 8, vocab=320)


@torch.no_grad()
def test_logits_and_perplexity_hook(models):
    import numpy as np

    from lmalloy.train.heldout import evaluate

    px = _proxy(models, alpha=(0.7,))
    x = torch.randint(2, 320, (2, 20))
    L, T, S = (_hf(models[k]) for k in ("large", "tuned", "small"))
    ref = L(input_ids=x).logits + 0.7 * (T(input_ids=x).logits - S(input_ids=x).logits)
    torch.testing.assert_close(px.logits(x), ref, atol=1e-5, rtol=0)
    tokens = np.random.default_rng(0).integers(2, 320, 200).astype(np.uint16)
    spans = {"a": (0, 200)}
    r0 = evaluate(None, tokens, spans, 32, 10_000, logits_fn=lambda t: px.logits(t, alphas=[0]))
    rl = evaluate(L, tokens, spans, 32, 10_000)
    assert math.isclose(r0["loss"], rl["loss"], rel_tol=1e-6)
    r1 = evaluate(None, tokens, spans, 32, 10_000, logits_fn=px.logits)
    assert r1["loss"] != r0["loss"]


@torch.no_grad()
def test_score_and_multiple_choice(models):
    px = _proxy(models, alpha=(1.0,))
    ctx, conts = "def add(a, b):", ["\n    return a + b\n", " pass", "x"]
    sc = px.score([ctx] * 3, conts)
    for c, s in zip(conts, sc, strict=True):
        c_ids, whole = _ids(px.tokenizer, ctx), _ids(px.tokenizer, ctx + c)
        assert whole[: len(c_ids)] == c_ids
        lp = px.logits(torch.tensor([whole]))[0].log_softmax(-1)  # (T, V)
        ref = sum(float(lp[t - 1, whole[t]]) for t in range(len(c_ids), len(whole)))
        assert s["tokens"] == len(whole) - len(c_ids)
        assert math.isclose(s["logprob"], ref, abs_tol=1e-4)
    res = px.choose([{"context": ctx, "choices": conts, "answer": 1}])
    assert res["predictions"] == [max(range(3), key=lambda i: sc[i]["logprob"])]
    assert res["accuracy"] == float(res["predictions"][0] == 1)


def test_greedy_flag_matches_generation(models):
    px = _proxy(models)
    g = px.generate(["def add(a, b):"], max_new_tokens=5, stop_at_eos=False)[0]
    s = px.score(["def add(a, b):"], [g.tokens])[0]
    assert s["greedy"] and s["tokens"] == 5
    g.tokens[-1] = (g.tokens[-1] + 1) % 320
    assert not px.score(["def add(a, b):"], [g.tokens])[0]["greedy"]


def test_prompt_format_per_model(models):
    px = _proxy(models, formats={"tuned": "### Task\n{prompt}\n### Answer\n"})
    g = px.generate([PROMPTS[0]], max_new_tokens=1, return_scores=True, stop_at_eos=False)[0]
    L, T, S = (_hf(models[k]) for k in ("large", "tuned", "small"))
    raw = torch.tensor([_ids(px.tokenizer, PROMPTS[0])])
    fmt = torch.tensor([_ids(px.tokenizer, f"### Task\n{PROMPTS[0]}\n### Answer\n")])
    with torch.no_grad():
        ref = (L(input_ids=raw).logits[0, -1] + T(input_ids=fmt).logits[0, -1]
               - S(input_ids=raw).logits[0, -1])
    torch.testing.assert_close(g.scores[0], ref, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_stop_strings_stream(models):
    px = _proxy(models)
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=3,
              repetition_penalty=1.3, stop_at_eos=False)
    a, b = px.generate(PROMPTS[:2], **kw), px.generate(PROMPTS[:2], **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    greedy = px.generate(PROMPTS[:1], max_new_tokens=12, stop_at_eos=False)[0]
    stop = greedy.text[5:8]
    streamed: list[str] = []
    g = px.generate(PROMPTS[:1], max_new_tokens=12, stop=[stop], stop_at_eos=False,
                    on_text=lambda i, t: streamed.append(t))[0]
    assert g.finish_reason == "stop"
    assert g.text == greedy.text[: greedy.text.find(stop)]
    assert "".join(streamed) == g.text


def test_processors_by_hand():
    from lmalloy.proxy.sampling import combine, repetition_penalty, top_k_filter, top_p_filter

    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = z.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    assert torch.isinf(top_p_filter(z, 0.5)[0, 1:]).all()  # the top token alone reaches 0.5
    kept = ~torch.isinf(top_p_filter(z, float(p[0] + p[1]) - 1e-4))[0]
    assert kept.tolist() == [True, True, False, False]
    f = top_k_filter(z, 3)
    assert torch.isinf(f[0, 3]) and not torch.isinf(f[0, :3]).any()
    seen = torch.tensor([[True, False, False, True]])
    assert repetition_penalty(z, seen, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    zl, zt, zu = torch.randn(3, 2, 6)
    out = combine(zl, [(zt, zu), (zu[:, :5], zt[:, :5])], [2.0, 0.5])
    torch.testing.assert_close(out, zl[:, :5] + 2 * (zt - zu)[:, :5] + 0.5 * (zu - zt)[:, :5])


# ---------------------------------------------------------------- CLI


def test_cli_generate_and_eval(models, tmp_path, capsys):
    m = models
    out = tmp_path / "gen.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    rc, _, err = run_cli(capsys, "proxy", "generate", "--large", m["large"], "--tuned",
                         m["tuned"], "--untuned", m["small"], "--prompts", prompts, "--out",
                         out, "--max-new-tokens", "6", "--no-stop-at-eos")
    assert rc == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["tokens"] == 6 for r in rows)
    rc, text, _ = run_cli(capsys, "proxy", "generate", "--large", m["large"], "--tuned",
                          m["tuned"], "--untuned", m["small"], "--prompt", "def",
                          "--max-new-tokens", "4")
    assert rc == 0 and text
    choices = tmp_path / "c.jsonl"
    choices.write_text(json.dumps({"context": "def add(a, b):",
                                   "choices": ["\n    return a + b", " zz"], "answer": 0}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.py").write_text("def add(a, b):\n    return a + b\n" * (10 + i))
    rc, text, err = run_cli(capsys, "proxy", "eval", "--large", m["large"], "--tuned",
                            m["tuned"], "--untuned", m["small"], "--tuned-large", m["tuned2"],
                            "--choices", choices, "--data", data, "--seq-len", "32",
                            "--val-fraction", "0.5", "--json")
    assert rc == 0, err
    res = json.loads(text)
    rows = res["rows"]
    assert set(rows) == {"large", "proxy-tuned", "tuned large"}
    gap = (rows["proxy-tuned"]["loss"] - rows["large"]["loss"]) / (
        rows["tuned large"]["loss"] - rows["large"]["loss"])
    assert math.isclose(res["gap_closed"]["loss"], gap, rel_tol=1e-9)


@pytest.fixture(scope="module")
def bad(models, tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("bad")
    mismatch = make_llama(d / "mismatch", tokenizer_dir, seed=5)
    # the same tokens with ids 300 and 301 swapped: a consistent tokenizer that disagrees
    tk = json.loads((models["small"] / "tokenizer.json").read_text())
    vocab = tk["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == k) for k in (300, 301))
    vocab[a], vocab[b] = 301, 300
    (mismatch / "tokenizer.json").write_text(json.dumps(tk))
    notlm = d / "notlm"
    shutil.copytree(models["small"], notlm)
    cfg = json.loads((notlm / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (notlm / "config.json").write_text(json.dumps(cfg))
    empty = d / "empty.jsonl"
    empty.write_text("\n")
    return {"mismatch": mismatch, "notlm": notlm, "empty": empty, "names": (a, b)}


@pytest.mark.parametrize("case", ["mismatch", "missing", "notlm", "nan", "inf", "long",
                                  "empty", "top_p_0", "top_p_big", "pairs"])
def test_cli_bad_inputs(models, bad, tmp_path, capsys, case):
    m = models
    out = tmp_path / "gen.jsonl"
    base = ["proxy", "generate", "--large", m["large"], "--untuned", m["small"], "--out", out]
    args, match = {
        "mismatch": (["--tuned", bad["mismatch"], "--prompt", "x"],
                     "first differing token at id 300 is {!r} vs {!r}".format(*bad["names"])),
        "missing": (["--tuned", tmp_path / "nope", "--prompt", "x"], "not found"),
        "notlm": (["--tuned", bad["notlm"], "--prompt", "x"], "not a causal language model"),
        "nan": (["--tuned", m["tuned"], "--prompt", "x", "--alpha", "nan"],
                "`--alpha`: must be finite, got nan"),
        "inf": (["--tuned", m["tuned"], "--prompt", "x", "--alpha", "1,inf"], "must be finite"),
        "long": (["--tuned", m["tuned"], "--prompt", "a" * 2000],
                 "not shorter than its context window of 256"),
        "empty": (["--tuned", m["tuned"], "--prompts", bad["empty"]], "no prompts"),
        "top_p_0": (["--tuned", m["tuned"], "--prompt", "x", "--top-p", "0"],
                    "`--top-p`: must be in (0, 1]"),
        "top_p_big": (["--tuned", m["tuned"], "--prompt", "x", "--top-p", "1.5"],
                      "`--top-p`: must be in (0, 1]"),
        "pairs": (["--tuned", f"{m['tuned']},{m['tuned2']}", "--prompt", "x"],
                  "2 --tuned model(s) but 1 --untuned"),
    }[case]
    assert_user_error(capsys, *base, *args, match=match)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_eval_bad_inputs(models, bad, tmp_path, capsys):
    m = models
    base = ["proxy", "eval", "--large", m["large"], "--tuned", m["tuned"], "--untuned",
            m["small"]]
    assert_user_error(capsys, *base, "--tuned-large", bad["mismatch"], "--no-perplexity",
                      "--choices", bad["empty"], match="no items")
    choices = tmp_path / "c.jsonl"
    choices.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0}) + "\n")
    assert_user_error(capsys, *base, "--tuned-large", bad["mismatch"], "--no-perplexity",
                      "--choices", choices, match="first differing token at id 300")
    assert_user_error(capsys, *base, "--alpha=-inf", "--no-perplexity", "--choices",
                      choices, match="must be finite")


def test_chat_format_uses_the_tuned_tokenizers_template(models, tmp_path):
    from transformers import AutoTokenizer

    chat = tmp_path / "chat"
    shutil.copytree(models["tuned"], chat)
    cfg = json.loads((chat / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|endoftext|>[{{ m.role }}] {{ m.content }}"
                            "{% endfor %}{% if add_generation_prompt %}\n[assistant] {% endif %}")
    (chat / "tokenizer_config.json").write_text(json.dumps(cfg))
    models = {**models, "chat": chat}
    px = _proxy(models, tuned=("chat",), formats={"tuned": "chat"})
    tok = AutoTokenizer.from_pretrained(chat)
    want = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert want.startswith("<|endoftext|>[user] hi")
    tuned = px.pairs[0][0]
    assert px.encode_prompt(tuned, "hi") == tok(want, add_special_tokens=False)["input_ids"]
    assert px.encode_prompt(px.large, "hi") == _ids(px.tokenizer, "hi")
    assert px.generate(["hi"], max_new_tokens=3, stop_at_eos=False)[0].tokens
