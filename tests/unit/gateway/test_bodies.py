"""Request bodies: every client mistake is an InvalidRequest naming its parameter."""

from __future__ import annotations

import pytest

from mell.common.errors import InvalidRequest
from mell.gateway.api.bodies import (
    chat_logprobs,
    decode_chat,
    decode_completion,
    include_usage,
    stop_strings,
    to_sampling,
)

MSG = '"messages":[{"role":"user","content":"hi"}]'


def test_chat_body_decodes_with_extras_ignored() -> None:
    req = decode_chat(
        (
            "{" + MSG + ',"max_completion_tokens":5,"temperature":0,"stop":"x",'
            '"logprobs":true,"top_logprobs":2,"stream":true,'
            '"stream_options":{"include_usage":true},"unknown_field":1}'
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
        (b"{" + MSG.encode() + b',"n":2}', "n"),
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
    with pytest.raises(InvalidRequest):
        decode_completion(b'{"prompt":"abc","echo":true}')
