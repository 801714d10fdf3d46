"""WARM (weight average of reward models) and `reward eval`'s bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch

from common import assert_user_error, make_llama, run_cli
from lmalloy.reward import data as D
from lmalloy.reward import evaluate as E

# ----------------------------------------------------------------------------- fixtures


def _rm(tmp, name: str, base, seed: int, noise: float = 0.02, labels: int = 1) -> object:
    """A reward-model folder: the shared init, its weights perturbed by `seed`."""
    from lmalloy.reward.model import reward_from_causal_lm
    from lmalloy.reward.train import init_group, save_reward_model

    m = reward_from_causal_lm(base, head_seed=0)
    group = init_group(m)
    if labels != 1:
        from transformers import AutoModelForSequenceClassification

        m.config.num_labels = labels
        m = AutoModelForSequenceClassification.from_config(m.config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    folder = tmp / name
    folder.mkdir()
    save_reward_model(m, folder, base, {"init_group": group, "seed": seed})
    return folder


@pytest.fixture(scope="module")
def rms(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("rms")
    run = tmp / "run"
    run.mkdir()
    return [_rm(run, f"rm-0{i}", tiny_llama, seed=i) for i in range(3)]


def _state(folder):
    from lmalloy.io.folder import open_model

    m = open_model(folder)
    return {n: m.read(n).clone() for n in m.names()}


# ----------------------------------------------------------------------------- warm


def test_warm_is_the_hand_computed_mean(capsys, tmp_path, rms):
    rc, _, err = run_cli(capsys, "reward", "warm", rms[0].parent, "--out", tmp_path / "w")
    assert rc == 0, err
    states = [_state(f) for f in rms]
    warm = _state(tmp_path / "w")
    assert set(warm) == set(states[0])
    for n, t in warm.items():
        want = (states[0][n] + states[1][n] + states[2][n]) / 3
        assert torch.allclose(t, want, atol=1e-6), n
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "w")
    assert m.config.num_labels == 1 and (tmp_path / "w" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "w" / "reward.json").read_text())
    assert meta["weights"] == pytest.approx([1 / 3] * 3)


def test_weighted_warm_and_equal_to_linear_merge(capsys, tmp_path, rms):
    rc, _, err = run_cli(capsys, "reward", "warm", rms[0], rms[1], "--weights", "3,1",
                         "--out", tmp_path / "w")
    assert rc == 0, err
    a, b, warm = _state(rms[0]), _state(rms[1]), _state(tmp_path / "w")
    for n, t in warm.items():
        assert torch.allclose(t, 0.75 * a[n] + 0.25 * b[n], atol=1e-6), n
    merge = pytest.importorskip("lmalloy.merge.engine")
    from lmalloy.config import validate
    from lmalloy.merge.config import MergeConfig

    cfg = validate(MergeConfig, {"method": "linear", "models": [str(rms[0]), str(rms[1])],
                                 "weights": [3, 1], "output": str(tmp_path / "m"),
                                 "progress": False})
    merge.merge(cfg)
    merged = _state(tmp_path / "m")
    for n, t in warm.items():
        assert torch.allclose(t, merged[n], atol=1e-6), n


def test_warm_needs_two_models(capsys, tmp_path, rms):
    assert_user_error(capsys, "reward", "warm", rms[0], "--out", tmp_path / "w",
                      match="at least 2 reward models, got 1")
    assert not (tmp_path / "w").exists()


def test_warm_refuses_different_architectures(capsys, tmp_path, rms, tokenizer_dir):
    big = make_llama(tmp_path / "big", tokenizer_dir, hidden=48, heads=4, kv_heads=2)
    other = _rm(tmp_path, "other", big, seed=0)
    assert_user_error(capsys, "reward", "warm", rms[0], other, "--out", tmp_path / "w",
                      match="differ in `hidden_size`")
    assert not (tmp_path / "w").exists()


def test_warm_refuses_different_heads(capsys, tmp_path, rms, tiny_llama):
    two = _rm(tmp_path, "two", tiny_llama, seed=0, labels=2)
    assert_user_error(capsys, "reward", "warm", rms[0], two, "--out", tmp_path / "w",
                      match="one output")
    assert not (tmp_path / "w").exists()


def test_warm_refuses_different_inits(capsys, tmp_path, rms):
    import shutil

    other = tmp_path / "rm-x"
    shutil.copytree(rms[1], other)
    meta = json.loads((other / "reward.json").read_text())
    (other / "reward.json").write_text(json.dumps({**meta, "init_group": "elsewhere"}))
    assert_user_error(capsys, "reward", "warm", rms[0], other, "--out", tmp_path / "w",
                      match="different initialisations")
    assert not (tmp_path / "w").exists()


def test_warm_refuses_a_causal_lm(capsys, tmp_path, rms, tiny_llama):
    assert_user_error(capsys, "reward", "warm", rms[0], tiny_llama, "--out", tmp_path / "w",
                      match="not a reward model")


# ----------------------------------------------------------------------------- bookkeeping


def test_accuracy_and_ensemble_on_a_hand_made_case():
    # two RMs, four pairs; scores of chosen / rejected
    c1, r1 = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0, 0.5])
    c2, r2 = torch.tensor([0.0, 3.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0, 0.0])
    assert E.pairwise_accuracy(c1, r1) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert E.pairwise_accuracy(c2, r2) == pytest.approx((0 + 1 + 0 + 1) / 4)
    ec, er = E.ensemble([c1, c2]), E.ensemble([r1, r2])
    assert ec.tolist() == [0.5, 1.5, 1.0, 0.75] and er.tolist() == [0.5, 0.5, 2.0, 0.25]
    assert E.pairwise_accuracy(ec, er) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    row = E.summarize({"a": 0.625, "b": 0.5}, ["a", "b"])
    assert row["mean"] == pytest.approx(0.5625) and row["best"] == 0.625
    assert E.summarize({"a": 0.6, "b": 0.2}, ["a", "b"], lower_is_better=True)["best"] == 0.2


def test_best_of_n_and_win_rate_on_a_hand_made_case():
    gold = torch.tensor([[0.0, 1.0, 2.0],   # prompt 0
                         [5.0, 4.0, 3.0],   # prompt 1
                         [1.0, 1.0, 0.0],   # prompt 2 (answers 0 and 1 tie under gold)
                         [0.0, 0.0, 9.0]])  # prompt 3
    rm_a = torch.tensor([[0.1, 0.2, 0.3], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    rm_b = torch.tensor([[0.3, 0.2, 0.1], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pa, pb = E.best_of_n(rm_a), E.best_of_n(rm_b)
    assert pa.tolist() == [2, 1, 0, 2] and pb.tolist() == [0, 0, 1, 2]
    w = E.win_rate(gold, pa, pb)
    # prompt 0: 2 > 0 win; 1: 4 < 5 loss; 2: gold tie; 3: same pick, tie
    assert (w["wins"], w["losses"], w["ties"]) == (1, 1, 2)
    assert w["rate"] == pytest.approx(0.5)
    outcomes = torch.tensor([1.0, 0.0, 0.5, 0.5])
    half = 1.96 * float(outcomes.std()) / 2
    assert (w["lo"], w["hi"]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    # against two selectors: per-prompt outcomes averaged over them
    w2 = E.win_rate(gold, pa, [pb, pa])
    # per prompt: (outcome vs pb + outcome vs itself = 0.5) / 2 -> 0.75, 0.25, 0.5, 0.5
    assert w2["rate"] == pytest.approx((0.75 + 0.25 + 0.5 + 0.5) / 4)
    assert (w2["wins"], w2["losses"], w2["ties"]) == (1, 1, 6)
    assert E.win_rate(gold, pb, pa)["rate"] == pytest.approx(1 - w["rate"])


# ----------------------------------------------------------------------------- eval end to end


def test_reward_eval_end_to_end(capsys, tmp_path, rms, tiny_llama):
    from lmalloy.data.corpus import Document
    from lmalloy.reward.model import Encoder, load_reward_model, score

    docs = [Document("code", "a.py", "\n".join(
        f"def f{i}(x):\n    y = x + {i}\n    z = y * 2\n    return z - x\n" for i in range(30)))]
    test = D.generate(docs, ["swap", "typo"], 12, seed=1)
    train = D.generate(docs, ["shuffle"], 10, label_noise=0.3, seed=2)
    D.write_pairs(test, tmp_path / "test.jsonl")
    D.write_pairs(train, tmp_path / "train.jsonl")
    rc, out, err = run_cli(capsys, "reward", "eval", rms[0].parent, "--pairs",
                           tmp_path / "test.jsonl", "--train-pairs", tmp_path / "train.jsonl",
                           "--policy", tiny_llama, "--gold", rms[2], "--bon-n", "3",
                           "--bon-prompts", "3", "--max-new-tokens", "5", "--out",
                           tmp_path / "res.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "res.json").read_text())
    assert "warm" in out and "ensemble" in out
    acc = res["accuracy"]
    assert set(acc) == {"test", "test/swap", "test/typo"} and acc["test"]["pairs"] == 12
    assert res["memorisation"]["pairs"] == 3  # round(0.3 * 10) flipped pairs
    # the ensemble column is the accuracy of the mean score, recomputed here
    models = [load_reward_model(f) for f in rms]
    enc = Encoder(rms[0], 1, 256)
    sc = [score(m, enc([p.prompt for p in test], [p.chosen for p in test]), 1) for m in models]
    sr = [score(m, enc([p.prompt for p in test], [p.rejected for p in test]), 1) for m in models]
    assert acc["test"]["ensemble"] == pytest.approx(
        E.pairwise_accuracy(E.ensemble(sc), E.ensemble(sr)))
    assert acc["test"]["rm-01"] == pytest.approx(E.pairwise_accuracy(sc[1], sr[1]))
    bon = res["best_of_n"]
    assert bon["n"] == 3 and bon["prompts"] == 3
    assert set(bon["win_rate"]) == {"warm_vs_single", "ensemble_vs_single", "warm_vs_ensemble"}
    w = bon["win_rate"]["warm_vs_single"]
    assert w["wins"] + w["ties"] + w["losses"] == 3 * 3 and w["lo"] <= w["rate"] <= w["hi"]


def test_eval_best_of_n_needs_policy_and_gold(capsys, tmp_path, rms, tiny_llama):
    assert_user_error(capsys, "reward", "eval", rms[0], rms[1], "--pairs", tmp_path / "x.jsonl",
                      "--policy", tiny_llama, match="needs both --policy and --gold")


def test_eval_missing_data_file(capsys, tmp_path, rms):
    assert_user_error(capsys, "reward", "eval", rms[0], rms[1], "--pairs", tmp_path / "x.jsonl",
                      match="preference data not found")
