"""Proxy-tuning (arXiv 2401.08565): steer a large model at decode time with a small
tuned/untuned pair, z = z_large + Σ α·(z_tuned − z_untuned).

`ProxyTuned` (lmalloy.proxy.model) generates and scores; the pure logit arithmetic and the
sampling processors are in lmalloy.proxy.sampling; exact speculative decoding (the tuned
model drafts, caches roll back per row) in lmalloy.proxy.speculative; `lmalloy proxy
generate|eval` in lmalloy.proxy.run. Importing this package is light: torch loads on first
use.
"""

from __future__ import annotations

__all__ = ["ProxyTuned", "combine"]


def __getattr__(name: str):
    if name == "ProxyTuned":
        from lmalloy.proxy.model import ProxyTuned

        return ProxyTuned
    if name == "combine":
        from lmalloy.proxy.sampling import combine

        return combine
    raise AttributeError(name)
