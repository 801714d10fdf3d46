"""Speculative proxy decoding is exact: greedy output equals the plain decoder's, sampled
output has the proxy-tuned distribution (χ² on a tiny vocabulary), and each draft's recorded
p(x) and q(x) match a direct full-sequence computation."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import test_proxy
from common import assert_user_error, make_llama, run_cli

# the tiny models and helpers of the plain decoder's tests (module fixtures, run afresh here)
PROMPTS, _proxy = test_proxy.PROMPTS, test_proxy._proxy
models, _one_thread = test_proxy.models, test_proxy._one_thread


# ---------------------------------------------------------------- greedy: identical tokens


@pytest.mark.parametrize("setup", ["one pair", "two pairs", "named draft", "padded head"])
def test_greedy_speculative_equals_plain(models, setup):
    kw = {"one pair": {}, "two pairs": dict(tuned=("tuned", "tuned2"), untuned=("small",) * 2,
                                            alpha=(0.7, -0.5)),
          "named draft": dict(draft=str(models["draft"])), "padded head": dict(large="padded")
          }[setup]
    px = _proxy(models, **kw)
    plain = px.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False, return_scores=True)
    for k, adaptive in ((1, False), (3, False), (6, False), (4, True)):
        spec = px.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False, return_scores=True,
                           speculative=k, adaptive_k=adaptive)
        for a, b in zip(plain, spec, strict=True):
            assert a.tokens == b.tokens and a.text == b.text and a.finish_reason == "length"
            assert len(b.scores) == 16
            for sa, sb in zip(a.scores, b.scores, strict=True):
                torch.testing.assert_close(sa, sb, atol=1e-4, rtol=0)
        st = px.last_speculative
        assert st["drafted"] > 0 and 0 <= st["accepted"] <= st["drafted"]
        assert max(st["k_history"]) <= k


def test_greedy_speculative_stops_and_streams_like_plain(models):
    px = _proxy(models)
    ref = px.generate(PROMPTS[:1], max_new_tokens=20, stop_at_eos=False)[0]
    i = next(i for i in range(3, len(ref.text)) if "\ufffd" not in ref.text[: i + 3])
    stop = ref.text[i : i + 3]  # clean text: a replacement character is no stop string
    for k in (None, 3):
        got: list[str] = []
        g = px.generate(PROMPTS[:1], max_new_tokens=20, stop=[stop], stop_at_eos=False,
                        speculative=k, on_text=lambda i, t, got=got: got.append(t))[0]
        assert g.finish_reason == "stop" and g.text == ref.text[: ref.text.find(stop)]
        assert "".join(got) == g.text
    # a prompt near the context's end: both decoders stop at the window
    long = "x = 1\n" * 60
    a = px.generate([long], max_new_tokens=200, stop_at_eos=False)[0]
    b = px.generate([long], max_new_tokens=200, stop_at_eos=False, speculative=5)[0]
    assert a.tokens == b.tokens and len(a.tokens) < 200


# ---------------------------------------------------------------- sampled: the distribution

TINY = ["<eos>", "<pad>", "a", "b", "c", "d", "e", "f"]


def _tiny_tokenizer(path):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(WordLevel({t: i for i, t in enumerate(TINY)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                            bos_token="<eos>").save_pretrained(path)
    return path


def _sharpen(folder, factor: float):
    """Scale the output layer so the 8-token distributions are far from uniform."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight"] = sd["lm_head.weight"] * factor
    save_file(sd, f, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = _tiny_tokenizer(d / "tok")
    small = _sharpen(make_llama(d / "small", tok, seed=11, vocab=8), 10)
    return {"large": _sharpen(make_llama(d / "large", tok, seed=10, vocab=8), 10),
            "small": small,
            "tuned": _sharpen(make_llama(d / "tuned", tok, seed=12, vocab=8,
                                         noise_from=small, noise=0.08), 1.3)}


SETTINGS = {"plain": dict(temperature=1.0),
            "filtered": dict(temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.4)}


def _dist(z, prefix, s):
    """The target distribution of the plain decoder's processors (scalar versions)."""
    from lmalloy.proxy.sampling import repetition_penalty, top_k_filter, top_p_filter

    seen = torch.zeros(1, z.shape[-1], dtype=torch.bool)
    seen[0, torch.tensor(prefix)] = True
    z = repetition_penalty(z[None], seen, s.get("repetition_penalty", 1.0))
    z = top_p_filter(top_k_filter(z / s["temperature"], s.get("top_k")), s.get("top_p"))
    return z.softmax(-1)[0]


def _exact_pairs(logits_fn, prompt, s):
    """P(first two tokens = (a, b)) for all a, b: (V, V), from full-sequence logits."""
    z1 = logits_fn(torch.tensor([prompt]))[0, -1]
    p1 = _dist(z1, prompt, s)
    V = p1.shape[0]
    seqs = torch.tensor([prompt + [a] for a in range(V)])
    z2 = logits_fn(seqs)[:, -1]  # (V, V)
    p2 = torch.stack([_dist(z2[a], prompt + [a], s) for a in range(V)])
    return p1[:, None] * p2  # (V, V)


def _chi2_pvalue(counts, probs):
    """Pearson's χ² goodness of fit, cells with expected count < 5 pooled (into the smallest
    cell if the pool itself is below 5); the p-value by the Wilson–Hilferty approximation."""
    n = counts.sum()
    exp = (probs * n).double()
    order = torch.argsort(exp)
    obs, e = counts.double()[order], exp[order]
    cut = int((e < 5).sum())
    if cut:
        po, pe = obs[:cut].sum(), e[:cut].sum()
        obs, e = obs[cut:].clone(), e[cut:].clone()
        if pe >= 5:
            obs, e = torch.cat([obs, po[None]]), torch.cat([e, pe[None]])
        else:
            obs[0] += po
            e[0] += pe
    stat, df = float(((obs - e) ** 2 / e).sum()), len(e) - 1
    zscore = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(zscore / math.sqrt(2))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampled_speculative_has_the_proxy_distribution(tiny, setting):
    from lmalloy.proxy.model import ProxyTuned

    s = SETTINGS[setting]
    px = ProxyTuned.from_pretrained(str(tiny["large"]), str(tiny["tuned"]), str(tiny["small"]))
    prompt = px.encode_prompt(px.large, "ab")
    exact = _exact_pairs(px.logits, prompt, s)
    n = 3000
    trace: list = []
    out = px.generate(["ab"] * n, max_new_tokens=3, stop_at_eos=False, speculative=2,
                      seed=5, trace=trace, **s)
    counts = torch.zeros(8, 8)
    for g in out:
        counts[g.tokens[0], g.tokens[1]] += 1
    assert _chi2_pvalue(counts.flatten(), exact.flatten()) > 1e-3
    # the same test has the power to reject the draft model's own distribution
    draft = ProxyTuned.from_pretrained(str(tiny["tuned"]), [], [], [])
    q = _exact_pairs(draft.logits, prompt, s).flatten()
    fake = torch.bincount(torch.multinomial(q, n, replacement=True,
                                            generator=torch.Generator().manual_seed(0)), None, 64)
    assert _chi2_pvalue(fake.float(), exact.flatten()) < 1e-6
    # rows accepted different numbers of drafts in the same round
    assert len(set(trace[0]["n"].tolist())) > 1
    # the plain sampler passes the same test (same seeds would give other draws)
    plain = px.generate(["ab"] * n, max_new_tokens=2, stop_at_eos=False, seed=6, **s)
    pc = torch.zeros(8, 8)
    for g in plain:
        pc[g.tokens[0], g.tokens[1]] += 1
    assert _chi2_pvalue(pc.flatten(), exact.flatten()) > 1e-3


def test_acceptance_rates_match_a_direct_computation(tiny):
    """P(draft 1 kept) = Σ min(p₁, q₁); P(drafts 1 and 2 kept) = Σₓ min(p₁, q₁)(x) ·
    Σ min(p₂(·|x), q₂(·|x)): the first round's counts over many rows against both."""
    from lmalloy.proxy.model import ProxyTuned

    s = SETTINGS["plain"]
    px = ProxyTuned.from_pretrained(str(tiny["large"]), str(tiny["tuned"]), str(tiny["small"]))
    draft = ProxyTuned.from_pretrained(str(tiny["tuned"]), [], [], [])
    prompt = px.encode_prompt(px.large, "ab")
    p1 = _dist(px.logits(torch.tensor([prompt]))[0, -1], prompt, s)
    q1 = _dist(draft.logits(torch.tensor([prompt]))[0, -1], prompt, s)
    both = 0.0
    for x in range(8):
        seq = torch.tensor([prompt + [x]])
        p2 = _dist(px.logits(seq)[0, -1], prompt + [x], s)
        q2 = _dist(draft.logits(seq)[0, -1], prompt + [x], s)
        both += float(torch.minimum(p1[x], q1[x]) * torch.minimum(p2, q2).sum())
    first = float(torch.minimum(p1, q1).sum())
    n = 4000
    trace: list = []
    px.generate(["ab"] * n, max_new_tokens=3, stop_at_eos=False, speculative=2, seed=9,
                trace=trace, **s)
    kept = trace[0]["n"]
    for got, want in ((float((kept >= 1).float().mean()), first),
                      (float((kept >= 2).float().mean()), both)):
        assert abs(got - want) < 4.5 * math.sqrt(want * (1 - want) / n), (got, want)
    assert 0.2 < first < 0.95  # the test is not trivially about identical models


def test_recorded_draft_probabilities_match_full_forwards(models):
    """Every round's drafts, their p(x) and q(x), the kept counts and the emitted tokens,
    recomputed from the whole sequence without caches."""
    from lmalloy.proxy.model import ProxyTuned
    from lmalloy.proxy.sampling import probabilities

    s = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2)
    px = _proxy(models, alpha=(1.5,))
    draft = ProxyTuned.from_pretrained(str(models["tuned"]), [], [], [])
    trace: list = []
    out = px.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False, speculative=3, seed=1,
                      trace=trace, **s)
    done = [0] * len(PROMPTS)
    for rnd in trace:
        for b, g in enumerate(out):
            if not rnd["valid"][b, 0]:
                continue
            before = px.encode_prompt(px.large, PROMPTS[b]) + g.tokens[: done[b]]
            m = int(rnd["eligible"][b])
            seqs = [before + rnd["drafts"][b, :j].tolist() for j in range(m)]
            for j, seq in enumerate(seqs):
                x = int(rnd["drafts"][b, j])
                for fn, key in ((px.logits, "px"), (draft.logits, "qx")):
                    z = fn(torch.tensor([seq]))[:, -1:]  # (1, 1, V)
                    seen = torch.zeros(1, 1, z.shape[-1], dtype=torch.bool)
                    seen[0, 0, torch.tensor(seq)] = True
                    p = probabilities(z, seen, *(torch.tensor([[float(v)]]) for v in (
                        s["temperature"], s["top_k"], s["top_p"], s["repetition_penalty"])))
                    assert math.isclose(float(p[0, 0, x]), float(rnd[key][b, j]), abs_tol=1e-5)
            kept = min(int(rnd["n"][b]), m)
            emitted = g.tokens[done[b]: done[b] + rnd["taken"][b]]
            assert emitted[:kept] == rnd["drafts"][b, :kept].tolist()
            ok = (rnd["px"][b, :m] / rnd["qx"][b, :m]).tolist()
            assert all(r > 0 for r in ok[:kept])  # a kept draft is possible under p
            done[b] += rnd["taken"][b]
    assert done == [12] * len(PROMPTS)
    st = px.last_speculative
    assert st["accepted"] == sum(int(torch.minimum(r["n"], r["eligible"]).sum()) for r in trace)
    assert st["drafted"] == sum(int(r["eligible"].sum()) for r in trace)


# ---------------------------------------------------------------- pieces by hand


def test_accept_rule_by_hand():
    from lmalloy.proxy.speculative import RowParams, accept, best_k, expected_tokens, next_after

    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])  # (1, 3, 3)
    q = torch.tensor([[[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]])  # (1, 2, 3)
    drafts = torch.tensor([[1, 2]])
    # p/q of x₁ = 0.5/0.75 = 2/3: kept iff u < 2/3; then x₂: 0.5/1.0
    for u, n in (([0.6, 0.4], 2), ([0.6, 0.6], 1), ([0.7, 0.0], 0)):
        got, px, qx = accept(p, q, drafts, torch.tensor([u]))
        assert int(got[0]) == n
    torch.testing.assert_close(px, torch.tensor([[0.5, 0.5]]))
    params = RowParams.same(1, temperature=1.0, top_k=None, top_p=None, penalty=1.0,
                            alphas=[], gen=torch.Generator().manual_seed(0))
    # rejected at draft 1: the residual max(0, p − q) is token 0 alone
    assert all(int(next_after(p, q, torch.tensor([0]), params)[0]) == 0 for _ in range(20))
    # all kept: the bonus token comes from p₃ (token 0 only)
    assert int(next_after(p, q, torch.tensor([2]), params)[0]) == 0
    assert expected_tokens(0.5, 2) == 1.75 and expected_tokens(1.0, 4) == 5.0
    # draft steps free and verification flat: the longest K; expensive drafts: K = 1
    assert best_k(0.9, 0.0, 1.0, 0.0, 8) == 8
    assert best_k(0.3, 1.0, 0.1, 0.0, 8) == 1


def test_lane_compaction_keeps_the_logits(models):
    """Squeezing masked columns out of a lane changes nothing the model computes."""
    from lmalloy.proxy.model import ProxyTuned
    from lmalloy.proxy.speculative import Lane

    px = ProxyTuned.from_pretrained(str(models["large"]), [], [], [])
    tok = px.tokenizer
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    from lmalloy.proxy.model import left_pad

    ids, mask = left_pad(rows, px.pad_id)
    g = torch.Generator().manual_seed(0)
    junk = torch.randint(2, 300, (len(rows), 5), generator=g)
    holes = torch.rand(len(rows), 5, generator=g) < 0.5
    lanes = []
    for _ in range(2):
        lane = Lane(px.large.model, px.vocab, len(rows))
        with torch.no_grad():
            lane.feed(ids, mask.bool())
            lane.feed(junk, holes)  # masked columns in the middle
        lanes.append(lane)
    lanes[1].compact(slack=0)
    assert lanes[1].mask.shape[1] == int(lanes[1].mask.sum(-1).max())
    nxt = torch.tensor([[5], [6], [7], [8]])
    with torch.no_grad():
        a, b = (lane.feed(nxt, torch.ones(4, 1, dtype=torch.bool)) for lane in lanes)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input


def test_cli_speculative(models, tmp_path, capsys):
    m = models
    out = tmp_path / "gen.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    base = ["proxy", "generate", "--large", m["large"], "--tuned", m["tuned"], "--untuned",
            m["small"], "--prompts", prompts, "--max-new-tokens", "6", "--no-stop-at-eos"]
    rc, _, err = run_cli(capsys, *base, "--out", out)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *base, "--out", tmp_path / "spec.jsonl", "--speculative", "3",
                         "--adaptive-k", "--draft", m["draft"])
    assert rc == 0, err
    assert "drafts kept" in err
    assert out.read_text() == (tmp_path / "spec.jsonl").read_text()


@pytest.fixture(scope="module")
def other_tokenizer(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("othertok") / "mismatch"
    shutil.copytree(models["draft"], d)
    tk = json.loads((d / "tokenizer.json").read_text())
    vocab = tk["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == k) for k in (300, 301))
    vocab[a], vocab[b] = 301, 300
    (d / "tokenizer.json").write_text(json.dumps(tk))
    return d


@pytest.mark.parametrize("case", ["zero", "negative", "too_long", "draft_tokenizer",
                                  "no_draft"])
def test_cli_speculative_bad_inputs(models, other_tokenizer, tmp_path, capsys, case):
    m = models
    out = tmp_path / "gen.jsonl"
    base = ["proxy", "generate", "--large", m["large"], "--untuned", m["small"], "--tuned",
            m["tuned"], "--prompt", "x", "--out", out]
    args, match = {
        "zero": (["--speculative", "0"], "`--speculative`: input should be greater than 0"),
        "negative": (["--speculative", "-2"], "greater than 0"),
        "too_long": (["--speculative", "255"], "do not fit the context window of 256"),
        "draft_tokenizer": (["--speculative", "2", "--draft", other_tokenizer],
                            "first differing token at id 300"),
        "no_draft": (["--speculative", "2", "--draft", tmp_path / "nope"], "not found"),
    }[case]
    assert_user_error(capsys, *base, *args, match=match)
    assert list(tmp_path.iterdir()) == []
