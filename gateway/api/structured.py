"""Structured output requests: `response_format` (OpenAI) and vLLM's guided fields, turned into
one llguidance grammar text that travels in SamplingParams.grammar to the worker (which masks
the sampler with it, workerd/model/grammar.py).

- `response_format`: `{"type": "text"}` (none), `{"type": "json_object"}` (any JSON object),
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
- vLLM: `guided_json` (a schema, object or string), `guided_regex`, `guided_choice` (a list of
  strings), `guided_grammar` (Lark or GBNF); `guided_decoding_backend` is accepted and ignored.
At most one of them; a bad schema or grammar is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from mell.common.errors import InvalidRequest


def grammar_of(fields: dict[str, Any]) -> str | None:
    """The grammar the request's structured-output fields ask for (None: free text)."""
    given = {k: v for k, v in fields.items() if v is not None}
    fmt = given.get("response_format")
    if fmt is not None and _format_type(fmt) == "text":
        del given["response_format"]
    if len(given) > 1:
        raise InvalidRequest(
            f"at most one of {', '.join(sorted(given))} may be given", param=sorted(given)[1]
        )
    if not given:
        return None
    ((name, value),) = given.items()
    return _compiled(*_source(name, value), name)


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of a JSON schema (tool calls forced by tool_choice); 400 naming `param`."""
    return _compiled("json_schema", json.dumps(schema), param)


def _compiled(kind: str, text: str, name: str) -> str:
    """llguidance's grammar text of (format, text), checked; InvalidRequest naming `name`."""
    try:
        grammar = llguidance.grammar_from(kind, text)  # type: ignore[arg-type]
    except (ValueError, TypeError) as err:
        raise InvalidRequest(f"{name}: {str(err)[:300]}", param=name) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(f"{name}: {error[:300]}", param=name)
    return grammar


def _format_type(fmt: Any) -> str:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            "response_format.type must be text, json_object or json_schema",
            param="response_format",
        )
    return str(fmt["type"])


def _source(name: str, value: Any) -> tuple[str, str]:
    """llguidance's (format, text) for one field."""
    if name == "response_format":
        if _format_type(value) == "json_object":
            return "json_schema", '{"type": "object"}'
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest(
                "response_format.json_schema must be an object with a `schema` object",
                param="response_format",
            )
        return "json_schema", json.dumps(spec.get("schema", {}))
    if name == "guided_json":
        if isinstance(value, str | dict):
            return "json_schema", value if isinstance(value, str) else json.dumps(value)
    elif name == "guided_regex":
        if isinstance(value, str):
            return "regex", value
    elif name == "guided_choice":
        if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
            return "choice", json.dumps(value)
    elif name == "guided_grammar" and isinstance(value, str):
        return "grammar", value
    raise InvalidRequest(f"{name} has the wrong type", param=name)
