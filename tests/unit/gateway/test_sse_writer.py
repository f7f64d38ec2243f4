"""The SSE fast path: chunks written straight to the socket, framed; a slow client falls back
to its handler; the last output brings usage and [DONE] and wakes the handler."""

from __future__ import annotations

from tokenizers import Tokenizer

from mell.common.messages import TokenOutput
from mell.gateway.api.chunks import DONE, CompletionFormat
from mell.gateway.api.generation import HIGH_WATER, SseWriter, TextOutput
from mell.gateway.cluster.stream import RequestStream


class FakeTransport:
    def __init__(self) -> None:
        self.data = b""
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


def _setup(tokenizer: Tokenizer) -> tuple[RequestStream, SseWriter, FakeTransport]:
    fmt = CompletionFormat("cmpl-x", "m", 1, tokenizer)
    writer = SseWriter(fmt, TextOutput(fmt, [], False), include_usage=True, num_prompt_tokens=3)
    stream = RequestStream("cmpl-x", "m", "w0", 3, 2, 0.0)
    transport = FakeTransport()
    stream.sink = writer.sink(transport, stream)
    return stream, writer, transport


def test_outputs_go_straight_to_the_socket(tokenizer: Tokenizer) -> None:
    stream, writer, transport = _setup(tokenizer)
    ids = tokenizer.encode("hi there", add_special_tokens=False).ids
    assert stream.push(TokenOutput("cmpl-x", 0, ids[:1], None, None, 3, num_cached_tokens=1))
    size, _, rest = transport.data.partition(b"\r\n")
    assert int(size, 16) == len(rest) - 2 and rest.endswith(b"\r\n")  # one HTTP chunk
    assert rest.startswith(b'data: {"id":"cmpl-x"')
    stream.push(TokenOutput("cmpl-x", 1, ids[1:2], None, "length", 3))
    assert writer.finished and stream.sink is None
    assert transport.data.endswith(DONE + b"\r\n")
    assert (
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,'
        b'"prompt_tokens_details":{"cached_tokens":1}}' in transport.data
    )


async def test_slow_or_closed_client_falls_back_to_the_handler(tokenizer: Tokenizer) -> None:
    stream, _, transport = _setup(tokenizer)
    transport.buffered = HIGH_WATER + 1
    stream.push(TokenOutput("cmpl-x", 0, [70], None, None, 3))
    assert transport.data == b""
    assert [o.token_ids for o in await stream.next(1.0)] == [[70]]
    transport.buffered, transport.closing = 0, True
    stream.push(TokenOutput("cmpl-x", 1, [71], None, None, 3))
    assert transport.data == b"" and len(await stream.next(1.0)) == 1
