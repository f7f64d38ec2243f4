"""Chunks and bodies are byte for byte what vLLM/OpenAI send."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from mell.common.sampling import TokenLogprobs
from mell.gateway.api.chunks import DONE, ChatFormat, CompletionFormat


def test_chat_stream_chunks_exact(tokenizer: Tokenizer) -> None:
    fmt = ChatFormat("chatcmpl-1", "mell-tiny", 1700000000, tokenizer)
    head = (
        'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        '"model":"mell-tiny",'
    )
    assert fmt.role_chunk().decode() == (
        head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"logprobs":null,"finish_reason":null}]}\n\n'
    )
    assert fmt.delta_chunk('He said "hi"\n', b"null", None).decode() == (
        head + '"choices":[{"index":0,"delta":{"content":"He said \\"hi\\"\\n"},'
        '"logprobs":null,"finish_reason":null}]}\n\n'
    )
    assert fmt.delta_chunk("!", b"null", "stop").decode() == (
        head + '"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,'
        '"finish_reason":"stop","stop_reason":null}]}\n\n'
    )
    assert fmt.usage_chunk(5, 3, 2).decode() == (
        head + '"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,'
        '"total_tokens":8,"prompt_tokens_details":{"cached_tokens":2}}}\n\n'
    )
    assert DONE == b"data: [DONE]\n\n"


def test_completion_stream_chunk_exact(tokenizer: Tokenizer) -> None:
    fmt = CompletionFormat("cmpl-1", "m", 1, tokenizer)
    assert fmt.role_chunk() is None
    assert fmt.delta_chunk("ab", b"null", "length").decode() == (
        'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
        '"choices":[{"index":0,"text":"ab","logprobs":null,"finish_reason":"length",'
        '"stop_reason":null}]}\n\n'
    )


def test_chunks_are_valid_json_with_unicode(tokenizer: Tokenizer) -> None:
    fmt = ChatFormat("chatcmpl-\u00e9", 'm"x', 1, tokenizer)
    chunk = fmt.delta_chunk("日本 🎉 \u2028", b"null", None)
    body = json.loads(chunk.removeprefix(b"data: ").removesuffix(b"\n\n"))
    assert body["choices"][0]["delta"]["content"] == "日本 🎉 \u2028"
    assert body["model"] == 'm"x'


def test_full_responses(tokenizer: Tokenizer) -> None:
    chat = json.loads(
        ChatFormat("chatcmpl-2", "m", 3, tokenizer).response("hi", None, "stop", 4, 1, 2)
    )
    assert chat == {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 3,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 4,
            "completion_tokens": 1,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }
    comp = json.loads(
        CompletionFormat("cmpl-2", "m", 3, tokenizer).response("hi", None, "length", 4, 1)
    )
    assert comp["object"] == "text_completion"
    assert comp["choices"][0]["text"] == "hi"


def test_logprobs_objects(tokenizer: Tokenizer) -> None:
    a = tokenizer.token_to_id("a") or 70
    entry = TokenLogprobs(-0.25, [a], [-0.25])
    chat = ChatFormat("c", "m", 1, tokenizer).logprobs([a], [entry])
    token = tokenizer.decode([a])
    assert chat == {
        "content": [
            {
                "token": token,
                "logprob": -0.25,
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": token, "logprob": -0.25, "bytes": list(token.encode())}],
            }
        ]
    }
    comp = CompletionFormat("c", "m", 1, tokenizer).logprobs([a], [entry])
    assert comp == {
        "text_offset": [0],
        "token_logprobs": [-0.25],
        "tokens": [token],
        "top_logprobs": [{token: -0.25}],
    }
