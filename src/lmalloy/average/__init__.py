"""Weight averaging within one run: EMA, SWA and LaWA, during training and afterwards.

`EMA`, `SWA`, `LaWA` (in-training averagers, fp32 shadows) come from
`lmalloy.average.averagers`; `average_folders` (offline, streaming) from
`lmalloy.average.offline`. Imported lazily so that `lmalloy average --help` stays light.
"""

from __future__ import annotations

_EXPORTS = {"EMA": "averagers", "SWA": "averagers", "LaWA": "averagers",
            "ema_decay": "averagers", "Averaging": "averagers",
            "average_folders": "offline"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"lmalloy.average.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
