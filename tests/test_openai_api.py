"""The OpenAI-compatible HTTP API against a real server on 127.0.0.1:0 (tiny random Llama, real
adapters on disk), driven by the official `openai` client (sync and async, streaming and not),
raw HTTP for what the client never sends, and the gRPC client for parity."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from safetensors.torch import load_file, save_file

from lorad.clients import ROUTING_HEADER, Client
from lorad.testing import ServeProcess, ServerThread, write_random_adapter

from serving_helpers import scrape, server_config, wait_for, wait_gauges_idle

API_TOKEN = "http-api-token-0123456789abcdef"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_geometry):
    root = tmp_path_factory.mktemp("http-adapters")
    for i in range(2):
        write_random_adapter(root / f"a{i}", tiny_geometry, rank=4 + 4 * i, seed=i, b_std=0.5)
    broken = write_random_adapter(root / "broken", tiny_geometry, rank=4, seed=7)
    tensors = load_file(broken / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def server(long_base, adapters_dir):
    config = server_config(adapters_dir, server=dict(http_port=0, max_request_bytes=2 << 20), max_seq_len=2048)
    with ServerThread(config, long_base) as srv:
        yield srv


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}/v1"


@pytest.fixture()
def client(base_url):
    with OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def grpc_client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def _metric(server, name: str) -> float:
    return scrape(server.server.metrics_port).get(name, 0.0)


# --- models -----------------------------------------------------------------------------------


def test_models_lists_the_base_and_every_adapter_with_its_version(client, grpc_client):
    models = {m.id: m for m in client.models.list()}
    assert {"tiny-llama", "a0", "a1"} <= set(models)
    versions = {a.id: a.digest for a in grpc_client.list_adapters().adapters}
    for adapter in ("a0", "a1"):
        extra = models[adapter].model_extra["lorad"]
        assert extra["kind"] == "adapter" and extra["version"] == versions[adapter] and extra["version"]
        assert models[adapter].owned_by == "lorad" and models[adapter].parent == "tiny-llama"
    assert models["a1"].model_extra["lorad"]["rank"] == 8
    assert models["tiny-llama"].model_extra["lorad"] == {"kind": "base"}
    assert client.models.retrieve("a0").id == "a0"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_broken_adapter_leaves_the_listing_once_its_error_is_known(client):
    with pytest.raises(openai.BadRequestError, match="NaN"):
        client.completions.create(model="broken", prompt="hi", max_tokens=2)
    assert "broken" not in {m.id for m in client.models.list()}


# --- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-llama", "base", "a0", "base:a1", "tiny-llama:a1"])
def test_completion_with_base_and_adapters(client, model):
    out = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=6, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == model and len(out.choices) == 1
    assert out.usage.completion_tokens <= 6 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.finish_reason in ("length", "stop") and choice.text
    adapter = model.rpartition(":")[2] if ":" in model else (None if model in ("base", "tiny-llama") else model)
    if adapter:
        assert out.system_fingerprint.startswith(f"lorad:{adapter}@sha256:")
    else:
        assert out.system_fingerprint == "lorad:base"


def test_chat_uses_the_chat_template_and_reports_logprobs(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model="a0", messages=messages, max_tokens=5, temperature=0, logprobs=True)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    msg = out.choices[0].message
    assert out.object == "chat.completion" and msg.role == "assistant" and msg.content
    lps = out.choices[0].logprobs.content
    assert len(lps) == out.usage.completion_tokens and all(t.logprob <= 0 for t in lps)
    assert "".join(t.token for t in lps) == msg.content


def test_completion_logprobs_whole_and_streamed(client, grpc_client):
    whole = client.completions.create(model="a1", prompt="Once", max_tokens=8, temperature=0, logprobs=0)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.tokens) == whole.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    grpc_out = grpc_client.generate("Once", adapter_id="a1", max_new_tokens=8, logprobs=True)
    assert lp.token_logprobs == pytest.approx(list(grpc_out.token_logprobs), abs=1e-6)
    chunks = list(client.completions.create(model="a1", prompt="Once", max_tokens=8, temperature=0, logprobs=0,
                                            stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_greedy_outputs_equal_the_grpc_path(client, grpc_client):
    """The same greedy request through gRPC and through HTTP: the same tokens and text."""
    for adapter in (None, "a0", "a1"):
        model = adapter or "tiny-llama"
        grpc_out = grpc_client.generate("Once upon a time", adapter_id=adapter, max_new_tokens=12)
        http_out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                                             extra_body={"return_token_ids": True})
        assert http_out.choices[0].model_extra["token_ids"] == grpc_out.token_ids
        assert http_out.choices[0].text == grpc_out.text
        messages = [{"role": "user", "content": "Name a colour."}]
        grpc_chat = grpc_client.generate(messages=messages, adapter_id=adapter, max_new_tokens=8)
        http_chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                   extra_body={"return_token_ids": True})
        assert http_chat.choices[0].model_extra["token_ids"] == grpc_chat.token_ids
        assert http_chat.choices[0].message.content == grpc_chat.text
        assert http_chat.usage.prompt_tokens == grpc_chat.prompt_tokens
        if adapter:
            assert http_chat.system_fingerprint == f"lorad:{adapter}@{grpc_chat.adapter_version}"


def test_streaming_completion_and_chat_equal_the_whole_answer(client):
    whole = client.completions.create(model="a1", prompt="Tell me", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="a1", prompt="Tell me", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Tell me"}]
    whole = client.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_streams_and_answers_concurrently(base_url):
    async def run():
        async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as aclient:
            async def one(model):
                stream = await aclient.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            texts = await asyncio.gather(*(one(m) for m in ("a0", "a1", "tiny-llama", "a0")))
            whole = await aclient.chat.completions.create(
                model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
            return texts, whole.choices[0].message.content

    texts, whole = asyncio.run(run())
    assert texts[0] == texts[3] == whole  # batched with other adapters, the same greedy answer
    assert texts[1] != texts[0] or texts[2] != texts[0]


def test_sampling_params_are_applied(client):
    kwargs = dict(model="a0", prompt="Pick a word", max_tokens=8, temperature=1.5, top_p=0.9, seed=1234)
    first, again = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == again  # seeded sampling is reproducible
    stop_at = client.completions.create(model="a0", prompt="Pick a word", max_tokens=8, temperature=0)
    word = stop_at.choices[0].text[2:5]
    stopped = client.completions.create(model="a0", prompt="Pick a word", max_tokens=8, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text
    assert client.completions.create(model="a0", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens <= 3


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(model="nope"), openai.NotFoundError, "model 'nope'"),
        (dict(model="../../etc"), openai.BadRequestError, "not a valid name"),
        (dict(n=2), openai.BadRequestError, "n: "),
        (dict(temperature=-1), openai.BadRequestError, "temperature"),
        (dict(top_p=2), openai.BadRequestError, "top_p"),
        (dict(max_tokens=10**6), openai.BadRequestError, "max_tokens: 1000000 is above"),
        (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(presence_penalty=0.5), openai.BadRequestError, "repetition_penalty"),
        (dict(logprobs=3), openai.BadRequestError, "logprobs"),
        (dict(echo=True), openai.BadRequestError, "echo"),
        (dict(prompt=[1, 2, 3]), openai.BadRequestError, "token ids"),
        (dict(prompt=["a", "b"]), openai.BadRequestError, "one prompt per request"),
        (dict(prompt="word " * 3000), openai.BadRequestError, "context"),
        (dict(extra_body={"temprature": 0.5}), openai.BadRequestError, "temprature: is not a field"),
        (dict(extra_body={"max_tokens": "many"}), openai.BadRequestError, "max_tokens"),
    ],
)
def test_bad_completion_requests_raise_the_sdks_typed_errors(client, kwargs, error, words):
    request = {"model": "a0", "prompt": "hi", "max_tokens": 2, **kwargs}
    with pytest.raises(error) as info:
        client.completions.create(**request)
    assert words in info.value.body["message"]
    assert set(info.value.body) == {"message", "type", "param", "code"}
    assert client.completions.create(model="a0", prompt="still alive?", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages[0].role"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (dict(top_logprobs=2, logprobs=True), "top_logprobs"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(messages=[]), "messages"),
    ],
)
def test_bad_chat_requests_get_400_with_a_sentence(client, kwargs, words):
    request = {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert words in info.value.body["message"]


def test_the_model_field_decides_and_the_routing_header_only_routes(client):
    plain = client.completions.create(model="a0", prompt="hi", max_tokens=4, temperature=0)
    routed = client.completions.create(model="a0", prompt="hi", max_tokens=4, temperature=0,
                                       extra_headers={ROUTING_HEADER: "a1"})
    assert routed.choices[0].text == plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="names no adapter"):
        client.completions.create(model="base:", prompt="hi", max_tokens=2)


def test_a_passed_deadline_is_504_and_frees_the_row(server, client):
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="a0", prompt="Tell me a long story", max_tokens=1900,
                                  extra_headers={"x-lorad-timeout": "0.2"})
    assert info.value.status_code == 504 and info.value.body["code"] == "deadline_exceeded"
    assert wait_gauges_idle(server.server.metrics_port) == (0.0, 0.0)
    with pytest.raises(openai.BadRequestError, match="x-lorad-timeout"):
        client.completions.create(model="a0", prompt="hi", max_tokens=2, extra_headers={"x-lorad-timeout": "soon"})


def test_raw_http_bad_json_wrong_types_huge_bodies_and_unknown_paths(server, base_url):
    with httpx.Client(base_url=base_url, timeout=30) as http:
        def post(path, content, **kw):
            return http.post(path, content=content, headers={"content-type": "application/json"}, **kw)

        cases = [
            (post("/completions", b'{"model": "a0", "prompt": '), 400, "not valid JSON"),
            (post("/completions", b'["a", "list"]'), 400, "JSON object"),
            (post("/completions", json.dumps({"model": "a0", "prompt": "x", "stream": "yes"})), 400, "stream"),
            (post("/chat/completions", json.dumps({"model": 7, "messages": []})), 400, "model"),
            (post("/completions", b"x" * (3 << 20)), 413, "larger than"),
            (http.get("/no/such/path"), 404, "no such endpoint"),
            (http.get("/completions"), 405, "not allowed"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert words in error["message"] and error["type"]
        # a chunked body (no Content-Length) is limited too
        huge = post("/completions", iter([b"x" * (1 << 20)] * 3))
        assert huge.status_code == 413
        assert post("/completions", json.dumps({"model": "a0", "prompt": "x", "max_tokens": 1})).status_code == 200
    root = base_url.removesuffix("/v1")
    for path in ("/health", "/ready"):
        probe = httpx.get(root + path, timeout=10)
        assert probe.status_code == 200 and probe.json()["status"] == "ready"


# --- disconnects and metrics ------------------------------------------------------------------


def test_a_client_leaving_mid_stream_frees_its_row(server, base_url):
    cancelled = _metric(server, 'lorad_transport_requests_total{outcome="cancelled",transport="http"}')
    engine_cancelled = server.server.metrics.requests.labels("cancelled")._value.get()
    body = {"model": "a0", "prompt": "Tell me a long story", "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{base_url}/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert _metric(server, "lorad_requests_running") == 1.0
    assert wait_gauges_idle(server.server.metrics_port) == (0.0, 0.0)
    assert server.server.metrics.requests.labels("cancelled")._value.get() == engine_cancelled + 1
    assert wait_for(lambda: _metric(
        server, 'lorad_transport_requests_total{outcome="cancelled",transport="http"}') == cancelled + 1)


def test_a_client_leaving_a_non_streaming_request_frees_its_row(server):
    engine_cancelled = server.server.metrics.requests.labels("cancelled")._value.get()
    body = json.dumps({"model": "a1", "prompt": "Tell me a long story", "max_tokens": 1900, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: lorad\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: _metric(server, "lorad_requests_running") == 1.0, timeout=10)
    assert wait_gauges_idle(server.server.metrics_port) == (0.0, 0.0)
    assert server.server.metrics.requests.labels("cancelled")._value.get() == engine_cancelled + 1


def test_requests_are_counted_by_transport(server, client, grpc_client):
    def count(transport, outcome):
        return _metric(server, f'lorad_transport_requests_total{{outcome="{outcome}",transport="{transport}"}}')

    before = {(t, o): count(t, o) for t in ("http", "grpc") for o in ("ok", "error")}
    client.completions.create(model="a0", prompt="hi", max_tokens=2)
    grpc_client.generate("hi", adapter_id="a0", max_new_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a0", prompt="hi", max_tokens=2, n=5)
    assert count("http", "ok") == before["http", "ok"] + 1
    assert count("grpc", "ok") == before["grpc", "ok"] + 1
    assert count("http", "error") == before["http", "error"] + 1
    assert count("grpc", "error") == before["grpc", "error"]


# --- tokens, limits, the CLI ------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(long_base, adapters_dir, tmp_path_factory):
    """A second server: API token required, one HTTP generation at a time."""
    token_file = tmp_path_factory.mktemp("secrets") / "api.token"
    token_file.write_text(API_TOKEN)
    token_file.chmod(0o600)
    config = server_config(adapters_dir, server=dict(http_port=0, api_token_file=str(token_file),
                                                     http_max_concurrency=1), max_seq_len=2048)
    with ServerThread(config, long_base) as srv:
        yield srv


def test_the_api_token_is_a_bearer_token_on_http_too(guarded):
    url = f"http://127.0.0.1:{guarded.server.http_port}/v1"
    with OpenAI(base_url=url, api_key="wrong-token-wrong-token", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError, match="not valid"):
            bad.completions.create(model="a0", prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    anonymous = httpx.post(f"{url}/completions", json={"model": "a0", "prompt": "hi"}, timeout=10)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in anonymous.json()["error"]["message"]
    # the token is checked before the body is judged
    assert httpx.post(f"{url}/completions", content=b"{not json", timeout=10).status_code == 401
    with OpenAI(base_url=url, api_key=API_TOKEN, max_retries=0) as good:
        assert good.completions.create(model="a0", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert httpx.get(url.removesuffix("/v1") + "/ready", timeout=10).status_code == 200  # probes stay open


def test_over_the_concurrency_limit_is_429_with_retry_after(guarded):
    url = f"http://127.0.0.1:{guarded.server.http_port}/v1"
    with OpenAI(base_url=url, api_key=API_TOKEN, max_retries=0, timeout=60) as c:
        stream = c.completions.create(model="a0", prompt="Tell me a long story", max_tokens=1900, stream=True)
        next(iter(stream))  # one generation holds the only place
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model="a0", prompt="hi", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        assert "--http-max-concurrency" in info.value.body["message"]
        stream.close()
        assert wait_for(lambda: guarded.server.http_api.in_flight == 0)
        assert c.completions.create(model="a0", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_lorad_serve_http_port_answers_the_openai_client(tiny_base_dir, adapters_dir, tmp_path):
    args = ["--base", str(tiny_base_dir), "--quant", "none", "--device", "cpu", "--adapters", str(adapters_dir),
            "--max-seq-len", "256", "--kv-cache-memory", "64MiB", "--max-lora-rank", "16", "--http-port", "0"]
    srv = ServeProcess(args, tmp_path / "serve.log", timeout=180).start()
    try:
        assert srv.http_url is not None
        with OpenAI(base_url=srv.http_url, api_key="unused", max_retries=0, timeout=60) as c:
            assert {"a0", "a1"} <= {m.id for m in c.models.list()}
            out = c.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert out.usage.completion_tokens >= 1
            grpc_out = Client(srv.target, timeout=60).generate("hello", adapter_id="a1", max_new_tokens=5)
            http_out = c.completions.create(model="a1", prompt="hello", max_tokens=5, temperature=0)
            assert http_out.choices[0].text == grpc_out.text
            # SIGTERM with a stream in flight: it runs to its end within --grace, then the process exits 0
            stream = iter(c.completions.create(model="a0", prompt="Tell me", max_tokens=200, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
            next(stream)
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(stream)
            assert rest[-1].usage.completion_tokens == 200 and rest[-2].choices[0].finish_reason == "length"
    finally:
        code = srv.stop()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]


def test_while_the_base_loads_probes_say_so_and_requests_get_503(long_base, adapters_dir):
    import threading

    release = threading.Event()

    def slow_load():
        release.wait(60)
        return long_base

    srv = ServerThread(server_config(adapters_dir, server=dict(http_port=0), max_seq_len=2048), slow_load)
    try:
        assert wait_for(lambda: srv.server.http_port is not None, timeout=30)
        root = f"http://127.0.0.1:{srv.server.http_port}"
        assert httpx.get(f"{root}/health", timeout=10).status_code == 200
        assert httpx.get(f"{root}/ready", timeout=10).json()["status"] == "starting"
        with OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as info:
                c.completions.create(model="a0", prompt="hi", max_tokens=2)
            assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
            assert "loading" in info.value.body["message"]
            release.set()
            srv.wait_started()
            assert httpx.get(f"{root}/ready", timeout=10).status_code == 200
            assert c.completions.create(model="a0", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    finally:
        release.set()
        srv.stop()


def test_with_tls_the_http_api_is_https_with_the_same_certificate(long_base, adapters_dir, tmp_path):
    import ssl

    from test_mgmt_access import _cert

    ca_cert, ca_key, ca_pem, _ = _cert(tmp_path, "ca", ca=True)
    _, _, server_pem, server_key = _cert(tmp_path, "server", issuer=(ca_cert, ca_key))
    config = server_config(adapters_dir, server=dict(http_port=0, tls_cert=server_pem, tls_key=server_key),
                           max_seq_len=2048)
    with ServerThread(config, long_base) as srv:
        url = f"https://127.0.0.1:{srv.server.http_port}/v1/completions"
        body = {"model": "a0", "prompt": "hi", "max_tokens": 2}
        answer = httpx.post(url, json=body, verify=ssl.create_default_context(cafile=ca_pem), timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        with pytest.raises(httpx.ConnectError):
            httpx.post(url, json=body, timeout=10)  # not trusted without the CA
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(url.replace("https", "http"), json=body, timeout=10)  # no plaintext


# --- behind HAProxy -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["affinity", "roundrobin"])
def test_haproxy_http_frontends_are_valid(tmp_path, policy):
    from lorad.haproxy import BalancerConfig, Replica, check_config, find_haproxy, render

    replicas = [Replica(f"r{i}", f"127.0.0.1:{50061 + i}", 9401 + i, id=i + 1, http_address=f"127.0.0.1:{8001 + i}")
                for i in range(3)]
    text = render(BalancerConfig(policy=policy, http_bind="127.0.0.1:8000"), replicas)
    assert "frontend lorad_http" in text and "server r2 127.0.0.1:8003 id 3 port 9403" in text
    assert "frontend lorad_http" not in render(BalancerConfig(policy=policy), replicas)
    with pytest.raises(Exception, match="http_bind"):
        render(BalancerConfig(http_bind="127.0.0.1:8000"), [Replica("r0", "127.0.0.1:1", 2, id=1)])
    if find_haproxy() is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    (tmp_path / "haproxy.cfg").write_text(text)
    check_config(tmp_path / "haproxy.cfg")


def test_cluster_config_prints_the_http_frontend():
    from click.testing import CliRunner

    from lorad.cli import main

    out = CliRunner().invoke(main, ["cluster", "config", "--http-bind", "127.0.0.1:8000",
                                    "--server", "10.0.0.5:50051:9400:8001", "--server", "[::1]:50052:9401:8002"])
    assert out.exit_code == 0, out.output
    assert "server r0 10.0.0.5:50051 id 1 port 9400" in out.output
    assert "server r0 10.0.0.5:8001 id 1 port 9400" in out.output and "server r1 [::1]:8002 id 2 port 9401" in out.output
    missing = CliRunner().invoke(main, ["cluster", "config", "--http-bind", ":8000", "--server", "10.0.0.5:50051:9400"])
    assert missing.exit_code != 0 and "HTTP API" in missing.output


def test_lorad_cluster_http_port_keeps_each_adapter_on_one_replica(tiny_base_dir, adapters_dir, tmp_path):
    """`lorad cluster up --http-port`: two real replicas behind a real HAProxy. By the body's
    "model" (the SDK sends no header) and by the x-lorad-adapter header, all of an adapter's
    requests reach one replica."""
    from lorad.cluster import ClusterConfig, LocalCluster, MetricsSnapshot
    from lorad.haproxy import find_haproxy

    if find_haproxy() is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    config = ClusterConfig(
        replicas=2, port=0, http_port=0, adapters_dir=str(adapters_dir), base=str(tiny_base_dir),
        kv_cache_memory="16MiB", max_seq_len=256, threads=1, drain_seconds=0.0, workdir=str(tmp_path),
        serve_args=("--quant", "none", "--max-loras", "2", "--max-cpu-loras", "4", "--max-lora-rank", "16"))
    with LocalCluster(config) as local:
        def served() -> list[float]:
            return [MetricsSnapshot(r.metrics()).sum("lorad_transport_requests_total", transport="http", outcome="ok")
                    for r in local.replicas]

        with OpenAI(base_url=f"http://127.0.0.1:{local.http_port}/v1", api_key="unused", max_retries=0,
                    timeout=60) as c:
            assert {"a0", "a1"} <= {m.id for m in c.models.list()}
            for adapter in ("a0", "a1"):
                before = served()
                for _ in range(4):
                    out = c.completions.create(model=adapter, prompt="hi", max_tokens=2, temperature=0)
                    assert out.system_fingerprint.startswith(f"lorad:{adapter}@")
                for _ in range(2):
                    c.completions.create(model=adapter, prompt="hi", max_tokens=2, extra_headers={ROUTING_HEADER: adapter})
                delta = sorted(after - b for after, b in zip(served(), before))
                assert delta == [0.0, 6.0], f"{adapter}: requests per replica {delta}"
