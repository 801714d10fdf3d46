"""Config of `lmalloy serve` (pydantic only)."""

from __future__ import annotations

from pydantic import Field

from lmalloy.proxy.config import ProxyModels, SpeculativeFields


class ServeConfig(ProxyModels, SpeculativeFields):
    """Serve `--large` alone (any causal-LM folder, e.g. a merged model) or steered by
    `--tuned/--untuned` pairs."""

    large: str = Field(..., description="the model to serve (the large model of a "
                       "proxy-tuned ensemble when --tuned/--untuned are given)")
    tuned: list[str] = Field([], description="small tuned model(s) steering --large")
    untuned: list[str] = Field([], description="their untuned bases, one per --tuned")
    host: str = Field("127.0.0.1", description="address to bind (127.0.0.1: this machine "
                      "only)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on "
                                "every request")
    name: str | None = Field(None, description="model id in /v1/models and responses "
                             "(default: the --large folder's name)")
    max_batch: int = Field(8, gt=0, description="requests decoded together")
    max_queue: int = Field(32, ge=0, description="requests waiting beyond --max-batch; more "
                           "get HTTP 429")
    drain_timeout: float = Field(60.0, gt=0, description="on SIGTERM, seconds to let running "
                                 "requests finish")
