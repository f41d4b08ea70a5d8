"""Structured outputs over HTTP: request fields -> ``StructuredSpec``, tools into the prompt,
replies -> ``tool_calls``.

Request fields (every error is a 400 naming the field):
  - ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``; on both endpoints.
  - vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (EBNF
    ``root ::= ...`` or Lark ``start: ...``), and ``structured_outputs`` with one of ``json``,
    ``regex``, ``choice``, ``grammar``, ``json_object``. At most one of all these per request.
  - chat ``tools`` + ``tool_choice``:
      ``"none"``      nothing is constrained and the model is not told about the tools
                      beyond what a tools-aware chat template renders;
      ``"required"``  the reply is one call of one of the tools: ``{"name": ..., "arguments": ...}``
                      with the arguments valid under that tool's ``parameters``;
      named           ``{"type": "function", "function": {"name": X}}``: a call of X;
      ``"auto"``      (the default with tools) a grammar that is the union of "a call of one of
                      the tools" and "plain text whose first character is not ``{``" (or, with a
                      ``response_format`` as well, that format): the model chooses by its first
                      character, and once it opens ``{`` it can only write a valid call. A plain
                      reply cannot start with ``{`` (unless a response format says it may).
    One call per reply (``parallel_tool_calls`` is accepted: one call always satisfies it).
The model learns about the tools from the chat template (``tools=`` reaches
``apply_chat_template``); a template that renders nothing of them (compared with and without)
gets a system message listing the tools and the JSON call format. Assistant messages with
``tool_calls`` and ``tool`` messages with ``tool_call_id`` go to the template in the Hugging Face
shape; a template that shows neither gets the calls as the JSON text the model would write and
the results as user messages.

Replies: a reply that is a call (``{"name": <a tool>, "arguments": {...}}``) becomes
``message.tool_calls = [{"id": "call_...", "type": "function", "function": {"name", "arguments":
"<JSON text>"}}]`` with ``content`` null and ``finish_reason`` ``"tool_calls"``; streamed, the
first delta names the call (index, id, type, name, ``arguments: ""``) and the next ones carry the
arguments text as it is generated (the closing ``}`` of the call is held back until the end).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine.sequence import TokenEvent
from ..errors import InvalidRequestError
from ..structured import TEXT_NOT_JSON, StructuredSpec
from .protocol import (
    ChatMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TOOLS = 128
#: the start of a call as the grammar writes it (and a little looser, for free-form replies)
CALL_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")
#: structured_outputs options that change nothing here (JSON is already compact and strict)
STRUCTURED_OUTPUT_NO_OPS = (
    "disable_any_whitespace", "disable_fallback", "disable_additional_properties",
)


# -- tools ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools and what ``tool_choice`` makes of them.

    ``choice``: ``none`` | ``auto`` | ``required`` | ``named`` (``name`` set). ``tools`` are the
    request's function definitions (``{"name", "description", "parameters"}``), ``template_tools``
    the OpenAI-shaped list for ``apply_chat_template``, ``call_schemas`` one JSON schema per tool
    for its call object.
    """

    choice: str
    tools: tuple[dict, ...]
    template_tools: tuple[dict, ...]
    call_schemas: tuple[dict, ...]
    name: str | None = None

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tools]

    @property
    def calls(self) -> bool:
        """Whether replies may be tool calls (parsed into ``tool_calls``)."""
        return self.choice != "none"

    def call_schema(self) -> dict:
        """The schema of a call this plan allows (named: that tool; else any of the tools)."""
        if self.choice == "named":
            return self.call_schemas[self.names.index(self.name)]
        if len(self.call_schemas) == 1:
            return self.call_schemas[0]
        return {"anyOf": list(self.call_schemas)}


def tool_plan(tools: Any, tool_choice: Any) -> ToolPlan | None:
    """Validate ``tools`` and ``tool_choice``; None when the request has no tools."""
    if tools in (None, []):
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of function tools", param="tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"tools takes at most {MAX_TOOLS} tools", param="tools")
    functions, template_tools, schemas = [], [], []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError(
                f"{where}: only function tools are supported ({{\"type\": \"function\", ...}})",
                param=f"{where}.type",
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidRequestError(
                f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}",
                param=f"{where}.function.name",
            )
        if name in (f["name"] for f in functions):
            raise InvalidRequestError(f"two tools are named {name!r}", param=f"{where}.function.name")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(
                f"{where}.function.description must be a string", param=f"{where}.function.description"
            )
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        param = f"{where}.function.parameters"
        StructuredSpec.json_schema(parameters, param=param)  # a 400 naming it when invalid
        functions.append({"name": name, "description": description, "parameters": parameters})
        template_tools.append({"type": "function", "function": {k: v for k, v in functions[-1].items() if v is not None}})
        schemas.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    choice, name = _tool_choice(tool_choice, [f["name"] for f in functions])
    return ToolPlan(choice, tuple(functions), tuple(template_tools), tuple(schemas), name)


def _tool_choice(value: Any, names: list[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("none", "auto", "required"):
        return value, None
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {name!r}, which is not among the tools {names}",
                param="tool_choice.function.name",
            )
        return "named", name
    raise InvalidRequestError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


# -- the request's constraint ---------------------------------------------------------------------
def structured_spec(body: Any, plan: ToolPlan | None = None) -> StructuredSpec | None:
    """The one constraint a request asks for (response_format, guided_*, structured_outputs,
    and the tools' call grammar), or None; a 400 naming the field when invalid or doubled."""
    found: list[StructuredSpec] = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(spec)
    guided = {name: getattr(body, name, None) for name in GUIDED_FIELDS}
    if guided["guided_json"] is not None:
        found.append(StructuredSpec.json_schema(guided["guided_json"], param="guided_json"))
    if guided["guided_regex"] is not None:
        found.append(StructuredSpec.regex(guided["guided_regex"], param="guided_regex"))
    if guided["guided_choice"] is not None:
        found.append(StructuredSpec.choice(guided["guided_choice"], param="guided_choice"))
    if guided["guided_grammar"] is not None:
        found.append(StructuredSpec.grammar(guided["guided_grammar"], param="guided_grammar"))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        found.extend(_structured_outputs(so))
    if len(found) > 1:
        raise InvalidRequestError(
            f"{found[1].param}: only one of response_format, guided_json, guided_regex, "
            f"guided_choice, guided_grammar and structured_outputs may constrain a reply "
            f"({found[0].param} already does)",
            param=found[1].param,
        )
    spec = found[0] if found else None
    if plan is None or not plan.calls:
        return spec
    if plan.choice in ("required", "named"):  # the reply is a call: a response format has no say
        return StructuredSpec.json_schema(plan.call_schema(), param="tools")
    # auto: a call, or the reply the request's format (else free text not starting with "{") allows
    other = ("regex", TEXT_NOT_JSON) if spec is None else (spec.kind, spec.source)
    parts = [("json", json.dumps(plan.call_schema(), ensure_ascii=False)), other]
    return StructuredSpec.union(parts, param="tools" if spec is None else spec.param)


def _response_format(value: Any) -> StructuredSpec | None:
    param = "response_format"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidRequestError(
            'response_format must be an object with a "type": "text", "json_object" or "json_schema"',
            param=param,
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec.json_object(param=param)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise InvalidRequestError(
                "response_format.json_schema must be an object with a schema", param=param
            )
        schema = inner.get("schema", inner.get("json_schema"))
        if schema is None:
            raise InvalidRequestError("response_format.json_schema.schema is required", param=param)
        return StructuredSpec.json_schema(schema, param=param)
    raise InvalidRequestError(
        f'response_format type {kind!r} is not supported: "text", "json_object" or "json_schema"',
        param=param,
    )


def _structured_outputs(value: Any) -> list[StructuredSpec]:
    if not isinstance(value, dict):
        raise InvalidRequestError("structured_outputs must be an object", param="structured_outputs")
    specs = []
    for key, item in value.items():
        param = f"structured_outputs.{key}"
        if item is None or key in STRUCTURED_OUTPUT_NO_OPS:
            continue
        if key == "json":
            specs.append(StructuredSpec.json_schema(item, param=param))
        elif key == "regex":
            specs.append(StructuredSpec.regex(item, param=param))
        elif key == "choice":
            specs.append(StructuredSpec.choice(item, param=param))
        elif key == "grammar":
            specs.append(StructuredSpec.grammar(item, param=param))
        elif key == "json_object":
            if item is True:
                specs.append(StructuredSpec.json_object(param=param))
            elif item is not False:
                raise InvalidRequestError(f"{param} must be a boolean", param=param)
        else:
            raise InvalidRequestError(
                f"{param} is not supported: one of {', '.join(STRUCTURED_OUTPUT_KINDS)}", param=param
            )
    return specs


# -- the prompt -----------------------------------------------------------------------------------
def conversation_entry(message: ChatMessage, text: str) -> dict:
    """One message for ``apply_chat_template``, in the Hugging Face shape: an assistant's
    ``tool_calls`` (arguments as objects), a tool message's ``tool_call_id`` (and ``name``)."""
    entry: dict[str, Any] = {"role": message.role, "content": text}
    if message.tool_calls:
        entry["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
            for call in message.tool_calls
        ]
    if message.role == "tool":
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            entry["name"] = message.name
    return entry


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def with_tools(tokenizer, conversation: list[dict], tools: list[dict] | None,
               announce: bool, chat_template: str | None, extra: dict) -> list[dict]:
    """``conversation`` made readable by this chat template (see the module docstring): tool calls
    and results it does not render become text, and when ``announce`` and it renders nothing of
    ``tools``, a system message lists them. Returns a new list; the input is not changed."""
    has_calls = any(e.get("tool_calls") for e in conversation)
    has_results = any(e["role"] == "tool" for e in conversation)
    if not (tools or has_calls or has_results):
        return conversation

    def render(conv: list[dict], with_tools: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(
                conv, tools=(tools or None) if with_tools else None, chat_template=chat_template,
                tokenize=False, add_generation_prompt=False, **extra,
            )
        except Exception:  # a template that refuses tool roles or calls
            return None

    out = [dict(e) for e in conversation]
    shown = render(out, with_tools=False)
    if has_calls:
        bare = [{k: v for k, v in e.items() if k != "tool_calls"} for e in out]
        if shown is None or shown == render(bare, with_tools=False):  # the calls do not show
            for e in out:
                if e.get("tool_calls"):
                    calls = "\n".join(
                        json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                   ensure_ascii=False)
                        for c in e.pop("tool_calls")
                    )
                    e["content"] = f"{e['content']}\n{calls}" if e["content"] else calls
            shown = render(out, with_tools=False)
    if has_results and shown is None:  # the template refuses role "tool": results as user text
        for e in out:
            if e["role"] == "tool":
                call = e.pop("tool_call_id", None)
                e.pop("name", None)
                e["role"] = "user"
                e["content"] = f"Result of the function call {call or ''}: {e['content']}".replace("  ", " ")
        shown = render(out, with_tools=False)
    if tools and announce and (shown is None or render(out, with_tools=True) == shown):
        note = tool_system_text(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{note}" if out[0]["content"] else note}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def tool_system_text(tools: list[dict]) -> str:
    """The tools and the call format, for templates that do not render tools themselves."""
    lines = ["You can call these functions (JSON schemas of their arguments):"]
    for tool in tools:
        fn = tool["function"]
        lines.append(json.dumps(fn, ensure_ascii=False, separators=(",", ":")))
    lines.append('To call one, reply with only {"name": <function name>, "arguments": <arguments object>}.')
    return "\n".join(lines)


# -- replies --------------------------------------------------------------------------------------
def parse_call(text: str, plan: ToolPlan) -> tuple[str, str] | None:
    """``(name, arguments JSON text)`` when ``text`` is one call of a tool of ``plan``, else None.
    The arguments are the generated text itself (what a stream sent, piece by piece)."""
    head = CALL_HEAD.match(text)
    if head is not None:
        try:
            name = json.loads(head.group(1))
        except ValueError:
            name = None
        rest = text[head.end():].rstrip()
        if name in plan.names and rest.endswith("}"):
            arguments = rest[:-1].rstrip()
            try:
                if isinstance(json.loads(arguments), dict):
                    return name, arguments
            except ValueError:
                pass
    try:  # a call written another way (keys in the other order, spaces): re-serialised
        value = json.loads(text)
    except ValueError:
        return None
    if (isinstance(value, dict) and set(value) == {"name", "arguments"} and value["name"] in plan.names
            and isinstance(value["arguments"], dict)):
        return value["name"], json.dumps(value["arguments"], ensure_ascii=False)
    return None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_reply(choice, plan: ToolPlan | None) -> None:
    """A finished chat choice (``ChatChoice``) whose text is a call: ``tool_calls`` set,
    ``content`` null, ``finish_reason`` "tool_calls". Anything else is left as it is."""
    if plan is None or not plan.calls or choice.message.content is None:
        return
    parsed = parse_call(choice.message.content, plan)
    if parsed is None or choice.finish_reason not in ("stop", None):
        return
    name, arguments = parsed
    choice.message.tool_calls = [ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=arguments))]
    choice.message.content = None
    choice.finish_reason = "tool_calls"


@dataclass
class _ChoiceStream:
    """One streamed choice of a request with tools: text goes out as content, or, once the reply
    opens ``{``, is held until the call's name is known and then sent as tool-call deltas."""

    plan: ToolPlan
    buffer: str = ""
    mode: str | None = None  # None (undecided), "text" or "call"
    named: bool = False  # the first tool-call delta went out
    args_at: int = 0  # where the arguments start in ``buffer``
    sent: str = ""  # arguments text sent so far
    is_call: bool = False
    id: str = field(default_factory=call_id)

    def feed(self, text: str, final: bool) -> tuple[str | None, list[DeltaToolCall] | None]:
        """``(content delta, tool-call deltas)`` for the next piece of text."""
        self.buffer += text
        if self.mode is None:
            start = self.buffer.lstrip()
            if not start and not final:
                return None, None
            self.mode = "call" if start.startswith("{") else "text"
            if self.mode == "text":
                return self.buffer or None, None
        if self.mode == "text":
            return text or None, None
        deltas: list[DeltaToolCall] = []
        if not self.named:
            head = CALL_HEAD.match(self.buffer)
            name = _name(head)
            # the head is settled once something other than spaces follows it (its \s* is greedy)
            if name in self.plan.names and self.buffer[head.end():].strip():
                self.named, self.args_at = True, head.end()
                deltas.append(DeltaToolCall(index=0, id=self.id, type="function",
                                            function=DeltaFunctionCall(name=name, arguments="")))
        if final:
            return self._finish(deltas)
        if self.named:  # hold back a run of closing braces: the last one closes the call
            ready = re.sub(r"[\s}]*$", "", self.buffer[self.args_at:])
            if len(ready) > len(self.sent):
                deltas.append(_args_delta(ready[len(self.sent):]))
                self.sent = ready
        return None, deltas or None

    def _finish(self, deltas: list[DeltaToolCall]) -> tuple[str | None, list[DeltaToolCall] | None]:
        parsed = parse_call(self.buffer, self.plan)
        if parsed is None:
            if not self.named:  # never was a call: the held text is the content
                return self.buffer or None, None
            rest = self.buffer[self.args_at + len(self.sent):]  # a call cut short (length)
            return None, [*deltas, _args_delta(rest)] if rest else (deltas or None)
        name, arguments = parsed
        if not self.named:
            deltas.append(DeltaToolCall(index=0, id=self.id, type="function",
                                        function=DeltaFunctionCall(name=name, arguments="")))
        # ``sent`` is a prefix of the arguments (both are the generated text); a free-form call
        # that parse_call re-serialised cannot be mended after the fact: the rest is sent as is
        arguments = arguments[len(self.sent):] if arguments.startswith(self.sent) else ""
        if arguments:
            deltas.append(_args_delta(arguments))
        self.is_call = True
        return None, deltas or None


def _name(head: re.Match | None) -> str | None:
    if head is None:
        return None
    try:
        return json.loads(head.group(1))
    except ValueError:
        return None


def _args_delta(text: str) -> DeltaToolCall:
    return DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))


class ToolStream:
    """The chat stream's deltas for every choice: ``delta(c, event)`` then ``finish(c, event)``.
    Without a plan that makes calls, a delta is the event's text, as without tools."""

    def __init__(self, plan: ToolPlan | None, choices: int) -> None:
        self.plan = plan if plan is not None and plan.calls else None
        self.choices = [_ChoiceStream(self.plan) for _ in range(choices)] if self.plan else []

    def delta(self, c: int, event: TokenEvent) -> DeltaMessage:
        if self.plan is None:
            return DeltaMessage(content=event.text)
        content, calls = self.choices[c].feed(event.text, event.finish_reason is not None)
        return DeltaMessage(content=content, tool_calls=calls)

    def finish(self, c: int, event: TokenEvent) -> str | None:
        if self.plan is not None and event.finish_reason == "stop" and self.choices[c].is_call:
            return "tool_calls"
        return event.finish_reason
