"""`kanana-quant serve` against the official `openai` client, on a tiny Kanana-shaped model (random weights,
real tokenizer) served on a free localhost port: what the server returns is checked against our own decode
loop run directly (greedy text, logprobs from the engine's logits), against jsonschema (tool arguments,
json_schema output) and against OpenAI's streaming rules."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import jsonschema
import numpy as np
import openai
import pytest
import uvicorn

from kanana_quant.chat_format import render_prompt
from kanana_quant.loader import open_model
from kanana_quant.runtimes.engines import open_engine
from kanana_quant.runtimes.generate import Decoding, generate, log_softmax
from kanana_quant.runtimes.sampling import SamplingParams
from kanana_quant.serve import Service, Settings
from kanana_quant.serve.app import MAX_BODY_BYTES, create_app
from kanana_quant.synth import TINY, synth_model

KEY = "test-key"
NAME = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "서울"]}},
                         "ok": {"type": "boolean"}}}


@contextmanager
def running(service: Service):
    """The app on a socket bound to a free localhost port, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory):
    # The tiny model with a 4K context: Kanana's tool instructions alone are ~550 tokens of its small vocabulary.
    return synth_model(tmp_path_factory.mktemp("serve") / NAME, {**TINY["dense"], "max_position_embeddings": 4096},
                       seed=7)


@pytest.fixture(scope="module")
def loaded(serve_model):
    return open_model(str(serve_model))


@pytest.fixture(scope="module")
def server(loaded):
    service = Service(loaded, Settings(engine="numpy", parallel=2, api_key=KEY, name=NAME))
    with running(service) as url:
        yield url
    service.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oracle(loaded):
    """Our decode loop on its own engine: what the server must reproduce."""
    engine = open_engine(loaded, "numpy")

    def run(messages, max_tokens, tools=None, **sampling):
        ids = loaded.tokenizer.encode(render_prompt(loaded.tokenizer, messages, tools))
        out = list(generate(engine, ids, max_tokens, SamplingParams(**sampling), loaded.tokenizer.eos_ids))
        return loaded.tokenizer.decode(out), out, ids

    run.engine = engine
    return run


HELLO = [{"role": "system", "content": "You are Kanana."}, {"role": "user", "content": "안녕하세요! 카나나는 누구?"}]


def test_chat_equals_our_greedy_decode(client, oracle):
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=12, temperature=0)
    text, tokens, prompt = oracle(HELLO, 12, temperature=0.0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if len(tokens) == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(tokens))
    assert r.model == NAME and r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, messages=HELLO, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_seed_replays_and_temperature_samples(client):
    kw = dict(model=NAME, messages=HELLO, max_tokens=10, temperature=1.0)
    a, b = (client.chat.completions.create(**kw, seed=3).choices[0].message.content for _ in range(2))
    others = {client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (4, 5, -6)}
    assert a == b and others - {a}
    greedy = client.chat.completions.create(**{**kw, "temperature": 0}).choices[0].message.content
    assert client.chat.completions.create(**{**kw, "temperature": 1e-300}).choices[0].message.content == greedy


def test_completions_logprobs_are_the_engines(client, loaded, oracle):
    prompt = "카나나는 한국어와"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=True)
    lp = r.choices[0].logprobs
    engine = oracle.engine
    engine.reset()
    logits = engine.forward(ids)
    for i, logprob in enumerate(lp.token_logprobs):
        ref = log_softmax(logits)
        token = int(np.argmax(ref))  # greedy
        assert logprob == pytest.approx(ref[token], abs=1e-5)
        top3 = np.sort(ref)[::-1][:3]
        # The legacy format keys alternatives by text, so two tokens that decode alike share an entry.
        assert all(np.abs(top3 - v).min() < 1e-5 for v in lp.top_logprobs[i].values())
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top3[0], abs=1e-5)
        logits = engine.forward([token])
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].finish_reason == "length"
    echoed = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_stop_string_cuts_the_reply(client, oracle):
    text, _, _ = oracle(HELLO, 24, temperature=0.0)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def _valid_arguments(call, tool=WEATHER):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_call_round_trip(client, oracle, loaded):
    """tools -> a forced call with schema-valid arguments -> the tool's result goes back into the prompt ->
    a final answer, which is exactly our decode of the Kanana-format prompt holding that result."""
    messages = [{"role": "user", "content": "서울 날씨 어때?"}]
    first = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], max_tokens=200, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    _valid_arguments(call)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "맑음"}'}]
    final = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=10, temperature=0)
    assert final.choices[0].message.tool_calls is None
    rendered = [{"role": "user", "content": "서울 날씨 어때?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
                messages[-1]]
    text, _, prompt = oracle(rendered, 10, temperature=0.0)
    assert final.choices[0].message.content == text and final.usage.prompt_tokens == len(prompt)
    result = "<|start_header_id|>ipython<|end_header_id|>\n\n" + messages[-1]["content"] + "<|eot_id|>"
    assert result in render_prompt(loaded.tokenizer, rendered)


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_tool_calls_assemble_to_the_whole(client, parallel):
    """Streamed deltas put together by OpenAI's rules give the non-streamed calls. A random model allowed
    parallel calls tends to go on calling until max_tokens, so that case may end in "length"."""
    kw = dict(model=NAME, messages=[{"role": "user", "content": "날씨 두 곳"}], tools=[WEATHER],
              tool_choice="required", parallel_tool_calls=parallel, max_tokens=200, seed=5)
    whole = client.chat.completions.create(**kw)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            if tc.id is not None:  # OpenAI streams id, type and name once, then argument pieces
                assert tc.index not in calls and tc.type == "function"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
        assert not delta.content
    expect = whole.choices[0].message.tool_calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
           [(c.function.name, c.function.arguments) for c in expect]
    assert finish == whole.choices[0].finish_reason
    assert finish in (("length", "tool_calls") if parallel else ("tool_calls",))
    assert len(expect) >= 1 and (parallel or len(expect) == 1)
    for c in expect if finish == "tool_calls" else expect[:-1]:  # all but a call cut off by max_tokens
        _valid_arguments(c)


def test_json_schema_output_validates_100_of_100(client):
    """Seeded sampling at temperature 1 from a random-weight model: only the grammar keeps it valid. PERSON's
    longest output is under 200 tokens even byte by byte with \\u escapes, so max_tokens never cuts it."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(seed):
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "사람 한 명"}],
                                           response_format=fmt, max_tokens=200, temperature=1.0, seed=seed)
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 4 clients on 2 slots: the queue is used too
        choices = list(pool.map(ask, range(100)))
    valid = 0
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        valid += 1
    assert valid == 100 and len({c.message.content for c in choices}) > 50  # sampled, not one fixed answer


def test_json_object_mode(client):
    r = client.chat.completions.create(model=NAME, messages=HELLO, response_format={"type": "json_object"},
                                       max_tokens=40, temperature=0.7, seed=2)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.startswith("{")


# ---------------------------------------------------------------------------------------------------------
# Hostile input: each bad request gets its status and an OpenAI error object, and the server goes on answering


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        chunked: bool = False) -> tuple[int, object, bytes]:
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        if chunked:
            conn.request(method, path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         headers=hdrs, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def chat_body(**fields) -> bytes:
    return json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                       **fields}).encode()


HOSTILE = [  # (what, method, path, body, extra headers, status, error code or None)
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', {}, 400, "invalid_json"),
    ("body is not an object", "POST", "/v1/chat/completions", b"[1, 2, 3]", {}, 400, "invalid_value"),
    ("invalid UTF-8", "POST", "/v1/chat/completions", b'{"model": "\xff\xfe"}', {}, 400, None),
    ("nesting 100k deep", "POST", "/v1/chat/completions", b"[" * 100_000, {}, 400, None),
    ("unknown field", "POST", "/v1/chat/completions", chat_body(frobnicate=1), {}, 400, "unknown_parameter"),
    ("unknown field in a message", "POST", "/v1/chat/completions",
     json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi", "mood": "x"}]}).encode(), {}, 400,
     "unknown_parameter"),
    ("unknown model", "POST", "/v1/chat/completions", chat_body(model="gpt-9"), {}, 404, "model_not_found"),
    ("prompt longer than the context", "POST", "/v1/chat/completions",
     json.dumps({"model": NAME, "messages": [{"role": "user", "content": "카나나 " * 5000}]}).encode(), {}, 400,
     "context_length_exceeded"),
    ("body over 8 MiB", "POST", "/v1/chat/completions", b" " * (MAX_BODY_BYTES + 1), {}, 413, None),
    ("invalid json_schema", "POST", "/v1/chat/completions", chat_body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}), {}, 400,
     "invalid_json_schema"),
    ("schema llguidance cannot enforce", "POST", "/v1/chat/completions", chat_body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://example.com/s.json"}}}),
     {}, 400, "invalid_json_schema"),
    ("schema nested 900 deep", "POST", "/v1/chat/completions", chat_body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(
            '{"type": "array", "items": ' * 900 + '{"type": "integer"}' + "}" * 900)}}), {}, 400,
     "invalid_json_schema"),
    ("invalid tool parameters", "POST", "/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 12}}}}}]), {}, 400,
     "invalid_json_schema"),
    ("tool parameters not an object", "POST", "/v1/chat/completions", chat_body(tools=[{"type": "function",
     "function": {"name": "f", "parameters": {"type": "string"}}}]), {}, 400, "invalid_json_schema"),
    ("bad tool name", "POST", "/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {
        "name": "a b<c>", "parameters": {"type": "object"}}}]), {}, 400, "invalid_value"),
    ("tool_choice names no tool", "POST", "/v1/chat/completions", chat_body(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "nope"}}), {}, 400, None),
    ("tools and json_schema at once", "POST", "/v1/chat/completions", chat_body(
        tools=[WEATHER], response_format={"type": "json_object"}), {}, 400, None),
    ("wrong API key", "POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer nope"}, 401,
     "invalid_api_key"),
    ("no API key", "GET", "/v1/models", None, {"Authorization": ""}, 401, "invalid_api_key"),
    ("n = 2", "POST", "/v1/chat/completions", chat_body(n=2), {}, 400, None),
    ("temperature 5", "POST", "/v1/chat/completions", chat_body(temperature=5), {}, 400, None),
    ("max_tokens 0", "POST", "/v1/chat/completions", chat_body(max_tokens=0), {}, 400, None),
    ("no messages", "POST", "/v1/chat/completions", json.dumps({"model": NAME, "messages": []}).encode(), {},
     400, None),
    ("unknown role", "POST", "/v1/chat/completions",
     json.dumps({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}).encode(), {}, 400, None),
    ("five stop strings", "POST", "/v1/chat/completions", chat_body(stop=list("abcde")), {}, 400, None),
    ("logit_bias", "POST", "/v1/chat/completions", chat_body(logit_bias={"5": 10}), {}, 400, None),
    ("token id past the vocabulary", "POST", "/v1/completions",
     json.dumps({"model": NAME, "prompt": [1, 2, 10 ** 9]}).encode(), {}, 400, None),
    ("unknown endpoint", "GET", "/v1/nope", None, {}, 404, None),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405, None),
]


def test_hostile_inputs_get_openai_errors_and_the_server_survives(server):
    table = []
    for what, method, path, body, headers, status, code in HOSTILE:
        got, hdrs, payload = raw(server, method, path, body, headers)
        error = json.loads(payload)["error"]
        table.append(f"{what:34} {got}")
        assert got == status, (what, payload[:300])
        assert set(error) == {"message", "type", "param", "code"} and error["message"], what
        assert "\n" not in error["message"] and "Traceback" not in payload.decode(errors="replace"), what
        if code:
            assert error["code"] == code, (what, error)
        assert raw(server, "GET", "/health")[0] == 200
    got, _, _ = raw(server, "POST", "/v1/chat/completions", b" " * (MAX_BODY_BYTES + 1), chunked=True)
    assert got == 413  # no Content-Length: counted as it arrives
    status, _, payload = raw(server, "POST", "/v1/chat/completions", chat_body())
    assert status == 200 and json.loads(payload)["choices"][0]["message"]["role"] == "assistant"
    print("\n".join(table))


# ---------------------------------------------------------------------------------------------------------
# Slots: a full queue answers 503 + Retry-After; a client that leaves frees its slot


# A reply that cannot end before max_tokens whatever is sampled: a JSON string of at least 20,000 characters.
LONG = {"type": "json_schema", "json_schema": {"name": "long", "schema": {"type": "string", "minLength": 200000}}}


def _stream_open(url: str, max_tokens: int):
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", chat_body(max_tokens=max_tokens, stream=True, response_format=LONG),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    r.readline()  # the first event: generation has started
    return conn, r


def _seconds_per_event(r, events: int = 16) -> float:
    """How fast this server streams right now, so bounds below scale with the machine's load."""
    start, seen = time.monotonic(), 0
    while seen < events:
        seen += r.readline().startswith(b"data:")
    return (time.monotonic() - start) / events


def _busy(url: str) -> int:
    return json.loads(raw(url, "GET", "/health")[2])["busy"]


def _wait_idle(url: str, seconds: float = 10) -> float:
    start = time.monotonic()
    while _busy(url):
        assert time.monotonic() - start < seconds, "the slot was not freed"
        time.sleep(0.05)
    return time.monotonic() - start


def test_full_queue_is_503_and_a_departed_client_frees_its_slot(tmp_path):
    # a 32K context, so that a request runs long enough (tens of seconds here) for an early stop to show
    model = synth_model(tmp_path / NAME, {**TINY["dense"], "max_position_embeddings": 32768}, seed=7)
    service = Service(open_model(str(model)), Settings(engine="numpy", parallel=1, max_queue=0, api_key=KEY,
                                                       name=NAME))
    try:
        with running(service) as url:
            conn, r = _stream_open(url, 30000)
            status, headers, payload = raw(url, "POST", "/v1/chat/completions", chat_body())
            assert status == 503 and int(headers["Retry-After"]) >= 1
            assert json.loads(payload)["error"]["code"] == "server_busy"
            # what finishing the request would take at the current rate; being freed must take a fraction
            left = 29000 * _seconds_per_event(r)
            conn.close()  # the client leaves mid-stream
            assert _wait_idle(url, left) < left / 10
            # A non-streaming client that leaves is noticed too (the server polls while it waits).
            sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            body = chat_body(max_tokens=30000, response_format=LONG)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " +
                         str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 10
            while not _busy(url):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            sock.close()
            assert _wait_idle(url, left) < left / 10
            assert raw(url, "POST", "/v1/chat/completions", chat_body())[0] == 200
    finally:
        service.close()


def test_onnxruntime_slots_run_in_parallel_and_match_numpy(serve_model, loaded, oracle, tmp_path):
    """Two onnxruntime slots (two child processes): concurrent grammar-constrained requests all validate, and
    greedy text through the server equals our numpy decode (the export is float at accuracy level 0)."""
    from kanana_quant.exporters.onnx import export_onnx

    export = export_onnx(loaded, tmp_path / "onnx", accuracy_level=0, lm_head="float").path
    service = Service(open_model(str(export)), Settings(engine="onnxruntime", parallel=2, name=NAME, threads=1))
    try:
        with running(service) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

            def ask(seed):
                return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "사람"}],
                                                      response_format=fmt, max_tokens=200, seed=seed).choices[0]

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for choice in pool.map(ask, range(8)):
                    assert choice.finish_reason == "stop"
                    jsonschema.validate(json.loads(choice.message.content), PERSON)
            r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=12, temperature=0)
            assert r.choices[0].message.content == oracle(HELLO, 12, temperature=0.0)[0]
            assert service.health()["slots"] == 2 and service.engine_name == "onnxruntime"
    finally:
        service.close()


def test_grammar_holds_in_llama_cpp(loaded, tmp_path):
    """The same constraint drives llama.cpp's logits (isolated child process) through our sampler."""
    from kanana_quant.gguf.writer import export_gguf
    from kanana_quant.runtimes.grammar import GrammarCompiler

    gguf = open_model(str(export_gguf(loaded, tmp_path / "m.gguf", "Q8_0")))
    engine = open_engine(gguf, "llama.cpp", max_seq_len=512, threads=1)
    tok = gguf.tokenizer
    grammar = GrammarCompiler(tok.to_files()["tokenizer.json"], gguf.config.vocab_size, tok.eos_ids).json_schema(PERSON)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "사람"}]))
    for seed in range(5):
        decoding = Decoding(engine, prompt, 200, SamplingParams(temperature=1.0, seed=seed), tok.eos_ids, 0,
                            grammar.start())
        out = [s.token for s in decoding]
        assert decoding.finish_reason == "stop"
        jsonschema.validate(json.loads(tok.decode(out)), PERSON)
    engine.close()


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on `port`, from the kernel's table (/proc/net/tcp)."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hexport = local.split(":")
        if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_cli_serve_starts_and_stops_on_sigterm(serve_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kanana_quant.cli", "serve", str(serve_model), "--port", str(port),
                             "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                if raw(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=3).usage.completion_tokens >= 1
        assert _listening_addresses(port) == {"127.0.0.1"}  # the default binds this machine only
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130  # README "Exit codes": interrupted (Ctrl-C or SIGTERM)
        out = proc.stdout.read()
        assert f"http://127.0.0.1:{port}/" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_chat_page_is_self_contained(server):
    """The page and everything it loads come from this server: no CDN, nothing to build."""
    import re

    status, headers, html = raw(server, "GET", "/")
    assert status == 200 and "default-src 'self'" in headers["Content-Security-Policy"]
    links = re.findall(rb'(?:src|href)="([^"]+)"', html)
    assert links and all(link.startswith(b"/static/") for link in links), links
    for link in links:
        status, _, body = raw(server, "GET", link.decode())
        assert status == 200 and b"http://" not in body and b"https://" not in body


def test_a_crashing_engine_is_a_500_and_the_server_goes_on(loaded, tmp_path, monkeypatch):
    """onnxruntime's child dies of SIGSEGV at every forward: each request gets one line with code
    engine_crashed, the slot reopens its engine, and the server keeps answering."""
    from test_isolation import crash_on_forward

    from kanana_quant.exporters.onnx import export_onnx

    export = export_onnx(loaded, tmp_path / "onnx").path
    for key, value in crash_on_forward(tmp_path / "crash", "onnxruntime").items():
        monkeypatch.setenv(key, value)
    service = Service(open_model(str(export)), Settings(engine="onnxruntime", name=NAME, threads=1))
    try:
        with running(service) as url:
            for _ in range(2):
                status, _, payload = raw(url, "POST", "/v1/chat/completions", chat_body())
                error = json.loads(payload)["error"]
                assert status == 500 and error["code"] == "engine_crashed" and "SIGSEGV" in error["message"]
                assert "\n" not in error["message"]
                assert raw(url, "GET", "/health")[0] == 200
    finally:
        service.close()
