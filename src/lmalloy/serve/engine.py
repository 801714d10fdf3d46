"""Continuous batching (iteration-level scheduling, Orca, OSDI 2022) over proxy-tuned decoding.

One thread owns the models. Between two decoding rounds it admits waiting requests (their
prompts are prefilled in a batch of their own, then merged into the running lanes, left-
padded), drops the rows of finished or cancelled requests, and runs one round for all
running rows: a plain step (K = 0) or a speculative round of K drafts
(lmalloy.proxy.speculative, the same code as `ProxyTuned.generate(speculative=K)`). Each row
has its own sampling settings, seed and α. The waiting queue is bounded: `submit` raises
`QueueFull` instead of letting a request wait without limit.

Requests talk to the HTTP side through a `sink(event)` callback, called from this thread:
("text", str), ("token", id, logprob, top), ("prompt", logprob records), ("done", Generation)
and ("error", message).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class QueueFull(Exception):
    """The waiting queue is at its bound."""


@dataclass
class Job:
    """One prompt to continue. lane_ids: the prompt's token ids for each lane (format)."""

    lane_ids: list[list[int]]
    large_ids: list[int]
    max_tokens: int
    sink: Callable[[tuple], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    penalty: float = 1.0
    alphas: Sequence[float] = ()
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None  # top-n logprobs of each generated token
    score_prompt: bool = False  # echo: the prompt's own logprobs first
    stream: bool = False  # send ("text", ...) events as the text grows
    cancelled: bool = False
    gen: torch.Generator = field(init=False)

    def __post_init__(self):
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)


@dataclass
class _Slot:
    job: Job
    rows: Any  # lmalloy.proxy.model._Rows of one row


def top_logprobs(lp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) of one position's log-softmax (V,)."""
    if n <= 0:
        return []
    v, i = torch.topk(lp, min(n, lp.shape[-1]))
    return list(zip(i.tolist(), v.tolist(), strict=True))


class Engine:
    """Decodes submitted jobs in one background thread, batched continuously."""

    def __init__(self, proxy, *, max_batch: int = 8, max_queue: int = 32,
                 speculative: int | None = None, adaptive_k: bool = False):
        from lmalloy.proxy.speculative import KControl, build_lanes

        self.proxy, self.max_batch, self.max_queue = proxy, max_batch, max_queue
        self.members = list(proxy.members)
        draft = proxy.draft_member() if speculative else proxy.large
        if draft is proxy.draft:
            self.members.append(draft)
        self._build = lambda rows=0: build_lanes(self.members, proxy.vocab, rows)
        self.lanes, slot = self._build()
        self.roles = slot[: len(proxy.members)]
        self.draft = slot[next(i for i, m in enumerate(self.members) if m is draft)]
        self.ctl = KControl(speculative or 0, adaptive_k and bool(speculative))
        self.pending = torch.zeros(len(self.lanes), 0, dtype=torch.long)
        self.slots: list[_Slot] = []
        self.waiting: deque[Job] = deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.thread = threading.Thread(target=self._run, name="lmalloy-engine", daemon=True)

    # ------------------------------------------------------------ the HTTP side's calls

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(f"{len(self.slots)} requests running and {len(self.waiting)} "
                                "waiting (the queue's bound); retry later")
            self.waiting.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        with self.cv:
            job.cancelled = True
            self.cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running and waiting jobs, then end the thread."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def status(self) -> dict:
        with self.cv:
            return {"running": len(self.slots), "waiting": len(self.waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, **self.counts,
                    "speculative": self.ctl.stats() if self.ctl.k_max else None}

    # ------------------------------------------------------------ the model thread

    def _run(self) -> None:
        while True:
            with self.cv:
                while not (self.waiting or self.slots or self.stopping):
                    self.cv.wait()
                if self.stopping and not self.waiting and not self.slots:
                    return
                n = self.max_batch - len(self.slots)
                new = [self.waiting.popleft() for _ in range(min(n, len(self.waiting)))]
            try:
                with torch.no_grad():
                    self._admit([j for j in new if not j.cancelled])
                    self._drop()
                    if self.slots:
                        self._round()
            except Exception as e:  # noqa: BLE001 - a failed round fails its requests, not the server
                self._fail(e, new)

    def _fail(self, e: Exception, new: list[Job]) -> None:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for s in self.slots:
            s.job.sink(("error", msg))
        for j in new:
            if not any(s.job is j for s in self.slots):
                j.sink(("error", msg))
        self.counts["failed"] += len(self.slots)
        self.slots = []
        self.lanes, _ = self._build()
        self.pending = torch.zeros(len(self.lanes), 0, dtype=torch.long)

    def _admit(self, jobs: list[Job]) -> None:
        from lmalloy.proxy.model import _Rows
        from lmalloy.proxy.speculative import prefill

        for j in [j for j in jobs if j.score_prompt]:
            self._score(j)
        jobs = [j for j in jobs if j.max_tokens > 0]
        if not jobs:
            return
        fresh, slot = self._build(len(jobs))
        pend = torch.zeros(len(fresh), len(jobs), dtype=torch.long)
        for i in sorted({slot.index(s) for s in slot}):
            pend[slot[i]] = prefill(fresh[slot[i]], [j.lane_ids[i] for j in jobs])
        for lane, f in zip(self.lanes, fresh, strict=True):
            lane.merge(f)
        self.pending = torch.cat([self.pending, pend], 1)
        for j in jobs:
            rows = _Rows(self.proxy, [j.large_ids], j.stop, True,
                         (lambda _i, t, j=j: j.sink(("text", t))) if j.stream else None)
            self.slots.append(_Slot(j, rows))

    def _score(self, job: Job) -> None:
        """Echo: the log-probability of every prompt token under the proxy-tuned model."""
        ids = torch.tensor([job.large_ids])
        lp = self.proxy.logits(ids, alphas=list(job.alphas))[0].log_softmax(-1).cpu()  # (T, V)
        recs = [(job.large_ids[0], None, [])]
        for t in range(1, len(job.large_ids)):
            tok = job.large_ids[t]
            recs.append((tok, float(lp[t - 1, tok]), top_logprobs(lp[t - 1], job.logprobs or 0)))
        job.sink(("prompt", recs))
        if job.max_tokens == 0:
            from lmalloy.proxy.model import Generation

            job.sink(("done", Generation("", "", [], "length")))
            self.counts["completed"] += 1

    def _drop(self) -> None:
        """Remove finished and cancelled rows from the lanes."""
        keep, done = [], []
        for b, s in enumerate(self.slots):
            if s.job.cancelled:
                self.counts["cancelled"] += 1
            elif s.rows.done[0]:
                done.append(s)
            else:
                keep.append(b)
        if len(keep) == len(self.slots):
            return
        idx = torch.tensor(keep, dtype=torch.long)
        for lane in self.lanes:
            lane.select(idx)
        self.pending = self.pending[:, idx]
        with self.cv:
            self.slots = [self.slots[b] for b in keep]
            self.counts["completed"] += len(done)
        for s in done:  # after the slot is free: a client that has its answer sees it so
            s.job.sink(("done", s.rows.finish([""])[0]))

    def _params(self):
        from lmalloy.proxy.speculative import RowParams

        js = [s.job for s in self.slots]
        P = len(self.proxy.pairs)
        return RowParams(torch.tensor([j.temperature for j in js], dtype=torch.float32),
                         torch.tensor([j.top_k for j in js], dtype=torch.long),
                         torch.tensor([j.top_p for j in js], dtype=torch.float32),
                         torch.tensor([j.penalty for j in js], dtype=torch.float32),
                         torch.tensor([list(j.alphas or self.proxy.alphas) for j in js],
                                      dtype=torch.float32).reshape(len(js), P),
                         [j.gen for j in js])

    def _round(self) -> None:
        from lmalloy.proxy.speculative import plan, room, speculative_round

        rows = [s.rows for s in self.slots]
        rooms = room(self.lanes, [s.job.max_tokens - len(s.rows.ids[0]) for s in self.slots])
        for r, n in zip(rows, rooms.tolist(), strict=True):
            r.done[0] = r.done[0] or n <= 0
        active = ~torch.tensor([r.done[0] for r in rows])
        if not active.any():
            return
        K, valid = plan(self.ctl.k, active, rooms)
        seen = torch.cat([r.seen for r in rows])
        rnd = speculative_round(self.lanes, self.roles, self.draft, self.pending, valid, K,
                                self._params(), seen)
        keep, last = self._hand_out(rnd, rooms, active)
        eligible = torch.clamp(rooms - 1, min=0).clamp(max=K) * active
        self.ctl.record(K, int(eligible.sum()), int(torch.minimum(rnd.n, eligible).sum()), rnd)
        for lane in self.lanes:
            lane.keep(K + 1, keep)
            lane.compact()
        self.pending = torch.tensor(last, dtype=torch.long)[None].repeat(len(self.lanes), 1)

    def _hand_out(self, rnd, rooms: torch.Tensor, active: torch.Tensor
                  ) -> tuple[torch.Tensor, list[int]]:
        """Each row's new tokens to its request (with logprobs when asked), up to its room
        and its stop; returns the columns each row keeps and the token it feeds next."""
        keep, last = [], []
        for b, s in enumerate(self.slots):
            toks = rnd.tokens(b)[: int(rooms[b])] if active[b] else []
            lp = rnd.z[b].log_softmax(-1) if s.job.logprobs is not None and toks else None
            taken = 0
            for j, t in enumerate(toks):
                if s.rows.done[0]:
                    break
                n = len(s.rows.ids[0])
                s.rows.accept([t])
                taken += 1
                if lp is not None and len(s.rows.ids[0]) > n:  # not the end-of-text token
                    s.job.sink(("token", t, float(lp[j, t]), top_logprobs(lp[j], s.job.logprobs)))
            keep.append(0 if s.rows.done[0] else taken)
            last.append(toks[taken - 1] if taken else s.rows.pad_id)
        return torch.tensor(keep, dtype=torch.long), last
