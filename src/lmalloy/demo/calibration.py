"""The recorded calibration of the demo's sizes: `calibration.json` beside this file, written
by `bench/demo_calibration.py` (throughput of each candidate size on the machine it ran on,
and the validation bits per byte each reaches after 30 s to 4 min of training). The report's
appendix shows it as recorded, with its command and the machine's load; the demo itself
does not re-measure it."""

from __future__ import annotations

import json
from pathlib import Path

FILE = Path(__file__).with_name("calibration.json")


def recorded() -> dict | None:
    """The record, or None where the bench has not written one."""
    try:
        return json.loads(FILE.read_text())
    except (OSError, ValueError):
        return None
