"""The demo's time budget: each stage's share, measured throughput, and scaling down.

The whole demo has a budget (20 minutes, `--quick` 2; `--budget-minutes` sets another).
Each stage owns a share of it (`SHARES`); its deadline is the sum of its own share and the
shares of the stages that ran before it in this invocation, counted from the start, so a
stage that finishes early leaves its slack to the next and one that overran shortens what
follows. Before a piece of work a stage estimates its cost from measured throughput
(`Rates`: tokens per second of training and of evaluation for each model the demo trains,
probed at the start of the pretraining stage and updated from every training run's own
log), and `StageClock.fit` scales the work down (fewer steps, pairs or evaluations) when
the estimate would pass the time the stage has left for it; the note it records goes into
the report. Nothing is cut below a stage's minimum, so a claim is always measured, if with
less data, and the report says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

# fractions of the budget per mode (each sums to 1): in quick mode fixed costs (loading,
# packing, saving) dominate every stage but pretraining, so pretraining gets more
SHARES = {
    "full": {"pretrain": 0.40, "averaging": 0.08, "merging": 0.14, "moe": 0.10,
             "proxy": 0.13, "warm": 0.15},
    "quick": {"pretrain": 0.50, "averaging": 0.08, "merging": 0.14, "moe": 0.08,
              "proxy": 0.08, "warm": 0.12},
}
MINUTES = {"quick": 2.0, "full": 20.0}


def load_average() -> float:
    """The machine's 1-minute load average (what else is running counts against us)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


@dataclass
class Rates:
    """Measured throughput, tokens per second, by key (e.g. `train:small`, `eval:large`)."""

    tps: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # key -> how it was measured

    def get(self, key: str, fallback: str | None = None, factor: float = 1.0) -> float:
        """The rate of `key`; else `fallback`'s times `factor` (e.g. an MoE from its dense
        model); KeyError when neither was measured."""
        if key in self.tps:
            return self.tps[key]
        if fallback is not None and fallback in self.tps:
            return self.tps[fallback] * factor
        raise KeyError(f"no measured throughput for {key}")

    def observe(self, key: str, tokens_per_s: float, how: str) -> None:
        """Keep the latest measurement: the machine's load changes during a run."""
        if tokens_per_s > 0:
            self.tps[key] = float(tokens_per_s)
            self.source[key] = how

    def seconds(self, key: str, tokens: float, **kw) -> float:
        return tokens / self.get(key, **kw)


@dataclass
class Budget:
    total_s: float
    shares: dict[str, float]
    order: list[str]  # the stages this invocation runs, in order
    t0: float = field(default_factory=time.perf_counter)
    rates: Rates = field(default_factory=Rates)

    def deadline(self, stage: str) -> float:
        """perf_counter time by which `stage` should end."""
        upto = self.order[: self.order.index(stage) + 1] if stage in self.order else [stage]
        return self.t0 + self.total_s * sum(self.shares[s] for s in upto)

    def clock(self, stage: str, minimum_share: float = 0.35) -> StageClock:
        """The stage's clock: its time runs to its deadline, but never less than
        `minimum_share` of its own share (so a late stage still measures its claim)."""
        now = time.perf_counter()
        own = self.total_s * self.shares[stage]
        allotted = max(self.deadline(stage) - now, minimum_share * own)
        return StageClock(stage, now, allotted, own, load_average())


@dataclass
class StageClock:
    stage: str
    t0: float
    allotted_s: float
    share_s: float
    load_start: float
    notes: list[str] = field(default_factory=list)
    plan: list[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.allotted_s - self.elapsed()

    def fit(self, what: str, planned: int, unit_s: float, fraction: float = 1.0,
            fixed_s: float = 0.0, minimum: int = 1, multiple: int = 1) -> int:
        """The number of units (≤ `planned`, ≥ `minimum`, a multiple of `multiple`) whose
        estimated cost, `fixed_s + n · unit_s` seconds, fits in `fraction` of the stage's
        time left; a note when it scales the work down. Every call is recorded in `plan`."""
        avail = max(0.0, fraction * self.left())
        n = planned
        if fixed_s + planned * unit_s > avail and unit_s > 0:
            n = max(minimum, min(planned, int((avail - fixed_s) / unit_s)))
        n = max(minimum, n - n % multiple) if multiple > 1 else n
        est = fixed_s + n * unit_s
        self.plan.append({"what": what, "planned": planned, "chosen": n,
                          "unit_s": unit_s, "estimate_s": est, "available_s": avail})
        if n < planned:
            self.notes.append(f"{what}: {n:,} instead of {planned:,} (the estimate, "
                              f"{fixed_s + planned * unit_s:.0f} s, was over the "
                              f"{avail:.0f} s this stage had left for it"
                              + (f"; at its minimum, still {est:.0f} s" if est > avail else "")
                              + ")")
        return n

    def summary(self) -> dict:
        return {"allotted_s": self.allotted_s, "share_s": self.share_s,
                "load_start": self.load_start, "load_end": load_average(),
                "notes": self.notes, "plan": self.plan}


def probe(model_kwargs: dict, seq_len: int, micro_batch: int, seconds: float) -> dict:
    """Tokens per second of training (forward, backward and AdamW step) and of evaluation
    (forward without gradients) of a freshly built Llama with these config fields, on
    random tokens: the measurement the budget plans from, taken in about 2·`seconds` (the
    median of five windows each)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**model_kwargs))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model_kwargs["vocab_size"], (micro_batch, seq_len + 1))
    tokens = micro_batch * seq_len

    def train_step() -> None:
        model(input_ids=x[:, :-1], labels=x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_step() -> None:
        with torch.no_grad():
            model(input_ids=x[:, :-1])

    out = {"params": sum(p.numel() for p in model.parameters())}
    for name, fn in (("train", train_step), ("eval", eval_step)):
        fn()  # warm-up: allocation, first-call dispatch
        windows = []
        for _ in range(5):  # the median of five windows: robust to a burst of other work
            n, t0 = 0, time.perf_counter()
            while n < 1 or time.perf_counter() - t0 < seconds / 5:
                fn()
                n += 1
            windows.append(n * tokens / (time.perf_counter() - t0))
        out[name] = sorted(windows)[2]
    return out
