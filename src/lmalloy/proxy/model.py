"""Proxy-tuned generation and scoring over any transformers causal LMs.

Proxy-tuning (Liu et al. 2024, arXiv 2401.08565): a large model behaves like its tuned
version when, at every decoding step, the difference between a small tuned model and its
untuned base is added to its logits:

    z = z_large + Σᵢ αᵢ · (z_tunedᵢ − z_untunedᵢ)

What is notable here:
- every model keeps its own KV cache (a transformers `DynamicCache`), so a step costs one
  cached single-token forward per model, not a re-run of the whole sequence;
- prompts are batched with left padding; each model gets its own attention mask and
  position ids (cumsum of the mask), so padded rows give the same tokens as unpadded ones;
- each model may see its own prompt format (e.g. the tuned model's chat template) while
  the generated tokens are shared;
- the tokenizers must agree token for token (the first differing token is named);
  logit rows that exist only as head padding are cut to the common size;
- scoring (log-likelihood of continuations, perplexity through
  `lmalloy.train.heldout.evaluate(logits_fn=...)`, multiple-choice ranking) uses the
  same logit arithmetic on full sequences, so the effect is measured, not only sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmalloy.errors import UserError
from lmalloy.io.folder import context_length
from lmalloy.io.tokenizer_files import first_vocab_difference, vocab_of
from lmalloy.proxy.sampling import combine, next_tokens, repetition_penalty

ROLES = ("large", "tuned", "untuned")


# ---------------------------------------------------------------- validation helpers

def check_alphas(alphas: Sequence[float]) -> None:
    for a in alphas:
        if not math.isfinite(a):
            raise UserError(f"`--alpha` must be finite, got {a}")


def format_prompt(fmt: str | None, prompt: str, tokenizer) -> tuple[str, bool]:
    """(text, already_has_special_tokens) of a prompt under a format: None/"raw" = as is,
    "chat" = the tokenizer's chat template with one user turn, else a template with
    `{prompt}`."""
    if fmt in (None, "raw"):
        return prompt, False
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{tokenizer.name_or_path}: the tokenizer has no chat template "
                            "(use a `{prompt}` template instead of `chat`)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return text, True
    return fmt.replace("{prompt}", prompt), False


def check_folder(path: str, allow_pickle: bool = False) -> dict:
    """The folder's config.json after checking it is a local causal-LM folder (headers
    only, no weights read). Hub ids are not accepted: nothing is downloaded."""
    from lmalloy.io.folder import open_model

    p = Path(path)
    if not p.exists():
        raise UserError(f"model folder not found: {path}")
    m = open_model(p, allow_pickle=allow_pickle)
    archs = m.config.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UserError(f"{path}: {archs[0]} is not a causal language model")
    return m.config


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
        raise UserError(f"{path}: no usable tokenizer ({str(e).splitlines()[0][:160]}); pass "
                        "--tokenizer") from None


def _tokenizers(paths: list[tuple[str, str]], tokenizer: str | None) -> dict[str, Any]:
    """Each folder's tokenizer (or the shared `tokenizer` for folders without one); they
    must agree token for token with the large model's (the first differing token named).
    The tokenizer.json files are compared first, before transformers loads."""
    large = paths[0][1]
    v0 = vocab_of(large)
    for _, p in paths[1:]:
        v = vocab_of(p)
        diff = first_vocab_difference(v0, v) if v0 is not None and v is not None else None
        if diff:
            raise UserError(f"tokenizers of {large} and {p} differ: first differing "
                            f"token at {diff}")
    shared = load_tokenizer(tokenizer) if tokenizer else None
    toks: dict[str, Any] = {}
    for _, p in paths:
        if p not in toks:
            toks[p] = load_tokenizer(p) if _has_tokenizer(p) or shared is None else shared
    ref = toks[large]
    vocab0 = ref.get_vocab()
    for _, p in paths[1:]:
        if toks[p] is ref:
            continue
        diff = first_vocab_difference(vocab0, toks[p].get_vocab())
        if diff:
            raise UserError(f"tokenizers of {large} and {p} differ: first differing "
                            f"token at {diff}")
    return toks


def prompt_ids(m: Member, prompt: str) -> list[int]:
    """A prompt's token ids for one member, in its format; an empty prompt starts from BOS
    (or EOS, the document separator)."""
    text, templated = format_prompt(m.fmt, prompt, m.tokenizer)
    ids = m.tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if not ids:
        tok = m.tokenizer
        first = next((t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                      if t is not None), 0)
        ids = [first]
    return list(ids)


def check_prompt_lengths(members, prompts: Sequence[str]) -> dict[int, list[list[int]]]:
    """Each member's prompt ids (index -> rows); a prompt that leaves no room in a member's
    context window is a UserError."""
    out = {}
    for k, m in enumerate(members):
        rows = [prompt_ids(m, p) for p in prompts]
        for i, r in enumerate(rows):
            if m.ctx_len is not None and len(r) >= m.ctx_len:
                raise UserError(f"prompt {i + 1} is {len(r)} tokens for {m.name}, not "
                                f"shorter than its context window of {m.ctx_len} tokens")
        out[k] = rows
    return out


def check_speculative(k: int, members, has_draft: bool = True) -> None:
    """`--speculative K`: at least 1, and K drafts plus a one-token prompt must fit every
    model's context window."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"`--speculative` must be a whole number of draft tokens >= 1, got {k}")
    if not has_draft:
        raise UserError("`--speculative` needs a draft model: a --tuned/--untuned pair "
                        "(the first tuned model drafts) or --draft")
    ctx = min((m.ctx_len for m in members if m.ctx_len is not None), default=None)
    if ctx is not None and k > ctx - 2:
        raise UserError(f"`--speculative` {k} drafts do not fit the context window of {ctx} "
                        f"tokens (at most {ctx - 2})")


# ---------------------------------------------------------------- records

@dataclass
class Member:
    """One of the ensemble's models with its tokenizer and prompt format."""

    name: str
    role: str  # "large", "tuned" or "untuned"
    model: Any
    tokenizer: Any
    fmt: str | None = None
    ctx_len: int | None = None


@dataclass
class Generation:
    prompt: str
    text: str
    tokens: list[int]
    finish_reason: str  # "eos", "stop", "length"
    scores: list[torch.Tensor] = field(default_factory=list, repr=False)  # per step, (V,)


# ---------------------------------------------------------------- the model

class ProxyTuned:
    """A large causal LM steered by (tuned, untuned, α) pairs of small ones.

    `ProxyTuned.from_pretrained(large, tuned, untuned, alpha)` validates the folders and the
    tokenizers before loading any weights. With α = 0 or tuned = untuned it reproduces the
    large model exactly.
    """

    def __init__(self, large: Member, pairs: Sequence[tuple[Member, Member]],
                 alphas: Sequence[float], draft: Member | None = None):
        if len(pairs) != len(alphas):
            raise UserError(f"{len(pairs)} tuned/untuned pair(s) but {len(alphas)} alpha(s)")
        check_alphas(alphas)
        self.large = large
        self.pairs = [tuple(p) for p in pairs]
        self.alphas = [float(a) for a in alphas]
        self.members = [large] + [m for p in self.pairs for m in p]
        self.draft = draft  # speculative decoding's draft when not the first tuned model
        self.last_speculative: dict = {}
        self.tokenizer = large.tokenizer
        vocab0 = self.tokenizer.get_vocab()
        for m in self.members[1:] + ([draft] if draft is not None else []):
            if m.tokenizer is self.tokenizer:
                continue
            diff = first_vocab_difference(vocab0, m.tokenizer.get_vocab())
            if diff:
                raise UserError(f"tokenizers of {large.name} and {m.name} differ: first "
                                f"differing token at {diff}")
        n_tok = len(vocab0)
        everyone = self.members + ([draft] if draft is not None else [])
        heads = [m.model.get_output_embeddings().weight.shape[0] for m in everyone]
        for m, h in zip(everyone, heads, strict=True):
            if h < n_tok:
                raise UserError(f"{m.name}: output layer has {h} rows, fewer than the "
                                f"tokenizer's {n_tok} tokens")
        self.vocab = min(heads)  # rows beyond this exist only as head padding somewhere
        self.eos_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.device = next(large.model.parameters()).device

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, large: str, tuned: str | Sequence[str],
                        untuned: str | Sequence[str], alpha: float | Sequence[float] = 1.0,
                        *, formats: dict[str, str | None] | None = None,
                        tokenizer: str | None = None, dtype: str = "float32",
                        device: str = "cpu", allow_pickle: bool = False,
                        prompts: Sequence[str] = (), draft: str | None = None,
                        speculative: int | None = None) -> ProxyTuned:
        """Load the models. `formats` maps a role ("large", "tuned", "untuned", "draft") to a
        prompt format ("raw", "chat" or a `{prompt}` template); `draft` is a folder for
        speculative decoding's draft model (default: the first tuned model). Everything is
        validated (folders, α, tokenizers, that each of `prompts` fits every model's context,
        and that `speculative` drafts fit it) before the first weight is read."""
        tuned = [tuned] if isinstance(tuned, str) else list(tuned)
        untuned = [untuned] if isinstance(untuned, str) else list(untuned)
        alphas = [alpha] * len(tuned) if isinstance(alpha, int | float) else list(alpha)
        if len(alphas) == 1 and len(tuned) > 1:
            alphas = alphas * len(tuned)
        if len(tuned) != len(untuned):
            raise UserError(f"{len(tuned)} --tuned model(s) but {len(untuned)} --untuned")
        if len(alphas) != len(tuned):
            raise UserError(f"{len(alphas)} --alpha value(s) for {len(tuned)} pair(s)")
        check_alphas(alphas)
        from lmalloy.io.models import check_device

        check_device(device)
        formats = formats or {}
        paths = [("large", large)] + [r for t, u in zip(tuned, untuned, strict=True)
                                      for r in (("tuned", t), ("untuned", u))]
        paths += [("draft", draft)] if draft else []
        confs = {p: check_folder(p, allow_pickle) for _, p in paths}
        toks = _tokenizers(paths, tokenizer)
        members = [Member(p, role, None, toks[p], formats.get(role), context_length(confs[p]))
                   for role, p in paths]
        check_prompt_lengths(members, prompts)
        if speculative is not None:
            check_speculative(speculative, members, has_draft=bool(draft or tuned))
        from lmalloy.io.models import load_causal_lm

        loaded: dict[str, Any] = {}
        for m in members:
            if m.name not in loaded:
                loaded[m.name] = load_causal_lm(m.name, allow_pickle, dtype).to(device)
            m.model = loaded[m.name]
        pairs = [(members[1 + 2 * i], members[2 + 2 * i]) for i in range(len(tuned))]
        return cls(members[0], pairs, alphas, members[-1] if draft else None)

    def draft_member(self) -> Member:
        """Speculative decoding's draft: the named draft model, else the first tuned one."""
        if self.draft is not None:
            return self.draft
        if not self.pairs:
            raise UserError("`--speculative` needs a draft model: a --tuned/--untuned pair "
                            "(the first tuned model drafts) or --draft")
        return self.pairs[0][0]

    # ------------------------------------------------------------ tokenisation

    def encode_prompt(self, m: Member, prompt: str) -> list[int]:
        return prompt_ids(m, prompt)

    def check_lengths(self, prompts: Sequence[str]) -> dict[int, list[list[int]]]:
        """Each member's prompt ids (index -> rows); a prompt that leaves no room in a
        model's context window is a UserError."""
        return check_prompt_lengths(self.members, prompts)

    # ------------------------------------------------------------ full-sequence logits

    def _forward(self, m: Member, ids: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        if mask is None:
            return m.model(input_ids=ids, use_cache=False).logits[..., : self.vocab]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return m.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=False).logits[..., : self.vocab]

    @torch.no_grad()
    def member_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(z_large, [(z_tuned, z_untuned), ...]) for the same ids, each (B, T, V); models
        shared between roles run once."""
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        cache: dict[int, torch.Tensor] = {}

        def run(m: Member) -> torch.Tensor:
            if id(m.model) not in cache:
                cache[id(m.model)] = self._forward(m, ids, mask)
            return cache[id(m.model)]

        return run(self.large), [(run(t), run(u)) for t, u in self.pairs]

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               alphas: Sequence[float] | None = None) -> torch.Tensor:
        """Proxy-tuned logits of every position, (B, T) -> (B, T, V) float32. Usable as
        `evaluate(None, ..., logits_fn=proxy.logits)`."""
        z_large, pairs = self.member_logits(input_ids, attention_mask)
        return combine(z_large, pairs, self.alphas if alphas is None else alphas)

    @torch.no_grad()
    def score(self, contexts: Sequence[str], continuations: Sequence[str | Sequence[int]],
              batch_size: int = 8, alphas: Sequence[float] | None = None) -> list[dict]:
        """Proxy-tuned log-likelihood of each continuation given its context.

        A continuation is text or token ids. Returns per item {"logprob": Σ log p (nats), "tokens": n, "greedy": whether greedy
        decoding reproduces the continuation token for token}. Each model sees its own
        prompt format of the context; the continuation tokens are shared (left padding puts
        them at the end of every row, so they line up across models)."""
        alphas = self.alphas if alphas is None else list(alphas)
        out: list[dict] = []
        for s in range(0, len(contexts), batch_size):
            ctxs, conts = contexts[s : s + batch_size], continuations[s : s + batch_size]
            cont_ids = [self._continuation_ids(c, x) for c, x in zip(ctxs, conts, strict=True)]
            n_max = max(len(c) for c in cont_ids)
            if n_max == 0:
                out += [{"logprob": 0.0, "tokens": 0, "greedy": True} for _ in ctxs]
                continue
            per_model: dict[int, torch.Tensor] = {}
            zs = []
            for m in self.members:
                if id(m.model) not in per_model or m.fmt not in (None, "raw"):
                    rows = [self.encode_prompt(m, c) + ids
                            for c, ids in zip(ctxs, cont_ids, strict=True)]
                    ids, mask = left_pad(rows, self.pad_id)
                    for i, r in enumerate(rows):
                        if m.ctx_len is not None and len(r) > m.ctx_len:
                            raise UserError(f"item {s + i + 1} is {len(r)} tokens, longer than "
                                            f"{m.name}'s context window of {m.ctx_len}")
                    z = self._forward(m, ids.to(self.device), mask.to(self.device))
                    z = z[:, -n_max - 1 : -1]  # (B, N, V): the positions predicting the ends
                    if m.fmt in (None, "raw"):
                        per_model[id(m.model)] = z
                else:
                    z = per_model[id(m.model)]
                zs.append(z)
            z = combine(zs[0], [(zs[1 + 2 * i], zs[2 + 2 * i]) for i in range(len(self.pairs))],
                        alphas)  # (B, N, V)
            tgt = torch.full((len(ctxs), n_max), -100, dtype=torch.long)
            for i, c in enumerate(cont_ids):
                if c:
                    tgt[i, n_max - len(c):] = torch.tensor(c)
            tgt = tgt.to(z.device)
            valid = tgt >= 0
            lp = z.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # (B, N)
            hit = (z.argmax(-1) == tgt) | ~valid
            for i in range(len(ctxs)):
                out.append({"logprob": float((lp[i] * valid[i]).sum()),
                            "tokens": int(valid[i].sum()), "greedy": bool(hit[i].all())})
        return out

    def _continuation_ids(self, context: str, continuation: str | Sequence[int]) -> list[int]:
        if not isinstance(continuation, str):  # already token ids
            return [int(t) for t in continuation]
        tok = self.tokenizer
        ctx = self.encode_prompt(self.large, context)
        whole = tok(context + continuation, add_special_tokens=True)["input_ids"]
        if self.large.fmt in (None, "raw") and whole[: len(ctx)] == ctx:
            return list(whole[len(ctx):])
        return list(tok(continuation, add_special_tokens=False)["input_ids"])

    def choose(self, items: Sequence[dict], batch_size: int = 8, normalize: bool = False,
               alphas: Sequence[float] | None = None) -> dict:
        """Multiple choice by log-likelihood ranking. items: {"context", "choices": [..],
        "answer": index}. Returns `lmalloy.train.heldout.rank_choices`' {"accuracy",
        "predictions", ...}; `normalize` ranks by the mean log-probability per token."""
        from lmalloy.train.heldout import rank_choices

        ctxs = [it["context"] for it in items for _ in it["choices"]]
        conts = [ch for it in items for ch in it["choices"]]
        return rank_choices(items, self.score(ctxs, conts, batch_size, alphas), normalize)

    # ------------------------------------------------------------ generation

    def _states(self, enc: dict[int, list[list[int]]], use_cache: bool
                ) -> tuple[list[_State], list[int]]:
        """One decoding state per distinct (model, format), and each member's state index."""
        states: list[_State] = []
        slot: list[int] = []
        seen_keys: dict[tuple, int] = {}
        for k, m in enumerate(self.members):
            key = (id(m.model), m.fmt)
            if key not in seen_keys:
                seen_keys[key] = len(states)
                states.append(_State(m, *left_pad(enc[k], self.pad_id), use_cache))
            slot.append(seen_keys[key])
        return states, slot

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0,
                 stop: Sequence[str] = (), seed: int = 0, stop_at_eos: bool = True,
                 on_text: Callable[[int, str], None] | None = None, use_cache: bool = True,
                 parallel: bool = False, return_scores: bool = False,
                 alphas: Sequence[float] | None = None, speculative: int | None = None,
                 adaptive_k: bool = False, trace: list | None = None) -> list[Generation]:
        """Generate for a batch of prompts (left-padded together).

        `on_text(row, text)` receives each row's text as it is produced (text that could be
        the start of a stop string is held back until it is not). `use_cache=False` re-runs
        every model on the whole sequence at each step (the naive loop, for comparison).
        `parallel=True` runs the tuned/untuned models in a second thread beside the large
        one. `return_scores` keeps each step's combined logits (before the processors).
        `speculative=K` drafts K tokens per round with the draft model and keeps exactly the
        same distribution (lmalloy.proxy.speculative); `adaptive_k` picks each round's K in
        [1, K] from the measured acceptance rate and costs."""
        if top_p is not None and not 0 < top_p <= 1:
            raise UserError(f"`--top-p` must be in (0, 1], got {top_p}")
        alphas = self.alphas if alphas is None else list(alphas)
        check_alphas(alphas)
        prompts = list(prompts)
        if speculative is not None:
            from lmalloy.proxy.speculative import decode

            check_speculative(speculative, self.members + [self.draft_member()])
            return decode(self, prompts, k=speculative, adaptive=adaptive_k,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty, stop=stop,
                          seed=seed, stop_at_eos=stop_at_eos, on_text=on_text,
                          return_scores=return_scores, alphas=alphas, trace=trace)
        enc = self.check_lengths(prompts)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        states, slot = self._states(enc, use_cache)
        steps = min([max_new_tokens] + [st.m.ctx_len - st.ids.shape[1] for st in states
                                        if st.m.ctx_len is not None])
        rows = _Rows(self, enc[0], stop, stop_at_eos, on_text)
        pool = ThreadPoolExecutor(1) if parallel and len(states) > 1 else None
        last: torch.Tensor | None = None  # (B,) the tokens fed at this step
        try:
            for _ in range(steps):
                zs = self._step_all(states, last, pool)  # each (B, V)
                z = combine(zs[slot[0]], [(zs[slot[1 + 2 * i]], zs[slot[2 + 2 * i]])
                                          for i in range(len(self.pairs))], alphas).cpu()
                if return_scores:
                    rows.keep_scores(z)
                z = _repetition(z, rows.seen, repetition_penalty)
                nxt = next_tokens(z, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=gen)  # (B,)
                last = torch.tensor(rows.accept(nxt.tolist()), dtype=torch.long)
                if all(rows.done):
                    break
        finally:
            if pool is not None:
                pool.shutdown()
        self.last_cache_bytes = {st.m.name: st.cache_bytes() for st in states}
        return rows.finish(prompts)

    def _step_all(self, states: list[_State], last: torch.Tensor | None,
                  pool: ThreadPoolExecutor | None) -> list[torch.Tensor]:
        if pool is None:
            return [st.step(last, self.vocab) for st in states]
        fut = pool.submit(states[0].step, last, self.vocab)
        rest = [st.step(last, self.vocab) for st in states[1:]]
        return [fut.result(), *rest]


class _Rows:
    """Per-row bookkeeping of a batch being decoded: tokens, text, stops, streaming."""

    def __init__(self, proxy: ProxyTuned, prompt_ids: list[list[int]], stop: Sequence[str],
                 stop_at_eos: bool, on_text: Callable[[int, str], None] | None):
        B, V = len(prompt_ids), proxy.vocab
        self.tok, self.eos_id, self.pad_id, self.V = proxy.tokenizer, proxy.eos_id, \
            proxy.pad_id, V
        self.stop, self.stop_at_eos, self.on_text = list(stop), stop_at_eos, on_text
        self.seen = torch.zeros(B, V, dtype=torch.bool)  # tokens in each row, for the penalty
        for i, r in enumerate(prompt_ids):
            self.seen[i, torch.tensor([t for t in r if t < V], dtype=torch.long)] = True
        self.ids: list[list[int]] = [[] for _ in range(B)]
        self.done = [False] * B
        self.reason = ["length"] * B
        self.texts = [""] * B
        self.emitted = [0] * B
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.need_text = bool(stop) or on_text is not None  # else decode once at the end

    def keep_scores(self, z: torch.Tensor, which: Sequence[bool] | None = None) -> None:
        for i in range(len(self.done)):
            if not self.done[i] and (which is None or which[i]):
                self.scores[i].append(z[i].clone())

    def accept(self, toks: list[int | None]) -> list[int | None]:
        """Take one sampled token per row (None: nothing for that row this time); returns the
        tokens to feed (pad for done rows)."""
        for i, t in enumerate(toks):
            if t is None:
                continue
            if self.done[i]:
                toks[i] = self.pad_id
                continue
            if self.stop_at_eos and t == self.eos_id:
                self.done[i], self.reason[i] = True, "eos"
                toks[i] = self.pad_id
            else:
                self.ids[i].append(t)
                if t < self.V:
                    self.seen[i, t] = True
                if self.need_text:
                    self.texts[i] = self.tok.decode(self.ids[i], skip_special_tokens=False)
                self._check_stop(i)
            self._stream(i)
        return toks

    def _check_stop(self, i: int) -> None:
        text = self.texts[i]
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.texts[i] = text[:cut]
            self.done[i], self.reason[i] = True, "stop"

    def _stream(self, i: int) -> None:
        """Hand out the text that can no longer become a stop string or a split character."""
        if self.on_text is None:
            return
        text = self.texts[i]
        safe = len(text) if self.done[i] else len(text) - self.hold
        if not self.done[i]:
            while safe > self.emitted[i] and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > self.emitted[i]:
            self.on_text(i, text[self.emitted[i]:safe])
            self.emitted[i] = safe

    def finish(self, prompts: list[str]) -> list[Generation]:
        if not self.need_text:
            self.texts = [self.tok.decode(r, skip_special_tokens=False) for r in self.ids]
        if self.on_text is not None:
            for i, t in enumerate(self.texts):
                if self.emitted[i] < len(t):
                    self.on_text(i, t[self.emitted[i]:])
        return [Generation(p, self.texts[i], self.ids[i], self.reason[i], self.scores[i])
                for i, p in enumerate(prompts)]


class _State:
    """One model's decoding state: the left-padded ids, attention mask and KV cache."""

    def __init__(self, m: Member, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool):
        self.m = m
        dev = next(m.model.parameters()).device
        self.ids = ids.to(dev)  # (B, L) grows by one column per step
        self.mask = mask.to(dev)  # (B, L)
        self.use_cache = use_cache
        self.cache = None

    def step(self, last: torch.Tensor | None, vocab: int) -> torch.Tensor:
        """Feed the previous step's tokens (None at the first step: the prompt);
        returns the last position's logits (B, V) in float32."""
        from transformers import DynamicCache

        if last is not None:
            last = last.to(self.ids.device)[:, None]  # (B, 1)
            self.ids = torch.cat([self.ids, last], 1)
            self.mask = torch.cat([self.mask, torch.ones_like(last)], 1)
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        model = self.m.model
        if not self.use_cache:
            out = model(input_ids=self.ids, attention_mask=self.mask, position_ids=pos,
                        use_cache=False, logits_to_keep=1)
        elif self.cache is None:  # the prompt: fill the cache
            self.cache = DynamicCache(config=model.config)
            out = model(input_ids=self.ids, attention_mask=self.mask, position_ids=pos,
                        cache=self.cache, use_cache=True, logits_to_keep=1)
        else:  # one new token per row against the cache
            out = model(input_ids=last, attention_mask=self.mask, position_ids=pos[:, -1:],
                        cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :vocab].float()  # (B, V)

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        n = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
        return n


def _repetition(z: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    return repetition_penalty(z, seen[:, : z.shape[-1]], penalty)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows: (ids (B, L), attention mask (B, L)) as int64."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, L - len(r):] = 1
    return ids, mask


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
