"""Peak memory of a benchmarked command: RSS and anonymous memory of its whole process tree,
sampled every 20 ms from /proc (shared by the benchmarks that compare with peer tools)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS / RssAnon of a process (and its children), sampled from /proc."""
    peak = {"rss": 0, "anon": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = anon = 0
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            rss += int(line.split()[1]) * 1024
                        elif line.startswith("RssAnon:"):
                            anon += int(line.split()[1]) * 1024
                except OSError:
                    pass
            peak["rss"] = max(peak["rss"], rss)
            peak["anon"] = max(peak["anon"], anon)
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err[-2000:]}")
    return {"wall": wall, "rss": peak["rss"], "anon": peak["anon"]}


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += _children(k)
    return out
