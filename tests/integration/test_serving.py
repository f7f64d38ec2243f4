"""The serving path end to end: `mellctl up` with two real tiny-model workers on loopback.

The official openai client, the exact SSE bytes, greedy equality with the in-process engine,
64 concurrent streams, a client that walks away, and every bad input.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest
from mell_cluster import LocalCluster, get_json, metric, sse_events, start_cluster, wait_until
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Tell me a story about a tiny model."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("serving"), "--workers", "2", "--device", "cpu")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(cluster: LocalCluster) -> Tokenizer:
    return Tokenizer.from_file(str(cluster.data_dir / "models/mell-tiny/tokenizer.json"))


def test_openai_completions(client: openai.OpenAI) -> None:
    full = client.completions.create(
        model="mell-tiny",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model="mell-tiny",
            prompt="Once upon a time",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_openai_chat(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model="mell-tiny", messages=CHAT, max_tokens=10, temperature=0, seed=1
    )
    assert full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant"
    assert full.usage is not None and full.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model="mell-tiny", messages=CHAT, max_tokens=10, temperature=0, seed=1, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_logprobs_and_seeded_sampling(client: openai.OpenAI) -> None:
    a, b = (
        client.chat.completions.create(
            model="mell-tiny",
            messages=CHAT,
            max_tokens=8,
            temperature=1.0,
            seed=42,
            logprobs=True,
            top_logprobs=2,
            extra_body={"ignore_eos": True},
        )
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    content = a.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 8 and all(len(t.top_logprobs) == 2 for t in content)


async def test_sse_bytes_exact(cluster: LocalCluster) -> None:
    body = {
        "model": "mell-tiny",
        "messages": CHAT,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(cluster.url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        events = await sse_events(r)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    rid, created = chunks[0]["id"], chunks[0]["created"]
    head = (
        f'{{"id":"{rid}","object":"chat.completion.chunk","created":{created},"model":"mell-tiny",'
    ).encode()
    assert events[0] == head + (
        b'"choices":[{"index":0,"delta":{"role":"assistant",'
        b'"content":""},"logprobs":null,"finish_reason":null}]}'
    )
    content = chunks[1:-1]
    for chunk, raw in zip(content[:-1], events[1:-3], strict=True):
        text = json.dumps(
            chunk["choices"][0]["delta"]["content"], ensure_ascii=False, separators=(",", ":")
        )
        assert raw == head + b'"choices":[{"index":0,"delta":{"content":' + text.encode() + (
            b'},"logprobs":null,"finish_reason":null}]}'
        )
    last = content[-1]["choices"][0]
    assert last["finish_reason"] == "length" and last["stop_reason"] is None
    assert events[-2] == head + (
        b'"choices":[],"usage":{"prompt_tokens":%d,'
        b'"completion_tokens":6,"total_tokens":%d,"prompt_tokens_details":{"cached_tokens":%d}}}'
        % (
            chunks[-1]["usage"]["prompt_tokens"],
            chunks[-1]["usage"]["prompt_tokens"] + 6,
            chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"],
        )
    )


def test_greedy_output_equals_in_process_engine(
    client: openai.OpenAI, cluster: LocalCluster, tokenizer: Tokenizer
) -> None:
    from tokenizers.decoders import DecodeStream

    from mell.common.config import EngineConfig
    from mell.common.sampling import SamplingParams
    from mell.workerd.engine.engine import Engine

    prompt = "The quick brown fox jumps over"
    ids = tokenizer.encode(prompt).ids
    engine = Engine(EngineConfig(model=str(cluster.data_dir / "models/mell-tiny"), device="cpu"))
    engine.add_request("ref", ids, SamplingParams(max_tokens=40, temperature=0.0))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
    stream = DecodeStream(skip_special_tokens=True)
    expected = "".join(p for t in out if (p := stream.step(tokenizer, t)))
    got = client.completions.create(model="mell-tiny", prompt=prompt, max_tokens=40, temperature=0)
    assert got.choices[0].text == expected
    assert got.usage is not None and got.usage.completion_tokens == len(out)


async def test_64_concurrent_streams(cluster: LocalCluster) -> None:
    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, int]:
        body = {
            "prompt": f"stream number {i}",
            "max_tokens": 20 + i % 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "seed": i,
        }
        async with session.post(cluster.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            events = await sse_events(r)
        assert events[-1] == b"[DONE]"
        usage = json.loads(events[-2])["usage"]
        finish = json.loads(events[-3])["choices"][0]["finish_reason"]
        assert finish == "length"
        return usage["completion_tokens"], 20 + i % 7

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, i) for i in range(64)))
    assert all(got == want for got, want in results)


async def test_client_disconnect_frees_blocks(cluster: LocalCluster) -> None:
    def used() -> float:
        text = _metrics(cluster)
        return metric(text, "mell:kv_cache_used_blocks", model_name="mell-tiny")

    wait_until(lambda: used() == 0, what="idle cluster")
    body = {"prompt": "a long story " * 20, "max_tokens": 1800, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        r = await s.post(cluster.url + "/v1/completions", json=body)
        await r.content.readuntil(b"\n\n")
        await asyncio.to_thread(wait_until, lambda: used() > 0, 5.0, "blocks in use")
        r.close()  # the client walks away mid-stream
    await asyncio.to_thread(wait_until, lambda: used() == 0, 10.0, "blocks freed")
    text = _metrics(cluster)
    assert metric(text, "mell:num_requests_in_flight", model_name="mell-tiny") == 0
    aborted = [e for e in cluster.gateway_log() if e["event"] == "request_aborted"]
    assert aborted and aborted[-1]["reason"] == "client disconnected"


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "n": 17}', 400, "n"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 9}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [1, 2, 999999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ["a", ""]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ["a", 3]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "bogus": 1}', 400, "bogus"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 50}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "model": "nope"}', 404, "model"),
    (
        "/v1/completions",
        b'{"prompt": "x", "stream_options": {"include_usage": true}}',
        400,
        "stream_options",
    ),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
        400,
        "top_logprobs",
    ),
    ("/v1/chat/completions", b'{"messages": "hello"}', 400, "messages"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99999}',
        400,
        "messages",
    ),
    ("/v1/nothing", b"{}", 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
async def test_bad_input_gets_error_json(
    cluster: LocalCluster, path: str, body: bytes, status: int, param: str | None
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(cluster.url + path, data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == status
        error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param and error["message"]
    assert get_json(cluster.url + "/health")[0] == 200


async def test_wrong_content_type_and_method(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            cluster.url + "/v1/completions",
            data=b"prompt=x",
            headers={"Content-Type": "text/plain"},
        ) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == 400
        async with s.get(cluster.url + "/v1/completions") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == 405


def test_stop_string_ends_output_before_it(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model="mell-tiny",
        prompt="Stop here",
        max_tokens=30,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = base.choices[0].text
    at = next((i for i in range(2, len(text) - 1) if text[i : i + 2].isalnum()), None)
    if at is None:
        pytest.skip(f"generated text has no usable stop string: {text!r}")
    stop = text[at : at + 2]
    cut = client.completions.create(
        model="mell-tiny",
        prompt="Stop here",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        stream=False,
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_health_version_metrics(cluster: LocalCluster) -> None:
    status, models = get_json(cluster.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["mell-tiny"]
    status, health = get_json(cluster.url + "/health")
    assert status == 200 and health["models"]["mell-tiny"]["active"] == 2
    assert get_json(cluster.url + "/version")[1]["version"]
    text = _metrics(cluster)
    for name in (
        "mell:num_requests_running",
        "mell:num_requests_waiting",
        "mell:kv_cache_usage_perc",
        "mell:time_to_first_token_seconds_bucket",
        "mell:inter_token_latency_seconds_bucket",
        "mell:e2e_request_latency_seconds_sum",
        "mell:prompt_tokens_total",
        "mell:generation_tokens_total",
        "mell:request_success_total",
        "mell:num_preemptions_total",
        "mell:active_workers",
        'mell:migrations_total{kind="kv"}',
        "mell:kv_cache_used_blocks",
        "mell:worker_kv_cache_usage_perc{",
    ):
        assert name in text, name
    assert metric(text, "mell:active_workers", model_name="mell-tiny") == 2
    assert 'worker="w0"' in text and 'worker="w1"' in text


def _metrics(cluster: LocalCluster) -> str:
    import urllib.request

    with urllib.request.urlopen(cluster.url + "/metrics", timeout=5) as r:
        return r.read().decode()


def test_prefix_caching_keeps_greedy_output_and_reports_cached_tokens(
    client: openai.OpenAI, cluster: LocalCluster, tokenizer: Tokenizer
) -> None:
    """A growing conversation (each turn resends the history): the workers' prefix caches
    (on by default) skip the history's prefill, and the text is that of an engine without
    caching, token for token."""
    from tokenizers.decoders import DecodeStream

    from mell.common.config import EngineConfig
    from mell.common.sampling import SamplingParams
    from mell.workerd.engine.engine import Engine

    engine = Engine(
        EngineConfig(
            model=str(cluster.data_dir / "models/mell-tiny"),
            device="cpu",
            enable_prefix_caching=False,
        )
    )
    history = " ".join(f"line {i} of a long shared history." for i in range(40))
    cached = []
    for turn in range(3):
        history += f" Question number {turn}?"
        ids = tokenizer.encode(history).ids
        engine.add_request(f"ref{turn}", ids, SamplingParams(max_tokens=16, temperature=0.0))
        out: list[int] = []
        while engine.has_unfinished():
            for o in engine.step():
                out.extend(o.new_token_ids)
        stream = DecodeStream(skip_special_tokens=True)
        expected = "".join(p for t in out if (p := stream.step(tokenizer, t)))
        got = client.completions.create(
            model="mell-tiny", prompt=history, max_tokens=16, temperature=0
        )
        assert got.choices[0].text == expected
        assert got.usage is not None
        cached.append(got.usage.prompt_tokens_details.cached_tokens)  # type: ignore[union-attr]
        history += got.choices[0].text
        time.sleep(0.6)  # a load report carries the worker's cache to the gateway
    assert cached[0] == 0 and all(c >= 16 * 10 for c in cached[1:]), cached
    text = _metrics(cluster)
    assert metric(text, "mell:prefix_cache_hits_total", model_name="mell-tiny") >= sum(cached)
    assert metric(text, "mell:prefix_cache_queries_total", model_name="mell-tiny") > 0
