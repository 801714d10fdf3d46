"""Corpora: documents with a domain each, held in memory or streamed from JSONL/Parquet.

The built-in `stdlib` corpus is the running interpreter's standard library: every `.py`
file under `sysconfig.get_paths()["stdlib"]` (site-packages excluded), sorted by path,
one document per file, the domain being the top-level package (`asyncio`, `email`, ...;
top-level modules form the domain `toplevel`). It is on every machine, so the demo and
the tests need no download.

User data: files, folders (every file below, recursively; the domain is the first
sub-folder, or the folder's name), and globs. `.jsonl` and `.parquet` files are *streamed*:
one document per line (row), its text in the `--text-field` field (column, default `text`),
its domain the file's unless the line's `domain` field (a `domain` column) names one. They
are checked cheaply when loaded, read in full only by `scan` and by packing, slice by slice,
and never held (`lmalloy.data.stream`). Any other file is *held*: read now, one document
each. Policy for bad files: a held file that is not UTF-8 or holds NUL bytes is skipped and
counted (a warning names the count and the first one); a bad JSONL line or Parquet row is
an error naming it; an empty result is an error.

Corpus order: held documents in source order, then streamed files in source order.
`--domains`/`--exclude-domains`, then `--max-chars-per-domain` (`Cap`), apply to both.
"""

from __future__ import annotations

import glob as globlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmalloy.data.stream import STREAM_SUFFIXES, Slice, Stream, open_stream, slices, whole
from lmalloy.errors import UserError, unknown


@dataclass
class Document:
    domain: str
    name: str
    text: str


class Cap:
    """`--max-chars-per-domain`: a document is kept while its domain's kept characters are
    below the cap (whole documents, in corpus order)."""

    def __init__(self, limit: int | None, used: dict[str, int] | None = None):
        self.limit, self.used = limit, dict(used or {})

    def __call__(self, domain: str, nchars: int) -> bool:
        if self.limit is None:
            return True
        used = self.used.get(domain, 0)
        if used >= self.limit:
            return False
        self.used[domain] = used + nchars
        return True


def progress(total: int, desc: str):
    """A bytes progress bar on stderr (off when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                disable=None, leave=False, mininterval=1.0)


@dataclass
class Corpus:
    held: list[Document]
    skipped: list[str] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    text_field: str = "text"
    keep: list[str] | None = None  # --domains (streamed documents are filtered as read)
    drop: list[str] = field(default_factory=list)
    max_chars_per_domain: int | None = None
    num_proc: int | None = None  # processes for the streamed files (None: min(4, cores))
    present: set[str] = field(default_factory=set)  # the held sources' domains, unfiltered
    _docs: list[Document] | None = field(default=None, init=False, repr=False, compare=False)
    _stats: dict[str, list[int]] | None = field(default=None, init=False, repr=False,
                                                compare=False)

    def cap(self) -> Cap:
        """The cap as it stands after the held documents (streamed ones come after them)."""
        used: dict[str, int] = {}
        for d in self.held:
            used[d.domain] = used.get(d.domain, 0) + len(d.text)
        return Cap(self.max_chars_per_domain, used)

    def filters(self) -> dict:
        return {"keep": frozenset(self.keep) if self.keep else None,
                "drop": frozenset(self.drop)}

    def slices(self) -> list[Slice]:
        return [sl for s in self.streams for sl in slices(s)]

    def streamed(self, desc: str | None = None, whole_files: bool = False
                 ) -> Iterator[tuple[str, str, int, Path]]:
        """(domain, text, location, file) of each streamed document the filters and the cap
        keep, in order, read in this process (a progress bar named `desc`; `whole_files`:
        one slice per file, so that JSONL locations are line numbers)."""
        from lmalloy.data.encode import Job

        job, cap = Job(None, text_field=self.text_field, **self.filters()), self.cap()
        todo = ([whole(s) for s in self.streams] if whole_files else self.slices())
        bar = progress(sum(sl.in_bytes for sl in todo), desc) if desc and todo else None
        try:
            for sl in todo:
                for domain, text, loc in job.documents(sl):
                    if cap(domain, len(text)):
                        yield domain, text, loc, Path(sl.path)
                if bar is not None:
                    bar.update(sl.in_bytes)
        finally:
            if bar is not None:
                bar.close()

    def iter_documents(self) -> Iterator[Document]:
        """Every document in corpus order; streamed files are read here, one at a time."""
        yield from self.held
        for domain, text, loc, path in self.streamed(whole_files=True):
            yield Document(domain, f"{path}:{loc}", text)

    def texts(self) -> Iterator[str]:
        """Every document's text, streamed (with a progress bar over the streamed files)."""
        yield from (d.text for d in self.held)
        yield from (text for _, text, _, _ in self.streamed("read"))

    @property
    def documents(self) -> list[Document]:
        """Every document in memory: streamed files are read in full, once. For the commands
        that need the texts of small corpora; packing and tokenizer training never call it."""
        if self._docs is None:
            self._docs = list(self.iter_documents())
        return self._docs

    def domains(self) -> dict[str, list[Document]]:
        out: dict[str, list[Document]] = {}
        for d in self.documents:
            out.setdefault(d.domain, []).append(d)
        return out

    @property
    def num_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[str, Path]]:
    root = stdlib_root()
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__")
                         and not d.startswith("config-"))
        for f in sorted(files):
            if f.endswith(".py"):
                p = Path(dirpath) / f
                rel = p.relative_to(root)
                domain = rel.parts[0] if len(rel.parts) > 1 else "toplevel"
                out.append((domain, p))
    out.sort(key=lambda dp: str(dp[1].relative_to(root)))
    return out


def _read_text(path: Path, skipped: list[str]) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if b"\x00" in raw:
        skipped.append(str(path))
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped.append(str(path))
        return None


def _stdlib_documents(domains: list[str] | None, exclude, only: bool,
                      skipped: list[str]) -> tuple[list[Document], set[str]]:
    """The documents of the stdlib domains wanted (the others are not read), and the names
    of all its domains."""
    files = _stdlib_files()
    names = {d for d, _ in files}
    for name in [*(domains or []), *exclude]:
        if name not in names and only:
            raise unknown("domain", name, names)
    docs = []
    for domain, p in files:
        if (domains and domain not in domains) or domain in exclude:
            continue
        text = _read_text(p, skipped)
        if text is not None:
            docs.append(Document(domain, str(p.relative_to(stdlib_root())), text))
    return docs, names


def _user_files(src: str) -> list[tuple[str, Path]]:
    p = Path(src)
    if p.is_file():
        return [(p.stem, p)]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        return [((f.relative_to(p).parts[0] if len(f.relative_to(p).parts) > 1
                  else p.resolve().name), f) for f in files]
    if any(ch in src for ch in "*?["):
        matches = sorted(Path(m) for m in globlib.glob(src, recursive=True))
        paths = [(m.parent.name or "data", m) for m in matches if m.is_file()]
        if not paths:
            raise UserError(f"--data glob `{src}` matches no files")
        return paths
    raise UserError(f"--data source not found: {src} (a file, folder, glob or `stdlib`)")


def _user_source(src: str, text_field: str, held: list[Document], streams: list[Stream],
                 skipped: list[str]) -> None:
    for domain, f in _user_files(src):
        if f.suffix in STREAM_SUFFIXES:
            streams.append(open_stream(f, domain, text_field))
        else:
            text = _read_text(f, skipped)
            if text is not None:
                held.append(Document(domain, str(f), text))


def load_corpus(sources: list[str], domains: list[str] | None = None,
                exclude: list[str] = (), max_chars_per_domain: int | None = None,
                quiet: bool = False, text_field: str = "text",
                num_proc: int | None = None) -> Corpus:
    """Read the held sources, open (and check) the streamed ones, filter domains; UserError
    when nothing is left. A `--domains` name that only a streamed file's lines could hold
    is checked by `scan`."""
    if not sources:
        raise UserError("--data is empty: name a corpus (`stdlib`), files, folders or globs")
    held: list[Document] = []
    streams: list[Stream] = []
    skipped: list[str] = []
    present: set[str] = set()
    for src in sources:
        if src == "stdlib":
            docs, names = _stdlib_documents(domains, exclude, len(sources) == 1, skipped)
            held += docs
            present |= names
        else:
            _user_source(src, text_field, held, streams, skipped)
    present |= {d.domain for d in held}
    could = present | {s.domain for s in streams}
    if not any(s.line_domains for s in streams):
        for name in [*(domains or []), *exclude]:
            if name not in could:
                raise unknown("domain", name, could)
    keep, drop = set(domains or ()) or None, set(exclude)

    def wanted(domain: str) -> bool:
        return (keep is None or domain in keep) and domain not in drop

    cap = Cap(max_chars_per_domain)
    held = [d for d in held if wanted(d.domain) and cap(d.domain, len(d.text)) and d.text]
    streams = [s for s in streams if not s.empty and (s.line_domains or wanted(s.domain))]
    if skipped and not quiet:
        print(f"lmalloy: skipped {len(skipped)} file(s) that are not UTF-8 text "
              f"(first: {skipped[0]})", file=sys.stderr)
    if not held and not streams:
        raise UserError(f"the corpus is empty: no text in {', '.join(sources)}"
                        + (f" (skipped {len(skipped)} non-UTF-8 file(s))" if skipped else ""))
    return Corpus(held, skipped, streams, text_field, sorted(keep) if keep else None,
                  sorted(drop), max_chars_per_domain, num_proc, present)


def corpus_from(cfg, quiet: bool = False) -> Corpus:
    """`load_corpus` with a command config's data fields (`lmalloy.data.config.DataFields`)."""
    return load_corpus(cfg.data, cfg.domains, cfg.exclude_domains, cfg.max_chars_per_domain,
                       quiet=quiet, text_field=cfg.text_field, num_proc=cfg.num_proc)


def scan(corpus: Corpus, num_proc: int | None = None) -> dict[str, list[int]]:
    """Per domain [documents, characters, UTF-8 bytes] of the corpus as it will be packed.

    Reads every streamed file in full (in parallel, no tokenizer), so every line is checked
    here, before heavy work, and so are `--domains` names only the lines could hold;
    UserError for a bad line, an unknown domain or an empty corpus. Computed once."""
    if corpus._stats is not None:
        return corpus._stats
    stats: dict[str, list[int]] = {}

    def add(domain: str, chars: int, nbytes: int) -> None:
        s = stats.setdefault(domain, [0, 0, 0])
        s[0], s[1], s[2] = s[0] + 1, s[1] + chars, s[2] + nbytes

    for d in corpus.held:
        add(d.domain, len(d.text), len(d.text.encode("utf-8")))
    seen = set(corpus.present)
    if corpus.streams:
        _scan_streams(corpus, num_proc, seen, add)
    for name in [*(corpus.keep or []), *corpus.drop]:
        if name not in seen:
            raise unknown("domain", name, seen)
    if not stats:
        raise UserError("the corpus is empty: no document with text in "
                        + ", ".join(str(s.path) for s in corpus.streams))
    corpus._stats = stats
    return stats


def _scan_streams(corpus: Corpus, num_proc: int | None, seen: set[str], add) -> None:
    from lmalloy.data.encode import Job, run_slices

    f = corpus.filters()
    keep, drop, cap = f["keep"], f["drop"], corpus.cap()
    todo = corpus.slices()
    bar = progress(sum(sl.in_bytes for sl in todo), "check")
    try:
        job = Job(None, text_field=corpus.text_field)
        for enc in run_slices(job, todo, num_proc or corpus.num_proc):
            seen.update(enc.domains)
            for d, c, b in zip(enc.doc_domain.tolist(), enc.nchars.tolist(),
                               enc.nbytes.tolist(), strict=True):
                name = enc.domains[d]
                if (keep is None or name in keep) and name not in drop and cap(name, c):
                    add(name, c, b)
            bar.update(enc.in_bytes)
    finally:
        bar.close()


def list_main(cfg) -> int:
    corpus = corpus_from(cfg)
    stats = scan(corpus)
    print(f"{'domain':<28} {'documents':>9} {'chars':>12} {'MB':>7}")
    for name, (n, chars, nbytes) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<28} {n:>9} {chars:>12,} {nbytes / 1e6:>7.2f}")
    docs, chars, nbytes = (sum(s[i] for s in stats.values()) for i in range(3))
    print(f"{'total':<28} {docs:>9} {chars:>12,} {nbytes / 1e6:>7.2f}"
          + (f"   ({len(corpus.streams)} streamed file(s))" if corpus.streams else "")
          + (f"   ({len(corpus.skipped)} non-UTF-8 file(s) skipped)" if corpus.skipped else ""))
    return 0
