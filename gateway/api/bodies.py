"""The OpenAI request bodies the gateway accepts, decoded and validated with msgspec.

Unknown fields are ignored (as vLLM does); wrong types, bad values and unsupported options are
`InvalidRequest` (HTTP 400) naming the parameter. `to_sampling` maps a body to SamplingParams.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mell.common.errors import InvalidRequest
from mell.common.sampling import MAX_TOP_LOGPROBS, SamplingParams


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)


def decode_chat(body: bytes) -> ChatCompletionRequest:
    req = _decode(_chat_decoder, body)
    _check_common(req)
    if not req.messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    return req


def decode_completion(body: bytes) -> CompletionRequest:
    req = _decode(_completion_decoder, body)
    _check_common(req)
    if req.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    if req.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    return req


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """Top-N alternatives wanted per token, None when logprobs are off."""
    return (req.top_logprobs or 0) if req.logprobs else None


def include_usage(req: _Common) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def stop_strings(req: _Common) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return [s for s in stops if s]


def to_sampling(req: _Common, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams of a decoded body; InvalidRequest for out-of-range values."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    ).validate()


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as err:
        message = str(err)
        raise InvalidRequest(f"invalid request body: {message}", param=_param(message)) from None
    except msgspec.DecodeError as err:
        raise InvalidRequest(f"request body is not valid JSON: {err}") from None


def _param(message: str) -> str | None:
    # "Expected `int`, got `str` - at `$.max_tokens`" -> "max_tokens"
    if " - at `$." in message:
        return message.rsplit(" - at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0]
    if "missing required field `" in message:
        return message.split("`")[1]
    return None


def _check_common(req: _Common) -> None:
    if req.n is not None and req.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    stops = stop_strings(req)
    if len(stops) > 16:
        raise InvalidRequest("at most 16 stop strings", param="stop")


def check_top_logprobs(n: int | None, param: str) -> None:
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"{param} must be in [0, {MAX_TOP_LOGPROBS}]", param=param)
