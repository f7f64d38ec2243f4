"""Response bodies and SSE chunks, byte for byte as vLLM/OpenAI emit them.

The invariant part of every chunk of a request (id, object, created, model) is encoded once;
a content chunk is then a concatenation of that prefix, the JSON-escaped text and a fixed suffix,
so the per-token cost is one string escape.

Chat stream: role chunk, content chunks, the last one carrying `finish_reason` (and vLLM's
`stop_reason`), an optional usage chunk with `"choices": []`, then `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from tokenizers import Tokenizer

from mell.common.sampling import TokenLogprobs
from mell.gateway.api.tools.parser import ToolCallDelta

_json = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the worker's prefix cache held."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class _Format:
    object_chunk: bytes
    object_full: str

    def __init__(
        self, request_id: str, model: str, created: int, tokenizer: Tokenizer, index: int = 0
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.model = model
        self.created = created
        self.tokenizer = tokenizer
        head = (
            b'{"id":'
            + _json(request_id)
            + b',"object":"'
            + self.object_chunk
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + _json(model)
        )
        self._head = b"data: " + head
        self._choice = self._head + b',"choices":[{"index":%d,' % index

    def usage_chunk(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> bytes:
        return (
            self._head
            + b',"choices":[],"usage":'
            + _json(usage(prompt_tokens, completion_tokens, cached_tokens))
            + b"}\n\n"
        )

    def choice(
        self,
        text: str,
        logprobs: Any,
        finish_reason: str,
        reasoning: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def response(
        self,
        text: str,
        logprobs: Any,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> bytes:
        """The whole non-streamed body of a one-choice request."""
        return self.full(
            [self.choice(text, logprobs, finish_reason)],
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        )

    def full(
        self,
        choices: list[dict[str, Any]],
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> bytes:
        """The whole non-streamed body with these choices (n > 1: one per choice)."""
        return _json(
            {
                "id": self.request_id,
                "object": self.object_full,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
            }
        )

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def prompt_logprobs(self, prompt_ids: list[int], entries: list[TokenLogprobs]) -> Any:
        """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a map
        token id -> {logprob, rank, decoded_token} of the token itself and the top-N."""
        out: list[Any] = [None]
        for token_id, entry in zip(prompt_ids[1:], entries, strict=False):
            ranked = {token_id: (entry.logprob, entry.rank)}
            for rank, (t, lp) in enumerate(
                zip(entry.top_token_ids, entry.top_logprobs, strict=False)
            ):
                ranked.setdefault(t, (lp, rank + 1))
            out.append(
                {
                    str(t): {
                        "logprob": max(lp, -9999.0),
                        "rank": rank,
                        "decoded_token": self._token(t),
                    }
                    for t, (lp, rank) in ranked.items()
                }
            )
        return out


class ChatFormat(_Format):
    object_chunk = b"chat.completion.chunk"
    object_full = "chat.completion"

    def role_chunk(self) -> bytes:
        return (
            self._choice + b'"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def delta_chunk(
        self,
        text: str,
        logprobs: bytes,
        finish_reason: str | None,
        reasoning: str = "",
        calls: list[ToolCallDelta] | None = None,
    ) -> bytes:
        """A content delta; with `reasoning` or tool `calls`, a `reasoning_content` or
        `tool_calls` delta (and the content only if there is some), as vLLM sends them."""
        tail = (
            b'"finish_reason":null}]}\n\n'
            if finish_reason is None
            else b'"finish_reason":"' + finish_reason.encode() + b'","stop_reason":null}]}\n\n'
        )
        fields = []
        if reasoning:
            fields.append(b'"reasoning_content":' + _json(reasoning))
        if text or not (reasoning or calls):
            fields.append(b'"content":' + _json(text))
        if calls:
            fields.append(b'"tool_calls":' + _json([_call_delta(c) for c in calls]))
        delta = b'"delta":{' + b",".join(fields)
        return self._choice + delta + b'},"logprobs":' + logprobs + b"," + tail

    def logprobs(self, token_ids: list[int], entries: list[TokenLogprobs]) -> Any:
        """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        content = []
        for token_id, entry in zip(token_ids, entries, strict=False):
            top = [
                self._entry(t, lp)
                for t, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=False)
            ]
            content.append({**self._entry(token_id, entry.logprob), "top_logprobs": top})
        return {"content": content}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self._token(token_id)
        return {
            "token": token,
            "logprob": max(logprob, -9999.0),
            "bytes": list(token.encode("utf-8")),
        }

    def choice(
        self,
        text: str,
        logprobs: Any,
        finish_reason: str,
        reasoning: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = tool_calls
            message["content"] = text or None
        return {
            "index": self.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }

    def full(
        self,
        choices: list[dict[str, Any]],
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> bytes:
        """Chat puts `prompt_logprobs` beside the choices (vLLM), not in them."""
        prompt_logprobs = [c.pop("prompt_logprobs", None) for c in choices]
        whole = super().full(choices, prompt_tokens, completion_tokens, cached_tokens)
        if prompt_logprobs[0] is None:
            return whole
        body = msgspec.json.decode(whole)
        body["prompt_logprobs"] = prompt_logprobs[0]
        return _json(body)


class CompletionFormat(_Format):
    object_chunk = b"text_completion"
    object_full = "text_completion"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._text_offset = 0

    def role_chunk(self) -> bytes | None:
        return None

    def delta_chunk(
        self,
        text: str,
        logprobs: bytes,
        finish_reason: str | None,
        reasoning: str = "",
        calls: list[ToolCallDelta] | None = None,
    ) -> bytes:
        reason = b"null" if finish_reason is None else b'"' + finish_reason.encode() + b'"'
        return (
            self._choice
            + b'"text":'
            + _json(text)
            + b',"logprobs":'
            + logprobs
            + b',"finish_reason":'
            + reason
            + b',"stop_reason":null}]}\n\n'
        )

    def logprobs(
        self, token_ids: list[int], entries: list[TokenLogprobs | None], top_n: int | None = None
    ) -> Any:
        """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs,
        text_offset); an entry None (the first echoed prompt token) has null logprobs; `top_n`
        cuts the alternatives (echoed prompt tokens carry prompt_logprobs' top-N)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token_id, entry in zip(token_ids, entries, strict=False):
            token = self._token(token_id)
            tokens.append(token)
            offsets.append(self._text_offset)
            self._text_offset += len(token)
            if entry is None:
                token_logprobs.append(None)
                tops.append(None)
                continue
            token_logprobs.append(max(entry.logprob, -9999.0))
            alternatives = list(zip(entry.top_token_ids, entry.top_logprobs, strict=False))
            top = {self._token(t): max(lp, -9999.0) for t, lp in alternatives[:top_n]}
            tops.append(top or {token: max(entry.logprob, -9999.0)})
        return {
            "text_offset": offsets,
            "token_logprobs": token_logprobs,
            "tokens": tokens,
            "top_logprobs": tops,
        }

    def choice(
        self,
        text: str,
        logprobs: Any,
        finish_reason: str,
        reasoning: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }


def _call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """One entry of `delta.tool_calls`: the first of a call has its id, type and name."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.index, "id": delta.id, "type": "function", "function": function}


def join_calls(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """The `message.tool_calls` of a whole response: its streamed deltas joined per call."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta.id is not None:
            function = {"name": delta.name, "arguments": ""}
            calls[delta.index] = {"id": delta.id, "type": "function", "function": function}
        calls[delta.index]["function"]["arguments"] += delta.arguments
    return [calls[i] for i in sorted(calls)]


def merge_logprobs(parts: list[Any]) -> Any:
    """Join the per-chunk logprobs objects of a whole response into one."""
    if not parts:
        return None
    merged: dict[str, list[Any]] = {key: [] for key in parts[0]}
    for part in parts:
        for key, values in part.items():
            merged[key].extend(values)
    return merged


def encode(obj: Any) -> bytes:
    return _json(obj)
