"""`lmalloy reward eval`: individual RMs vs their prediction ensemble vs WARM.

Measures what WARM (arXiv 2401.12187) claims, side by side:

- **pairwise accuracy** per test file and per `distribution` (a tie counts one half), for
  each RM, the mean and best of the individual RMs, the ensemble ENS (mean of the M
  scores, M forward passes) and WARM (the weight average, one forward pass);
- **memorisation**: on the training pairs whose labels were flipped, the share where the
  model agrees with the *wrong* label (lower is better: WARM's section 4.2 finding is that
  weight averaging memorises corrupted labels less than ensembling);
- **best-of-N**: a policy LM samples N answers per prompt, each selector picks its
  highest-scoring answer, and a gold RM (trained on clean labels) judges pairs of picks.
  The win rate of A over B counts a tie (same answer, or equal gold score) as one half;
  its 95% interval is the normal one over prompts (the prompt is the independent unit).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from lmalloy.errors import UserError

# ----------------------------------------------------------------------------- bookkeeping


def pair_outcomes(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when r_c > r_r, 0.5 on a tie, else 0."""
    return (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with r_c > r_r, ties counting one half."""
    return float(pair_outcomes(r_chosen, r_rejected).mean())


def ensemble(scores: list[torch.Tensor]) -> torch.Tensor:
    """ENS: the mean of the models' scores (same shape as each)."""
    return torch.stack(scores).mean(0)


def best_of_n(scores_PN: torch.Tensor) -> torch.Tensor:
    """Index of the highest-scoring of N answers per prompt (the first on ties): (P,)."""
    return scores_PN.argmax(-1)


def win_rate(gold_PN: torch.Tensor, picks_a: torch.Tensor | list[torch.Tensor],
             picks_b: torch.Tensor | list[torch.Tensor]) -> dict:
    """Win rate of selector A's picks over B's as judged by gold scores (P, N).

    A list of pick vectors on either side averages the per-prompt outcome over them
    (e.g. WARM against each of M single RMs); the interval stays one over prompts.
    """
    a_list = picks_a if isinstance(picks_a, list) else [picks_a]
    b_list = picks_b if isinstance(picks_b, list) else [picks_b]
    rows = torch.arange(gold_PN.shape[0])
    outcome = torch.zeros(gold_PN.shape[0])
    wins = ties = losses = 0
    for a in a_list:
        for b in b_list:
            ga, gb = gold_PN[rows, a], gold_PN[rows, b]
            o = (ga > gb).float() + 0.5 * (ga == gb).float()
            outcome += o
            wins += int((ga > gb).sum())
            ties += int((ga == gb).sum())
            losses += int((ga < gb).sum())
    outcome /= len(a_list) * len(b_list)
    n = len(outcome)
    rate = float(outcome.mean())
    half = 1.96 * float(outcome.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return {"rate": rate, "lo": max(0.0, rate - half), "hi": min(1.0, rate + half),
            "prompts": n, "wins": wins, "ties": ties, "losses": losses}


def summarize(values: dict[str, float], singles: list[str], lower_is_better: bool = False
              ) -> dict[str, float]:
    """Add `mean` and `best` of the individual RMs to one row of results."""
    xs = [values[s] for s in singles]
    return {**values, "mean": sum(xs) / len(xs), "best": min(xs) if lower_is_better else max(xs)}


# ----------------------------------------------------------------------------- models


def _load_warm(cfg, models, folders):
    """The WARM folder given, or the uniform weight average of the RMs, written by the same
    streaming average as `reward warm` to a scratch folder and loaded from it."""
    import tempfile

    from lmalloy.average.weighted import Combination, averaged_model
    from lmalloy.reward.model import load_reward_model

    if cfg.warm:
        return load_reward_model(cfg.warm)
    from lmalloy.reward.warm import check_compatible

    check_compatible(folders)
    with tempfile.TemporaryDirectory() as d, averaged_model(
            folders, Combination.uniform(len(folders)), load_reward_model, Path(d) / "warm",
            folders[0]) as warm:
        return warm


def sample_answers(policy_path: str, prompts: list[str], n: int, max_new_tokens: int,
                   temperature: float, top_k: int | None, seed: int) -> list[list[str]]:
    """N sampled answers per prompt from a causal LM (stopped at EOS), as text."""
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.models import load_causal_lm

    model = load_causal_lm(policy_path)
    tok = Tok.load(policy_path)
    torch.manual_seed(seed)
    out = []
    for p in prompts:
        ids = tok.encode(p) or [tok.eos_id]
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                               temperature=temperature, top_k=top_k or 0,
                               max_new_tokens=max_new_tokens, num_return_sequences=n,
                               pad_token_id=tok.pad_id if tok.pad_id is not None else tok.eos_id,
                               eos_token_id=tok.eos_id)
        answers = []
        for row in y[:, len(ids) :].tolist():
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            answers.append(tok.decode([t for t in row if t != tok.pad_id]))
        out.append(answers)
    return out


# ----------------------------------------------------------------------------- main


def _groups(path: str, pairs) -> dict[str, list[int]]:
    stem = Path(path).stem
    g: dict[str, list[int]] = {stem: list(range(len(pairs)))}
    dists = sorted({p.distribution for p in pairs if p.distribution})
    if len(dists) > 1:
        for d in dists:
            g[f"{stem}/{d}"] = [i for i, p in enumerate(pairs) if p.distribution == d]
    return g


def _check_inputs(cfg) -> None:
    from lmalloy.io.folder import open_model

    for p in [cfg.warm, cfg.gold]:
        if p is not None:
            from lmalloy.reward.model import check_reward_folder

            check_reward_folder(p)
    if cfg.policy is not None:
        m = open_model(cfg.policy)
        archs = m.config.get("architectures") or []
        if archs and not archs[0].endswith("ForCausalLM"):
            raise UserError(f"--policy {cfg.policy}: {archs[0]} is not a causal LM")
        if not (Path(cfg.policy) / "tokenizer.json").is_file():
            raise UserError(f"--policy {cfg.policy} has no tokenizer.json")


def evaluate(cfg) -> dict:
    """Every measurement of `reward eval` as one dict (see the module docstring)."""
    from lmalloy.io.folder import open_model
    from lmalloy.reward.data import read_pairs
    from lmalloy.reward.model import Encoder, check_reward_folder, load_reward_model, score
    from lmalloy.reward.warm import resolve_models

    paths = resolve_models(cfg.models)
    for p in paths:
        check_reward_folder(p)
    tests = {f: read_pairs(f) for f in cfg.pairs}
    train = read_pairs(cfg.train_pairs) if cfg.train_pairs else None
    _check_inputs(cfg)
    folders = [open_model(p) for p in paths]
    names = [p.name for p in paths]
    reserved = {"warm", "ensemble", "mean", "best", "pairs"}
    if len(set(names)) < len(names) or reserved & set(names):  # e.g. rm-00 of two runs
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    models = [load_reward_model(p) for p in paths]
    sel: dict[str, object] = dict(zip(names, models, strict=True))
    if len(models) >= 2:
        sel["warm"] = _load_warm(cfg, models, folders)
    elif cfg.warm:
        sel["warm"] = load_reward_model(cfg.warm)
    enc = Encoder(paths[0], models[0].config.pad_token_id, cfg.seq_len)

    def all_scores(prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        seqs = enc(prompts, answers)
        s = {k: score(m, seqs, enc.pad_id, cfg.batch_size) for k, m in sel.items()}
        if len(models) >= 2:
            s["ensemble"] = ensemble([s[n] for n in names])
        return s

    def accuracy_rows(pairs, groups, lower_is_better: bool = False) -> dict[str, dict]:
        sc = all_scores([p.prompt for p in pairs], [p.chosen for p in pairs])
        sr = all_scores([p.prompt for p in pairs], [p.rejected for p in pairs])
        rows = {}
        for g, idx in groups.items():
            ix = torch.tensor(idx)
            row = {k: pairwise_accuracy(sc[k][ix], sr[k][ix]) for k in sc}
            row = summarize(row, names, lower_is_better)
            row["pairs"] = len(idx)
            if cfg.per_pair:
                row["outcomes"] = {k: pair_outcomes(sc[k][ix], sr[k][ix]).tolist() for k in sc}
            rows[g] = row
        return rows

    res: dict = {"models": names, "selectors": list(sel) + (["ensemble"] if len(models) >= 2
                                                            else []), "accuracy": {}}
    for f, pairs in tests.items():
        res["accuracy"].update(accuracy_rows(pairs, _groups(f, pairs)))
    if train is not None:
        flipped = [p for p in train if p.flipped]
        clean = [p for p in train if not p.flipped]
        if flipped:
            res["memorisation"] = accuracy_rows(
                flipped, {"flipped": list(range(len(flipped)))}, lower_is_better=True)["flipped"]
        if clean:
            res["train_clean_accuracy"] = accuracy_rows(clean, {"clean": list(range(len(clean)))}
                                                        )["clean"]
    if cfg.policy is not None:
        res["best_of_n"] = best_of_n_eval(cfg, tests, all_scores, names)
    return res


def best_of_n_eval(cfg, tests, all_scores, names) -> dict:
    from lmalloy.reward.model import Encoder, load_reward_model, score

    prompts: list[str] = []
    for pairs in tests.values():
        for p in pairs:
            if p.prompt not in prompts:
                prompts.append(p.prompt)
    prompts = prompts[: cfg.bon_prompts]
    N = cfg.bon_n
    answers = sample_answers(cfg.policy, prompts, N, cfg.max_new_tokens, cfg.temperature,
                             cfg.top_k, cfg.seed)
    flat_p = [p for p in prompts for _ in range(N)]
    flat_a = [a for row in answers for a in row]
    s = {k: v.view(len(prompts), N) for k, v in all_scores(flat_p, flat_a).items()}
    gold = load_reward_model(cfg.gold)
    genc = Encoder(cfg.gold, gold.config.pad_token_id, cfg.seq_len)
    gold_PN = score(gold, genc(flat_p, flat_a), genc.pad_id, cfg.batch_size).view(len(prompts), N)
    picks = {k: best_of_n(v) for k, v in s.items()}
    rows = torch.arange(len(prompts))
    out: dict = {"n": N, "prompts": len(prompts),
                 "gold_of_pick": {k: float(gold_PN[rows, p].mean()) for k, p in picks.items()},
                 "gold_random": float(gold_PN.mean()), "gold_best": float(gold_PN.max(-1)
                                                                            .values.mean())}
    singles = [picks[n] for n in names]
    wr = {}
    if "warm" in picks:
        wr["warm_vs_single"] = win_rate(gold_PN, picks["warm"], singles)
    if "ensemble" in picks:
        wr["ensemble_vs_single"] = win_rate(gold_PN, picks["ensemble"], singles)
        wr["warm_vs_ensemble"] = win_rate(gold_PN, picks["warm"], picks["ensemble"])
    out["win_rate"] = wr
    out["examples"] = [{"prompt": prompts[i], **{k: answers[i][int(picks[k][i])]
                                                 for k in ("warm", names[0]) if k in picks}}
                       for i in range(min(2, len(prompts)))]
    return out


def _table(res: dict) -> str:
    cols = res["models"] + ["mean", "best"] + [c for c in ("ensemble", "warm")
                                               if c in res["selectors"]]
    lines = ["accuracy".ljust(28) + "".join(f"{c:>10}" for c in cols) + f"{'pairs':>8}"]
    rows = list(res["accuracy"].items())
    if "memorisation" in res:
        rows.append(("memorisation (flipped)", res["memorisation"]))
    for g, r in rows:
        lines.append(f"{g[:28]:<28}" + "".join(f"{r[c]:>10.3f}" for c in cols)
                     + f"{r['pairs']:>8}")
    bon = res.get("best_of_n")
    if bon:
        lines.append(f"best-of-{bon['n']} on {bon['prompts']} prompts, gold score of the pick: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in bon["gold_of_pick"].items())
                     + f" (random {bon['gold_random']:.3f})")
        for k, w in bon["win_rate"].items():
            lines.append(f"win rate {k.replace('_', ' ')}: {100 * w['rate']:.1f}% "
                         f"[{100 * w['lo']:.1f}, {100 * w['hi']:.1f}] "
                         f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
    return "\n".join(lines)


def main(cfg) -> int:
    from lmalloy.io.writer import atomic_write_text, check_output_file

    if cfg.out:
        check_output_file(cfg.out, cfg.overwrite)
    res = evaluate(cfg)
    print(_table(res))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(res, indent=1) + "\n", overwrite=cfg.overwrite)
        print(f"results -> {cfg.out}", file=sys.stderr)
    return 0
