"""A chat request's tools and tool_choice, decided once per request: what the prompt shows,
what the grammar forces and which parser reads the output.

- `none`: the tools are rendered (as vLLM does by default), the output is plain content.
- `auto` (the default with tools): the model decides; its output is read by the parser of its
  chat template's format (`tool_format`); a model whose format is unknown is refused (400), as
  vLLM refuses auto tool choice without a parser.
- `required`: the grammar forces a JSON array of one or more calls of the given tools (one when
  `parallel_tool_calls` is false); named (`{"type": "function", "function": {"name": ...}}`):
  the grammar forces the arguments of that function. Both read by `forced.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mell.common.errors import InvalidRequest
from mell.gateway.api.chat_template import ChatTemplate
from mell.gateway.api.structured import schema_grammar
from mell.gateway.api.tools.forced import NamedParser, RequiredParser
from mell.gateway.api.tools.hermes import HermesParser
from mell.gateway.api.tools.llama3 import PYTHON_TAG, Llama3JsonParser
from mell.gateway.api.tools.mistral import MistralParser
from mell.gateway.api.tools.parser import CallParser, ToolParser

ToolFormat = Literal["hermes", "llama3_json", "mistral"]
Mode = Literal["none", "auto", "required", "named"]
PARSERS: dict[ToolFormat, type[CallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def tool_format(template: ChatTemplate | None) -> ToolFormat | None:
    """The tool call format the model's chat template teaches (None: none this server parses)."""
    if template is None:
        return None
    source = template.source
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<tool_call>" in source:
        return "hermes"
    if PYTHON_TAG in source or ("ipython" in source and '"parameters"' in source):
        return "llama3_json"
    return None


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request uses its tools."""

    mode: Mode
    grammar: str | None = None  # forced calls: the grammar of the output
    name: str | None = None  # named: the function
    max_calls: int | None = None  # 1 when parallel tool calls are off
    format: ToolFormat | None = None  # auto: the model's format

    def parser(self) -> ToolParser | None:
        """A fresh parser for one choice's output (None: the output is all content)."""
        if self.mode == "named" and self.name is not None:
            return NamedParser(self.name)
        if self.mode == "required":
            return RequiredParser(self.max_calls)
        if self.mode == "auto" and self.format is not None:
            return PARSERS[self.format](self.max_calls)
        return None


def plan_tools(
    functions: list[dict[str, Any]],
    tool_choice: str | dict[str, Any] | None,
    parallel: bool | None,
    fmt: ToolFormat | None,
    model: str,
) -> ToolPlan:
    """The plan of a request; `functions` are its tools' `function` objects (name, parameters).
    InvalidRequest naming tool_choice for a choice the tools cannot meet."""
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    max_calls = 1 if parallel is False else None
    if isinstance(choice, dict):
        name = _named(choice, functions)
        params = _parameters(next(f for f in functions if f["name"] == name))
        return ToolPlan("named", schema_grammar(params, "tools"), name=name)
    if choice not in ("none", "auto", "required"):
        raise InvalidRequest(
            f"tool_choice must be none, auto, required or a named function, not {choice[:40]!r}",
            param="tool_choice",
        )
    if choice == "none" or not functions:
        if choice == "required":
            raise InvalidRequest("tool_choice required needs tools", param="tool_choice")
        return ToolPlan("none")
    if choice == "required":
        schema = _required_schema(functions, max_calls)
        return ToolPlan("required", schema_grammar(schema, "tools"), max_calls=max_calls)
    if fmt is None:
        raise InvalidRequest(
            f"tool_choice auto: the chat template of model {model} has no tool call format this "
            "server parses (Hermes <tool_call>, Llama 3 JSON, Mistral [TOOL_CALLS]); use "
            'tool_choice "required" or a named function',
            param="tool_choice",
        )
    return ToolPlan("auto", max_calls=max_calls, format=fmt)


def _named(choice: dict[str, Any], functions: list[dict[str, Any]]) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest(
            'a named tool_choice is {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if not any(f["name"] == name for f in functions):
        raise InvalidRequest(
            f"tool_choice names function {name[:64]!r}, which is not in tools",
            param="tool_choice",
        )
    return name


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else ANY_OBJECT


def _required_schema(functions: list[dict[str, Any]], max_calls: int | None) -> dict[str, Any]:
    """vLLM's schema for tool_choice required: an array of {name, parameters} of the tools."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [f["name"]]},
                "parameters": _parameters(f),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return schema
