"""Exact speculative proxy-tuned decoding, with caches that roll back per row.

Speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv
2302.01318): a cheap draft model proposes K tokens x₁..x_K from its distribution q; the
target model scores all K positions in one forward; x_i is kept with probability
min(1, p_i(x_i) / q_i(x_i)), and at the first rejection a token is drawn from
norm(max(0, p_i − q_i)); when all K are kept, one more comes from p_{K+1}. Every emitted token
is then distributed exactly as p — here the proxy-tuned distribution

    p = transforms(z_large + Σᵢ αᵢ · (z_tunedᵢ − z_untunedᵢ))

under the user's repetition penalty, temperature, top-k and top-p (the transforms of
lmalloy.proxy.sampling, so the target is the non-speculative decoder's distribution). The
draft is the first pair's tuned model by default: its logits at the K positions are part of
the target anyway, so drafting costs nothing extra for that model, and the large and
untuned models each run one cached forward of K + 1 tokens per round instead of K + 1
single-token steps. Greedy decoding is the same rule with one-hot p and q: a draft is kept
iff it is the target's argmax, so the output equals the non-speculative decoder's.

Batching: rows accept different numbers of drafts. Each model's `Lane` holds a left-padded
attention mask and a `DynamicCache`; after a round the cache is cut to the longest accepted
row and the rejected columns of the other rows are masked out (holes, like left padding:
position ids are the cumulative sum of the mask, so a row's tokens keep their positions).
`Lane.compact` squeezes the holes out when they pile up; `Lane.select` and `Lane.merge` drop
and add rows (the server's continuous batching uses the same lanes and rounds).

Shapes: B rows, K drafts, V vocabulary, L cached columns.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmalloy.errors import UserError
from lmalloy.proxy.sampling import probabilities

# ---------------------------------------------------------------- one model's cached rows


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The cache's (keys, values) per layer, each (B, H, L, D); None while it is empty."""
    layers = getattr(cache, "layers", None) or []
    out = []
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            return None
        out.append((k, v))
    return out or None


def _set_kv(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.keys, layer.values = k, v


class Lane:
    """One model's decoding state over B rows: attention mask (B, L) and KV cache (L columns).

    The cache is a plain full `DynamicCache` (no sliding-window layers, which could not roll
    back); sliding-window attention is still applied by the model's own mask.
    """

    def __init__(self, model: Any, vocab: int, rows: int, ctx_len: int | None = None):
        from transformers import DynamicCache

        self.model, self.vocab, self.ctx_len = model, vocab, ctx_len
        self.device = next(model.parameters()).device
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=self.device)  # (B, L)
        self.cache = DynamicCache()

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def counts(self) -> torch.Tensor:
        """Tokens each row holds in the cache, (B,) on the CPU."""
        return self.mask.sum(-1).cpu()

    def feed(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Append n columns: tokens (B, n), valid (B, n) bool (an invalid column is cached but
        masked, like padding). Returns the logits of the n positions, (B, n, V) float32."""
        n = tokens.shape[1]
        self.mask = torch.cat([self.mask, valid.to(self.device, torch.long)], 1)  # (B, L+n)
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -n:]  # (B, n)
        out = self.model(input_ids=tokens.to(self.device), attention_mask=self.mask,
                         position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=n)
        if _kv(self.cache) is None:
            raise UserError(f"{type(self.model).__name__}: its KV cache is not a plain per-layer "
                            "cache, which speculative decoding and serving need to roll back")
        return out.logits[:, -n:, : self.vocab].float()

    def keep(self, new: int, keep: torch.Tensor) -> None:
        """Of the last `new` columns, keep the first keep[b] for row b (B,): cut the cache to
        the longest kept row, mask the rest of the others."""
        L = self.mask.shape[1]
        base = L - new
        top = int(keep.max()) if keep.numel() else 0
        kv = _kv(self.cache)
        if kv is not None and base + top < L:
            _set_kv(self.cache, [(k[:, :, : base + top], v[:, :, : base + top]) for k, v in kv])
        self.mask = self.mask[:, : base + top].clone()
        cols = torch.arange(top, device=self.device)[None]  # (1, top)
        self.mask[:, base:] *= (cols < keep.to(self.device)[:, None]).long()

    def select(self, idx: torch.Tensor) -> None:
        """Keep only rows `idx` (in that order), then drop columns no row uses at the left."""
        idx = idx.to(self.device)
        self.mask = self.mask[idx]
        kv = _kv(self.cache)
        if kv is not None:
            _set_kv(self.cache, [(k[idx], v[idx]) for k, v in kv])
        self.compact(slack=0)

    def compact(self, slack: int = 32) -> None:
        """Squeeze out masked columns (padding and rejected drafts) when there are more than
        `slack` of them per row: each row's valid columns, left-padded to the longest."""
        L = self.mask.shape[1]
        n = self.mask.sum(-1)  # (B,)
        width = int(n.max()) if n.numel() else 0
        if L - width <= slack:
            return
        # stable sort: valid columns in order at the right end, masked ones at the left
        order = torch.sort(self.mask, dim=-1, stable=True).indices[:, L - width:]  # (B, W)
        self.mask = self.mask.gather(1, order)
        kv = _kv(self.cache)
        if kv is not None:
            def take(t: torch.Tensor) -> torch.Tensor:
                ix = order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                return t.gather(2, ix)

            _set_kv(self.cache, [(take(k), take(v)) for k, v in kv])

    def merge(self, other: Lane) -> None:
        """Append `other`'s rows (same model), left-padding the shorter lane's columns."""
        L = max(self.mask.shape[1], other.mask.shape[1])
        a, b = _kv(self.cache), _kv(other.cache)
        template = a or b
        if template is not None:
            def padded(kv, lane: Lane):
                out = []
                for i, (k0, _) in enumerate(template):
                    shape = (lane.rows, k0.shape[1], L, k0.shape[3])
                    pair = []
                    for t in (kv[i] if kv is not None else (None, None)):
                        z = k0.new_zeros(shape)
                        if t is not None and t.shape[2]:
                            z[:, :, L - t.shape[2]:] = t
                        pair.append(z)
                    out.append(tuple(pair))
                return out

            merged = [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb)
                      in zip(padded(a, self), padded(b, other), strict=True)]
            if a is None:
                self.cache = other.cache
            _set_kv(self.cache, merged)

        def pad(m: torch.Tensor) -> torch.Tensor:
            return torch.cat([m.new_zeros(m.shape[0], L - m.shape[1]), m], 1)

        self.mask = torch.cat([pad(self.mask), pad(other.mask.to(self.device))])


def prefill(lane: Lane, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Cache every prompt but its last token; returns those last tokens (B,), the first
    tokens each round will feed."""
    from lmalloy.proxy.model import left_pad

    heads = [list(r[:-1]) for r in rows]
    if max(len(h) for h in heads):
        ids, mask = left_pad(heads, 0)
        lane.feed(ids, mask.bool())
    return torch.tensor([r[-1] for r in rows], dtype=torch.long)


# ---------------------------------------------------------------- per-row sampling settings


@dataclass
class RowParams:
    """Sampling settings, one per row: tensors (B,) and α (B, P); `gens` one generator per
    row (rows may share one)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    alphas: torch.Tensor
    gens: list[torch.Generator | None]

    @classmethod
    def same(cls, rows: int, *, temperature: float, top_k: int | None, top_p: float | None,
             penalty: float, alphas: Sequence[float], gen: torch.Generator) -> RowParams:
        full = torch.full
        return cls(full((rows,), float(temperature)), full((rows,), int(top_k or 0)),
                   full((rows,), float(1.0 if top_p is None else top_p)),
                   full((rows,), float(penalty)),
                   torch.tensor([list(alphas)] * rows, dtype=torch.float32).reshape(rows, -1),
                   [gen] * rows)

    def probs(self, z: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The rows' distributions: z (B, J, V), seen (B, J, V) -> (B, J, V)."""
        J = z.shape[1]

        def e(t: torch.Tensor) -> torch.Tensor:
            return t[:, None].expand(-1, J)

        return probabilities(z, seen, e(self.temperature), e(self.top_k), e(self.top_p),
                             e(self.penalty))

    def greedy(self) -> torch.Tensor:
        return self.temperature <= 0


def _sampled(params: RowParams) -> tuple[list[int], torch.Generator | None]:
    """The rows that sample (not greedy), and their generator when they all share one."""
    greedy = params.greedy().tolist()
    todo = [b for b, g in enumerate(greedy) if not g]
    shared = params.gens[todo[0]] if todo else None
    if any(params.gens[b] is not shared for b in todo):
        shared = None
    return todo, shared


def draw(probs: torch.Tensor, params: RowParams) -> torch.Tensor:
    """One token per row from probs (B, V): the argmax for greedy rows, else a draw with the
    row's generator."""
    out = probs.argmax(-1)
    todo, shared = _sampled(params)
    if todo and shared is not None:  # one generator: one call, rows in order
        out[todo] = torch.multinomial(probs[todo], 1, generator=shared)[:, 0]
    else:
        for b in todo:
            out[b] = torch.multinomial(probs[b], 1, generator=params.gens[b])[0]
    return out


def uniforms(params: RowParams, k: int) -> torch.Tensor:
    """(B, K) uniforms for the acceptance tests; 0.5 for greedy rows (p/q is 0 or 1 there)."""
    u = torch.full((len(params.gens), k), 0.5)
    todo, shared = _sampled(params)
    if todo and k and shared is not None:
        u[todo] = torch.rand(len(todo), k, generator=shared)
    elif k:
        for b in todo:
            u[b] = torch.rand(k, generator=params.gens[b])
    return u


def accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The acceptance rule. p (B, K+1, V) target, q (B, K, V) draft distributions, drafts
    (B, K) drawn from q, u (B, K) uniforms. Returns (n (B,) drafts kept, p(x) (B, K),
    q(x) (B, K)): x_i is kept while u_i < p_i(x_i) / q_i(x_i)."""
    K = drafts.shape[1]
    if K == 0:
        z = torch.zeros(p.shape[0], 0)
        return torch.zeros(p.shape[0], dtype=torch.long), z, z
    px = p[:, :K].gather(-1, drafts[..., None])[..., 0]  # (B, K)
    qx = q.gather(-1, drafts[..., None])[..., 0]  # (B, K), > 0: x was drawn from q
    ok = u * qx < px
    return ok.long().cumprod(1).sum(1), px, qx


def next_after(p: torch.Tensor, q: torch.Tensor, n: torch.Tensor, params: RowParams
               ) -> torch.Tensor:
    """The token after the n kept drafts (B,): from norm(max(0, p_n − q_n)) after a rejection,
    from p_{K+1} when all K were kept."""
    K = q.shape[1]
    rows = torch.arange(p.shape[0])
    dist = p[rows, n].clone()  # (B, V)
    rej = n < K
    if rej.any():
        res = (p[rows[rej], n[rej]] - q[rows[rej], n[rej]]).clamp(min=0)
        mass = res.sum(-1, keepdim=True)
        # p == q up to rounding: a rejection had (almost) no chance, p itself is the residual
        dist[rej] = torch.where(mass > 1e-9, res / mass.clamp(min=1e-30), dist[rej])
    return draw(dist, params)


# ---------------------------------------------------------------- one round


@dataclass
class Round:
    """What one round produced: drafts (B, K), kept n (B,), next token y (B,), the combined
    logits of the K + 1 positions (B, K+1, V), p(x) and q(x) of the drafts (B, K)."""

    drafts: torch.Tensor
    n: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    px: torch.Tensor
    qx: torch.Tensor
    t_draft: float = 0.0
    t_verify: float = 0.0

    def tokens(self, b: int) -> list[int]:
        return self.drafts[b, : int(self.n[b])].tolist() + [int(self.y[b])]


def speculative_round(lanes: list[Lane], roles: Sequence[int], draft: int,
                      pending: torch.Tensor, valid: torch.Tensor, k: int,
                      params: RowParams, seen: torch.Tensor) -> Round:
    """Draft k tokens with lane `draft`, score them with the other lanes in one forward each,
    accept or resample. roles: lane index of the large model, then of each pair's tuned and
    untuned model; pending (lanes, B) the token each lane feeds first; valid (B, k+1) which
    columns each row feeds (False: finished row, or beyond its room); seen (B, V) bool."""
    from lmalloy.proxy.sampling import combine_rows

    B, V = valid.shape[0], seen.shape[1]
    t0 = time.perf_counter()
    drafts = torch.zeros(B, k, dtype=torch.long)
    seens, qs, zd = [seen], [], []
    tok = pending[draft]
    for j in range(k + 1):
        z = lanes[draft].feed(tok[:, None], valid[:, j : j + 1]).cpu()  # (B, 1, V)
        zd.append(z)
        if j == k:
            break
        q = params.probs(z, seens[-1][:, None])[:, 0]  # (B, V)
        tok = draw(q, params)
        drafts[:, j] = tok
        qs.append(q)
        seens.append(seens[-1] | torch.nn.functional.one_hot(tok, V).bool())
    t1 = time.perf_counter()
    zs = []
    for i, lane in enumerate(lanes):
        if i == draft:
            zs.append(torch.cat(zd, 1))  # (B, k+1, V)
        elif i in roles:
            cols = torch.cat([pending[i][:, None], drafts], 1)  # (B, k+1)
            zs.append(lane.feed(cols, valid))
        else:
            zs.append(None)
    pairs = [(zs[roles[1 + 2 * i]], zs[roles[2 + 2 * i]]) for i in range((len(roles) - 1) // 2)]
    z = combine_rows(zs[roles[0]], pairs, params.alphas).cpu()  # (B, k+1, V)
    t2 = time.perf_counter()
    p = params.probs(z, torch.stack(seens, 1))  # (B, k+1, V)
    q = torch.stack(qs, 1) if qs else torch.zeros(B, 0, V)  # (B, k, V)
    n, px, qx = accept(p, q, drafts, uniforms(params, k))
    y = next_after(p, q, n, params)
    return Round(drafts, n, y, z, px, qx, t1 - t0, t2 - t1)


# ---------------------------------------------------------------- adaptive K


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round yields when each draft is kept with probability alpha:
    1 + α + … + α^k (Leviathan et al. 2023, eq. 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_k(alpha: float, t_step: float, t_fixed: float, t_tok: float, k_max: int) -> int:
    """The K in [1, k_max] with the most tokens per second when a round costs
    (K + 1)·t_step (the draft's single steps) + t_fixed + (K + 1)·t_tok (the verifying
    forwards)."""
    def rate(k: int) -> float:
        return expected_tokens(alpha, k) / ((k + 1) * (t_step + t_tok) + t_fixed)

    return max(range(1, k_max + 1), key=rate)


@dataclass
class KControl:
    """K per round: fixed, or (adaptive) the `best_k` of the measured acceptance rate and
    costs, re-estimated every round from the last `window` rounds."""

    k_max: int
    adaptive: bool = False
    window: int = 32
    k: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    history: dict[int, int] = field(default_factory=dict)
    _obs: deque = field(default_factory=lambda: deque(maxlen=32))

    def __post_init__(self):
        self.k = self.k_max

    def record(self, k: int, drafted: int, accepted: int, rnd: Round) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.history[k] = self.history.get(k, 0) + 1
        self._obs.append((k, drafted, accepted, rnd.t_draft, rnd.t_verify))
        if self.adaptive:
            self.k = self._choose()

    def _choose(self) -> int:
        obs = list(self._obs)
        d = sum(o[1] for o in obs)
        alpha = sum(o[2] for o in obs) / d if d else 0.5
        t_step = sum(o[3] for o in obs) / sum(o[0] + 1 for o in obs)
        x = [o[0] + 1.0 for o in obs]
        y = [o[4] for o in obs]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxx = sum((a - mx) ** 2 for a in x)
        slope = max(0.0, sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx
                    ) if sxx > 0 else 0.0
        return best_k(min(alpha, 0.999), t_step, max(my - slope * mx, 0.0), slope, self.k_max)

    def stats(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else math.nan,
                "k_history": dict(sorted(self.history.items()))}


# ---------------------------------------------------------------- a batch, start to end


def build_lanes(members: Sequence[Any], vocab: int, rows: int) -> tuple[list[Lane], list[int]]:
    """One lane per distinct (model, prompt format), and each member's lane index."""
    lanes: list[Lane] = []
    slot: list[int] = []
    keys: dict[tuple, int] = {}
    for m in members:
        key = (id(m.model), m.fmt)
        if key not in keys:
            keys[key] = len(lanes)
            lanes.append(Lane(m.model, vocab, rows, m.ctx_len))
        slot.append(keys[key])
    return lanes, slot


def room(lanes: Sequence[Lane], budget: Sequence[int]) -> torch.Tensor:
    """Tokens each row may still produce (B,): its budget, and what every model's context
    window leaves (the last token produced is never fed, so a row may fill the window)."""
    r = torch.tensor(list(budget), dtype=torch.long)
    for lane in lanes:
        if lane.ctx_len is not None:
            r = torch.minimum(r, lane.ctx_len - lane.counts() - 1)
    return r


def plan(k: int, active: torch.Tensor, rooms: torch.Tensor) -> tuple[int, torch.Tensor]:
    """This round's K (never more drafts than the roomiest row can use) and the valid
    columns (B, K+1): active rows, within their room."""
    k = max(0, min(k, int(rooms[active].max()) - 1))
    valid = active[:, None] & (torch.arange(k + 1)[None] < rooms[:, None])
    return k, valid


def _take(rows, rnd: Round, rooms: torch.Tensor, active: torch.Tensor, scores: bool
          ) -> tuple[list[int], list[int]]:
    """Hand each row its new tokens (up to its room, until it stops); returns how many each
    row took and the last one."""
    B = len(rows.done)
    new = [rnd.tokens(b) if active[b] else [] for b in range(B)]
    taken, last = [0] * B, [rows.pad_id] * B
    for j in range(max(len(t) for t in new)):
        toks = [new[b][j] if j < len(new[b]) and not rows.done[b] and taken[b] < rooms[b]
                else None for b in range(B)]
        if scores:
            rows.keep_scores(rnd.z[:, j], [t is not None for t in toks])
        for b, t in enumerate(toks):
            if t is not None:
                taken[b] += 1
                last[b] = t
        rows.accept(toks)
    return taken, last


@torch.no_grad()
def decode(proxy, prompts: Sequence[str], *, k: int, adaptive: bool, max_new_tokens: int,
           temperature: float, top_k: int | None, top_p: float | None,
           repetition_penalty: float, stop: Sequence[str], seed: int, stop_at_eos: bool,
           on_text, return_scores: bool, alphas: Sequence[float],
           trace: list | None = None) -> list:
    """`ProxyTuned.generate(speculative=k)`: the same rows, tokens, stops and streaming as the
    plain decoder; `proxy.last_speculative` gets the acceptance statistics and `trace` (a
    list) one record per round."""
    from lmalloy.proxy.model import _Rows, check_prompt_lengths

    draft = proxy.draft_member()
    members = list(proxy.members) + ([draft] if draft is proxy.draft else [])
    enc = check_prompt_lengths(members, prompts)
    B = len(prompts)
    lanes, slot = build_lanes(members, proxy.vocab, B)
    pending = torch.zeros(len(lanes), B, dtype=torch.long)
    for i in sorted({slot.index(s) for s in slot}):
        pending[slot[i]] = prefill(lanes[slot[i]], enc[i])
    roles = slot[: len(proxy.members)]
    d = slot[next(i for i, m in enumerate(members) if m is draft)]
    rows = _Rows(proxy, enc[0], stop, stop_at_eos, on_text)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = RowParams.same(B, temperature=temperature, top_k=top_k, top_p=top_p,
                            penalty=repetition_penalty, alphas=alphas, gen=gen)
    ctl = KControl(k, adaptive)
    while True:
        rooms = room(lanes, [max_new_tokens - len(r) for r in rows.ids])
        for b in range(B):
            rows.done[b] = rows.done[b] or bool(rooms[b] <= 0)
        active = ~torch.tensor(rows.done)
        if not active.any():
            break
        K, valid = plan(ctl.k, active, rooms)
        rnd = speculative_round(lanes, roles, d, pending, valid, K, params, rows.seen)
        taken, last = _take(rows, rnd, rooms, active, return_scores)
        eligible = torch.clamp(rooms - 1, min=0).clamp(max=K) * active
        ctl.record(K, int(eligible.sum()), int(torch.minimum(rnd.n, eligible).sum()), rnd)
        keep = torch.tensor([0 if rows.done[b] else taken[b] for b in range(B)])
        for lane in lanes:
            lane.keep(K + 1, keep)
            lane.compact()
        pending[:] = torch.tensor(last)[None]
        if trace is not None:
            trace.append({"k": K, "valid": valid, "drafts": rnd.drafts, "n": rnd.n, "y": rnd.y,
                          "px": rnd.px, "qx": rnd.qx, "taken": taken, "eligible": eligible})
    proxy.last_speculative = ctl.stats()
    return rows.finish(list(prompts))
