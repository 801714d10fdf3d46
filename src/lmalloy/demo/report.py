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


def write_report(out: Path, title: str, intro: str, sections: list[dict], head: str = "",
                 tail: str = "") -> Path:
    """`head` (markdown with its own headings) goes between the intro and the sections,
    `tail` after them."""
    md = [f"# {title}", "", intro, ""]
    if head:
        md += [head.strip(), ""]
    for s in sections:
        md += [f"## {s['title']}", "", s["markdown"].strip(), ""]
    if tail:
        md += [tail.strip(), ""]
    from lmalloy.io.writer import atomic_write_text

    text = "\n".join(md)
    atomic_write_text(out / "report.md", text)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>{md_to_html(text)}</body></html>")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


# ----------------------------------------------------------------- the demo's own tables

CLAIMS_HEADING = "## Claims: what held in this run"
TIMES_HEADING = "## Time: each stage against its share of the budget"
APPENDIX_HEADING = "## Appendix: calibration, throughput and the plan"
CLAIMS_COLUMNS = ["stage", "claim", "paper", "paper's number", "this run (95% interval)",
                  "threshold", "verdict"]


def _cell(s: str) -> str:
    return str(s).replace("|", "/").replace("\n", " ")


def claims_markdown(results: dict[str, dict]) -> list[str]:
    """The claims table: one row per claim of every stage that has run, verdicts as the
    stages computed them (`lmalloy.demo.stats`)."""
    md = [CLAIMS_HEADING, "",
          "Each verdict is computed from the interval: *held* when the whole 95% interval is "
          "on the claim's side of the threshold, *did not hold* when it is on the other side, "
          "*inconclusive* when it straddles it. Intervals cover evaluation noise (bootstrap "
          "over validation windows, pairs, sequences or prompts; Wilson for one accuracy), "
          "not training seeds.", "",
          "| " + " | ".join(CLAIMS_COLUMNS) + " |", "|---" * len(CLAIMS_COLUMNS) + "|"]
    for name, r in results.items():
        for c in r.get("claims", []):
            side = ">" if c["higher"] else "<"
            thr = f"{side} {c['threshold']:g}" + (" (each part)" if c.get("combined") else "")
            md.append("| " + " | ".join(_cell(x) for x in (
                name, c["claim"], c["paper"], c["paper_number"], c["measured"], thr,
                f"**{c['verdict']}**")) + " |")
    notes = [f"{c['claim']}: {c['note']}" for r in results.values()
             for c in r.get("claims", []) if c.get("note")]
    if notes:
        md += ["", "Notes: " + "; ".join(notes) + "."]
    return md + [""]


def times_markdown(results: dict[str, dict], budget_s: float) -> list[str]:
    md = [TIMES_HEADING, "",
          "| stage | share of the budget (s) | allotted at its start (s) | took (s) | load "
          "(start → end) | scaled down |", "|---|---|---|---|---|---|"]
    total = 0.0
    for name, r in results.items():
        b = r.get("budget") or {}
        total += r.get("seconds", 0)
        scaled = "; ".join(b.get("notes") or []) or "no"
        md.append(f"| {name} | {b.get('share_s', float('nan')):.0f} | "
                  f"{b.get('allotted_s', float('nan')):.0f} | {r.get('seconds', 0):.0f} | "
                  f"{b.get('load_start', float('nan')):.2f} → "
                  f"{b.get('load_end', float('nan')):.2f} | {_cell(scaled)} |")
    md.append(f"| **total** | {budget_s:.0f} | | **{total:.0f}** | | |")
    return md + [""]


def appendix_markdown(results: dict[str, dict], recorded: dict | None) -> list[str]:
    """Throughput measured by this run, the plan every stage made from it, and the recorded
    calibration that chose the sizes."""
    md = [APPENDIX_HEADING, ""]
    pre = results.get("pretrain", {}).get("numbers", {})
    if pre.get("throughput"):
        md += ["**Throughput probe** (measured by this run at the start of the pretraining "
               "stage: random tokens, the demo's sequence length and micro-batch, "
               "`lmalloy.demo.budget.probe`):", "",
               "| size | parameters | training tokens/s | evaluation tokens/s | load |",
               "|---|---|---|---|---|"]
        for size, r in pre["throughput"].items():
            md.append(f"| {size} | {r['params'] / 1e6:.2f}M | {r['train']:,.0f} | "
                      f"{r['eval']:,.0f} | {r['load']:.2f} |")
        md.append("")
    rates = {}
    for r in results.values():
        rates.update(r.get("rates") or {})
    if rates:
        md += ["**Rates the budget planned with** (the latest measurement of each; training "
               "runs update them from their own logs):", "",
               "| rate | tokens/s | measured by |", "|---|---|---|"]
        for k, (v, how) in sorted(rates.items()):
            md.append(f"| {k} | {v:,.0f} | {_cell(how)} |")
        md.append("")
    md += ["**The plan** (every sized piece of work: what was planned, what the budget "
           "chose, its estimate and the time the stage had for it):", "",
           "| stage | work | planned | chosen | estimate (s) | available (s) |",
           "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for p in (r.get("budget") or {}).get("plan", []):
            md.append(f"| {name} | {_cell(p['what'])} | {p['planned']:,} | {p['chosen']:,} | "
                      f"{p['estimate_s']:.0f} | {p['available_s']:.0f} |")
    md.append("")
    if recorded:
        md += recorded_markdown(recorded)
    return md


def recorded_markdown(rec: dict) -> list[str]:
    """The calibration that chose the demo's sizes and steps, recorded by
    `bench/demo_calibration.py` (not re-measured by this run)."""
    md = [f"**Recorded calibration** (not measured by this run: `{rec['command']}` on "
          f"{rec['machine']}, {rec['date']}, load {rec['load_start']:.2f} → "
          f"{rec['load_end']:.2f}):", ""]
    md += ["| model | parameters | tokens/s | " + " | ".join(
        f"val bits/byte at {t:g} s" for t in rec["times"]) + " | tokens/s × param |",
        "|---" * (4 + len(rec["times"])) + "|"]
    for r in rec["runs"]:
        md.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | "
                  + " | ".join("—" if v is None else f"{v:.3f}" for v in r["bpb_at"])
                  + f" | {r['tokens_per_s'] * r['params'] / 1e9:.1f}G |")
    if rec.get("notes"):
        md += ["", rec["notes"]]
    return md + [""]
