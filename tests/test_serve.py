"""`lmalloy serve` as a real process on a free 127.0.0.1 port, called by the official `openai`
client and by plain HTTP: the same tokens as `ProxyTuned.generate`, logprobs equal to a direct
computation, OpenAI's error shape for bad requests, a bounded queue, disconnects, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import assert_user_error, make_llama

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEY = "sk-test-key"
PROMPTS = ["def add(a, b):", "class Point:", "import json\n", "for"]
CHAT = ("{% for m in messages %}<|endoftext|>[{{ m.role }}] {{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}\n[assistant] {% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("serve")
    small = make_llama(d / "small", tokenizer_dir, seed=1)
    large = make_llama(d / "large", tokenizer_dir, seed=0, hidden=64, layers=3)
    cfg = json.loads((large / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT
    (large / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {"large": large, "small": small,
            "tuned": make_llama(d / "tuned", tokenizer_dir, seed=2, noise_from=small, noise=0.2)}


def start_server(*args, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`lmalloy serve ARGS --port 0` in a subprocess; returns it and its base URL."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
        [SRC, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lmalloy.cli", "serve", "--port", "0",
                          *map(str, args)], env=env, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    if " on http://" not in line:
        p.kill()
        raise AssertionError(line + p.stderr.read())
    return p, line.split(" on ")[1].split()[0]


def stop_server(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    p.stderr.close()


def ensemble(models) -> list:
    return ["--large", models["large"], "--tuned", models["tuned"], "--untuned",
            models["small"], "--alpha", "1.0"]


@pytest.fixture(scope="module")
def server(models):
    p, url = start_server(*ensemble(models), "--api-key", KEY, "--speculative", "3",
                          "--max-batch", "4")
    yield url
    stop_server(p)


@pytest.fixture(scope="module")
def local(models):
    from lmalloy.proxy.model import ProxyTuned

    return ProxyTuned.from_pretrained(str(models["large"]), str(models["tuned"]),
                                      str(models["small"]), 1.0)


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)


# ---------------------------------------------------------------- the openai client


def test_openai_completions_plain_and_streamed(server, local):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["large"]
    prompts = ["def add(a, b):", "class Point:", "import json\n"]
    want = local.generate(prompts, max_new_tokens=12)
    r = c.completions.create(model="large", prompt=prompts, max_tokens=12, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for ch, g in zip(r.choices, want, strict=True):
        assert ch.text == g.text
        assert ch.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[
            g.finish_reason]
    assert r.usage.completion_tokens == sum(len(g.tokens) for g in want)
    parts, finish = [], None
    for chunk in c.completions.create(model="large", prompt=prompts[0], max_tokens=12,
                                      temperature=0, stream=True):
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == want[0].text and finish == "length"
    # sampling with a seed is reproducible; a stop string cuts the text
    kw = dict(model="large", prompt=prompts[0], max_tokens=10, temperature=0.9, top_p=0.9,
              seed=7)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text
    stop = want[0].text[2:4]
    r = c.completions.create(model="large", prompt=prompts[0], max_tokens=12, temperature=0,
                             stop=[stop])
    assert r.choices[0].text == want[0].text[: want[0].text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_openai_chat_plain_and_streamed(server, local):
    c = client(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=False)
    want = local.generate([rendered], max_new_tokens=9)[0]
    r = c.chat.completions.create(model="large", messages=messages, max_tokens=9,
                                  temperature=0, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert len(r.choices[0].logprobs.content) == len(want.tokens)
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    text, roles = "", set()
    for chunk in c.chat.completions.create(model="large", messages=messages, max_tokens=9,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            roles.add(chunk.choices[0].delta.role)
        else:
            assert chunk.usage.completion_tokens == len(want.tokens)
    assert text == want.text and "assistant" in roles


@torch.no_grad()
def test_echo_logprobs_equal_a_direct_computation(server, local):
    c = client(server)
    prompt = "def add(a, b):\n    return a + b\n"
    ids = local.tokenizer(prompt)["input_ids"]
    for alpha in (1.0, 0.0, 2.5):
        r = c.completions.create(model="large", prompt=prompt, max_tokens=0, echo=True,
                                 logprobs=1, temperature=0, extra_body={"alpha": alpha})
        lp = r.choices[0].logprobs
        assert r.choices[0].text == prompt and lp.token_logprobs[0] is None
        ref = local.logits(torch.tensor([ids]), alphas=[alpha])[0].log_softmax(-1)
        for t in range(1, len(ids)):
            assert math.isclose(lp.token_logprobs[t], float(ref[t - 1, ids[t]]), abs_tol=1e-4)
            best = int(ref[t - 1].argmax())
            assert math.isclose(max(lp.top_logprobs[t].values()), float(ref[t - 1, best]),
                                abs_tol=1e-4)
    # token-id prompts (what lm-eval sends), with one generated token after the prompt
    r = c.completions.create(model="large", prompt=[ids], max_tokens=1, echo=True, logprobs=1,
                             temperature=0)
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids) + 1


# ---------------------------------------------------------------- bad requests


def _bad_requests(url: str, ctx_prompt: str) -> list[tuple]:
    ok = {"model": "large", "prompt": "x", "max_tokens": 2}
    c, ch = f"{url}/completions", f"{url}/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("POST", c, b"{not json", 400), ("POST", c, b"[1, 2]", 400),
        ("POST", c, {**ok, "bogus": 1}, 400), ("POST", c, {**ok, "max_tokens": 100000}, 400),
        ("POST", c, {**ok, "prompt": ctx_prompt}, 400), ("POST", c, {**ok, "temperature": -1}, 400),
        ("POST", c, {**ok, "n": 2}, 400), ("POST", c, {**ok, "model": "gpt-4"}, 404),
        ("POST", c, {**ok, "top_p": 0}, 400), ("POST", c, {**ok, "prompt": []}, 400),
        ("POST", c, {**ok, "stream": "yes"}, 400), ("POST", c, {**ok, "alpha": [1, 2]}, 400),
        ("POST", c, {**ok, "logprobs": 99}, 400), ("POST", c, {**ok, "stop": [""]}, 400),
        ("POST", c, {**ok, "logit_bias": {"5": 1}}, 400), ("POST", c, {"model": "large"}, 400),
        ("POST", c, {**ok, "max_tokens": -1}, 400), ("POST", c, {**ok, "prompt": [[1, "a"]]}, 400),
        ("POST", ch, {"model": "large", "messages": []}, 400),
        ("POST", ch, {"model": "large", "messages": [{"role": "robot", "content": "x"}]}, 400),
        ("POST", ch, {"model": "large", "messages": msgs, "max_completion_tokens": 10**6}, 400),
        ("POST", ch, {"model": "large", "messages": msgs, "tools": []}, 400),
        ("GET", c, None, 405), ("POST", f"{url}/nope", ok, 404),
        ("POST", c, {**ok, "presence_penalty": 0.5}, 400),
    ]


def test_fifty_malformed_requests_then_a_good_one(server):
    ctx_prompt = "x " * 400
    bad = _bad_requests(server, ctx_prompt)
    head = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30, headers=head) as h:
        for i in range(50):
            method, url, body, status = bad[i % len(bad)]
            content = body if isinstance(body, bytes) else (None if body is None
                                                            else json.dumps(body).encode())
            r = h.request(method, url, content=content)
            assert r.status_code == status, (bad[i % len(bad)], r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        r = h.post(f"{server}/completions", json={"model": "large", "prompt": "x",
                                                  "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
        assert h.get(server.replace("/v1", "/health")).json()["running"] == 0
    # named parameters in the messages
    with httpx.Client(timeout=30, headers=head) as h:
        e = h.post(f"{server}/completions", json={"model": "large", "prompt": "x",
                                                  "bogus": 1}).json()["error"]
        assert e["message"] == "Unrecognized request argument supplied: bogus"
        assert e["param"] == "bogus"
        e = h.post(f"{server}/completions", json={"model": "large", "prompt": ctx_prompt}
                   ).json()["error"]
        assert e["code"] == "context_length_exceeded"


def test_api_key_is_required_on_every_request(server):
    with httpx.Client(timeout=10) as h:
        for path in ("/models", "/completions"):
            for head in ({}, {"Authorization": "Bearer wrong"}):
                r = h.request("GET" if path == "/models" else "POST", server + path,
                              headers=head, json={"model": "large", "prompt": "x"})
                assert r.status_code == 401
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert h.get(server.replace("/v1", "/health")).status_code == 401


# ---------------------------------------------------------------- queue, disconnect, SIGTERM


def _stream(h, url: str, n: int):
    return h.stream("POST", f"{url}/completions", json={
        "model": "large", "prompt": "def", "max_tokens": n, "temperature": 0, "stream": True})


def _finish(lines) -> tuple[str, str | None, bool]:
    text, finish, done = "", None, False
    for line in lines:
        if line.startswith("data: {"):
            ch = json.loads(line[6:])["choices"][0]
            text += ch["text"]
            finish = ch["finish_reason"] or finish
        done = done or line == "data: [DONE]"
    return text, finish, done


def _until(h, health: str, **want) -> dict:
    """Poll /health until it shows `want` (bounded: 10 s)."""
    for _ in range(1000):
        st = h.get(health).json()
        if all(st[k] == v for k, v in want.items()):
            return st
        time.sleep(0.01)
    raise AssertionError(f"/health never showed {want}: {st}")


def test_queue_bound_disconnect_and_sigterm_drain(models):
    p, url = start_server(*ensemble(models), "--max-batch", "1", "--max-queue", "1")
    health = url.replace("/v1", "/health")
    err = ""
    try:
        with httpx.Client(timeout=60) as ha, httpx.Client(timeout=60) as hb, \
                httpx.Client(timeout=60) as hc:
            with _stream(ha, url, 200) as a:
                assert a.status_code == 200
                _until(hc, health, running=1)  # A decodes (200 tokens: ~0.5 s or more)
                with _stream(hb, url, 5) as b:
                    assert b.status_code == 200
                    _until(hc, health, running=1, waiting=1)  # B waits for A's slot
                    r = hc.post(f"{url}/completions", json={"model": "large", "prompt": "x"})
                    assert r.status_code == 429
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    a.close()  # the client goes away: its slot goes to B
                    text, finish, done = _finish(b.iter_lines())
                    assert finish == "length" and done
            st = _until(hc, health, running=0)
            assert st["cancelled"] == 1 and st["rejected"] == 1 and st["completed"] == 1
            with _stream(ha, url, 200) as d:
                lines = d.iter_lines()
                _until(hc, health, running=1)
                p.send_signal(signal.SIGTERM)  # in flight: it finishes, then the server stops
                text, finish, done = _finish(lines)
            assert finish is not None and done and text
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        err = p.stderr.read()
        p.stderr.close()
    assert "draining" in err and "Traceback" not in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(health, timeout=5)


@torch.no_grad()
def test_single_model_with_a_named_draft(models):
    """Serving one model (no pairs, e.g. a merged one), sped up by a separate draft model."""
    from lmalloy.proxy.model import ProxyTuned

    large = ProxyTuned.from_pretrained(str(models["large"]), [], [], [])
    want = large.generate(PROMPTS, max_new_tokens=20)
    p, url = start_server("--large", models["large"], "--draft", models["tuned"],
                          "--speculative", "3", "--api-key", KEY)
    try:
        c = client(url)
        r = c.completions.create(model="large", prompt=PROMPTS, max_tokens=20, temperature=0)
        assert [ch.text for ch in r.choices] == [g.text for g in want]
        e = httpx.post(f"{url}/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "large", "prompt": "x", "alpha": 2.0}).json()["error"]
        assert e["param"] == "alpha" and "one model" in e["message"]
    finally:
        stop_server(p)


def test_port_in_use_is_one_line(models, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        t = time.perf_counter()
        assert_user_error(capsys, "serve", "--large", models["large"], "--port", str(port),
                          match=f"`--port` {port} on 127.0.0.1 is in use")
        assert time.perf_counter() - t < 5  # refused before any weight is loaded
    finally:
        s.close()


def test_serve_bad_flags(models, tmp_path, capsys):
    assert_user_error(capsys, "serve", "--large", tmp_path / "nope", "--port", "0",
                      match="not found")
    assert_user_error(capsys, "serve", "--large", models["large"], "--port", "0",
                      "--speculative", "2", match="needs a draft model")
    assert_user_error(capsys, "serve", "--large", models["large"], "--port", "70000",
                      match="`--port`")
    shutil.rmtree(tmp_path, ignore_errors=True)
