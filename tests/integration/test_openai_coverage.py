"""The OpenAI surface through the official openai client on a real `mellctl up` cluster whose
worker serves a shorter context than the checkpoint (a KV cap): penalties and logit_bias (the
served tokens equal the in-process engine's, and differ from the unpenalised ones), n=3, batch
prompts, echo, include_stop_str_in_output, skip_special_tokens, /tokenize and /detokenize,
/v1/models' context length, unknown and unsupported fields, and the hostile bodies of issue 14
(ints beyond int64, reserved chat_template_kwargs) answered 400 without leaking a request."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from mell_cluster import LocalCluster, metric, start_cluster, wait_until
from tokenizers import Tokenizer

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.workerd.engine.engine import Engine

pytestmark = pytest.mark.slow
PROMPT = "The quick brown fox jumps over the lazy dog and"
CHAT = [{"role": "user", "content": "Tell me a story about a tiny model."}]
KV_BLOCKS = 40  # of 16 tokens: the worker serves 640 tokens of the checkpoint's 2048


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("coverage"),
        *("--workers", "1", "--device", "cpu", "--num-kv-blocks", str(KV_BLOCKS)),
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(cluster: LocalCluster) -> Tokenizer:
    return Tokenizer.from_file(str(cluster.data_dir / "models/mell-tiny/tokenizer.json"))


@pytest.fixture(scope="module")
def engine(cluster: LocalCluster) -> Engine:
    return Engine(EngineConfig(model=str(cluster.data_dir / "models/mell-tiny"), device="cpu"))


def _reference(engine: Engine, tokenizer: Tokenizer, sampling: SamplingParams) -> list[int]:
    engine.add_request("ref", tokenizer.encode(PROMPT).ids, sampling)
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
    return out


def _text(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)  # a finished text is the decode


def _complete(client: openai.OpenAI, **fields: Any) -> str:
    extra = {"ignore_eos": True, **fields.pop("extra_body", {})}
    fields = {"max_tokens": 24, "temperature": 0, **fields}
    got = client.completions.create(model="mell-tiny", prompt=PROMPT, extra_body=extra, **fields)
    return got.choices[0].text


PENALTIES = [
    {"presence_penalty": 2.0},
    {"frequency_penalty": 1.5},
    {"extra_body": {"repetition_penalty": 1.8}},
    {"presence_penalty": -1.0, "frequency_penalty": 0.7, "extra_body": {"repetition_penalty": 1.3}},
]


@pytest.mark.parametrize("fields", PENALTIES)
def test_penalties_change_output_as_the_engine_does(
    client: openai.OpenAI, engine: Engine, tokenizer: Tokenizer, fields: dict[str, Any]
) -> None:
    base_ids = _reference(
        engine, tokenizer, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    )
    assert len(set(base_ids)) < len(base_ids)  # the unpenalised output repeats tokens
    flat = {**fields, **fields.get("extra_body", {})}
    flat.pop("extra_body", None)
    want = _reference(
        engine, tokenizer, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **flat)
    )
    got = _complete(client, **fields)
    assert got == _text(tokenizer, want)
    assert want != base_ids


def test_logit_bias_forces_and_bans_tokens(
    client: openai.OpenAI, engine: Engine, tokenizer: Tokenizer
) -> None:
    token = tokenizer.encode(" fox", add_special_tokens=False).ids[0]
    forced = _complete(client, max_tokens=6, logit_bias={str(token): 100})
    assert forced == tokenizer.decode([token] * 6)
    base = _reference(
        engine, tokenizer, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )
    banned = _complete(client, max_tokens=6, logit_bias={str(t): -100 for t in set(base)})
    ids = tokenizer.encode(banned, add_special_tokens=False).ids
    assert banned and not set(ids) & set(base)


def test_n_3_choices_streamed_and_not(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": "mell-tiny",
        "messages": CHAT,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
        "extra_body": {"ignore_eos": True},
    }
    full = client.chat.completions.create(**kwargs)
    assert [c.index for c in full.choices] == [0, 1, 2]
    texts = [c.message.content for c in full.choices]
    assert len(set(texts)) == 3  # seeds 7, 8, 9: three different samples
    assert full.usage is not None and full.usage.completion_tokens == 36
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == texts
    streamed = ["", "", ""]
    usage = None
    for chunk in client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert streamed == texts
    assert usage is not None and usage.completion_tokens == 36


def test_batch_prompts_with_n(client: openai.OpenAI) -> None:
    prompts = ["Once upon a time", "The quick brown fox"]
    singles = [
        client.completions.create(model="mell-tiny", prompt=p, max_tokens=8, temperature=0)
        for p in prompts
    ]
    batch = client.completions.create(
        model="mell-tiny", prompt=prompts, max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles for _ in "ab"]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)  # type: ignore[union-attr]


def test_unknown_and_unsupported_fields(client: openai.OpenAI) -> None:
    ok = client.chat.completions.create(
        model="mell-tiny",
        messages=CHAT,
        max_tokens=2,
        user="u",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=True,
    )
    assert ok.choices[0].message.role == "assistant"
    for extra, param in (
        ({"bogus_field": 1}, "bogus_field"),
        ({"best_of": 3}, "best_of"),
        ({"structural_tag": {"type": "x"}}, "structural_tag"),
        ({"use_beam_search": True}, "use_beam_search"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="mell-tiny", messages=CHAT, max_tokens=2, extra_body=extra
            )
        assert info.value.body["param"] == param  # type: ignore[index]


HOSTILE = [
    (b'{"prompt":"x","top_k":18446744073709551616}', "top_k"),
    (b'{"prompt":"x","stop_token_ids":[99999999999999999999999]}', "stop_token_ids"),
    (b'{"prompt":"x","top_k":9223372036854775807}', "top_k"),
    (b'{"prompt":"x","seed":-9223372036854775809}', "seed"),
]
CHAT_HOSTILE = [
    b'{"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"%s":1}}' % name
    for name in (b"messages", b"add_generation_prompt", b"bos_token", b"eos_token")
]


async def test_hostile_ints_and_template_kwargs_are_400_and_leak_nothing(
    cluster: LocalCluster,
) -> None:
    async with aiohttp.ClientSession() as s:
        bodies = [("/v1/completions", b, p) for b, p in HOSTILE * 15]
        bodies += [("/v1/chat/completions", b, "chat_template_kwargs") for b in CHAT_HOSTILE]
        for path, body, param in bodies:
            headers = {"Content-Type": "application/json"}
            async with s.post(cluster.url + path, data=body, headers=headers) as r:
                assert r.status == 400, body
                assert (await r.json())["error"]["param"] == param
        async with s.get(cluster.url + "/metrics") as r:
            text = await r.text()
    assert metric(text, "mell:num_requests_in_flight", model_name="mell-tiny") == 0


def test_models_report_the_served_context_and_default_chat_works(
    client: openai.OpenAI, cluster: LocalCluster
) -> None:
    models = client.models.list()
    assert models.data[0].model_extra["max_model_len"] == KV_BLOCKS * 16  # type: ignore[index]
    full = client.chat.completions.create(model="mell-tiny", messages=CHAT, temperature=0)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage is not None
    assert full.usage.prompt_tokens + full.usage.completion_tokens <= KV_BLOCKS * 16


def test_echo_stop_string_inclusion_and_special_tokens(
    client: openai.OpenAI, tokenizer: Tokenizer
) -> None:
    plain = _complete(client, max_tokens=12)
    echoed = client.completions.create(
        model="mell-tiny",
        prompt=[PROMPT, PROMPT],
        max_tokens=12,
        temperature=0,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in echoed.choices] == [PROMPT + plain] * 2
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="mell-tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            echo=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed == PROMPT + plain
    stop = next(plain[i : i + 2] for i in range(2, len(plain)) if plain[i : i + 2].isalnum())
    cut = plain[: plain.find(stop)]
    assert _complete(client, max_tokens=12, stop=[stop]) == cut
    kept = _complete(
        client, max_tokens=12, stop=[stop], extra_body={"include_stop_str_in_output": True}
    )
    assert kept == cut + stop
    eos = tokenizer.token_to_id("<|im_end|>")
    forced = {"logit_bias": {str(eos): 100}, "max_tokens": 3}
    assert _complete(client, **forced) == ""
    shown = _complete(client, **forced, extra_body={"skip_special_tokens": False})
    assert shown == "<|im_end|>" * 3


def test_tokenize_and_detokenize(cluster: LocalCluster, tokenizer: Tokenizer) -> None:
    import json
    import urllib.error
    import urllib.request

    def post(path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            cluster.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    got = post("/tokenize", {"model": "mell-tiny", "prompt": PROMPT})
    assert got["tokens"] == tokenizer.encode(PROMPT).ids and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == KV_BLOCKS * 16
    chat = post("/tokenize", {"messages": CHAT, "return_token_strs": True})
    assert chat["token_strs"] == [tokenizer.id_to_token(t) for t in chat["tokens"]]
    assert "<|im_start|>" in tokenizer.decode(chat["tokens"], skip_special_tokens=False)
    assert post("/detokenize", {"tokens": got["tokens"]})["prompt"] == PROMPT
    for path, body, param in (
        ("/detokenize", {"tokens": [10**30]}, "tokens"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/tokenize", {"prompt": "x", "messages": CHAT}, "prompt"),
        ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
    ):
        with pytest.raises(urllib.error.HTTPError) as info:
            post(path, body)
        assert info.value.code == 400
        assert json.loads(info.value.read())["error"]["param"] == param


def test_echo_with_logprobs_and_prompt_logprobs(
    client: openai.OpenAI, engine: Engine, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(PROMPT).ids
    engine.add_request("pl", ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))
    want = next(o.prompt_logprobs for o in engine.step() if o.request_id == "pl")
    while engine.has_unfinished():
        engine.step()
    assert want is not None and len(want) == len(ids) - 1
    got = client.completions.create(
        model="mell-tiny",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"prompt_logprobs": 2, "ignore_eos": True},
    )
    choice = got.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(ids) + 4
    assert lp.tokens[: len(ids)] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([e.logprob for e in want], abs=1e-4)
    assert lp.text_offset is not None and lp.text_offset[len(ids)] == len(PROMPT)
    assert choice.text.startswith(PROMPT)
    prompt_lp = choice.model_extra["prompt_logprobs"]  # type: ignore[index]
    assert prompt_lp[0] is None and len(prompt_lp) == len(ids)
    for token, entry, shown in zip(ids[1:], want, prompt_lp[1:], strict=True):
        assert shown[str(token)]["logprob"] == pytest.approx(entry.logprob, abs=1e-4)
        assert shown[str(token)]["rank"] == entry.rank
        assert set(map(int, shown)) == {token, *entry.top_token_ids}
    chat = client.chat.completions.create(
        model="mell-tiny", messages=CHAT, max_tokens=2, extra_body={"prompt_logprobs": 0}
    )
    assert chat.model_extra["prompt_logprobs"][0] is None  # type: ignore[index]
    assert chat.usage is not None
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens  # type: ignore[index]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    import json

    kwargs: dict[str, Any] = {
        "model": "mell-tiny",
        "messages": CHAT,
        "max_tokens": 120,
        "temperature": 1.0,
        "seed": 3,
        "n": 3,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        },
    }
    if stream:
        texts = ["", "", ""]
        reasons: list[str | None] = [None] * 3
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                reasons[c.index] = c.finish_reason or reasons[c.index]
    else:
        full = client.chat.completions.create(**kwargs)
        texts = [c.message.content or "" for c in full.choices]
        reasons = [c.finish_reason for c in full.choices]
    assert reasons == ["stop"] * 3, texts
    for text in texts:
        value = json.loads(text)
        assert set(value) == {"name", "age", "ok"}
        assert isinstance(value["name"], str) and len(value["name"]) <= 8
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 99
        assert isinstance(value["ok"], bool)


def test_guided_fields(client: openai.OpenAI) -> None:
    import json
    import re

    choice = _complete(
        client, max_tokens=10, extra_body={"guided_choice": ["yes", "no"], "ignore_eos": False}
    )
    assert choice in ("yes", "no")
    digits = _complete(
        client, max_tokens=10, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}", "ignore_eos": False}
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", digits)
    obj = client.chat.completions.create(
        model="mell-tiny",
        messages=CHAT,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    for extra, param in (
        ({"guided_regex": "["}, "guided_regex"),
        ({"guided_json": {"type": "objectx"}}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="mell-tiny", prompt="x", extra_body=extra)
        assert info.value.body["param"] == param  # type: ignore[index]


def test_n_choices_share_one_prefill_and_report_its_cached_tokens(
    client: openai.OpenAI, cluster: LocalCluster
) -> None:
    """The n choices of a prompt go to one worker, which prefills it once: only the first is
    queued for a prefill (looked up in the prefix cache), the others take its KV (the engine's
    test_shared_prefill counts the computed tokens); each choice samples as a request of its
    own seed would, and usage counts the prompt once with the cached tokens of its prefill."""
    long_chat = [{"role": "user", "content": "A long question about tiny models. " * 6}]
    kwargs: dict[str, Any] = {
        "model": "mell-tiny",
        "messages": long_chat,
        "max_tokens": 8,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    singles = [
        client.chat.completions.create(**kwargs, seed=20 + i).choices[0].message.content
        for i in range(3)
    ]
    queried = _settled_prefix_queries(cluster)  # (the singles' lookups reported)
    fresh = [{"role": "user", "content": "Another long question, never asked before. " * 6}]
    shared = client.chat.completions.create(**{**kwargs, "messages": fresh}, seed=1, n=3)
    assert shared.usage is not None
    wait_until(lambda: _prefix_queries(cluster) > queried, what="the worker's load report")
    assert _settled_prefix_queries(cluster) - queried == shared.usage.prompt_tokens
    first = client.chat.completions.create(**kwargs, seed=20, n=3)
    assert [c.message.content for c in first.choices] == singles
    single = client.chat.completions.create(**kwargs, seed=20)
    again = client.chat.completions.create(**kwargs, seed=20, n=3)
    assert again.usage is not None and single.usage is not None
    assert again.usage.prompt_tokens == single.usage.prompt_tokens
    cached = again.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached == single.usage.prompt_tokens_details.cached_tokens > 0  # type: ignore[union-attr]
    streamed = None
    for chunk in client.chat.completions.create(
        **kwargs, seed=20, n=3, stream=True, stream_options={"include_usage": True}
    ):
        streamed = chunk.usage or streamed
    assert streamed is not None
    assert streamed.prompt_tokens_details.cached_tokens == cached  # type: ignore[union-attr]


def _settled_prefix_queries(cluster: LocalCluster) -> float:
    """The counter once load reports stop changing it (two reads a second apart agree)."""
    value = _prefix_queries(cluster)
    while True:
        time.sleep(1.0)
        again = _prefix_queries(cluster)
        if again == value:
            return value
        value = again


def _prefix_queries(cluster: LocalCluster) -> float:
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return metric(text, "mell:prefix_cache_queries_total", model_name="mell-tiny")
