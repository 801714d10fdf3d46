"""`lmalloy merge search`: choose a merge's coefficients on held-out data.

The config is a merge YAML whose parameters may be ranges or choices (`lmalloy.merge.space`).
A nevergrad optimizer (`lmalloy.merge.optimizer`) asks for one candidate at a time; the
candidate is planned like any merge (`lmalloy.merge.plan`: a value that breaks a
per-tensor rule makes that candidate infeasible, not the search), merged by the engine
(`lmalloy.merge.engine`) and scored by lmalloy's evaluator (`lmalloy.train.heldout`):

- `loss`: the held-out loss over every token of the corpus/domains pooled (big domains
  weigh more); `mean-domain-loss`: each domain's loss on up to --eval-tokens of its own,
  averaged (every domain counts alike); both on the split training makes (`--val-fraction`,
  `--split-seed`), minimised;
- `accuracy` / `accuracy-norm`: multiple choice on a JSONL, each choice ranked by its summed
  / per-token mean log-likelihood after the context (lm-evaluation-harness' acc; per token
  where it divides by characters), maximised.

A candidate is merged straight into the weights of one model loaded once (the engine writes
into a `StateSink` over the model's own tensors: no second copy, no disk), or, where the
merged tensors do not match the model's one to one (a re-indexed vocabulary, a layout that
transformers converts on load) or `--no-in-memory`, streamed into one scratch folder beside
the output, replaced by each candidate, and loaded from there.

Every candidate is appended to a log (`search.jsonl`, one JSON line, fsynced) in a work
folder beside the output, `.<out>.search/`. After a kill, `--resume` replays the log: the
seeded optimizer is asked again and told each logged score, so it continues exactly as an
uninterrupted search would (where it asks something else — a changed budget can change
NGOpt's choice of algorithm — the logged candidates are told as such), and only the rest of
the budget is evaluated. A log written for another search space, objective, data or inputs
is refused. The best candidate is then merged into `--out` by the engine (atomically) with
`merge.yaml` (the plain merge YAML of the chosen values: `lmalloy merge merge.yaml` makes
the same tensors), the log and `search.png` (score against evaluation, best so far).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.merge.config import MergeConfig, SearchConfig

# settings that may change between a killed search and its --resume
VOLATILE = ("budget", "resume", "overwrite", "progress", "threads", "in_memory",
            "max_shard_size", "num_proc", "out")
# the fields of a merge (as opposed to its evaluation), written to merge.yaml when set
MERGE_KEYS = ("method", "base_model", "models", "parameters", "dtype", "compute_dtype",
              "chat_template", "tokenizer_source", "tokenizer_pad_to", "ties_trim", "seed")


@dataclass
class Objective:
    name: str
    maximize: bool
    score: Callable  # model -> {"value": float, ...details}
    what: str  # for people: what is scored


@dataclass
class Search:
    cfg: SearchConfig
    space: list  # (Variable, kind: "float" | "int" | "choice")
    out: Path
    work: Path  # .<out>.search: the log and the scratch folder
    objective: Objective
    header: dict
    records: list = field(default_factory=list)  # logged candidates (a resumed search's)
    fresh: bool = True  # no log to continue: the work folder is made anew

    @property
    def log(self) -> Path:
        return self.work / "search.jsonl"

    @property
    def scratch(self) -> Path:
        return self.work / "scratch"


# ------------------------------------------------------------------ checks


def check_space(cfg: SearchConfig, method) -> list:
    """(variable, kind) per search value, each checked against the method's parameter: one
    it takes, where it takes it, and both ends of a range (or every choice) valid."""
    from lmalloy.merge.plan import check_param_names

    check_param_names(cfg, method)
    per_model = {p.name: p for p in method.model_params}
    specs = {**{p.name: p for p in method.global_params}, **per_model}
    out = []
    for v in cfg.variables:
        spec = specs[v.param]
        if v.model is not None and v.param not in per_model:
            raise UserError(f"`{v.path}`: `{v.param}` is a global parameter of "
                            f"`{cfg.method}`; search it under the top-level `parameters:`")
        if v.choices is not None:
            for c in v.choices:
                c = float(c) if spec.kind == "float" and type(c) is int else c
                if err := spec.check(c, ""):
                    raise UserError(f"`{v.path}` choice {c!r}: {err}")
            out.append((v, "choice"))
            continue
        if spec.kind == "bool":
            raise UserError(f"`{v.path}`: `{v.param}` is true or false; search it with "
                            "`choice: [true, false]`")
        for x in (v.low, v.high):
            if err := spec.check(int(x) if spec.kind == "int" and x == int(x) else x, ""):
                raise UserError(f"`{v.path}` range [{v.low:g}, {v.high:g}]: {err}")
        out.append((v, spec.kind))
    return out


def start_values(space: list) -> dict:
    """{path: where the optimizer starts} (whole numbers rounded)."""
    return {v.path: round(v.start) if kind == "int" else v.start for v, kind in space}


def candidate(cfg: SearchConfig, values: dict, out: Path, overwrite: bool = True,
              progress: bool = False) -> MergeConfig:
    """The plain merge config of one candidate (`values`: {variable path: value})."""
    from pydantic import ValidationError

    from lmalloy.config import format_validation_error

    params, models = cfg.concrete(values)
    data = cfg.model_dump(include=set(MergeConfig.model_fields))
    data.update(parameters=params, models=[m.model_dump() for m in models], weights=None,
                out=str(out), overwrite=overwrite, progress=progress)
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, MergeConfig)) from None


def _identity(cfg: SearchConfig, folders) -> dict:
    """What a log must have been written for: the config but for what may change, the
    inputs' weight files (size, modification time) and the choices file's digest."""
    fp = cfg.model_dump(mode="json", exclude=set(VOLATILE))
    fp["inputs"] = {str(f.path.resolve()): sorted([q.name, q.stat().st_size,
                                                   q.stat().st_mtime_ns] for q in f.files)
                    for f in folders}
    if cfg.choices:
        fp["choices_sha256"] = hashlib.sha256(Path(cfg.choices).read_bytes()).hexdigest()
    return fp


def read_log(path: Path) -> tuple[dict, list[dict]]:
    """(header, candidate records) of a search log; a last line cut short by a kill is
    dropped."""
    lines = path.read_bytes().split(b"\n")
    rows = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError:
            if i >= len(lines) - 1:  # the last line, written when the process died
                break
            raise UserError(f"{path} line {i}: not valid JSON; the search log is damaged"
                            ) from None
    if not rows or "lmalloy_search" not in rows[0]:
        raise UserError(f"{path}: not a `merge search` log (no header line)")
    recs = rows[1:]
    if [r.get("eval") for r in recs] != list(range(1, len(recs) + 1)):
        raise UserError(f"{path}: the candidates are not numbered 1, 2, ...; the log is "
                        "damaged")
    return rows[0], recs


def _resume_source(cfg: SearchConfig, work: Path) -> Path | None:
    """The log a --resume continues (the work folder's, else a finished output's)."""
    out = Path(cfg.out).resolve()
    if (work / "search.jsonl").is_file():
        return work / "search.jsonl"
    if (out / "search.jsonl").is_file():
        if not cfg.overwrite:
            raise UserError(f"--resume: {out} is a finished search; add --overwrite to "
                            "continue it (its output is replaced when the search ends)")
        return out / "search.jsonl"
    if cfg.resume:
        raise UserError(f"--resume: no search to resume ({work / 'search.jsonl'} does not "
                        "exist)")
    return None


def _check_log(cfg: SearchConfig, work: Path, header: dict) -> tuple[list, bool]:
    """(records to continue from, whether the search starts afresh)."""
    from lmalloy.config import diff_keys

    log = work / "search.jsonl"
    if not cfg.resume:
        if log.is_file() and not cfg.overwrite:
            raise UserError(f"an interrupted search left its log at {log}: pass --resume to "
                            "continue it, or --overwrite to start over")
        return [], True
    src = _resume_source(cfg, work)
    old, records = read_log(src)
    changed = diff_keys(old.get("identity", {}), header["identity"])
    if changed:
        raise UserError(f"--resume: {src} was written for another search (changed: "
                        f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
                        "start over with --overwrite, or choose another --out")
    return records, src != log


def make_objective(cfg: SearchConfig, ref) -> Objective:
    """The objective, its data read and checked (lengths, windows) before any weight."""
    from lmalloy.data.tokenizer import Tok
    from lmalloy.train import heldout as H

    if cfg.objective in ("accuracy", "accuracy-norm"):
        from lmalloy.data.jsonl import read_choices

        items = read_choices(cfg.choices)
        rows = H.choice_rows(Tok.load(cfg.base_model or cfg.models[0].model), items)
        limit = ref.context_length
        for i, per in enumerate(rows, 1):
            n = max(len(c) + len(x) for c, x in per)
            if limit is not None and n > limit:
                raise UserError(f"{cfg.choices} item {i} is {n} tokens with its longest "
                                f"choice, above the model's context of {limit}")
        norm = cfg.objective == "accuracy-norm"

        def accuracy(model) -> dict:
            r = H.choice_accuracy(model, rows, items, norm)
            return {"value": r["accuracy"], "answer_logprob": r["answer_logprob"]}

        return Objective(cfg.objective, True, accuracy, f"{cfg.objective} on the "
                         f"{len(items)} items of {cfg.choices}")
    from lmalloy.merge.greedy import heldout_tokens

    ref.check_seq_len(cfg.seq_len)
    tokens, spans, tb = heldout_tokens(cfg)
    args = (cfg.seq_len, cfg.eval_tokens, tb)
    split = f"{cfg.eval_split} split at --val-fraction {cfg.val_fraction}"
    if cfg.objective == "loss":
        if not H.eval_windows(spans, cfg.seq_len, cfg.eval_tokens):
            raise UserError(f"no {split} window of --seq-len {cfg.seq_len} tokens to score")

        def loss(model) -> dict:
            r = H.evaluate(model, tokens, spans, *args)
            return {"value": r["loss"], "domains": {d: v["loss"] for d, v in
                                                    r["domains"].items()}}

        return Objective("loss", False, loss, f"the held-out loss of {', '.join(spans)} "
                         f"pooled ({split}, up to {cfg.eval_tokens:,} tokens)")
    for d, span in spans.items():
        if not H.eval_windows({d: span}, cfg.seq_len, cfg.eval_tokens):
            raise UserError(f"domain `{d}` has no {split} window of --seq-len {cfg.seq_len} "
                            "tokens to score")

    def mean_domain_loss(model) -> dict:
        rs = H.evaluate_domains(model, tokens, spans, *args)
        losses = {d: r["loss"] for d, r in rs.items()}
        return {"value": sum(losses.values()) / len(losses), "domains": losses}

    return Objective("mean-domain-loss", False, mean_domain_loss, f"each domain's held-out "
                     f"loss averaged over {', '.join(spans)} ({split}, up to "
                     f"{cfg.eval_tokens:,} tokens each)")


def prepare(cfg: SearchConfig) -> Search:
    """Every check, cheapest first, before any weight is read (the corpus is packed)."""
    from lmalloy.io.writer import check_output
    from lmalloy.merge.lora import is_adapter
    from lmalloy.merge.methods import METHODS
    from lmalloy.merge.optimizer import check_optimizer, nevergrad
    from lmalloy.merge.plan import plan

    for m in cfg.models:
        if is_adapter(m.model):
            raise UserError(f"{m.model} is a PEFT adapter; `merge search` merges full models "
                            "(for adapters: `merge lorahub`)")
    space = check_space(cfg, METHODS[cfg.method])
    work = Path(cfg.out).resolve().parent / f".{Path(cfg.out).name}.search"
    if cfg.resume:
        _resume_source(cfg, work)  # a clear line before the output check's
    out = check_output(cfg.out, cfg.overwrite, [m.model for m in cfg.models]
                       + ([cfg.base_model] if cfg.base_model else []))
    p = plan(candidate(cfg, start_values(space), work / "scratch"))  # the whole merge, at the start point
    try:
        header = {"lmalloy_search": 1, "identity": _identity(cfg, p.inputs),
                  "variables": [v.describe() for v, _ in space]}
        records, fresh = _check_log(cfg, work, header)
        objective = make_objective(cfg, p.ref)
    finally:
        for f in p.inputs:
            f.close()
    check_optimizer(nevergrad("merge search"), cfg.optimizer)
    header.update(objective=objective.name, maximize=objective.maximize,
                  optimizer=cfg.optimizer, search_seed=cfg.search_seed)
    return Search(cfg, space, out, work, objective, header, records, fresh)


# ------------------------------------------------------------------ evaluation


def model_targets(model, p) -> dict | None:
    """{tensor name: the model's own tensor} when every merged tensor has one of its name
    and shape and every parameter is covered (tied ones through their owner), else None."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers())
    targets = {}
    for tp in p.tensors:
        t = named.get(tp.name)
        if t is None or tuple(t.shape) != tuple(tp.shape) or not t.is_contiguous():
            return None
        targets[tp.name] = t
    covered = {id(t) for t in targets.values()}
    if any(id(q) not in covered for q in model.parameters()):
        return None
    return targets


class Evaluator:
    """Merges candidates and scores them: in memory into one loaded model where its tensors
    match the merged ones, else through the scratch folder."""

    def __init__(self, s: Search):
        self.s = s
        self.model = None
        self.targets = None
        self.in_memory = s.cfg.in_memory

    def load(self) -> None:
        """The model candidates are merged into (unless they go through the scratch folder),
        loaded once, before the first candidate."""
        from lmalloy.io.models import load_causal_lm
        from lmalloy.merge.plan import plan

        if self.in_memory is False:
            return
        p = plan(candidate(self.s.cfg, start_values(self.s.space), self.s.scratch))
        try:
            self.model = load_causal_lm(p.ref.path)
            self.targets = model_targets(self.model, p)
        finally:
            for f in p.inputs:
                f.close()
        if self.targets is None:
            if self.in_memory:
                raise UserError("--in-memory: the model's tensors do not match the merged "
                                "ones by name and shape (a converted layout or a re-indexed "
                                "vocabulary); use --no-in-memory")
            self.model = None
        self.in_memory = self.targets is not None

    def merged(self, p):
        """The merged model of a candidate's plan."""
        from lmalloy.average.weighted import StateSink, one_torch_thread
        from lmalloy.io.models import load_causal_lm
        from lmalloy.merge.engine import execute, merge_into

        if self.in_memory:
            merge_into(p, StateSink(self.targets))
            return self.model
        with one_torch_thread():
            execute(p)
        return load_causal_lm(self.s.scratch)

    def __call__(self, values: dict, k: int) -> dict:
        """The log record of candidate `k`: its values, score (None where the values break a
        rule of the method or give NaN/Inf: infeasible), times."""
        from lmalloy.merge.plan import plan

        rec = {"eval": k, "params": values}
        t0 = time.perf_counter()
        try:
            p = plan(candidate(self.s.cfg, values, self.s.scratch))
        except UserError as e:
            rec.update(score=None, error=str(e), merge_s=0.0, eval_s=0.0)
            return rec
        t1 = None
        try:
            model = self.merged(p)
            t1 = time.perf_counter()
            res = self.s.objective.score(model)
        except UserError as e:
            if "NaN or Inf" not in str(e) and "non-finite" not in str(e):
                raise
            rec.update(score=None, error=str(e))
        else:
            v = res.pop("value")
            rec.update(value=v, score=-v if self.s.objective.maximize else v, **res)
        t2 = time.perf_counter()
        t1 = t1 or t2
        rec.update(merge_s=round(t1 - t0, 3), eval_s=round(t2 - t1, 3))
        return rec


# ------------------------------------------------------------------ the search


def parametrization(ng, space: list):
    """A nevergrad Dict of the variables: bounded scalars (log-scaled, whole numbers) and
    choices, keyed by path."""
    parts = {}
    for v, kind in space:
        if kind == "choice":
            parts[v.path] = ng.p.Choice(list(v.choices))
        elif v.log:
            parts[v.path] = ng.p.Log(init=v.start, lower=v.low, upper=v.high)
        else:
            parts[v.path] = ng.p.Scalar(init=round(v.start) if kind == "int" else v.start,
                                        lower=v.low, upper=v.high)
            if kind == "int":
                parts[v.path].set_integer_casting()
    return ng.p.Dict(**parts)


def plain(value: dict) -> dict:
    """A candidate's values as JSON numbers and booleans (not numpy's)."""
    out = {}
    for k, x in value.items():
        if hasattr(x, "item"):
            x = x.item()
        out[k] = float(x) if isinstance(x, float) else x
    return out


def penalty(records: list, maximize: bool) -> float:
    """What an infeasible candidate is told: the worst score seen (no better than any)."""
    seen = [r["score"] for r in records if r.get("score") is not None]
    return max(seen) if seen else (0.0 if maximize else 1e3)


def replay(opt, records: list) -> str:
    """Tell the optimizer the logged candidates. Asked again, a seeded optimizer asks the
    same candidates; from the first one it does not, the rest are told as not asked."""
    n = 0
    for r in records:
        c = opt.ask()
        if plain(c.value) != r["params"]:
            break
        opt.tell(c, r["told"])
        n += 1
    if n == len(records):
        return "replayed"
    try:
        for r in records[n:]:
            opt.tell(opt.parametrization.spawn_child(new_value=r["params"]), r["told"])
    except Exception as e:  # nevergrad's TellNotAskedNotSupportedError and the like
        raise UserError(f"--resume: optimizer `{opt.name}` takes back only the candidates "
                        f"it asks ({type(e).__name__}); resume with the first run's --budget"
                        ) from None
    return f"{n} replayed, {len(records) - n} told"


def _line(s: Search, rec: dict, best: dict | None) -> str:
    o = s.objective
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in rec["params"].items())
    got = (f"{o.name} {rec['value']:.4f}" if rec.get("score") is not None
           else f"infeasible ({rec['error']})")
    if "repeat_of" in rec:
        got += f" (asked again: #{rec['repeat_of']}'s score)"
    tail = f"; best {best['value']:.4f} (#{best['eval']})" if best else ""
    return f"search {rec['eval']}/{s.cfg.budget}: {got}{tail}  [{shown}]"


def best_of(records: list) -> dict | None:
    ok = [r for r in records if r.get("score") is not None]
    return min(ok, key=lambda r: (r["score"], r["eval"])) if ok else None


def _append(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _step(s: Search, opt, ev: Evaluator, records: list) -> dict:
    """Ask one candidate, merge and score it (or, asked again, take its score from the
    log: the objective is deterministic), tell the optimizer, log it."""
    c = opt.ask()
    values = plain(c.value)
    same = next((r for r in records if r["params"] == values and "repeat_of" not in r), None)
    if same is not None:
        keep = ("score", "value", "error", "domains", "answer_logprob")
        rec = {"eval": len(records) + 1, "params": values, "repeat_of": same["eval"],
               **{k: same[k] for k in keep if k in same}, "merge_s": 0.0, "eval_s": 0.0}
    else:
        rec = ev(values, len(records) + 1)
    rec["told"] = rec["score"] if rec["score"] is not None else penalty(
        records, s.objective.maximize)
    opt.tell(c, rec["told"])
    _append(s.log, rec)
    records.append(rec)
    return rec


def run_search(s: Search) -> list:
    """Ask, merge, score, tell and log until the budget is spent; returns every record."""
    from lmalloy.merge.optimizer import nevergrad, optimizer, quiet

    ng = nevergrad("merge search")
    records = list(s.records)
    bar = None
    with quiet():
        opt = optimizer(ng, parametrization(ng, s.space), s.cfg.budget, s.cfg.optimizer,
                        s.cfg.search_seed)
        how = replay(opt, records)
        if records:
            print(f"merge search: resumed from {len(records)} logged candidate(s) ({how})",
                  file=sys.stderr)
        ev = Evaluator(s)
        if len(records) < s.cfg.budget:
            ev.load()
        if s.cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=s.cfg.budget, initial=len(records), desc="merge search",
                       unit="merge", file=sys.stderr, leave=False, disable=None)
        say = bar.write if bar is not None else (lambda m: print(m, file=sys.stderr))
        try:
            while len(records) < s.cfg.budget:
                rec = _step(s, opt, ev, records)
                best = best_of(records)
                say(_line(s, rec, best))
                if bar is not None:
                    bar.set_postfix_str(f"best {best['value']:.4f}" if best else
                                        "none feasible")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    return records


# ------------------------------------------------------------------ output


def plot(records: list, objective: Objective, title: str) -> bytes:
    """search.png: each candidate's score against its evaluation, and the best so far."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ok = [r for r in records if r.get("score") is not None]
    ax.scatter([r["eval"] for r in ok], [r["value"] for r in ok], s=16, color="tab:blue",
               label="candidate")
    best, xs, ys = None, [], []
    for r in records:
        if r.get("score") is not None and (best is None or r["score"] < best["score"]):
            best = r
        if best is not None:
            xs.append(r["eval"])
            ys.append(best["value"])
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    bad = len(records) - len(ok)
    if bad:
        ax.plot([], [], " ", label=f"{bad} infeasible (not shown)")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(objective.name + (" (higher is better)" if objective.maximize
                                    else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def merge_yaml(mcfg: MergeConfig, head: list[str]) -> str:
    """The chosen merge as a plain merge YAML in mergekit's shape (`merge_method`,
    `out_dtype`, `tokenizer.source`), only what differs from the defaults besides the
    models; `lmalloy merge` reads it back to the same merge."""
    import yaml

    d = mcfg.model_dump(mode="json", include=set(MERGE_KEYS))
    defaults = {k: f.default for k, f in MergeConfig.model_fields.items()}
    out: dict = {"merge_method": d.pop("method")}
    if d.get("base_model"):
        out["base_model"] = d["base_model"]
    out["models"] = [{"model": m["model"], **({"parameters": m["parameters"]}
                                               if m["parameters"] else {})}
                     for m in d.pop("models")]
    tok = {"source": d.pop("tokenizer_source"), "pad_to_multiple_of": d.pop("tokenizer_pad_to")}
    names = {"dtype": "out_dtype"}
    for k, v in d.items():
        if k != "base_model" and v != defaults[k]:
            out[names.get(k, k)] = v
    if any(v is not None for v in tok.values()):
        out["tokenizer"] = {k: v for k, v in tok.items() if v is not None}
    return "".join(f"# {x}\n" for x in head) + yaml.safe_dump(out, sort_keys=False)


def write_best(s: Search, records: list, seconds: float) -> dict:
    """The best candidate merged into --out by the engine, with merge.yaml, the log and
    search.png; the work folder removed. Returns the best record."""
    from lmalloy.average.weighted import one_torch_thread
    from lmalloy.merge.engine import execute
    from lmalloy.merge.plan import plan

    best = best_of(records)
    if best is None:
        raise UserError(f"no candidate of the {len(records)} evaluated could be merged and "
                        f"scored; the first failed with: {records[0]['error']}")
    o = s.objective
    first = records[0]
    head = [f"lmalloy merge search: the best of {len(records)} candidates by {o.what}: "
            f"{o.name} {best['value']:.6g} (evaluation {best['eval']}; the first "
            f"candidate: {first['value']:.6g})" if first.get("score") is not None else
            f"lmalloy merge search: the best of {len(records)} candidates by {o.what}: "
            f"{o.name} {best['value']:.6g} (evaluation {best['eval']})",
            f"searched {', '.join(v.describe() for v, _ in s.space)} with nevergrad "
            f"{s.cfg.optimizer} (seed {s.cfg.search_seed}) in {duration(seconds)}",
            "`lmalloy merge merge.yaml --out DIR` makes this merge again"]
    mcfg = candidate(s.cfg, best["params"], s.out, s.cfg.overwrite, s.cfg.progress)
    p = plan(mcfg)
    p.notes = head[:2]
    p.files = {"merge.yaml": merge_yaml(mcfg, head), "search.jsonl": s.log.read_text(),
               "search.png": plot(records, o, f"merge search: {s.cfg.method}, "
                                  f"{s.cfg.optimizer}, {len(records)} evaluations")}
    with one_torch_thread():
        execute(p)
    shutil.rmtree(s.work, ignore_errors=True)
    return best


def _start(s: Search) -> None:
    """The work folder, made anew unless a log there is continued, and the log rewritten as
    its header and the records to continue from (a line a kill cut short is gone)."""
    from lmalloy.io.writer import atomic_write_text

    if s.fresh:
        shutil.rmtree(s.work, ignore_errors=True)
    s.work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(s.log, "".join(json.dumps(x) + "\n" for x in [s.header, *s.records]))


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _lock(path: Path):
    """An exclusive lock on `path`, or a UserError if another search holds it."""
    import fcntl

    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another `merge search` is running with this --out ({path} is "
                        "locked)") from None
    return f


def _summary(s: Search, records: list, best: dict, seconds: float, wall: float) -> str:
    o, n = s.objective, len(records)
    chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in best["params"].items())
    return (f"merge search: best {o.name} {best['value']:.4f} at evaluation {best['eval']} "
            f"of {n} ({chosen}); {duration(seconds)} of merging and scoring "
            f"({seconds / max(n, 1):.1f} s a candidate), {duration(wall)} this run "
            f"-> {s.out}")


def main(cfg: SearchConfig) -> int:
    s = prepare(cfg)
    t0 = time.perf_counter()
    s.work.parent.mkdir(parents=True, exist_ok=True)
    lock_path = s.work.parent / f".{s.out.name}.search.lock"
    lock = _lock(lock_path)
    try:
        _start(s)
        print(f"merge search: {'; '.join(v.describe() for v, _ in s.space)}; "
              f"{cfg.budget} evaluations of {s.objective.what}; log {s.log}", file=sys.stderr)
        records = run_search(s)
        spent = sum(r["merge_s"] + r["eval_s"] for r in records)
        best = write_best(s, records, spent)
    finally:
        lock.close()
    lock_path.unlink(missing_ok=True)
    print(_summary(s, records, best, spent, time.perf_counter() - t0), file=sys.stderr)
    return 0
