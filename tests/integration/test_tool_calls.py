"""Tool calls through the official openai client on a real `mellctl up` cluster whose model has a
Qwen2.5-style chat template (tools in the system prompt, `<tool_call>` blocks, `<tool_response>`
turns). The random-weight model calls no tool on its own: calls are forced by the grammar
(tool_choice required or named), or, for `auto`, its output is forced into the template's
`<tool_call>` format by a regex so that the model-format parser reads what the worker wrote."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from mell_cluster import LocalCluster, start_cluster

from mell.common.tiny_model import ensure_tiny_model

pytestmark = pytest.mark.slow
# Modelled on Qwen2.5-Instruct's template (the parts that carry tools and calls).
TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\nReturn calls as <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>' }}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- tool_call.arguments | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}
{{- '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("tools")
    model = Path(shutil.copytree(ensure_tiny_model(root / "mell-tiny"), root / "qwenish"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    c = start_cluster(root / "data", "--model", str(model), "--workers", "1", "--device", "cpu")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)


def _create(client: openai.OpenAI, **kw: Any) -> Any:
    fields = {"model": "qwenish", "messages": ASK, "tools": TOOLS, "max_tokens": 80, **kw}
    return client.chat.completions.create(**fields)


def _valid_weather(arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Tokyo", "Lima")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7
    return args


def _streamed(client: openai.OpenAI, **kw: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, calls, finish reason) of a stream, checking OpenAI's delta.tool_calls shape:
    a call's first delta has its index, id, type and name; later ones argument fragments."""
    content, calls, finish = "", {}, None
    fragments = 0
    for chunk in _create(client, **kw, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                    fragments += 1
                calls[d.index]["arguments"] += d.function.arguments or ""
    if calls:
        assert fragments >= 2  # the arguments arrive in pieces, as they are generated
    return content, [calls[i] for i in sorted(calls)], finish


def test_named_tool_call_round_trip(client: openai.OpenAI, cluster: LocalCluster) -> None:
    full = _create(client, tool_choice=NAMED, temperature=1.0, seed=5)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = _valid_weather(call.function.arguments)
    assert not choice.message.content
    content, calls, finish = _streamed(client, tool_choice=NAMED, temperature=1.0, seed=5)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", call.function.arguments)
    ]
    # the call and its result go back; the template renders both into the next prompt
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = _create(client, messages=history, tool_choice="none", max_tokens=8)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    prompt = _tokenized_text(cluster, history)
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(args) + "}\n</tool_call>"
    ) in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(_tokenized(cluster, history))


def test_required_calls_streamed_and_not(client: openai.OpenAI) -> None:
    kw = {"tool_choice": "required", "temperature": 1.0, "seed": 11, "max_tokens": 120}
    full = _create(client, **kw)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    names = [c.function.name for c in choice.message.tool_calls]
    assert set(names) <= {"get_weather", "get_time"}
    for c in choice.message.tool_calls:
        args = json.loads(c.function.arguments)
        if c.function.name == "get_weather":
            _valid_weather(c.function.arguments)
        else:
            assert args["zone"] in ("UTC", "CET")
    _, calls, finish = _streamed(client, **kw)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert len({c["id"] for c in calls}) == len(calls)
    one = _create(client, **kw, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


AS_QWEN = (
    '<tool_call>\\n\\{"name": "get_time", "arguments": \\{"zone": "(UTC|CET)"\\}\\}\\n</tool_call>'
)


def test_auto_reads_the_models_own_format(client: openai.OpenAI) -> None:
    kw = {"tool_choice": "auto", "temperature": 0, "extra_body": {"guided_regex": AS_QWEN}}
    full = _create(client, **kw)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    content, calls, finish = _streamed(client, **kw)
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", call.function.arguments)]
    plain = _create(client, tool_choice="auto", temperature=0, max_tokens=6)
    assert plain.choices[0].message.tool_calls is None  # free text: no call, all content


def test_bad_tool_requests_are_400(client: openai.OpenAI) -> None:
    for kw, param in (
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            _create(client, **kw)
        assert info.value.body["param"] == param  # type: ignore[index]


def _post(cluster: LocalCluster, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        cluster.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _tokenized(cluster: LocalCluster, messages: list[dict[str, Any]]) -> list[int]:
    return _post(cluster, "/tokenize", {"messages": messages, "tools": TOOLS})["tokens"]  # type: ignore[no-any-return]


def _tokenized_text(cluster: LocalCluster, messages: list[dict[str, Any]]) -> str:
    ids = _tokenized(cluster, messages)
    return _post(cluster, "/detokenize", {"tokens": ids})["prompt"]  # type: ignore[no-any-return]
