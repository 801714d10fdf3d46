"""Preference pairs: JSONL reading and a built-in generator of pairs from a corpus.

A pair is one JSON object per line with string fields `prompt`, `chosen`, `rejected`;
optional `distribution` (a name to group accuracy by) and `flipped` (true when the
generator swapped the pair's labels: label noise). Other fields are kept but unused.

The generator turns code into preference data without any human label: a snippet of
`prompt_lines + answer_lines` consecutive lines is cut from a document; `chosen` is the
real answer, `rejected` the same answer damaged by one corruption kind. Each kind is its
own distribution, so a reward model trained on some kinds can be tested on others (WARM,
arXiv 2401.12187, tests robustness under such shifts). Label noise flips exactly
round(fraction × n) pairs, chosen at random, and marks them, so memorisation of the
wrong labels can be measured later (WARM's 25%-flipped setting).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lmalloy.data.jsonl import iter_jsonl
from lmalloy.errors import UserError

REQUIRED = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    distribution: str = ""
    flipped: bool = False
    domain: str = ""
    source: str = ""


# ----------------------------------------------------------------------------- reading


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs of one JSONL file; a bad line is a UserError naming the file and line."""
    p = Path(path)
    pairs: list[Pair] = []
    for i, obj in iter_jsonl(p, "preference data"):
        if not isinstance(obj, dict):
            raise UserError(f"{p} line {i}: expected a JSON object with "
                            f"{', '.join(REQUIRED)}")
        for key in REQUIRED:
            if key not in obj:
                raise UserError(f"{p} line {i}: missing field `{key}` (each line needs "
                                f"{', '.join(REQUIRED)})")
            if not isinstance(obj[key], str):
                raise UserError(f"{p} line {i}: field `{key}` must be a string, got "
                                f"{type(obj[key]).__name__}")
        if not isinstance(obj.get("flipped", False), bool):
            raise UserError(f"{p} line {i}: field `flipped` must be true or false")
        pairs.append(Pair(obj["prompt"], obj["chosen"], obj["rejected"],
                          str(obj.get("distribution") or ""), obj.get("flipped", False),
                          str(obj.get("domain") or ""), str(obj.get("source") or "")))
    if not pairs:
        raise UserError(f"{p}: no preference pairs (the file is empty)")
    return pairs


def write_pairs(pairs: list[Pair], path: str | Path, overwrite: bool = True) -> None:
    """Write JSONL atomically (`lmalloy.io.writer.atomic_write_text`)."""
    from lmalloy.io.writer import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(asdict(x), ensure_ascii=False) + "\n"
                                    for x in pairs), overwrite=overwrite)


# ----------------------------------------------------------------------------- corruptions
# Each takes (answer, rng, other answers) and returns a damaged answer (maybe unchanged:
# the caller then tries another snippet).

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")


def swap_tokens(text: str, rng: random.Random, _pool: list[str], n: int = 2) -> str:
    """Swap n random pairs of distinct tokens (identifiers, numbers, punctuation)."""
    spans = [m.span() for m in WORD.finditer(text)]
    if len(spans) < 4:
        return text
    toks = [text[a:b] for a, b in spans]
    for _ in range(n):
        for _try in range(10):
            i, j = rng.sample(range(len(toks)), 2)
            if toks[i] != toks[j]:
                toks[i], toks[j] = toks[j], toks[i]
                break
    out, last = [], 0
    for (a, b), t in zip(spans, toks, strict=True):
        out += [text[last:a], t]
        last = b
    return "".join(out) + text[last:]


def shuffle_lines(text: str, rng: random.Random, _pool: list[str]) -> str:
    lines = text.split("\n")
    body = [x for x in lines if x.strip()]
    if len(set(body)) < 2:
        return text
    for _ in range(10):
        perm = lines[:]
        rng.shuffle(perm)
        if perm != lines:
            return "\n".join(perm)
    return text


def truncate(text: str, rng: random.Random, _pool: list[str]) -> str:
    """Cut the answer at 30-70% of its characters (mid-line)."""
    if len(text) < 10:
        return text
    return text[: int(len(text) * rng.uniform(0.3, 0.7))]


def repeat_line(text: str, rng: random.Random, _pool: list[str]) -> str:
    """One non-blank line repeated over the rest of the answer (degenerate sampling)."""
    lines = text.split("\n")
    idx = [i for i, x in enumerate(lines) if x.strip()]
    if len(idx) < 2:
        return text
    i = rng.choice(idx[:-1])
    return "\n".join(lines[: i + 1] + [lines[i]] * (len(lines) - i - 1))


def typos(text: str, rng: random.Random, _pool: list[str], rate: float = 0.08) -> str:
    """Replace a share of non-space characters with other characters of the answer."""
    chars = list(text)
    pos = [i for i, c in enumerate(chars) if not c.isspace()]
    if len(pos) < 5:
        return text
    alphabet = sorted({c for c in chars if not c.isspace()})
    for i in rng.sample(pos, max(1, int(rate * len(pos)))):
        chars[i] = rng.choice(alphabet)
    return "".join(chars)


def foreign(text: str, rng: random.Random, pool: list[str]) -> str:
    """The answer of another snippet (fluent, but not a continuation of this prompt)."""
    for _ in range(10):
        other = rng.choice(pool)
        if other != text:
            return other
    return text


CORRUPTIONS: dict[str, Callable[[str, random.Random, list[str]], str]] = {
    "swap": swap_tokens, "shuffle": shuffle_lines, "truncate": truncate,
    "repeat": repeat_line, "typo": typos, "foreign": foreign,
}


# ----------------------------------------------------------------------------- generator


def in_test_split(name: str, test_fraction: float) -> bool:
    """A deterministic share of snippets (by document name and line) forms the `test` split."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return h / 2**64 < test_fraction


def snippets(docs, prompt_lines: int, answer_lines: int, max_chars: int
             ) -> list[tuple[str, str, str, str]]:
    """(domain, "name:line", prompt, answer) windows of consecutive lines, non-overlapping.

    A window is kept when its answer has at least 2 non-blank lines and 20 characters,
    and the whole window fits in max_chars.
    """
    out = []
    k = prompt_lines + answer_lines
    for d in docs:
        lines = d.text.split("\n")
        for s in range(0, len(lines) - k + 1, k):
            prompt = "".join(x + "\n" for x in lines[s : s + prompt_lines])
            answer = "\n".join(lines[s + prompt_lines : s + k])
            if (sum(1 for x in answer.split("\n") if x.strip()) < 2
                    or len(answer.strip()) < 20 or len(prompt) + len(answer) > max_chars):
                continue
            out.append((d.domain, f"{d.name}:{s + 1}", prompt, answer))
    return out


def generate(docs, kinds: list[str], num_pairs: int, label_noise: float = 0.0,
             prompt_lines: int = 3, answer_lines: int = 3, max_chars: int = 400,
             seed: int = 0, split: str = "all", test_fraction: float = 0.2) -> list[Pair]:
    """Preference pairs from documents: kinds in turn, then label noise on a random subset.

    split `train`/`test` keeps the snippets on either side of `in_test_split`, so a test set
    never shares a snippet with a training set made with the same --test-fraction.
    """
    if not 0 <= label_noise < 0.5:
        raise UserError(f"`--label-noise` must be in [0, 0.5), got {label_noise}")
    rng = random.Random(seed)
    cands = snippets(docs, prompt_lines, answer_lines, max_chars)
    if split != "all":
        cands = [c for c in cands if in_test_split(c[1], test_fraction) == (split == "test")]
    rng.shuffle(cands)
    pool = [c[3] for c in cands]
    pairs: list[Pair] = []
    for domain, source, prompt, answer in cands:
        if len(pairs) == num_pairs:
            break
        kind = kinds[len(pairs) % len(kinds)]
        bad = CORRUPTIONS[kind](answer, rng, pool)
        if bad == answer or not bad.strip():
            continue
        pairs.append(Pair(prompt, answer, bad, kind, False, domain, source))
    if not pairs:
        raise UserError("no snippets to make pairs from: the corpus has no windows of "
                        f"{prompt_lines}+{answer_lines} lines within --max-chars {max_chars}")
    return flip_labels(pairs, label_noise, seed)


def flip_labels(pairs: list[Pair], fraction: float, seed: int = 0) -> list[Pair]:
    """Swap chosen/rejected of exactly round(fraction × n) random pairs; mark them flipped."""
    if not 0 <= fraction < 0.5:
        raise UserError(f"`--label-noise` must be in [0, 0.5), got {fraction}")
    rng = random.Random(seed + 7919)
    k = round(fraction * len(pairs))
    flip = set(rng.sample(range(len(pairs)), k))
    out = []
    for i, x in enumerate(pairs):
        if i in flip:
            x = Pair(x.prompt, x.rejected, x.chosen, x.distribution, not x.flipped, x.domain,
                     x.source)
        out.append(x)
    return out


def main(cfg) -> int:
    """`lmalloy reward data`: write generated preference pairs as JSONL."""
    import sys

    from lmalloy.data.corpus import corpus_from
    from lmalloy.io.writer import check_output_file

    out = check_output_file(cfg.out, cfg.overwrite)
    corpus = corpus_from(cfg)
    pairs = generate(corpus.documents, cfg.kinds, cfg.num_pairs, cfg.label_noise,
                     cfg.prompt_lines, cfg.answer_lines, cfg.max_chars, cfg.seed, cfg.split,
                     cfg.test_fraction)
    write_pairs(pairs, out, overwrite=cfg.overwrite)
    n_flip = sum(p.flipped for p in pairs)
    short = f" (asked {cfg.num_pairs}; the corpus has no more snippets)" \
        if len(pairs) < cfg.num_pairs else ""
    print(f"reward data: {len(pairs)} pairs{short}, kinds {', '.join(cfg.kinds)}, "
          f"{n_flip} flipped -> {out}", file=sys.stderr)
    return 0
