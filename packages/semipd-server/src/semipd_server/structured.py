"""`response_format`, `tools` and `tool_choice` of the OpenAI routes (and `json_schema` / `regex` of /generate):
what the output must match, as a `StructuredOutput` the engine compiles into a grammar, and the tool calls read
back from a finished output.

Tools: "none" sends none to the template; "auto" needs a chat template that reads `tools` (else 400: the model
would never see them) and parses Hermes-style `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks;
"required" and a named function constrain the output with a JSON-schema grammar (any template), so the calls
always parse."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from semipd_runtime import SamplingParams
from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.grammar import StructuredOutput
from semipd_server.errors import bad_request

if TYPE_CHECKING:
    from semipd_server.state import ServerState


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None  # the grammar always holds the output to the schema


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    function: FunctionDef


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    function: NamedFunction


ToolChoice = str | NamedToolChoice


def response_format_spec(rf: ResponseFormat | None) -> StructuredOutput | None:
    """The grammar a response_format asks for (None: free text). The schema itself is checked when the engine
    compiles it (a 400 naming response_format too)."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutput("json_object")
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema is None:
            raise bad_request("response_format of type 'json_schema' needs json_schema.schema",
                              "response_format", "invalid_response_format")
        return StructuredOutput("json_schema", json.dumps(rf.json_schema.schema))
    raise bad_request(f"response_format type must be 'text', 'json_object' or 'json_schema', got {rf.type!r}",
                      "response_format", "invalid_response_format")


async def compile_structured(state: ServerState, params: SamplingParams, param: str = "response_format") -> None:
    """Compile the request's grammar on the preparation pool, off the event loop (the engine caches it, so
    its submit finds it); a grammar that cannot compile is a 400 naming `param`."""
    if params.structured is None:
        return
    try:
        await state.prep.offload(state.engine.compile_grammar, params.structured)
    except InvalidRequestError as e:
        raise bad_request(e.message, param, "invalid_grammar") from None


def generate_spec(json_schema: str | None, regex: str | None) -> StructuredOutput | None:
    """SGLang's `sampling_params.json_schema` (a string) / `regex` on /generate."""
    if json_schema is not None and regex is not None:
        raise bad_request("give json_schema or regex, not both", "sampling_params.json_schema")
    if json_schema is not None:
        return StructuredOutput("json_schema", json_schema)
    return StructuredOutput("regex", regex) if regex is not None else None


@dataclass(slots=True)
class ToolPlan:
    """How a chat request uses tools: what the template renders, what the output is parsed as."""

    render: list[dict[str, Any]] | None = None  # tool definitions for the chat template
    parse: str = "none"  # "none" | "auto" (tool-call blocks) | "required" (a JSON list) | "named" (arguments)
    function: str = ""  # the named function
    spec: StructuredOutput | None = None  # the grammar of "required" / "named"
    parallel: bool = True  # False (parallel_tool_calls): at most one call


def plan_tools(tools: list[Tool] | None, choice: ToolChoice | None, template_has_tools: bool,
               stream: bool, parallel: bool | None = None) -> ToolPlan:
    for i, t in enumerate(tools or []):
        if t.type != "function":
            raise bad_request(f"tool type {t.type!r} is not supported (only 'function')", f"tools[{i}].type")
    defs = [msgspec.to_builtins(t) for t in tools or []]
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none" or (choice == "auto" and not tools):
        return ToolPlan()
    if not tools:
        raise bad_request("tool_choice asks for a tool call but tools is empty", "tool_choice")
    if stream:
        raise bad_request("streaming tool calls is not supported yet; send stream=false", "stream", "unsupported")
    render = defs if template_has_tools else None
    if choice == "auto":
        if not template_has_tools:
            raise bad_request(
                "this model's chat template does not define tool calling (it never reads `tools`), so the "
                "model would not see them; send tool_choice 'required' or a named function (the output is "
                "then constrained to a call), or no tools", "tools", "unsupported")
        return ToolPlan(render, "auto", parallel=parallel is not False)
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                    "arguments": _params(t.function)},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if parallel is False:
            schema["maxItems"] = 1
        return ToolPlan(render, "required", spec=StructuredOutput("json_schema", json.dumps(schema)),
                        parallel=parallel is not False)
    if isinstance(choice, NamedToolChoice):
        fn = next((t.function for t in tools if t.function.name == choice.function.name), None)
        if fn is None:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among tools",
                              "tool_choice")
        return ToolPlan(render, "named", fn.name, StructuredOutput("json_schema", json.dumps(_params(fn))))
    raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                      "tool_choice")


def _params(fn: FunctionDef) -> dict[str, Any]:
    return fn.parameters if fn.parameters is not None else {"type": "object"}


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left, OpenAI tool_calls) of a finished output; no calls when it holds none (or, cut short by
    the length limit, none that parses)."""
    if plan.parse == "named":
        return None, [_call(plan.function, text)]
    if plan.parse == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []
        return None, [_call(c["name"], c["arguments"]) for c in items]
    if plan.parse != "auto":
        return text, []
    calls: list[dict[str, Any]] = []

    def take(m: re.Match[str]) -> str:  # a block that parses becomes a call; any other stays in the content
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return m.group(0)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return m.group(0)
        calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
        return ""

    rest = _TOOL_CALL.sub(take, text).strip()
    if not calls:
        return text, []
    return rest or None, calls if plan.parallel else calls[:1]


def with_tool_calls(choice: dict[str, Any], plan: ToolPlan) -> dict[str, Any]:
    """A chat choice with its output read as tool calls (finish_reason "tool_calls") where it holds any."""
    if plan.parse == "none" or choice.get("finish_reason") not in ("stop", None):
        return choice
    content, calls = parse_tool_calls(choice["message"].get("content") or "", plan)
    if calls:
        choice["message"] = {**choice["message"], "content": content, "tool_calls": calls}
        choice["finish_reason"] = "tool_calls"
    return choice
