"""The OpenAI request bodies the gateway accepts, decoded and validated with msgspec.

Fields OpenAI or vLLM accept without effect on the output (`user`, `metadata`, `store`, ...) are
accepted and ignored; known fields this gateway does not implement are accepted only at their
default; any other field is unknown. Wrong types, bad values, unknown and unsupported fields are
`InvalidRequest` (HTTP 400) naming the parameter. `to_sampling` maps a body to SamplingParams.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from mell.common.errors import InvalidRequest
from mell.common.sampling import INT64_MAX, INT64_MIN, MAX_TOP_LOGPROBS, SamplingParams
from mell.common.slo import RequestSLO
from mell.gateway.api.structured import grammar_of

Int = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]  # JSON ints beyond int64: 400


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    """A tool call of an earlier assistant message, as the client sends it back."""

    function: FunctionCall
    id: str | None = None
    type: str = "function"


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool


class FunctionDef(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, omit_defaults=True):
    type: str
    function: FunctionDef


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: Int | None = None
    # mell's extension: this request's SLOs (seconds; the worker's defaults when unset)
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    # Accepted and ignored, as OpenAI or vLLM ignore them: they never change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    spaces_between_special_tokens: bool | None = None
    # Known but not supported beyond their default: 400 naming the field otherwise.
    best_of: Int | None = None
    priority: Int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structural_tag: Any = None
    guided_decoding_backend: str | None = None  # accepted, ignored: llguidance is the one
    guided_whitespace_pattern: Any = None
    logits_processors: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Int | None = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    kv_transfer_params: Any = None
    vllm_xargs: Any = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: bool | None = False
    top_logprobs: Int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # passed to the chat template, as vLLM does
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none, auto, required or a named function
    parallel_tool_calls: bool | None = None
    # Accepted and ignored (only a speed-up hint).
    prediction: Any = None
    # Known but not supported beyond their default.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    continue_final_message: Any = None
    chat_template: Any = None
    documents: Any = None
    mm_processor_kwargs: Any = None
    include_reasoning: bool = True  # vLLM: False drops a thinking model's reasoning
    echo: Any = None
    add_special_tokens: Any = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    logprobs: Int | None = None
    echo: bool | None = False
    suffix: str | None = None
    add_special_tokens: bool = True


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDef] | None = None  # rendered by the template with the messages
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[Int]


STRUCTURED_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
# Fields accepted only at their default (None, or the values listed): anything else is a 400
# that names the field, since silently ignoring it would change what the client gets.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "priority": (None, 0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "structural_tag": (None,),
    "guided_whitespace_pattern": (None,),
    "logits_processors": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "web_search_options": (None,),
    "verbosity": (None,),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "documents": (None,),
    "mm_processor_kwargs": (None,),
    "suffix": (None, ""),
}
_CHAT_DEFAULT_ONLY = {"echo": (None, False), "add_special_tokens": (None, False)}
# Template variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception"}
)


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
_detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)


MAX_N = 16  # choices per request


def decode_chat(body: bytes) -> ChatCompletionRequest:
    req = _decode(_chat_decoder, body)
    _check_common(req)
    _check_defaults(req, _CHAT_DEFAULT_ONLY)
    if not req.messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise InvalidRequest(
            "max_completion_tokens must be at least 1", param="max_completion_tokens"
        )
    check_template_kwargs(req.chat_template_kwargs)
    for tool in req.tools or []:
        if tool.type != "function":
            raise InvalidRequest(f"tool type {tool.type[:40]!r} is not supported", param="tools")
    return req


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs or {}))
    if reserved:
        raise InvalidRequest(
            f"chat_template_kwargs may not set {', '.join(reserved)} (the server sets them)",
            param="chat_template_kwargs",
        )


def decode_tokenize(body: bytes) -> TokenizeRequest:
    req: TokenizeRequest = _decode(_tokenize_decoder, body)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give either prompt or messages", param="prompt")
    check_template_kwargs(req.chat_template_kwargs)
    return req


def tokenize_template_kwargs(req: TokenizeRequest) -> dict[str, Any]:
    kwargs = dict(req.chat_template_kwargs or {})
    if req.tools:
        kwargs["tools"] = msgspec.to_builtins(req.tools)
    return kwargs


def decode_detokenize(body: bytes) -> DetokenizeRequest:
    req: DetokenizeRequest = _decode(_detokenize_decoder, body)
    return req


def decode_completion(body: bytes) -> CompletionRequest:
    req = _decode(_completion_decoder, body)
    _check_common(req)
    return req


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    """Extra chat template variables: chat_template_kwargs, and reasoning_effort as vLLM
    passes it."""
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    if req.tools:  # as Hugging Face passes them: the OpenAI tool objects
        kwargs["tools"] = msgspec.to_builtins(req.tools)
    return kwargs


def tool_functions(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The `function` objects of the request's tools (name, description, parameters)."""
    return [msgspec.to_builtins(tool.function) for tool in req.tools or []]


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """Top-N alternatives wanted per token, None when logprobs are off."""
    return (req.top_logprobs or 0) if req.logprobs else None


def include_usage(req: _Common) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def stop_strings(req: _Common) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return [s for s in stops if s]


def to_sampling(
    req: _Common,
    max_tokens: int,
    logprobs: int | None,
    defaults: dict[str, Any] | None = None,
) -> SamplingParams:
    """SamplingParams of a decoded body; InvalidRequest for out-of-range values.

    A field the body leaves unset takes its value from `defaults` (the model's
    generation_config.json, as vLLM applies it), else the OpenAI default."""
    given = defaults or {}

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else given.get(name, fallback)

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0),
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=pick("repetition_penalty", 1.0),
        logit_bias=_logit_bias(req.logit_bias),
        min_tokens=req.min_tokens or 0,
        prompt_logprobs=req.prompt_logprobs,
        grammar=grammar_of({name: getattr(req, name) for name in STRUCTURED_FIELDS}),
    ).validate()


def to_slo(req: _Common) -> RequestSLO | None:
    """The body's own SLOs (mell's extension), None when it sets none; InvalidRequest naming
    the field for a value outside [0, MAX_SLO_S] (0: the worker's default)."""
    if req.ttft_slo_s is None and req.tpot_slo_s is None:
        return None
    return RequestSLO(req.ttft_slo_s or 0.0, req.tpot_slo_s or 0.0).validate()


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(
                f"logit_bias keys must be token ids, not {key[:40]!r}", param="logit_bias"
            ) from None
        if not 0 <= token < 2**31:
            raise InvalidRequest(f"logit_bias token id {token} is out of range", param="logit_bias")
        out[token] = value
    return out


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as err:
        message = str(err)
        if message.startswith("Object contains unknown field `"):
            field = message.split("`")[1]
            if " - at `$." in message:  # nested: name its path
                field = message.rsplit(" - at `$.", 1)[1].rstrip("`") + "." + field
            raise InvalidRequest(
                f"unknown field `{field[:100]}`: not an OpenAI or vLLM request field",
                param=field[:100],
            ) from None
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


def _check_defaults(req: _Common, fields: dict[str, tuple[Any, ...]]) -> None:
    for name, allowed in fields.items():
        value = getattr(req, name, None)
        if not any(_same(value, a) for a in allowed):
            raise InvalidRequest(_unsupported(name), param=name)


def _check_common(req: _Common) -> None:
    _check_defaults(req, _DEFAULT_ONLY)
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidRequest(
            "prompt_logprobs is returned in non-streamed responses only", param="prompt_logprobs"
        )
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise InvalidRequest(f"n must be in [1, {MAX_N}]", param="n")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    stops = stop_strings(req)
    if len(stops) > 16:
        raise InvalidRequest("at most 16 stop strings", param="stop")
    to_slo(req)


def _same(value: Any, default: Any) -> bool:
    return bool(value == default) and isinstance(value, bool) == isinstance(default, bool)


def _unsupported(name: str) -> str:
    if name == "best_of":
        return (
            "best_of is not supported (no server-side ranking of candidates); "
            "use n to get several choices"
        )
    return f"{name} is not supported by this server (only its default is accepted)"


def check_top_logprobs(n: int | None, param: str) -> None:
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"{param} must be in [0, {MAX_TOP_LOGPROBS}]", param=param)
