"""The OpenAI API's request bodies, errors and response bodies (completions and chat).

Requests are validated by pydantic models that forbid unknown fields, as OpenAI does
("Unrecognized request argument supplied: X"); every error is OpenAI's shape,
{"error": {"message", "type", "param", "code"}}. Fields the API has but lmalloy does not
implement (n > 1, best_of, logit_bias, presence/frequency penalties, suffix) are refused with
a 400 naming them, never silently ignored. lmalloy's own fields: `alpha` (one value, or one per
tuned/untuned pair: the steering strength for this request), `top_k`, `repetition_penalty`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                       code, type_)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # lmalloy's own
    alpha: float | list[float] | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def parse(cls: type[_Strict], body: object) -> _Strict:
    """The request model of a decoded JSON body, or an ApiError naming the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}",
                           param) from None
        where = ".".join(str(x) for x in err["loc"][:1] + tuple(
            x for x in err["loc"][1:] if isinstance(x, int)))
        raise ApiError(400, f"Invalid value for '{where}': {err['msg']}", param) from None
    _unsupported(req)
    return req


def _unsupported(req: _Sampling) -> None:
    checks = [("n", req.n != 1, "only n=1 is supported"),
              ("presence_penalty", req.presence_penalty != 0, "is not supported (use "
               "repetition_penalty)"),
              ("frequency_penalty", req.frequency_penalty != 0, "is not supported (use "
               "repetition_penalty)"),
              ("logit_bias", bool(req.logit_bias), "is not supported"),
              ("best_of", getattr(req, "best_of", None) not in (None, 1), "is not supported"),
              ("suffix", getattr(req, "suffix", None) is not None, "is not supported")]
    for param, bad, why in checks:
        if bad:
            raise ApiError(400, f"'{param}' {why}" if not why.startswith("only") else why, param)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 16 or any(not s for s in stops):
        raise ApiError(400, "'stop' takes up to 16 non-empty strings", "stop")
    for a in ([req.alpha] if isinstance(req.alpha, float | int) else req.alpha or []):
        if not math.isfinite(a):
            raise ApiError(400, f"'alpha' must be finite, got {a}", "alpha")


def stops(req: _Sampling) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def alphas(req: _Sampling, default: list[float]) -> list[float]:
    """The request's α per pair (the server's when not given)."""
    if req.alpha is None:
        return list(default)
    vals = [float(req.alpha)] if isinstance(req.alpha, float | int) else [float(a) for a in
                                                                          req.alpha]
    if not default:
        raise ApiError(400, "'alpha' needs a proxy-tuned model; this server runs one model",
                       "alpha")
    if len(vals) == 1:
        return vals * len(default)
    if len(vals) != len(default):
        raise ApiError(400, f"'alpha' has {len(vals)} values for {len(default)} tuned/untuned "
                       "pairs; give one or one per pair", "alpha")
    return vals


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def token_text(tok, t: int) -> str:
    return tok.decode([t], skip_special_tokens=False)


def completion_logprobs(tok, records: list[tuple], offset: int = 0) -> dict:
    """The completions API's logprobs block; records: (token id, logprob or None, top)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp, top in records:
        s = token_text(tok, t)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if lp is None else
                                   {token_text(tok, i): v for i, v in top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def chat_logprobs(tok, records: list[tuple]) -> dict:
    """The chat API's logprobs block: {"content": [{"token", "logprob", "bytes",
    "top_logprobs"}]}."""
    def entry(t: int, lp: float) -> dict:
        s = token_text(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, lp, top in records]}
