"""Handlers of the OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions.

Each handler: decode the body (400 on any mistake), resolve the model (404), build the prompt
(chat template, tokenization), check lengths, then `respond` (place, stream, end). A prompt
too long for the model's context is refused by its size in characters before it is rendered
or tokenized (`ServedModel.check_prompt_chars`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from mell.common.errors import InvalidRequest
from mell.common.ids import new_request_id
from mell.common.sampling import INT64_MAX, SamplingParams
from mell.gateway.api.bodies import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ToolCall,
    chat_logprobs,
    check_top_logprobs,
    decode_chat,
    decode_completion,
    decode_detokenize,
    decode_tokenize,
    include_usage,
    stop_strings,
    template_kwargs,
    to_sampling,
    to_slo,
    tokenize_template_kwargs,
    tool_functions,
)
from mell.gateway.api.choices import Choice, respond_many
from mell.gateway.api.chunks import ChatFormat, CompletionFormat
from mell.gateway.api.generation import Format, Outcome, TextOutput, respond
from mell.gateway.api.reasoning import ReasoningSplitter
from mell.gateway.api.served_models import ServedModel, check_token_ids, context_length
from mell.gateway.api.tools.request import ToolPlan, plan_tools
from mell.gateway.cluster.dispatcher import Job
from mell.gateway.context import CONTEXT, GatewayContext

T = TypeVar("T")
MAX_CHOICES = 64  # choices of one HTTP request: n times the number of prompts


async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    ctx = request.app[CONTEXT]
    body = _decode(decode_chat, await _body(request))
    check_top_logprobs(body.top_logprobs, "top_logprobs")
    model = ctx.models.resolve(body.model)
    model.check_prompt_chars(sum(_content_chars(m) for m in body.messages), "messages")
    prompt = _render_chat(model, body)
    ids = await ctx.models.encode(model, prompt, add_special_tokens=False)
    limit = context_length(model, ctx.state.view)
    max_tokens = (
        body.max_completion_tokens or body.max_tokens or _default_max_tokens(model, limit, ids)
    )
    _check_length(limit, len(ids), max_tokens, "messages")
    logprobs = chat_logprobs(body)
    sampling = to_sampling(body, max_tokens, logprobs, model.sampling_defaults)
    tools = plan_tools(
        tool_functions(body),
        body.tool_choice,
        body.parallel_tool_calls,
        model.tool_format,
        model.name,
    )
    sampling = _forced_calls(sampling, tools)
    answer = _Answer(new_request_id("chatcmpl"), model, ChatFormat, body, arrival, tools=tools)
    return await answer.respond(request, ctx, [ids], sampling, logprobs is not None)


async def completions(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    ctx = request.app[CONTEXT]
    body = _decode(decode_completion, await _body(request))
    check_top_logprobs(body.logprobs, "logprobs")
    model = ctx.models.resolve(body.model)
    sources = _prompt_list(body.prompt)
    prompts = [await _prompt_ids(ctx, model, p, body.add_special_tokens) for p in sources]
    max_tokens = body.max_tokens or 16
    limit = context_length(model, ctx.state.view)
    for ids in prompts:
        _check_length(limit, len(ids), max_tokens, "prompt")
    sampling = to_sampling(body, max_tokens, body.logprobs, model.sampling_defaults)
    if body.echo and body.logprobs is not None:  # the echoed prompt's logprobs are wanted
        wanted = max(sampling.prompt_logprobs or 0, body.logprobs)
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=wanted)
    echo = [_echo_text(model, p, ids) for p, ids in zip(sources, prompts, strict=True)]
    answer = _Answer(
        new_request_id("cmpl"), model, CompletionFormat, body, arrival, echo if body.echo else None
    )
    return await answer.respond(request, ctx, prompts, sampling, body.logprobs is not None)


@dataclass(slots=True)
class _Answer:
    """The response to one HTTP request: one choice, or several (n > 1, a list of prompts)."""

    request_id: str
    model: ServedModel
    format: type[ChatFormat] | type[CompletionFormat]
    body: CompletionRequest | ChatCompletionRequest
    arrival: float
    echo: list[str] | None = None  # per prompt, the text echoed before the completion
    tools: ToolPlan | None = None  # chat: how the request uses its tools

    async def respond(
        self,
        request: web.Request,
        ctx: GatewayContext,
        prompts: list[list[int]],
        sampling: SamplingParams,
        want_logprobs: bool,
    ) -> web.StreamResponse:
        n = self.body.n or 1
        if n * len(prompts) > MAX_CHOICES:
            raise InvalidRequest(
                f"n times the number of prompts is {n * len(prompts)}, more than {MAX_CHOICES}",
                param="n",
            )
        with structlog.contextvars.bound_contextvars(request_id=self.request_id):
            if n == 1 and len(prompts) == 1:
                job = Job(
                    self.request_id,
                    self.model.name,
                    prompts[0],
                    sampling,
                    self.arrival,
                    slo=to_slo(self.body),
                )
                return await respond(
                    request,
                    ctx.dispatcher,
                    job,
                    self._text(self._format(0), 0, prompts[0], sampling, want_logprobs),
                    bool(self.body.stream),
                    include_usage(self.body),
                    ctx.config.request_timeout_s,
                )
            choices = [
                self._choice(i, i * n + j, ids, child_sampling(sampling, j), want_logprobs)
                for i, ids in enumerate(prompts)
                for j in range(n)
            ]
            return await respond_many(
                request,
                ctx.dispatcher,
                choices,
                sum(len(ids) for ids in prompts),
                bool(self.body.stream),
                include_usage(self.body),
                ctx.config.request_timeout_s,
            )

    def _format(self, index: int) -> Format:
        return self.format(
            self.request_id, self.model.name, int(time.time()), self.model.tokenizer, index
        )

    def _choice(
        self,
        i_prompt: int,
        index: int,
        ids: list[int],
        sampling: SamplingParams,
        want_logprobs: bool,
    ) -> Choice:
        group = f"{self.request_id}/{i_prompt}" if (self.body.n or 1) > 1 else None
        job = Job(
            f"{self.request_id}-{index}",
            self.model.name,
            ids,
            sampling,
            self.arrival,
            group=group,
            slo=to_slo(self.body),
        )
        fmt = self._format(index)
        text = self._text(fmt, i_prompt, ids, sampling, want_logprobs)
        return Choice(job, fmt, text, Outcome(), i_prompt)

    def _text(
        self,
        fmt: Format,
        i_prompt: int,
        ids: list[int],
        sampling: SamplingParams,
        want_logprobs: bool,
    ) -> TextOutput:
        body = self.body
        tools = self.tools.parser() if self.tools is not None else None
        return TextOutput(
            fmt,
            stop_strings(body),
            want_logprobs,
            skip_special_tokens=body.skip_special_tokens
            and (tools is None or tools.skip_special_tokens),
            include_stop=body.include_stop_str_in_output,
            prefix=self.echo[i_prompt] if self.echo else "",
            prompt_ids=ids if sampling.prompt_logprobs is not None else None,
            echo_top=sampling.logprobs if self.echo else None,
            show_prompt_logprobs=body.prompt_logprobs is not None,
            reasoning=self._reasoning(),
            tools=tools,
        )

    def _reasoning(self) -> ReasoningSplitter | None:
        """A splitter of reasoning from content, for a chat request to a thinking model."""
        body = self.body
        if self.model.reasoning is None or not isinstance(body, ChatCompletionRequest):
            return None
        return ReasoningSplitter(self.model.reasoning, keep=body.include_reasoning)


def _forced_calls(sampling: SamplingParams, tools: ToolPlan) -> SamplingParams:
    """The sampling of a request whose tool calls the grammar forces (required, named)."""
    if tools.grammar is None:
        return sampling
    if sampling.grammar is not None:
        raise InvalidRequest(
            f"tool_choice {tools.mode} forces tool calls: it cannot be combined with "
            "response_format or guided decoding",
            param="tool_choice",
        )
    return msgspec.structs.replace(sampling, grammar=tools.grammar)


def child_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """The sampling of choice `index` of n: a seeded request's choices use seed + index, as
    vLLM's parallel sampling does (wrapped into int64), so they differ and stay reproducible."""
    if sampling.seed is None or index == 0:
        return sampling
    seed = sampling.seed + index
    if seed > INT64_MAX:
        seed -= 2**64
    return msgspec.structs.replace(sampling, seed=seed)


async def _body(request: web.Request) -> bytes:
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise InvalidRequest(f"Content-Type must be application/json, not {request.content_type}")
    return await request.read()


def _decode(decode: Callable[[bytes], T], body: bytes) -> T:
    try:
        return decode(body)
    except RecursionError:  # msgspec's limit on nesting
        raise InvalidRequest("request body is nested too deeply") from None


def _content_chars(message: ChatMessage) -> int:
    content = message.content
    if isinstance(content, list):
        return sum(len(part.text or "") for part in content)
    return len(content or "")


def _render_chat(model: ServedModel, body: ChatCompletionRequest) -> str:
    return _render(model, body.messages, body.add_generation_prompt, template_kwargs(body))


def _render(
    model: ServedModel,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    kwargs: dict[str, Any] | None,
) -> str:
    if model.chat_template is None:
        raise InvalidRequest(f"model {model.name} has no chat template", param="messages")
    return model.chat_template.render(
        [_message_dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        **(kwargs or {}),
    )


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        for part in content:
            if part.type != "text":
                raise InvalidRequest(
                    f"content part type {part.type!r} is not supported", param="messages"
                )
        content = "".join(part.text or "" for part in content)
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": content or ""}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [_tool_call_dict(call) for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _tool_call_dict(call: ToolCall) -> dict[str, Any]:
    """An earlier tool call for the template. Its arguments, a JSON string on the wire, are
    given as the object they encode (as vLLM does: Llama's and Mistral's templates need it)."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    function = {"name": call.function.name, "arguments": arguments}
    out: dict[str, Any] = {"type": call.type, "function": function}
    if call.id is not None:
        out["id"] = call.id
    return out


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions body: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return [prompt]
    if prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        return list(prompt)
    raise InvalidRequest(
        "prompt must be a string, a list of token ids, or a list of either", param="prompt"
    )


def _echo_text(model: ServedModel, prompt: str | list[int], ids: list[int]) -> str:
    """What `echo` repeats: the prompt as given, or the decode of its token ids."""
    return prompt if isinstance(prompt, str) else model.tokenizer.decode(ids, False)


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


async def _prompt_ids(
    ctx: GatewayContext, model: ServedModel, prompt: str | list[int], add_special_tokens: bool
) -> list[int]:
    if isinstance(prompt, str):
        ids = await ctx.models.encode(model, prompt, add_special_tokens=add_special_tokens)
    else:
        ids = check_token_ids(model, prompt)  # type: ignore[arg-type]
    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    return ids


def _default_max_tokens(model: ServedModel, limit: int, ids: list[int]) -> int:
    """The rest of the context, capped by generation_config's max_new_tokens (as vLLM)."""
    rest = limit - len(ids)
    cap = model.sampling_defaults.get("max_tokens")
    return min(rest, int(cap)) if isinstance(cap, int) and cap > 0 else rest


def _check_length(limit: int, num_prompt: int, max_tokens: int, what: str) -> None:
    if num_prompt == 0:
        raise InvalidRequest("prompt is empty", param=what)
    if num_prompt + max(max_tokens, 1) > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, "
            f"you requested {num_prompt + max_tokens} tokens ({num_prompt} in the {what}, "
            f"{max_tokens} in the completion). Please reduce the length of the {what} or "
            "completion.",
            param=what,
        )


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: a prompt (special tokens added by default) or chat messages (rendered
    by the template; no special tokens added by default) to token ids."""
    ctx = request.app[CONTEXT]
    body = _decode(decode_tokenize, await _body(request))
    model = ctx.models.resolve(body.model)
    if body.messages is not None:
        if not body.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        kwargs = tokenize_template_kwargs(body)
        text = _render(model, body.messages, body.add_generation_prompt, kwargs)
        special = bool(body.add_special_tokens)
    else:
        text = body.prompt or ""
        special = body.add_special_tokens is not False
    ids = await ctx.models.encode(model, text, add_special_tokens=special)
    strs = [model.tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
    limit = context_length(model, ctx.state.view)
    return _json({"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's /detokenize: token ids (all in the vocabulary) to text."""
    ctx = request.app[CONTEXT]
    body = _decode(decode_detokenize, await _body(request))
    model = ctx.models.resolve(body.model)
    ids = check_token_ids(model, list(body.tokens), param="tokens")
    return _json({"prompt": model.tokenizer.decode(ids, skip_special_tokens=False)})


def _json(obj: object) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), content_type="application/json")
