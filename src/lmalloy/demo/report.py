"""The demo report: sections (markdown + images) rendered to report.md and report.html.

The HTML is produced by a small converter for the markdown the stages write: headings,
paragraphs, pipe tables, images, fenced code, bullet lists, **bold** and `code`.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.5}table{border-collapse:collapse;margin:1em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:0 .2em}pre{background:#f7f7f7;padding:.8em;overflow-x:auto}
h1{border-bottom:2px solid #333}h2{border-bottom:1px solid #ccc;margin-top:2em}
.verdict{background:#eef6ee;border-left:4px solid #4a4;padding:.5em 1em}"""


def _inline(s: str) -> str:
    s = html.escape(s, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return s


def md_to_html(md: str) -> str:
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            code = "\n".join(lines[i + 1 : j])
            out.append(f"<pre><code>{html.escape(code)}</code></pre>")
            i = j + 1
            continue
        if line.startswith("<"):  # raw HTML passes through
            out.append(line)
        elif m := re.match(r"^(#{1,4}) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)", line):
            out.append(f'<p><img alt="{html.escape(m.group(1))}" src="{m.group(2)}"></p>')
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            t = ["<table>"]
            for k, r in enumerate(body):
                tag = "th" if k == 0 else "td"
                t.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in r) + "</tr>")
            out.append("".join(t) + "</table>")
            continue
        elif line.startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith("> "):
            out.append(f'<p class="verdict">{_inline(line[2:])}</p>')
        elif line.strip():
            para = [line]
            while i + 1 < len(lines) and lines[i + 1].strip() and not re.match(
                    r"^(#|\||!\[|```|- |\* |> |<)", lines[i + 1]):
                i += 1
                para.append(lines[i])
            out.append(f"<p>{_inline(' '.join(para))}</p>")
        i += 1
    return "\n".join(out)


def write_report(out: Path, title: str, intro: str, sections: list[dict]) -> Path:
    md = [f"# {title}", "", intro, ""]
    for s in sections:
        md += [f"## {s['title']}", "", s["markdown"].strip(), ""]
    from lmalloy.io.writer import atomic_write_text

    text = "\n".join(md)
    atomic_write_text(out / "report.md", text)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>{md_to_html(text)}</body></html>")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
