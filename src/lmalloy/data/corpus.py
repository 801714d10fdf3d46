"""Corpora as lists of documents with a domain each.

The built-in `stdlib` corpus is the running interpreter's standard library: every `.py`
file under `sysconfig.get_paths()["stdlib"]` (site-packages excluded), sorted by path,
one document per file, the domain being the top-level package (`asyncio`, `email`, ...;
top-level modules form the domain `toplevel`). It is on every machine, so the demo and
the tests need no download.

User data: files (one document each; `.jsonl` files give one document per line's `text`
field), folders (every file below, recursively; the domain is the first sub-folder, or
the folder's name), and globs. Policy for bad files: a file that is not UTF-8 or holds NUL
bytes is skipped and counted (a warning names the count and the first one); an empty
result is an error.
"""

from __future__ import annotations

import glob as globlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from lmalloy.data.jsonl import iter_jsonl
from lmalloy.errors import UserError, unknown


@dataclass
class Document:
    domain: str
    name: str
    text: str


@dataclass
class Corpus:
    documents: list[Document]
    skipped: list[str] = field(default_factory=list)

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


def _jsonl_documents(path: Path, domain: str, text_field: str = "text") -> list[Document]:
    docs = []
    for i, obj in iter_jsonl(path, "--data file"):
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise UserError(f"{path} line {i}: expected an object with a string "
                            f"`{text_field}` field")
        docs.append(Document(str(obj.get("domain", domain)), f"{path}:{i}", obj[text_field]))
    return docs


def _user_source(src: str, skipped: list[str]) -> list[Document]:
    p = Path(src)
    if p.is_file():
        paths = [(p.stem, p)]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        paths = [((f.relative_to(p).parts[0] if len(f.relative_to(p).parts) > 1
                   else p.resolve().name), f) for f in files]
    elif any(ch in src for ch in "*?["):
        matches = sorted(Path(m) for m in globlib.glob(src, recursive=True))
        paths = [(m.parent.name or "data", m) for m in matches if m.is_file()]
        if not paths:
            raise UserError(f"--data glob `{src}` matches no files")
    else:
        raise UserError(f"--data source not found: {src} (a file, folder, glob or `stdlib`)")
    docs = []
    for domain, f in paths:
        if f.suffix == ".jsonl":
            docs += _jsonl_documents(f, domain)
        else:
            text = _read_text(f, skipped)
            if text is not None:
                docs.append(Document(domain, str(f), text))
    return docs


def load_corpus(sources: list[str], domains: list[str] | None = None,
                exclude: list[str] = (), max_chars_per_domain: int | None = None,
                quiet: bool = False) -> Corpus:
    """Read every source; filter domains; UserError when nothing is left."""
    if not sources:
        raise UserError("--data is empty: name a corpus (`stdlib`), files, folders or globs")
    docs: list[Document] = []
    skipped: list[str] = []
    for src in sources:
        if src == "stdlib":
            files = _stdlib_files()
            names = {d for d, _ in files}
            for name in [*(domains or []), *exclude]:
                if name not in names and len(sources) == 1:
                    raise unknown("domain", name, names)
            for domain, p in files:
                if (domains and domain not in domains) or domain in exclude:
                    continue
                text = _read_text(p, skipped)
                if text is not None:
                    docs.append(Document(domain, str(p.relative_to(stdlib_root())), text))
        else:
            docs += _user_source(src, skipped)
    present = {d.domain for d in docs}
    for name in [*(domains or []), *exclude]:
        if name not in present:
            raise unknown("domain", name, present)
    if domains:
        keep = set(domains)
        docs = [d for d in docs if d.domain in keep]
    if exclude:
        drop = set(exclude)
        docs = [d for d in docs if d.domain not in drop]
    if max_chars_per_domain:
        used: dict[str, int] = {}
        kept = []
        for d in docs:
            if used.get(d.domain, 0) < max_chars_per_domain:
                kept.append(d)
                used[d.domain] = used.get(d.domain, 0) + len(d.text)
        docs = kept
    docs = [d for d in docs if d.text]
    if skipped and not quiet:
        print(f"lmalloy: skipped {len(skipped)} file(s) that are not UTF-8 text "
              f"(first: {skipped[0]})", file=sys.stderr)
    if not docs:
        raise UserError(f"the corpus is empty: no text in {', '.join(sources)}"
                        + (f" (skipped {len(skipped)} non-UTF-8 file(s))" if skipped else ""))
    return Corpus(docs, skipped)


def list_main(cfg) -> int:
    corpus = load_corpus(cfg.data, cfg.domains, cfg.exclude_domains, cfg.max_chars_per_domain)
    doms = corpus.domains()
    print(f"{'domain':<28} {'documents':>9} {'chars':>12} {'MB':>7}")
    for name, ds in sorted(doms.items(), key=lambda kv: -sum(len(d.text) for d in kv[1])):
        chars = sum(len(d.text) for d in ds)
        mb = sum(len(d.text.encode()) for d in ds) / 1e6
        print(f"{name:<28} {len(ds):>9} {chars:>12,} {mb:>7.2f}")
    print(f"{'total':<28} {len(corpus.documents):>9} {corpus.num_chars:>12,}"
          + (f"   ({len(corpus.skipped)} non-UTF-8 file(s) skipped)" if corpus.skipped else ""))
    return 0
