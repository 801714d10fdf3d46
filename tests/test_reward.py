"""Reward models: preference data, Bradley–Terry loss, score position, training."""

from __future__ import annotations

import json
import math
import random

import pytest

from common import assert_user_error, run_cli
from lmalloy.data.corpus import Document
from lmalloy.reward import data as D

CODE = "\n".join(
    f"def f{i}(a, b):\n    x = a + {i}\n    y = b * {i}\n    if x > y:\n        return x - y\n"
    f"    return y - x\n" for i in range(40))
DOCS = [Document("code", f"doc{i}.py", CODE) for i in range(3)]


# ----------------------------------------------------------------------------- data


def test_corruptions_change_the_answer_each_in_its_own_way():
    rng = random.Random(0)
    ans = "    x = a + 1\n    y = b * 2\n    return x - y"
    pool = [ans, "    other = 1\n    thing = 2"]
    sw = D.swap_tokens(ans, rng, pool)
    assert sw != ans and sorted(D.WORD.findall(sw)) == sorted(D.WORD.findall(ans))
    sh = D.shuffle_lines(ans, rng, pool)
    assert sh != ans and sorted(sh.split("\n")) == sorted(ans.split("\n"))
    tr = D.truncate(ans, rng, pool)
    assert ans.startswith(tr) and 0.3 * len(ans) - 1 <= len(tr) <= 0.7 * len(ans)
    rp = D.repeat_line(ans, rng, pool)
    lines = rp.split("\n")
    assert len(lines) == 3 and len(set(lines[-2:])) == 1 and rp != ans
    ty = D.typos(ans, rng, pool)
    assert len(ty) == len(ans) and ty != ans
    assert [i for i, (a, b) in enumerate(zip(ans, ty, strict=True)) if a.isspace() != b.isspace()
            ] == []
    assert D.foreign(ans, rng, pool) == pool[1]


def test_generator_kinds_in_turn_and_noise_bookkeeping():
    clean = D.generate(DOCS, ["swap", "shuffle", "truncate"], 40, 0.0, seed=3)
    noisy = D.generate(DOCS, ["swap", "shuffle", "truncate"], 40, 0.25, seed=3)
    assert len(clean) == len(noisy) == 40
    assert [p.distribution for p in clean[:6]] == ["swap", "shuffle", "truncate"] * 2
    assert not any(p.flipped for p in clean)
    assert sum(p.flipped for p in noisy) == 10  # exactly round(0.25 * 40)
    for c, n in zip(clean, noisy, strict=True):
        assert c.prompt == n.prompt and c.distribution == n.distribution
        if n.flipped:  # labels swapped: the corrupted answer is now "chosen"
            assert (n.chosen, n.rejected) == (c.rejected, c.chosen)
        else:
            assert (n.chosen, n.rejected) == (c.chosen, c.rejected)
        assert c.chosen in CODE and c.chosen != c.rejected


def test_jsonl_round_trip_keeps_flipped(tmp_path):
    pairs = D.generate(DOCS, ["repeat", "typo"], 10, 0.2, seed=1)
    D.write_pairs(pairs, tmp_path / "p.jsonl")
    back = D.read_pairs(tmp_path / "p.jsonl")
    assert back == pairs and sum(p.flipped for p in back) == 2


def test_reward_data_cli_split_is_disjoint(capsys, tmp_path):
    files = {}
    for split in ("train", "test"):
        files[split] = tmp_path / f"{split}.jsonl"
        rc, _, err = run_cli(capsys, "reward", "data", "--domains", "json", "--split", split,
                             "--num-pairs", "30", "--out", files[split])
        assert rc == 0, err
    src = {s: {p.source for p in D.read_pairs(f)} for s, f in files.items()}
    assert src["train"] and src["test"] and not src["train"] & src["test"]


@pytest.mark.parametrize("noise", ["0.5", "-0.1", "0.75"])
def test_label_noise_outside_range(capsys, tmp_path, noise):
    out = tmp_path / "p.jsonl"
    assert_user_error(capsys, "reward", "data", "--label-noise", noise, "--out", out,
                      match="--label-noise")
    assert not out.exists()


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "a", "chosen": "b"}', "line 2: missing field `rejected`"),
    ('{"prompt": "a", "chosen": "b", "rejected": ', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "line 2: field `chosen` must be a string"),
])
def test_bad_jsonl_lines_are_named(capsys, tmp_path, tiny_llama, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n' + line + "\n")
    out = tmp_path / "rm"
    assert_user_error(capsys, "reward", "train", "--base-model", tiny_llama, "--pairs", f,
                      "--out", out, match=match)
    assert not out.exists()


def test_empty_preference_set(capsys, tmp_path, tiny_llama):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    out = tmp_path / "rm"
    assert_user_error(capsys, "reward", "train", "--base-model", tiny_llama, "--pairs", f,
                      "--out", out, match="no preference pairs")
    assert not out.exists()


# ----------------------------------------------------------------------------- model


def test_bradley_terry_loss_against_hand_computation():
    import torch

    from lmalloy.reward.model import bt_loss

    rc = torch.tensor([2.0, -1.0, 0.5])
    rr = torch.tensor([1.0, 1.0, 0.5])
    # -log sigmoid(d) = log(1 + exp(-d)), d = 1, -2, 0
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2)) + math.log(2)) / 3
    assert float(bt_loss(rc, rr)) == pytest.approx(want, rel=1e-6)


@pytest.fixture(scope="module")
def reward_model(tiny_llama):
    from lmalloy.reward.model import reward_from_causal_lm

    return reward_from_causal_lm(tiny_llama, head_seed=0).eval()


def test_score_position_left_and_right_padding(reward_model):
    import torch

    from lmalloy.reward.model import forward_scores, pad_batch

    pad = reward_model.config.pad_token_id
    seqs = [[5, 6, 7, 8, 9, 10, 0], [11, 12, 0], [13, 14, 15, 16, 0]]
    with torch.no_grad():
        alone = torch.stack([forward_scores(reward_model, [s], pad)[0] for s in seqs])
        right = forward_scores(reward_model, seqs, pad, "right")
        left = forward_scores(reward_model, seqs, pad, "left")
        # the score is the head applied to the hidden state of each sequence's last token
        h = reward_model.model(input_ids=torch.tensor([seqs[1]])).last_hidden_state[0, -1]
        by_hand = float(reward_model.score(h)[0])
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)
    assert float(alone[1]) == pytest.approx(by_hand, abs=1e-5)
    ids, mask, pos = pad_batch(seqs[1:2] + seqs[:1], pad, "left")
    assert ids[0, :4].tolist() == [pad] * 4 and pos[0].tolist() == [0, 0, 0, 0, 0, 1, 2]


def test_shared_head_init_is_seeded(tiny_llama, reward_model):
    import torch

    from lmalloy.reward.model import reward_from_causal_lm

    again = reward_from_causal_lm(tiny_llama, head_seed=0)
    other = reward_from_causal_lm(tiny_llama, head_seed=1)
    assert torch.equal(again.score.weight, reward_model.score.weight)
    assert not torch.equal(other.score.weight, reward_model.score.weight)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    D.write_pairs(D.generate(DOCS, ["swap", "shuffle", "truncate"], 24, 0.25, seed=0), f)
    return f


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, pairs_file):
    from lmalloy.cli import main

    out = tmp_path_factory.mktemp("rm") / "run"
    rc = main(["reward", "train", "--base-model", str(tiny_llama), "--pairs", str(pairs_file),
               "--out", str(out), "--num-models", "3", "--lr", "1e-4,1e-3", "--dropout",
               "0,0.1", "--batch-size", "8", "--max-steps", "3", "--no-progress",
               "--seq-len", "64"])
    assert rc == 0
    return out


def test_train_m_models_diverse_hparams_loadable(trained):
    import torch
    from transformers import AutoModelForSequenceClassification

    metas = [json.loads((trained / f"rm-{i:02d}" / "reward.json").read_text()) for i in range(3)]
    assert [m["seed"] for m in metas] == [1, 2, 3]
    assert len({m["lr"] for m in metas}) == 3 and all(1e-4 <= m["lr"] <= 1e-3 for m in metas)
    assert all(0 <= m["dropout"] <= 0.1 for m in metas)
    assert len({m["init_group"] for m in metas}) == 1
    models = [AutoModelForSequenceClassification.from_pretrained(trained / f"rm-{i:02d}")
              for i in range(3)]
    assert models[0].config.num_labels == 1 and models[0].config.pad_token_id == 1
    assert models[0].config.attention_dropout == 0.0  # training dropout not saved
    w = [m.score.weight for m in models]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    recs = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in recs} == {"rm-00", "rm-01", "rm-02"}


def test_baklava_inits_from_different_checkpoints(capsys, tmp_path, tiny_llama, tokenizer_dir,
                                                   pairs_file):
    import torch
    from transformers import AutoModelForSequenceClassification

    from common import make_llama

    other = make_llama(tmp_path / "ckpt2", tokenizer_dir, noise_from=tiny_llama, noise=0.05)
    rc, _, err = run_cli(capsys, "reward", "train", "--base-model", f"{tiny_llama},{other}",
                         "--num-models", "2", "--pairs", pairs_file, "--out", tmp_path / "bk",
                         "--max-steps", "1", "--lr", "1e-9", "--no-progress", "--seq-len", "32")
    assert rc == 0, err
    a, b = (AutoModelForSequenceClassification.from_pretrained(tmp_path / "bk" / f"rm-0{i}")
            for i in range(2))
    assert torch.allclose(a.score.weight, b.score.weight, atol=1e-6)  # one head init
    emb = "model.embed_tokens.weight"
    da = (a.state_dict()[emb] - b.state_dict()[emb]).abs().max()
    assert float(da) > 0.01  # bodies come from different checkpoints
    metas = [json.loads((tmp_path / "bk" / f"rm-0{i}" / "reward.json").read_text())
             for i in range(2)]
    assert metas[0]["init_from"] != metas[1]["init_from"]
    assert metas[0]["init_group"] == metas[1]["init_group"]


def test_baklava_needs_one_init_per_model(capsys, tmp_path, tiny_llama, pairs_file):
    assert_user_error(capsys, "reward", "train", "--base-model", f"{tiny_llama},{tiny_llama}",
                      "--num-models", "3", "--pairs", pairs_file, "--out", tmp_path / "x",
                      match="--base-model")
