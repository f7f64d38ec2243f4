"""Tool call parsers on text: each model format, whole and streamed a character at a time
(both give the same calls), content kept apart, limits, and the format read from templates."""

from __future__ import annotations

import json

import pytest

from mell.common.errors import InvalidRequest
from mell.gateway.api.chat_template import ChatTemplate
from mell.gateway.api.chunks import join_calls
from mell.gateway.api.tools.forced import NamedParser, RequiredParser
from mell.gateway.api.tools.hermes import HermesParser
from mell.gateway.api.tools.llama3 import Llama3JsonParser
from mell.gateway.api.tools.mistral import MistralParser
from mell.gateway.api.tools.parser import ToolCallDelta, ToolParser
from mell.gateway.api.tools.request import plan_tools, tool_format


def _run(parser: ToolParser, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for piece in pieces:
        text, calls = parser.feed(piece)
        content.append(text)
        deltas.extend(calls)
    text, calls = parser.flush()
    return "".join(content) + text, deltas + calls


def _parse(make: type[ToolParser] | object, output: str, **kw: object) -> list[tuple[str, object]]:
    """(content, calls) of `output` fed whole and fed a character at a time: they must agree."""
    results = []
    for pieces in ([output], list(output)):
        parser = make(**kw)  # type: ignore[operator]
        content, deltas = _run(parser, pieces)
        calls = join_calls(deltas)
        for delta in deltas:  # a call's first delta names it, before any arguments
            if delta.id is not None:
                assert delta.name and delta.arguments == ""
        results.append(
            (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
        )
        assert parser.called == bool(calls)
    assert results[0] == results[1]
    return results[0]  # type: ignore[return-value]


def test_hermes_content_then_calls() -> None:
    out = (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris \\"}{\\" x", "days": [1, {"a": 2}]}}'
        '\n</tool_call>\n<tool_call>\n{"arguments": {}, "name": "time"}\n</tool_call>'
    )
    content, calls = _parse(HermesParser, out)
    assert content == "Let me look.\n"
    assert calls == [
        ("get_weather", '{"city": "Paris \\"}{\\" x", "days": [1, {"a": 2}]}'),
        ("time", "{}"),
    ]
    assert json.loads(calls[0][1])["city"] == 'Paris "}{" x'


def test_hermes_plain_text_and_a_partial_marker_held_back() -> None:
    assert _parse(HermesParser, "no tools <tool here") == ("no tools <tool here", [])
    parser = HermesParser()
    assert parser.feed("a <tool_") == ("a ", [])
    assert parser.flush() == ("<tool_", [])


def test_one_call_when_parallel_calls_are_off() -> None:
    out = (
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    assert _parse(HermesParser, out, max_calls=1)[1] == [("a", '{"x": 1}')]
    assert len(_parse(HermesParser, out)[1]) == 2


def test_llama3_json_calls() -> None:
    out = (
        '<|python_tag|>{"name": "search", "parameters": {"q": "a; b"}}; '
        '{"name": "f", "parameters": {}}'
    )
    assert _parse(Llama3JsonParser, out) == ("", [("search", '{"q": "a; b"}'), ("f", "{}")])
    assert _parse(Llama3JsonParser, ' {"name": "f"}') == ("", [("f", "{}")])
    assert _parse(Llama3JsonParser, "Hello {there}") == ("Hello {there}", [])
    # an output that looks like a call and is not one comes back as content
    assert _parse(Llama3JsonParser, '{"answer": 42}') == ('{"answer": 42}', [])


def test_mistral_calls_and_ids() -> None:
    out = (
        'Sure.[TOOL_CALLS][{"name": "f", "arguments": {"s": "[x]"}}, '
        '{"name": "g", "arguments": {"n": -1.5e3}}]</s>'
    )
    assert _parse(MistralParser, out) == ("Sure.", [("f", '{"s": "[x]"}'), ("g", '{"n": -1.5e3}')])
    _, deltas = _run(MistralParser(), [out])
    ids = [d.id for d in deltas if d.id is not None]
    assert len(ids) == 2 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert not MistralParser.skip_special_tokens
    spaced = '[TOOL_CALLS] [{"name": "f", "arguments": {}}]'  # tokenizer v3 writes a space
    assert _parse(MistralParser, spaced) == ("", [("f", "{}")])


def test_mistral_v11_calls_one_marker_each() -> None:
    out = (
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris [TOOL_CALLS] }{", "days": [1]}'
        '[TOOL_CALLS] time [ARGS] {}[TOOL_CALLS]search[ARGS]{"q": "a"}</s>'
    )
    assert _parse(MistralParser, out) == (
        "Checking.",
        [
            ("get_weather", '{"city": "Paris [TOOL_CALLS] }{", "days": [1]}'),
            ("time", "{}"),
            ("search", '{"q": "a"}'),
        ],
    )
    assert _parse(MistralParser, out, max_calls=1)[1] == [
        ("get_weather", '{"city": "Paris [TOOL_CALLS] }{", "days": [1]}')
    ]
    # a decoder that drops [ARGS] leaves name{...}; a JSON string that encodes an object
    assert _parse(MistralParser, '[TOOL_CALLS]f{"a": 1}[TOOL_CALLS]g[ARGS]"{\\"b\\": 2}"') == (
        "",
        [("f", '{"a": 1}'), ("g", '{"b": 2}')],
    )


def test_mistral_v11_call_ids() -> None:
    out = '[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{"x": 1}[TOOL_CALLS]g[CALL_ID]not-an-id[ARGS]{}'
    assert _parse(MistralParser, out) == ("", [("f", '{"x": 1}'), ("g", "{}")])
    for pieces in ([out], list(out)):
        _, deltas = _run(MistralParser(), pieces)
        ids = [d.id for d in deltas if d.id is not None]
        assert ids[0] == "a1B2c3D4e" and len(ids[1]) == 9 and ids[1].isalnum()


def test_mistral_v11_streams_the_name_then_argument_fragments() -> None:
    parser = MistralParser()
    assert parser.feed("Hi [TOOL_") == ("Hi ", [])
    assert parser.feed("CALLS]get_wea") == ("", [])
    assert parser.feed("ther[AR") == ("", [])
    content, deltas = parser.feed('GS]{"city": "Pa')
    assert content == "" and [(d.index, d.name, d.arguments) for d in deltas] == [
        (0, "get_weather", ""),
        (0, None, '{"city": "Pa'),
    ]
    assert parser.feed('ris"}') == ("", [ToolCallDelta(0, 'ris"}')])
    assert parser.flush() == ("", [])


def test_mistral_v11_heads_without_a_call() -> None:
    # a head without arguments is dropped; a region that never becomes a call is content
    out = '[TOOL_CALLS]oops[TOOL_CALLS]f[ARGS]{"a": 1}'
    assert _parse(MistralParser, out) == ("", [("f", '{"a": 1}')])
    assert _parse(MistralParser, "[TOOL_CALLS]just text") == ("[TOOL_CALLS]just text", [])
    # cut by the length: what the call has
    content, deltas = _run(MistralParser(), ['[TOOL_CALLS]f[ARGS]{"a": "xy'])
    assert content == "" and join_calls(deltas)[0]["function"]["arguments"] == '{"a": "xy'


def test_forced_required_and_named() -> None:
    out = '[{"name": "f", "parameters": {"a": [1, 2]}}, {"name": "g", "parameters": {}}]'
    assert _parse(RequiredParser, out) == ("", [("f", '{"a": [1, 2]}'), ("g", "{}")])
    assert _parse(NamedParser, ' {"city": "Oslo"}', name="w") == ("", [("w", '{"city": "Oslo"}')])


def test_a_call_cut_by_the_length_keeps_what_it_has() -> None:
    content, deltas = _run(HermesParser(), ['<tool_call>{"name": "f", "arguments": {"a": "xy'])
    assert content == "" and join_calls(deltas)[0]["function"]["arguments"] == '{"a": "xy'


def test_arguments_written_as_a_json_string_become_the_object_text() -> None:
    """A JSON string that encodes an object is decoded (streamed and not); any other string
    value stays as written."""
    out = (
        '<tool_call>{"name": "w", "arguments": "{\\"city\\": \\"Paris\\"}" }</tool_call>'
        '<tool_call>{"arguments": " {\\"a\\": [1]} ", "name": "x"}</tool_call>'
        '<tool_call>{"name": "y", "arguments": "not json"}</tool_call>'
        '<tool_call>{"name": "z", "arguments": "[1, 2]"}</tool_call>'
    )
    assert _parse(HermesParser, out)[1] == [
        ("w", '{"city": "Paris"}'),
        ("x", '{"a": [1]}'),
        ("y", '"not json"'),
        ("z", '"[1, 2]"'),
    ]
    llama = '{"name": "f", "parameters": "{\\"q\\": \\"a; b\\"}"}; {"name": "g"}'
    assert _parse(Llama3JsonParser, llama) == ("", [("f", '{"q": "a; b"}'), ("g", "{}")])
    mistral = '[TOOL_CALLS][{"name": "f", "arguments": "{\\"s\\": \\"[x]\\"}"}]'
    assert _parse(MistralParser, mistral) == ("", [("f", '{"s": "[x]"}')])


def test_a_string_argument_cut_by_the_length_is_kept_as_written() -> None:
    cut = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1'
    assert _parse(HermesParser, cut)[1] == [("f", '"{\\"a\\": 1')]


QWEN = "{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>{{ messages }}"
LLAMA = "{{- '<|python_tag|>' }}{{ messages }}"
MISTRAL = "[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]{{ messages }}"


def test_format_from_the_chat_template() -> None:
    assert tool_format(ChatTemplate(QWEN)) == "hermes"
    assert tool_format(ChatTemplate(LLAMA)) == "llama3_json"
    assert tool_format(ChatTemplate(MISTRAL)) == "mistral"
    assert tool_format(ChatTemplate("{{ messages }}")) is None
    assert tool_format(None) is None


F = [
    {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"c": {"type": "string"}}},
    }
]


def test_plans() -> None:
    assert plan_tools([], None, None, None, "m").mode == "none"
    assert plan_tools(F, None, None, "hermes", "m").mode == "auto"
    assert plan_tools(F, "none", None, None, "m").parser() is None
    required = plan_tools(F, "required", False, None, "m")
    assert required.mode == "required" and required.grammar and required.max_calls == 1
    named = plan_tools(
        F, {"type": "function", "function": {"name": "get_weather"}}, None, None, "m"
    )
    assert named.mode == "named" and named.grammar and isinstance(named.parser(), NamedParser)
    for choice, fmt in (
        ("auto", None),  # the model's format is unknown
        ("required", None),
        ({"type": "function", "function": {"name": "nope"}}, None),
        ({"type": "function"}, None),
        ("sometimes", "hermes"),
    ):
        functions = F if choice != "required" else []
        with pytest.raises(InvalidRequest) as info:
            plan_tools(functions, choice, None, fmt, "m")  # type: ignore[arg-type]
        assert info.value.param == "tool_choice"
    bad = [{"name": "f", "parameters": {"type": "objectx"}}]
    with pytest.raises(InvalidRequest) as info:
        plan_tools(bad, "required", None, None, "m")
    assert info.value.param == "tools"
