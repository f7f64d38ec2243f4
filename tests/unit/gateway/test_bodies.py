"""Request bodies: every client mistake is an InvalidRequest naming its parameter."""

from __future__ import annotations

import pytest

from mell.common.errors import InvalidRequest
from mell.common.slo import RequestSLO
from mell.gateway.api.bodies import (
    chat_logprobs,
    decode_chat,
    decode_completion,
    include_usage,
    stop_strings,
    to_sampling,
    to_slo,
)

MSG = '"messages":[{"role":"user","content":"hi"}]'


def test_chat_body_decodes_with_ignorable_fields() -> None:
    req = decode_chat(
        (
            "{" + MSG + ',"max_completion_tokens":5,"temperature":0,"stop":"x",'
            '"logprobs":true,"top_logprobs":2,"stream":true,'
            '"stream_options":{"include_usage":true},"user":"u","metadata":{"a":"b"},'
            '"store":false,"service_tier":"auto","parallel_tool_calls":true,'
            '"response_format":{"type":"text"},"tool_choice":"none"}'
        ).encode()
    )
    assert req.max_completion_tokens == 5
    assert stop_strings(req) == ["x"]
    assert chat_logprobs(req) == 2
    assert include_usage(req)
    sampling = to_sampling(req, 5, chat_logprobs(req))
    assert sampling.is_greedy and sampling.logprobs == 2


def test_content_parts_and_nulls() -> None:
    req = decode_chat(
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],'
        b'"temperature":null,"stop":null,"n":null}'
    )
    assert req.messages[0].content[0].text == "a"  # type: ignore[index,union-attr]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        (b"[]", None),
        (b'{"model":"m"}', "messages"),
        (b"{" + MSG.encode() + b',"max_tokens":"ten"}', "max_tokens"),
        (b"{" + MSG.encode() + b',"n":0}', "n"),
        (b"{" + MSG.encode() + b',"n":17}', "n"),
        (b"{" + MSG.encode() + b',"unknown_field":1}', "unknown_field"),
        (b"{" + MSG.encode() + b',"best_of":2}', "best_of"),
        (b"{" + MSG.encode() + b',"structural_tag":{"type":"x"}}', "structural_tag"),
        (b"{" + MSG.encode() + b',"tools":[{"type":"function"}]}', "tools"),
        (b"{" + MSG.encode() + b',"use_beam_search":true}', "use_beam_search"),
        (
            b"{" + MSG.encode() + b',"stream_options":{"bogus":1},"stream":true}',
            "stream_options.bogus",
        ),
        (b"{" + MSG.encode() + b',"top_k":18446744073709551616}', "top_k"),
        (b"{" + MSG.encode() + b',"stop_token_ids":[1,99999999999999999999999]}', "stop_token_ids"),
        (b"{" + MSG.encode() + b',"max_completion_tokens":0}', "max_completion_tokens"),
        (b"{" + MSG.encode() + b',"chat_template_kwargs":{"messages":[]}}', "chat_template_kwargs"),
        (
            b"{" + MSG.encode() + b',"chat_template_kwargs":{"add_generation_prompt":false}}',
            "chat_template_kwargs",
        ),
        (
            b"{" + MSG.encode() + b',"chat_template_kwargs":{"bos_token":"x"}}',
            "chat_template_kwargs",
        ),
        (
            b"{" + MSG.encode() + b',"chat_template_kwargs":{"eos_token":"x"}}',
            "chat_template_kwargs",
        ),
        (b"{" + MSG.encode() + b',"stream_options":{"include_usage":true}}', "stream_options"),
        (b"{" + MSG.encode() + b',"top_logprobs":3}', "top_logprobs"),
        (b"{" + MSG.encode() + b',"max_tokens":0}', "max_tokens"),
        (b'{"messages":[]}', "messages"),
        (b'{"messages":[{"content":"x"}]}', "messages"),
    ],
)
def test_bad_chat_bodies(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_chat(body)
    assert info.value.param == param
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"seed": 2**70}, "seed"),
        ({"top_k": 2**40}, "top_k"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 9}, "min_tokens"),
        ({"logit_bias": '{"5": 101}'}, "logit_bias"),
        ({"logit_bias": '{"x": 1}'}, "logit_bias"),
        ({"logit_bias": '{"99999999999": 1}'}, "logit_bias"),
    ],
)
def test_out_of_range_sampling(fields: dict[str, float], param: str) -> None:
    body = '{"prompt":"x",' + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    try:
        req = decode_completion(body.encode())
    except InvalidRequest as err:  # seed beyond int64 fails at decode already
        assert err.param == param
        return
    with pytest.raises(InvalidRequest) as info:
        to_sampling(req, 4, None)
    assert info.value.param == param


def test_completion_prompt_forms() -> None:
    assert decode_completion(b'{"prompt":[1,2,3]}').prompt == [1, 2, 3]
    assert decode_completion(b'{"prompt":"abc","logprobs":2}').logprobs == 2


def test_sampling_fields_and_generation_config_defaults() -> None:
    req = decode_completion(
        b'{"prompt":"x","presence_penalty":0.5,"frequency_penalty":-0.5,"logit_bias":{"7":-100},'
        b'"min_tokens":2,"top_p":0.9}'
    )
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}
    s = to_sampling(req, 4, None, defaults)
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (0.5, -0.5, {7: -100.0})
    assert (s.min_tokens, s.temperature, s.top_p, s.top_k) == (2, 0.6, 0.9, 20)
    assert s.repetition_penalty == 1.1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ('"response_format":{"type":"xml"}', "response_format"),
        ('"response_format":{"type":"json_schema","json_schema":{"schema":3}}', "response_format"),
        ('"guided_json":{"type":"objectx"}', "guided_json"),
        ('"guided_regex":"["', "guided_regex"),
        ('"guided_choice":[]', "guided_choice"),
        ('"guided_grammar":"start: ("', "guided_grammar"),
        ('"guided_regex":"a","guided_json":{}', "guided_regex"),
    ],
)
def test_bad_structured_output(fields: str, param: str) -> None:
    req = decode_completion(('{"prompt":"x",' + fields + "}").encode())
    with pytest.raises(InvalidRequest) as info:
        to_sampling(req, 4, None)
    assert info.value.param == param


def test_structured_output_grammars() -> None:
    def grammar(fields: str) -> str | None:
        req = decode_completion(('{"prompt":"x",' + fields + "}").encode())
        return to_sampling(req, 4, None).grammar

    assert grammar('"response_format":{"type":"text"}') is None
    assert "json_schema" in (grammar('"response_format":{"type":"json_object"}') or "")
    assert '"yes"' in (grammar('"guided_choice":["yes","no"]') or "")


def test_slo_extension_is_carried_and_bounded() -> None:
    req = decode_chat(("{" + MSG + ',"ttft_slo_s":0.5,"tpot_slo_s":0.02}').encode())
    assert to_slo(req) == RequestSLO(ttft_s=0.5, tpot_s=0.02)
    req = decode_completion(b'{"prompt":"x","tpot_slo_s":0.1}')
    assert to_slo(req) == RequestSLO(ttft_s=0.0, tpot_s=0.1)  # 0: the worker's default
    assert to_slo(decode_completion(b'{"prompt":"x"}')) is None
    for field, value in (
        ("ttft_slo_s", "-1"),
        ("tpot_slo_s", "1e9"),
        ("ttft_slo_s", "3600.5"),
        ("tpot_slo_s", '"fast"'),
    ):
        with pytest.raises(InvalidRequest) as err:
            decode_chat(("{" + MSG + f',"{field}":{value}}}').encode())
        assert err.value.param == field, (field, value)
