"""Each merge method's pure function against a small hand-written reference (tiny tensors).

The mergekit comparison on whole models is tests/test_merge_compat.py; these pin the
arithmetic itself: which entries are kept, the weights, the quantiles, the iterations.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from common import assert_user_error, make_llama
from lmalloy.merge.methods import (
    METHODS,
    Param,
    TensorCtx,
    della_check,
    della_probs,
    karcher_mean,
)

CTX = TensorCtx("model.layers.0.mlp.up_proj.weight")

# `mergekit list-merge-methods` (0.1.5): lmalloy has every one of them
MERGEKIT_METHODS = ("linear", "slerp", "nuslerp", "multislerp", "karcher", "passthrough",
                    "model_stock", "arcee_fusion", "nearswap", "sce", "ram", "ramplus_tl",
                    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear")


def run(name: str, xs, base=None, p=None, ctx=CTX, **g) -> torch.Tensor:
    """Call a method's function with its defaults filled in (as the engine resolves them)."""
    m = METHODS[name]
    xs = [torch.as_tensor(x, dtype=torch.float32) for x in xs]
    base = None if base is None else torch.as_tensor(base, dtype=torch.float32)
    p = p or [{} for _ in xs]
    p = [{s.name: q.get(s.name, s.default) for s in m.model_params} for q in p]
    g = {s.name: g.get(s.name, s.default) for s in m.global_params}
    assert all(v is not None for q in p for v in q.values()) and None not in g.values()
    return m.fn(xs, base, p, g, ctx)


def close(a, b, tol: float = 1e-6) -> None:
    b = torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


def test_every_mergekit_method_is_registered_with_a_paper():
    assert set(MERGEKIT_METHODS) <= set(METHODS)
    assert set(METHODS) - set(MERGEKIT_METHODS) == {"soup", "greedy_soup"}
    for name, m in METHODS.items():
        assert m.paper, name
        assert not (m.needs_base and m.optional_base), name


def test_int_parameter_rejects_fractions():
    p = Param("max_iter", 10, 0.0, kind="int")
    assert p.check(3, "") is None
    assert "whole number" in p.check(2.5, "")
    assert "[0, inf]" in p.check(-1, "")


# --------------------------------------------------------------------------- breadcrumbs

TAU = [[-1.0, 2.0, -3.0, 4.0, -5.0], [6.0, -7.0, 8.0, -9.0, 10.0]]  # |τ| = 1..10


def test_breadcrumbs_keeps_a_band_of_magnitudes():
    base = torch.full((2, 5), 0.5)
    x = base + torch.tensor(TAU)
    # n = 10, keep k = 5, drop the top ⌊0.2·10⌋ = 2 (|τ| 10, 9) and the bottom 3 (1, 2, 3)
    out = run("breadcrumbs", [x], base, [{"weight": 1.0, "density": 0.5, "gamma": 0.2}])
    keep = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    close(out, base + torch.tensor(TAU) * keep)
    # the top is dropped only as far as the density allows: k = 8 leaves room for 2 outliers
    out = run("breadcrumbs", [x], base, [{"weight": 1.0, "density": 0.8, "gamma": 0.5}])
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    close(out, base + torch.tensor(TAU) * keep)
    # density 1: nothing is dropped, outliers neither (as mergekit 0.1.5)
    out = run("breadcrumbs", [x], base, [{"weight": 2.0, "density": 1.0, "gamma": 0.3}])
    close(out, base + 2 * torch.tensor(TAU))


def test_breadcrumbs_ties_votes_and_normalizes():
    base = torch.zeros(1, 5)
    t1 = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    t2 = torch.tensor([[-5.0, 0.5, -6.0, 7.0, 200.0]])
    p = [{"weight": 1.0, "density": 0.8, "gamma": 0.2}] * 2  # drop each τ's largest entry
    out = run("breadcrumbs_ties", [t1, t2], base, p, normalize=True)
    # trimmed: t1 [1, 2, 3, 4, 0], t2 [-5, 0.5, -6, 7, 0]; signs of the sum: -, +, -, +, +
    close(out, [[-5.0, 1.25, -6.0, 5.5, 0.0]])
    out = run("breadcrumbs_ties", [t1, t2], base, p)  # normalize defaults to false
    close(out, [[-5.0, 2.5, -6.0, 11.0, 0.0]])


# --------------------------------------------------------------------------- della

def test_della_probabilities_follow_the_magnitude_rank_per_row():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 3.0, -2.0, 1.0]])
    pr = della_probs(x, 0.5, 0.15)
    ranks = torch.tensor([[0, 3, 2, 1], [3, 2, 1, 0]], dtype=torch.float32)
    close(pr, 0.35 + ranks / 3 * 0.3)
    close(della_probs(torch.tensor([1.0, -4.0, 2.0]), 0.4, 0.1), [0.3, 0.5, 0.4])  # one row
    close(della_probs(torch.ones(3, 1), 0.4, 0.1), torch.full((3, 1), 0.4))  # rows of one


def test_della_is_unbiased_and_keeps_large_entries_more_often():
    torch.manual_seed(0)
    base = torch.zeros(4, 32)
    tau = torch.randn(4, 32)
    p = [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}]
    outs = torch.stack([run("della_linear", [tau], base, p, ctx=TensorCtx(CTX.name, seed=s))
                        for s in range(600)])  # (S, 4, 32)
    # rescaled by 1/keep-probability: the mean over seeds is τ
    err = float((outs.mean(0) - tau).norm() / tau.norm())
    assert err < 0.08, err
    kept = (outs != 0).float().mean(0)  # per entry, ≈ its keep probability
    assert abs(float(kept.mean()) - 0.4) < 0.01
    big = tau.abs() == tau.abs().max(dim=1, keepdim=True).values
    small = tau.abs() == tau.abs().min(dim=1, keepdim=True).values
    assert abs(float(kept[big].mean()) - 0.6) < 0.05 and abs(float(kept[small].mean()) - 0.2) < 0.05
    # the same seed gives the same drops; another seed other drops
    a = run("della_linear", [tau], base, p, ctx=TensorCtx(CTX.name, seed=1))
    assert torch.equal(a, outs[1]) and not torch.equal(a, outs[2])
    # rescale off: survivors unchanged
    raw = run("della_linear", [tau], base, p, rescale=False)
    assert torch.equal(raw[raw != 0], tau[raw != 0])


def test_della_parameters_are_checked():
    assert della_check([{"density": 0.5, "epsilon": 0.15}], {}) is None
    assert della_check([{"density": 1.0, "epsilon": 0.4}], {}) is None  # no drops at all
    assert "density ± epsilon" in della_check([{"density": 0.9, "epsilon": 0.15}], {})
    assert "model 2" in della_check([{"density": 0.5, "epsilon": 0.1},
                                     {"density": 0.1, "epsilon": 0.1}], {})


def test_della_bad_epsilon_is_a_user_error_before_writing(capsys, tmp_path, tokenizer_dir):
    base = make_llama(tmp_path / "base", tokenizer_dir, seed=0)
    ft = make_llama(tmp_path / "ft", tokenizer_dir, seed=1, noise_from=base, noise=0.02)
    out = tmp_path / "out"
    assert_user_error(capsys, "merge", "--method", "della", "--base-model", base, "--models",
                      ft, "--weights", "1", "--parameters", "density=0.9,epsilon=0.2",
                      "--output", out, match="density ± epsilon must lie in (0, 1)")
    assert not out.exists()


def test_optional_base_is_taken_out_of_the_models(capsys, tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    from common import run_cli

    base = make_llama(tmp_path / "base", tokenizer_dir, seed=0)
    fts = [make_llama(tmp_path / f"ft{i}", tokenizer_dir, seed=i + 1, noise_from=base,
                      noise=0.02) for i in range(2)]
    outs = {}
    for tag, models in (("listed", [base, *fts]), ("not_listed", fts)):
        rc, _, err = run_cli(capsys, "merge", "--method", "karcher", "--base-model", base,
                             "--models", ",".join(map(str, models)), "--output",
                             tmp_path / tag, "--no-progress")
        assert rc == 0, err
        outs[tag] = load_file(tmp_path / tag / "model.safetensors")
    ref = {k: karcher_mean([load_file(f / "model.safetensors")[k] for f in (*fts, base)])
           for k in outs["listed"]}
    for k, v in ref.items():  # the base is one input, listed or not
        close(outs["listed"][k], v, tol=1e-5)
        close(outs["not_listed"][k], v, tol=1e-5)
    # nuslerp takes exactly two models besides an optional base
    assert_user_error(capsys, "merge", "--method", "nuslerp", "--base-model", base, "--models",
                      f"{base},{fts[0]}", "--weights", "1,1", "--output", tmp_path / "n",
                      match="exactly 2 model(s) besides the base, got 1")


# --------------------------------------------------------------------------- sce

def test_sce_selects_by_variance_weights_by_energy_and_erases_by_sign():
    base = torch.zeros(1, 4)
    t1 = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    t2 = torch.tensor([[3.0, -2.0, 2.0, 0.5]])
    # variances across the two: 1, 4, 2.25, 0; the top half of the 3 nonzero: k = 1 -> entry 1
    out = run("sce", [t1, t2], base, select_topk=0.5)
    # after the selection only entry 1 is left: t1 2, t2 -2, equal weights, Σ = 0 elects +
    close(out, [[0.0, 2.0, 0.0, 0.0]])
    out = run("sce", [t1, t2], base)  # select_topk 1: no selection
    w1, w2 = (1 + 4 + 1 + 0.25) / 4, (9 + 4 + 4 + 0.25) / 4  # mean τ²
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    # signs of Σ: + + + +; entry 1: only t1 agrees; entry 2: only t2
    close(out, [[(w1 * 1 + w2 * 3) / (w1 + w2), 2.0, 2.0, 0.5]])


def test_sce_tiny_task_vectors_fall_back_to_equal_weights():
    base = torch.zeros(1, 2)
    t1, t2 = torch.tensor([[1e-4, 1e-4]]), torch.tensor([[3e-4, 3e-4]])
    # Σ mean τ² = 1e-7 < 1e-6: mergekit's absolute threshold gives equal weights
    close(run("sce", [t1, t2], base), [[2e-4, 2e-4]], tol=1e-9)


# --------------------------------------------------------------------------- slerps

def slerp_vec(t: float, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook SLERP of two vectors (not colinear)."""
    th = math.acos(float(u @ v / (u.norm() * v.norm())))
    return (math.sin((1 - t) * th) * u + math.sin(t * th) * v) / math.sin(th)


def test_nuslerp_flattened_per_row_per_column_and_colinear():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    p = [{"weight": 1.0}, {"weight": 3.0}]  # t = w₂ / (w₁ + w₂) = 3/4
    t = 0.75
    flat = run("nuslerp", [a, b], None, p)
    close(flat, slerp_vec(t, a.reshape(-1), b.reshape(-1)).view(3, 4), tol=1e-5)
    rows = run("nuslerp", [a, b], None, p, nuslerp_flatten=False)
    close(rows, torch.stack([slerp_vec(t, a[i], b[i]) for i in range(3)]), tol=1e-5)
    cols = run("nuslerp", [a, b], None, p, nuslerp_flatten=False, nuslerp_row_wise=True)
    close(cols, torch.stack([slerp_vec(t, a[:, j], b[:, j]) for j in range(4)], 1), tol=1e-5)
    assert not torch.allclose(flat, rows, atol=1e-3) and not torch.allclose(rows, cols, atol=1e-3)
    # colinear: linear interpolation
    close(run("nuslerp", [a, 2 * a], None, p), 0.25 * a + 0.75 * 2 * a)
    # with a base: slerp of the task vectors, added to the base
    base = torch.full((3, 4), 0.3)
    close(run("nuslerp", [base + a, base + b], base, p), base + flat, tol=1e-5)
    # weights summing to 0: t = 1/2
    half = run("nuslerp", [a, b], None, [{"weight": 1.0}, {"weight": -1.0}])
    close(half, slerp_vec(0.5, a.reshape(-1), b.reshape(-1)).view(3, 4), tol=1e-5)


def test_multislerp_is_slerp_for_two_and_symmetric_for_three():
    e = torch.eye(3)
    a, b = 2 * e[0], 4 * e[1]
    out = run("multislerp", [a, b], None, [{"weight": 1.0}, {"weight": 1.0}])
    close(out, 3.0 * (e[0] + e[1]) / math.sqrt(2), tol=1e-5)  # the midpoint, mean norm 3
    out = run("multislerp", [e[0], e[1], e[2]], None, [{"weight": 2.0}] * 3)
    close(out, torch.ones(3) / math.sqrt(3), tol=1e-5)
    # unequal weights, against the tangent-space formula written out
    w = torch.tensor([0.2, 0.8])
    m = (w[0] * e[0] + w[1] * e[1]) / (w[0] * e[0] + w[1] * e[1]).norm()
    tang = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, (e[0], e[1]), strict=True))
    tn = tang.norm()
    want = (m * torch.cos(tn) + tang * torch.sin(tn) / tn) * (2 * 0.2 + 4 * 0.8)
    out = run("multislerp", [a, b], None, [{"weight": 1.0}, {"weight": 4.0}])
    close(out, want, tol=1e-5)
    close(run("multislerp", [a], None, [{"weight": 1.0}]), a)  # one model: itself
    # antipodal pair: linear fallback; antipodal three: a user error
    close(run("multislerp", [e[0], -e[0]], None, [{"weight": 1.0}] * 2), torch.zeros(3))
    from lmalloy.errors import UserError

    with pytest.raises(UserError, match="cancel out"):
        run("multislerp", [e[0], -e[0], torch.zeros(3)], None, [{"weight": 1.0}] * 3)
    base = torch.ones(3)
    close(run("multislerp", [base + a, base + b], base, [{"weight": 1.0}] * 2),
          base + 3.0 * (e[0] + e[1]) / math.sqrt(2), tol=1e-5)


def test_karcher_converges_to_the_mean_angle():
    # directions at 0°, 0° and 90° in a plane: the Fréchet mean on the circle is at 30°,
    # not at the normalised Euclidean mean (26.57°)
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0])]
    out = karcher_mean(xs, max_iter=100, tol=1e-7)
    ang = math.degrees(math.atan2(float(out[1]), float(out[0])))
    assert abs(ang - 30.0) < 1e-3, ang
    assert abs(float(out.norm()) - 2.0) < 1e-5  # the mean norm
    start = karcher_mean(xs, max_iter=0)  # no iteration: the normalised Euclidean mean
    ang0 = math.degrees(math.atan2(float(start[1]), float(start[0])))
    assert abs(ang0 - math.degrees(math.atan2(1, 2))) < 1e-4, ang0
    # a base is one more input
    close(run("karcher", xs[:2], xs[2], max_iter=100, tol=1e-7), out)
    # zero-norm inputs do not vote on the direction but count in the norm
    z = karcher_mean([torch.tensor([0.0, 2.0]), torch.zeros(2)])
    close(z, [0.0, 1.0])


# --------------------------------------------------------------------------- nearswap, fusion

def test_nearswap_swaps_in_entries_that_are_close():
    base = torch.zeros(4)
    x = torch.tensor([0.001, 0.1, -1.0, 0.0])
    # weights clamp(0.01 / |Δ|, 0, 1) = 1, 0.1, 0.01, 1 (|Δ| clamped to 1e-6)
    close(run("nearswap", [x], base, t=0.01), [0.001, 0.01, -0.01, 0.0])


def test_arcee_fusion_keeps_outlier_importance_only():
    torch.manual_seed(0)
    base = torch.randn(1, 20)
    delta = torch.linspace(0.010, 0.029, 20)
    delta[7] = 1.0
    out = run("arcee_fusion", [base + delta], base)
    # one row: importance = KL · |Δ|, so the threshold is median + 1.5·IQR of |Δ| scaled by
    # KL, with quantiles the ⌊q·19⌋-th smallest: 4th, 9th and 14th (0-based)
    s = delta.sort().values
    thr = s[9] + 1.5 * (s[14] - s[4])
    keep = delta >= thr
    assert keep.sum() == 1 and keep[7]
    close(out, base + delta * keep)
    # a row the model left unchanged has KL 0 and importance 0: it keeps nothing
    b2 = torch.randn(2, 20)
    x2 = b2.clone()
    x2[0] += delta
    out2 = run("arcee_fusion", [x2], b2)
    assert torch.equal(out2[1], b2[1]) and float((out2[0] - b2[0])[7]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- ram

def test_ram_unique_changes_kept_shared_ones_averaged():
    base = torch.zeros(1, 4)
    t1 = torch.tensor([[1.0, 0.3, 2.0, 0.0]])  # 0.3 is below epsilon 0.5: not a change
    t2 = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    close(run("ram", [t1, t2], base, epsilon=0.5), [[2.0, 0.0, 2.0, 0.0]])
    # RAM+: model 1 has 1 shared and 1 unique changed entry -> ρ = 1, clamped to α = 0.6,
    # its unique entries × (1 + 0.5·0.6); model 2 has no unique entry
    close(run("ramplus_tl", [t1, t2], base, epsilon=0.5, r=0.5, alpha=0.6),
          [[2.0, 0.0, 2.6, 0.0]])
    close(run("ramplus_tl", [t1, t2], base, epsilon=0.5, r=0.5, alpha=0.6) -
          run("ram", [t1, t2], base, epsilon=0.5), [[0.0, 0.0, 0.6, 0.0]])


def _ties_inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
          for _ in range(3)]
    xs[1][:1000] = base[:1000]  # ties at zero
    return xs, base


@pytest.mark.parametrize("n", [5000, 3 << 20])
def test_ties_thresholds_are_the_exact_kth_largest(n, monkeypatch):
    """The sampled band (large tensors), direct selection (small) and the two-pass fallback
    give kth_largest's value exactly."""
    from lmalloy.merge import fused
    from lmalloy.merge.methods import kth_largest

    xs, base = _ties_inputs(n)
    dens = [0.5, 0.2, 0.97]

    def read(t, a, b):
        return t[a:b]

    def bad():
        raise AssertionError("no input is bad")

    want = [float(kth_largest((x.float() - base.float()).abs(), max(1, int(d * n))))
            for x, d in zip(xs, dens, strict=True)]
    got = fused.ties_thresholds(read, xs, base, dens, n, torch.float32, 1 << 18,
                                fused.Kernels(False), bad)
    assert got == want
    if n > fused.EXACT_MAX:  # a band that misses: the exact fallback
        monkeypatch.setattr(fused, "_bracket", lambda s, k, n: (0.0, 1e-30))
        assert fused.ties_thresholds(read, xs, base, dens, n, torch.float32, 1 << 18,
                                     fused.Kernels(False), bad) == want


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    from lmalloy.merge import fused

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused, "_kernels", {})
    monkeypatch.setattr(fused, "_warned", [])
    xs, base = _ties_inputs(4096)
    args = (torch.tensor([0.01, 0.02, 0.0]), torch.tensor([1.0, 0.5, 1.0]), True,
            torch.tensor(1.0), torch.bfloat16, torch.float32)
    k = fused.Kernels(True)
    out, bad_in, bad_out = k.ties(xs, base, *args)
    ref, _, _ = fused.Kernels(False).ties(xs, base, *args)
    assert torch.equal(out, ref) and not bad_in and not bad_out and not k.compiled
    k.ties(xs, base, *args)
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile is unavailable here (no C++ compiler found)") == 1


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_ties_equals_eager():
    """The fused kernel computes eager TIES's arithmetic: within an ulp (FMA contraction),
    NaN inputs reported."""
    from lmalloy.merge import fused

    xs, base = _ties_inputs(1 << 16)
    args = (torch.tensor([0.01, 0.02, 0.0]), torch.tensor([0.7, 0.4, 1.0]), True,
            torch.tensor(0.9), torch.float32, torch.float32)
    k = fused.Kernels(True)
    out, bad_in, bad_out = k.ties(xs, base, *args)
    assert k.compiled, "torch.compile works on this machine"
    ref, _, _ = fused.Kernels(False).ties(xs, base, *args)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    assert not bad_in and not bad_out
    xs[2][7] = float("nan")
    assert k.ties(xs, base, *args)[1]
    got = k.band(xs[:2], base, torch.tensor([0.0, 0.01]), torch.tensor([0.02, 0.03]),
                 torch.float32)
    want = fused.Kernels(False).band(xs[:2], base, torch.tensor([0.0, 0.01]),
                                     torch.tensor([0.02, 0.03]), torch.float32)
    for (c1, v1), (c2, v2) in zip(got, want, strict=True):
        assert c1 == c2 and torch.equal(v1, v2)
