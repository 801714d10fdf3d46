"""The layout of a training run folder (`pretrain`, `finetune`), read without torch.

  config.yaml           the resolved config (`--resume` starts from it)
  tokenizer/            the trained tokenizer (pretrain without --tokenizer)
  data/                 packed tokens (train.bin, val.bin, meta.json)
  checkpoints/step-N/   HF folder + trainer_state.pt and trainer_state/ (lmalloy.train.checkpoint)
  final/                the final HF model
  metrics.jsonl, loss.png
"""

from __future__ import annotations

import re
from pathlib import Path

CKPT_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a run's checkpoints, oldest first."""
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)
