"""Fault injection: SIGKILL at seeded random moments of merge, average, reward warm,
pretrain --overwrite and eval's cache build.

Each run is a real process (forked from a forkserver that imported torch and lmalloy once,
so a kill costs milliseconds, not an interpreter start) killed with SIGKILL while it
writes: the moment is a seeded random delay after its temporary output appears. After
every kill: no folder that looks complete (not hidden) is corrupt (every header parses,
every tensor reads, a pack cache's files have the sizes its meta promises), and the output
the user had before (written first, replaced with --overwrite) is either untouched or the
complete new one. The counts of kills that landed before the end are asserted.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import make_llama

KILLS = 10


def _child(args: list[str], env: dict, stdout: str | None = None) -> None:
    os.environ.update(env)
    import sys

    from lmalloy.cli import main

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the child dies with it
    if stdout:
        sys.stdout = open(stdout, "w")  # noqa: SIM115
    rc = main(args)
    sys.stdout.flush()
    os._exit(rc)


@pytest.fixture(scope="module")
def ctx():
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["torch", "transformers", "safetensors", "lmalloy.cli",
                              "lmalloy.merge.engine", "lmalloy.average.weighted",
                              "lmalloy.train.run", "lmalloy.eval.perplexity"])
    return c


def _digest(folder: Path):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes()) for p in folder.rglob("*")
                  if p.is_file())


def _check_complete(parent: Path) -> int:
    """Every visible model folder under `parent` opens and reads; returns how many."""
    from lmalloy.io.folder import open_model

    n = 0
    for cfg in parent.rglob("config.json"):
        folder = cfg.parent
        if any(part.startswith(".") for part in folder.relative_to(parent).parts):
            continue
        m = open_model(folder)
        for name in m.names():
            m.read(name)
        json.loads(cfg.read_text())
        n += 1
    return n


def _wait_for_tmp(p, watch: Path) -> None:
    """Until something hidden and temporary appears in `watch` (or the process ends)."""
    deadline = time.time() + 60
    while p.is_alive() and time.time() < deadline:
        if watch.is_dir() and any(q.name.startswith(".") and ".tmp-" in q.name
                                  for q in watch.iterdir()):
            return
        time.sleep(0.001)


def _kill_at_random(ctx, args: list[str], watch: Path, rng: random.Random, window: float,
                    env: dict | None = None) -> bool:
    """Run `lmalloy args` and SIGKILL it a random delay in [0, 0.6·window] after its
    temporary output appears in `watch`; True if it was killed mid-run. (`window` is one
    measured run's; the 0.6 keeps most kills inside a run that a loaded machine makes
    faster or slower than that one.)"""
    p = ctx.Process(target=_child, args=(args, env or {}))
    p.start()
    _wait_for_tmp(p, watch)
    time.sleep(rng.uniform(0, 0.6 * window))
    alive = p.is_alive()
    p.kill()
    p.join()
    assert alive or p.exitcode == 0, f"the run failed before the kill ({p.exitcode}): {args}"
    return alive


def _run(ctx, args: list[str], env: dict | None = None, watch: Path | None = None,
         stdout: Path | None = None) -> float:
    """Run to the end; returns the seconds from its temporary output's appearance in
    `watch` (or from the start) to its exit: the window a kill can land in."""
    p = ctx.Process(target=_child, args=(args, env or {}, str(stdout) if stdout else None))
    t0 = time.perf_counter()
    p.start()
    if watch is not None:
        _wait_for_tmp(p, watch)
        t0 = time.perf_counter()
    p.join()
    assert p.exitcode == 0, args
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("faults")
    base = make_llama(d / "base", tokenizer_dir, hidden=256, layers=4, intermediate=768)
    fts = [make_llama(d / f"ft{i}", tokenizer_dir, hidden=256, layers=4, intermediate=768,
                      seed=i + 1, noise_from=base, noise=0.01) for i in range(3)]
    return d, base, fts


def _faults(ctx, tmp: Path, args_for, seed: int, check=_check_complete):
    """Write the output once, then KILLS overwrites killed at random: the old output
    survives or the new one is complete; no visible folder is corrupt."""
    out = tmp / "out"
    _run(ctx, args_for(out, False))
    dt = _run(ctx, args_for(out, True), watch=tmp)  # the writing window of an overwrite
    old = _digest(out)
    rng = random.Random(seed)
    mid = 0
    for _ in range(KILLS):
        mid += _kill_at_random(ctx, args_for(out, True), tmp, rng, dt)
        assert out.is_dir(), "the old output is gone"
        now = _digest(out)
        if now != old:  # replaced: only by a complete new output
            check(tmp)
            old = now
        check(tmp)
    return mid


@pytest.mark.slow
def test_kill_merge(ctx, models, tmp_path):
    _, base, fts = models

    def args(out, overwrite):
        return ["merge", "--method", "ties", "--base-model", str(base), "--models",
                ",".join(map(str, fts)), "--parameters", "weight=1,density=0.5", "--out",
                str(out), "--no-progress"] + (["--overwrite"] if overwrite else [])

    assert _faults(ctx, tmp_path, args, seed=1) >= KILLS // 2


@pytest.mark.slow
def test_kill_average(ctx, models, tmp_path):
    _, base, fts = models

    def args(out, overwrite):
        return ["average", *map(str, fts), "--out", str(out)] + (
            ["--overwrite"] if overwrite else [])

    assert _faults(ctx, tmp_path, args, seed=2) >= KILLS // 2


@pytest.mark.slow
def test_kill_reward_warm(ctx, models, tmp_path):
    from lmalloy.reward.model import reward_from_causal_lm
    from lmalloy.reward.train import init_group, save_reward_model

    d, base, fts = models
    rms = []
    for i, f in enumerate(fts):
        m = reward_from_causal_lm(f, head_seed=0)
        rms.append(tmp_path / "rms" / f"rm-{i:02d}")
        save_reward_model(m, rms[-1], f, {"init_group": init_group(m)})
    work = tmp_path / "w"
    work.mkdir()

    def args(out, overwrite):
        return ["reward", "warm", *map(str, rms), "--out", str(out)] + (
            ["--overwrite"] if overwrite else [])

    assert _faults(ctx, work, args, seed=3) >= KILLS // 2


@pytest.mark.slow
def test_kill_pretrain_overwrite(ctx, tmp_path, tokenizer_dir):
    from lmalloy.io.runs import list_checkpoints

    def check(parent: Path) -> None:
        _check_complete(parent)
        run = parent / "out"
        assert (run / "final" / "model.safetensors").is_file(), "the run has no final model"
        assert list_checkpoints(run), "the run lost its checkpoints"

    def args(out, overwrite):
        return ["pretrain", "--preset", "tiny", "--domains", "json", "--seq-len", "32",
                "--global-batch-tokens", "256", "--micro-batch-size", "4", "--max-steps",
                "12", "--eval-every", "3", "--eval-tokens", "512", "--tokenizer",
                str(tokenizer_dir), "--no-progress", "--threads", "1", "--out", str(out)] + (
            ["--overwrite", "--seed", "1"] if overwrite else [])

    assert _faults(ctx, tmp_path, args, seed=4, check=check) >= KILLS // 2


@pytest.mark.slow
def test_kill_eval_cache_build(ctx, tmp_path, tokenizer_dir):
    from lmalloy.data.pack import read_meta

    model = make_llama(tmp_path / "m", tokenizer_dir)
    cache = tmp_path / "cache"
    env = {"LMALLOY_CACHE": str(cache)}
    args = ["eval", str(model), "--domains", "email", "--eval-tokens", "2048", "--json"]
    (cache / "packed").mkdir(parents=True)
    dt = _run(ctx, args, env, watch=cache / "packed")
    ref = None
    rng = random.Random(5)
    mid = 0
    for _ in range(KILLS):
        shutil.rmtree(cache, ignore_errors=True)
        (cache / "packed").mkdir(parents=True)
        mid += _kill_at_random(ctx, args, cache / "packed", rng, dt, env)
        for folder in (cache / "packed").iterdir():  # a visible cache folder is complete
            if not folder.name.startswith("."):
                assert read_meta(folder) is not None, folder
        # and the next run (which cleans up after the killed one) gives the same numbers
        _run(ctx, args, env, stdout=tmp_path / "eval.json")
        loss = json.loads((tmp_path / "eval.json").read_text())[str(model)]["loss"]
        ref = loss if ref is None else ref
        assert loss == ref
        assert not [p for p in (cache / "packed").iterdir() if ".tmp-" in p.name]
    assert mid >= KILLS // 2


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path):
    """Only a dead writer's temporaries go; a live writer's stay; a swapped-out `.old-`
    copy whose output vanished is restored."""
    from lmalloy.io.writer import clean_stale_tmp

    dead = 2 ** 22 + 12345  # beyond pid_max's default: no such process
    (tmp_path / f".out.tmp-{dead}-abcd1234").mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}-abcd1234").mkdir()
    (tmp_path / f".gone.old-{dead}-abcd1234").mkdir()
    (tmp_path / f".gone.old-{dead}-abcd1234" / "config.json").write_text("{}")
    removed = clean_stale_tmp(tmp_path)
    assert [p.name for p in removed] == [f".out.tmp-{dead}-abcd1234"]
    assert (tmp_path / f".out.tmp-{os.getpid()}-abcd1234").is_dir()
    assert (tmp_path / "gone" / "config.json").is_file()


def test_concurrent_evals_on_different_corpora_share_nothing(tmp_path, tokenizer_dir):
    """Two evals with one tokenizer on different corpora, at once: each reports its own
    corpus's loss (the cache is keyed by corpus content, built under a lock)."""
    import subprocess
    import sys

    model = make_llama(tmp_path / "m", tokenizer_dir)
    env = {**os.environ, "LMALLOY_CACHE": str(tmp_path / "cache")}
    cmds = {d: [sys.executable, "-m", "lmalloy", "eval", str(model), "--domains", d,
                "--eval-tokens", "1024", "--json"] for d in ("json", "email")}
    alone = {}
    for d, c in cmds.items():
        env_d = {**env, "LMALLOY_CACHE": str(tmp_path / f"alone-{d}")}
        alone[d] = json.loads(subprocess.run(c, env=env_d, capture_output=True, text=True,
                                             check=True).stdout)[str(model)]["loss"]
    procs = {d: subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for d, c in cmds.items()}
    for d, p in procs.items():
        out, err = p.communicate()
        assert p.returncode == 0, err
        assert json.loads(out)[str(model)]["loss"] == alone[d]
    assert alone["json"] != alone["email"]


def test_weights_of_a_killed_merge_never_appear(models, tmp_path, ctx):
    """Sanity of the checker itself: a complete output reads, a truncated one fails."""
    _, base, fts = models
    out = tmp_path / "o"
    _run(ctx, ["average", *map(str, fts), "--out", str(out)])
    assert _check_complete(tmp_path) == 1
    sd = load_file(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    from lmalloy.errors import UserError

    with pytest.raises(UserError, match="truncated"):
        _check_complete(tmp_path)
