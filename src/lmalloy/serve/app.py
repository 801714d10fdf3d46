"""`lmalloy serve`: the Starlette app over the engine, run by uvicorn.

Starlette rather than FastAPI: the requests are validated by our own pydantic models into
OpenAI's error shape (FastAPI's automatic 422 bodies would have to be replaced anyway), and
it imports in 0.16 s against FastAPI's 0.4–0.5 s with the same per-request latency
(docs/serve.md). The port is bound before any weight is loaded, so a port in use is one line
and exit code 2; on SIGTERM uvicorn stops accepting connections, running requests finish
(up to --drain-timeout), then the engine thread ends and the process exits 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from lmalloy.errors import UserError
from lmalloy.serve.api import (
    FINISH,
    ApiError,
    ChatRequest,
    CompletionRequest,
    alphas,
    chat_logprobs,
    completion_logprobs,
    error_body,
    parse,
    stops,
)

# ---------------------------------------------------------------- prompts -> jobs


class Server:
    """What the handlers need: the engine, the ensemble's members, the served name."""

    def __init__(self, engine, name: str, api_key: str | None):
        self.engine, self.name, self.api_key = engine, name, api_key
        self.proxy = engine.proxy
        self.tok = self.proxy.tokenizer
        self.members = engine.members
        self.raw = all(m.fmt in (None, "raw") for m in self.members)

    def member_ids(self, text: str | None, ids: list[int] | None, chat: list | None
                   ) -> list[list[int]]:
        """The prompt's token ids for every member, each in its own format."""
        from lmalloy.proxy.model import prompt_ids

        out = []
        for m in self.members:
            if chat is not None:
                out.append(self._chat_ids(m, chat))
            elif ids is not None and m.fmt in (None, "raw"):
                out.append(list(ids))
            else:
                out.append(prompt_ids(m, text if text is not None else self.tok.decode(ids)))
        return out

    def _chat_ids(self, m, messages: list) -> list[int]:
        from lmalloy.proxy.model import format_prompt

        def render(tok) -> str:
            if not getattr(tok, "chat_template", None):
                raise ApiError(400, "the model's tokenizer has no chat template; use "
                               "/v1/completions", "messages")
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        if m.fmt == "chat":
            text = render(m.tokenizer if getattr(m.tokenizer, "chat_template", None)
                          else self.tok)
        else:
            text, _ = format_prompt(m.fmt, render(self.tok), m.tokenizer)
        return list(m.tokenizer(text, add_special_tokens=False)["input_ids"])

    def jobs(self, req, prompts: list[tuple], default_max: int | None, sink_for) -> list:
        """One engine job per prompt; every check (context, max_tokens, α) before any runs.
        prompts: (text, ids, chat messages) with one of them set."""
        from lmalloy.serve.engine import Job

        a = alphas(req, self.proxy.alphas)
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        echo = bool(getattr(req, "echo", False))
        if echo and req.logprobs is not None and not self.raw:
            raise ApiError(400, "'echo' with 'logprobs' needs every model to see the raw "
                           "prompt (a --*-format is set)", "echo")
        out = []
        for i, (text, ids, chat) in enumerate(prompts):
            per = self.member_ids(text, ids, chat)
            if any(not r for r in per):
                raise ApiError(400, "the prompt is empty", "prompt")
            room = min((m.ctx_len - len(r) for m, r in zip(self.members, per, strict=True)
                        if m.ctx_len is not None), default=1 << 30)
            need = 0 if (echo and max_tokens == 0) else 1
            if room < need:
                raise ApiError(400, f"prompt {i + 1} is {max(len(r) for r in per)} tokens; this "
                               f"model's maximum context length is {self._ctx()} tokens",
                               "messages" if chat is not None else "prompt",
                               "context_length_exceeded")
            if max_tokens is not None and max_tokens > room:
                raise ApiError(400, f"max_tokens is too large: {max_tokens}; the prompt leaves "
                               f"room for {room} of this model's {self._ctx()} tokens",
                               "max_tokens", "context_length_exceeded")
            n = max_tokens if max_tokens is not None else min(default_max or room, room)
            lp = req.logprobs if isinstance(req.logprobs, int) and not isinstance(
                req.logprobs, bool) else (req.top_logprobs or 0) if req.logprobs else None
            out.append(Job(per, per[0], n, sink_for(i), temperature=req.temperature,
                           top_k=req.top_k or 0, top_p=req.top_p,
                           penalty=req.repetition_penalty or 1.0, alphas=a, seed=req.seed,
                           stop=stops(req), logprobs=lp, stream=req.stream,
                           score_prompt=echo and req.logprobs is not None))
        return out

    def _ctx(self) -> int | None:
        return min((m.ctx_len for m in self.members if m.ctx_len is not None), default=None)


def _completion_prompts(req: CompletionRequest) -> list[tuple]:
    p = req.prompt
    if isinstance(p, str):
        return [(p, None, None)]
    if not p:
        raise ApiError(400, "'prompt' must not be empty", "prompt")
    if isinstance(p[0], str):
        return [(x, None, None) for x in p]
    if isinstance(p[0], int):
        return [(None, list(p), None)]
    return [(None, list(x), None) for x in p]


# ---------------------------------------------------------------- running jobs


class _Run:
    """A request's jobs in the engine; their events arrive on one asyncio queue."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()
        self.jobs: list = []

    def sink_for(self, i: int):
        def sink(ev: tuple) -> None:
            try:
                self.loop.call_soon_threadsafe(self.q.put_nowait, (i, ev))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        return sink

    def submit(self) -> None:
        from lmalloy.serve.engine import QueueFull

        try:
            for j in self.jobs:
                self.server.engine.submit(j)
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, f"too many requests: {e}", None, "rate_limit_exceeded",
                           "rate_limit_error") from None

    def cancel(self) -> None:
        for j in self.jobs:
            self.server.engine.cancel(j)

    async def events(self):
        """(index, event) until every job is done; an engine error raises ApiError(500)."""
        left = len(self.jobs)
        while left:
            i, ev = await self.q.get()
            if ev[0] == "error":
                self.cancel()
                raise ApiError(500, f"decoding failed: {ev[1]}", None, None, "server_error")
            if ev[0] == "done":
                left -= 1
            yield i, ev


async def _watch_disconnect(request, run: _Run) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            run.cancel()
            return


async def _collect(request, run: _Run) -> list[dict]:
    """Wait for every job (cancelling them if the client goes away); per job its prompt
    and token logprob records and the final Generation."""
    res = [{"prompt": [], "tokens": [], "gen": None} for _ in run.jobs]
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        async for i, ev in run.events():
            if ev[0] == "prompt":
                res[i]["prompt"] = ev[1]
            elif ev[0] == "token":
                res[i]["tokens"].append(ev[1:])
            elif ev[0] == "done":
                res[i]["gen"] = ev[1]
    finally:
        watcher.cancel()
    return res


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(run: _Run, res: list[dict] | None = None, counts: list[int] | None = None) -> dict:
    p = sum(len(j.large_ids) for j in run.jobs)
    c = sum(len(r["gen"].tokens) for r in res) if res is not None else sum(counts or [])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ---------------------------------------------------------------- handlers


async def _body(request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request. (HINT: the body "
                       "must be valid JSON.)") from None


def _check_model(server: Server, req) -> None:
    if req.model != server.name:
        raise ApiError(404, f"The model `{req.model}` does not exist (this server serves "
                       f"`{server.name}`)", "model", "model_not_found")


async def completions(request):
    from starlette.responses import JSONResponse, StreamingResponse

    server: Server = request.app.state.server
    req = parse(CompletionRequest, await _body(request))
    _check_model(server, req)
    prompts = _completion_prompts(req)
    run = _Run(server)
    run.jobs = server.jobs(req, prompts, 16, run.sink_for)
    run.submit()
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": server.name}
    if req.stream:
        return StreamingResponse(_stream_completion(run, req, meta),
                                 media_type="text/event-stream")
    res = await _collect(request, run)
    choices = []
    for i, r in enumerate(res):
        text, recs, offset = r["gen"].text, r["tokens"], 0
        if req.echo:
            prompt = prompts[i][0] if prompts[i][0] is not None else server.tok.decode(
                prompts[i][1])
            text, recs, offset = prompt + text, r["prompt"] + recs, 0
        lp = completion_logprobs(server.tok, recs, offset) if req.logprobs is not None else None
        choices.append({"text": text, "index": i, "logprobs": lp,
                        "finish_reason": FINISH[r["gen"].finish_reason]})
    return JSONResponse({**meta, "choices": choices, "usage": _usage(run, res)})


async def _stream_completion(run: _Run, req, meta: dict):
    counts = [0] * len(run.jobs)
    try:
        async for i, ev in run.events():
            if ev[0] == "text" and ev[1]:
                yield _sse({**meta, "choices": [{"text": ev[1], "index": i, "logprobs": None,
                                                 "finish_reason": None}]})
            elif ev[0] == "done":
                counts[i] = len(ev[1].tokens)
                yield _sse({**meta, "choices": [{"text": "", "index": i, "logprobs": None,
                                                 "finish_reason": FINISH[ev[1].finish_reason]}]})
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(run, counts=counts)})
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield _sse(e.body())
    finally:
        run.cancel()  # a client that went away frees its rows (no-op when all are done)


async def chat_completions(request):
    from starlette.responses import JSONResponse, StreamingResponse

    server: Server = request.app.state.server
    req = parse(ChatRequest, await _body(request))
    _check_model(server, req)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    run = _Run(server)
    run.jobs = server.jobs(req, [(None, None, messages)], None, run.sink_for)
    run.submit()
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": server.name}
    if req.stream:
        return StreamingResponse(_stream_chat(run, req, {**meta,
                                                         "object": "chat.completion.chunk"}),
                                 media_type="text/event-stream")
    r = (await _collect(request, run))[0]
    lp = chat_logprobs(server.tok, r["tokens"]) if req.logprobs else None
    choice = {"index": 0, "message": {"role": "assistant", "content": r["gen"].text},
              "logprobs": lp, "finish_reason": FINISH[r["gen"].finish_reason]}
    return JSONResponse({**meta, "choices": [choice], "usage": _usage(run, [r])})


async def _stream_chat(run: _Run, req, meta: dict):
    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({**meta, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]})

    count = [0]
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for _, ev in run.events():
            if ev[0] == "text" and ev[1]:
                yield chunk({"content": ev[1]})
            elif ev[0] == "done":
                count[0] = len(ev[1].tokens)
                yield chunk({}, FINISH[ev[1].finish_reason])
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(run, counts=count)})
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield _sse(e.body())
    finally:
        run.cancel()


async def models(request):
    from starlette.responses import JSONResponse

    server: Server = request.app.state.server
    return JSONResponse({"object": "list", "data": [
        {"id": server.name, "object": "model", "created": int(time.time()),
         "owned_by": "lmalloy"}]})


async def health(request):
    from starlette.responses import JSONResponse

    return JSONResponse({"status": "ok", **request.app.state.server.engine.status()})


# ---------------------------------------------------------------- the app


class _Auth:
    """ASGI middleware: `Authorization: Bearer KEY` on every request when a key is set."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key:
            got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.key}".encode()):
                from starlette.responses import JSONResponse

                body = error_body("Incorrect API key provided (send `Authorization: Bearer "
                                  "KEY`)", "invalid_request_error", None, "invalid_api_key")
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status)

    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}",
                                       "invalid_request_error", None, code), e.status_code)

    async def server_error(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"),
                            500)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)

    app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/health", health, methods=["GET"])],
                    middleware=[Middleware(_Auth, key=server.api_key)],
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        Exception: server_error},
                    lifespan=lifespan)
    app.state.server = server
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError (port in use, bad address)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  proto=socket.IPPROTO_TCP)[0]
    except socket.gaierror as e:
        raise UserError(f"`--host` {host}: not an address of this machine ({e.strerror})") \
            from None
    # proto TCP, not 0: asyncio sets TCP_NODELAY only on such sockets (else Nagle's
    # algorithm and delayed ACKs add ~40 ms to every response)
    sock = socket.socket(info[0], info[1], info[2])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno == 98 else f"cannot be bound ({e.strerror})"
        raise UserError(f"`--port` {port} on {host} {why}; pick another with --port "
                        "(0 = any free port)") from None
    sock.listen(2048)
    return sock


def main(cfg) -> int:
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"`lmalloy serve` needs {' and '.join(missing)}: pip install "
                        "'lmalloy[serve]'")
    sock = bind(cfg.host, cfg.port)  # before any weight is loaded
    try:
        return _serve(cfg, sock)
    finally:
        sock.close()


def _serve(cfg, sock: socket.socket) -> int:
    import uvicorn

    from lmalloy.proxy.model import ProxyTuned
    from lmalloy.serve.engine import Engine

    proxy = ProxyTuned.from_pretrained(cfg.large, cfg.tuned, cfg.untuned, cfg.alphas()
                                       if cfg.tuned else [], formats=cfg.formats(),
                                       tokenizer=cfg.tokenizer, dtype=cfg.dtype,
                                       device=cfg.device, allow_pickle=cfg.allow_pickle,
                                       draft=cfg.draft, speculative=cfg.speculative)
    for m in proxy.members:
        m.model.eval()
    engine = Engine(proxy, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    speculative=cfg.speculative, adaptive_k=cfg.adaptive_k)
    name = cfg.name or Path(cfg.large).resolve().name
    app = create_app(Server(engine, name, cfg.api_key))
    config = uvicorn.Config(app, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=cfg.drain_timeout)
    host, port = sock.getsockname()[:2]
    print(f"lmalloy serve: {name} on http://{host}:{port}/v1 (batch {cfg.max_batch}, queue "
          f"{cfg.max_queue}{', speculative K=' + str(cfg.speculative) if cfg.speculative else ''}"
          ")", file=sys.stderr, flush=True)
    _uvicorn_server()(config).run(sockets=[sock])
    print("lmalloy serve: stopped", file=sys.stderr, flush=True)
    return 0


def _uvicorn_server():
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """uvicorn's server, but a handled SIGTERM/SIGINT ends the process normally (exit 0
        after the drain) instead of being re-raised."""

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                print("lmalloy serve: draining running requests", file=sys.stderr, flush=True)
            self.force_exit = self.should_exit and sig == 2
            self.should_exit = True

    return Uvicorn
