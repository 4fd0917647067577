"""Kanana-1.5's tool-call format: rendering conversations with tools into a prompt, the grammar that keeps
generated calls well-formed, and parsing calls out of generated text (whole, or piece by piece while
streaming).

The format is Functionary v3 for Llama 3.1, which Kakao's vLLM recipe parses (`functionary_v3_llama_31`):
Llama-3 headers; the tool list in a system turn; calls written by the assistant as
`<function=NAME>{json arguments}</function>`, several back to back, then `<|eom_id|>`; code for a tool named
"python" after `<|python_tag|>`; tool results in `ipython` turns.

Messages and tools here are plain dicts in OpenAI's shape (the server validated them): messages
{"role", "content", "tool_calls": [{"id", "function": {"name", "arguments"}}], "tool_call_id"} and tools
{"name", "description", "parameters"} (the `function` object of an OpenAI tool).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from kanana_quant import kanana
from kanana_quant.errors import KananaQuantError
from kanana_quant.tokenizer import Tokenizer


def _special(name: str) -> str:
    # The token strings are Kanana's (kanana.py); looking them up there catches a typo here at import time.
    if name not in kanana.NAMED_SPECIAL_TOKENS.values():
        raise AssertionError(f"{name} is not one of Kanana's special tokens")
    return name


START_HEADER, END_HEADER = _special("<|start_header_id|>"), _special("<|end_header_id|>")
PYTHON_TAG = _special("<|python_tag|>")
EOT, EOM, BOS = kanana.EOT_TOKEN, kanana.EOM_TOKEN, kanana.BOS_TOKEN
CALL_OPEN, CALL_CLOSE = "<function=", "</function>"
PYTHON_TOOL = "python"  # the tool whose calls are code after <|python_tag|>

INSTRUCTIONS = (
    "Think very carefully before calling functions.\n"
    "If you choose to call a function ONLY reply in the following format:\n"
    "<{start_tag}={function_name}>{parameters}{end_tag}\n"
    "where\n\n"
    "start_tag => `<function`\n"
    "parameters => a JSON dict with the function argument name as key and function argument value as value.\n"
    "end_tag => `</function>`\n\n"
    "Here is an example,\n"
    '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
    "Reminder:\n"
    "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
    "- Required parameters MUST be specified\n"
    "- Put the entire function call reply on one line\n\n"
)


def _header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def call_text(name: str, arguments: str) -> str:
    """One call as the assistant writes it."""
    if name == PYTHON_TOOL:
        try:
            code = json.loads(arguments)["code"]
        except (ValueError, TypeError, KeyError):
            code = arguments  # a client that sent the code itself
        return PYTHON_TAG + str(code)
    return f"{CALL_OPEN}{name}>{arguments}{CALL_CLOSE}"


def render_kanana(messages: list[dict], tools: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt in Kanana-1.5's tool format (used when the model's own template does not take tools)."""
    out = [BOS]
    if tools:
        out.append(_header("system"))
        if any(t["name"] == PYTHON_TOOL for t in tools):
            out.append("Environment: ipython\n\n")
        out.append("You have access to the following functions:\n\n")
        for tool in tools:
            out.append(f"Use the function '{tool['name']}' to '{tool.get('description') or ''}'\n"
                       f"{json.dumps(tool, ensure_ascii=False)}\n\n")
        out += [INSTRUCTIONS, EOT]
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            out += [_header("ipython"), content, EOT]
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            out += [_header("assistant"), content]
            out += [call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            out.append(EOM if calls else EOT)
        else:
            out += [_header(role), content, EOT]
    if add_generation_prompt:
        out.append(_header("assistant"))
    return "".join(out)


def template_takes_tools(tokenizer: Tokenizer) -> bool:
    """Whether the model's chat template renders a tool list (it reads the `tools` variable)."""
    return "tools" in tokenizer.chat_template


def has_kanana_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_id(t) is not None for t in (START_HEADER, END_HEADER, EOT, EOM))


def _hf_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers' templates expect them: tool-call arguments as objects, not JSON text."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                try:
                    arguments = json.loads(c["function"]["arguments"])
                except ValueError:
                    arguments = c["function"]["arguments"]
                calls.append({"id": c.get("id"), "type": "function",
                              "function": {"name": c["function"]["name"], "arguments": arguments}})
            m["tool_calls"] = calls
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def render_prompt(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                  add_generation_prompt: bool = True) -> str:
    """The prompt for a conversation. Without tools in play, the model's own template. With tools (or tool
    calls and results in the history): the model's template if it takes tools (passing `tools` in OpenAI's
    shape, as transformers does), else Kanana-1.5's format, which needs Kanana's (Llama-3's) special tokens."""
    in_play = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not in_play:
        return tokenizer.apply_chat_template(_hf_messages(messages), add_generation_prompt)
    if template_takes_tools(tokenizer):
        return tokenizer.apply_chat_template(_hf_messages(messages), add_generation_prompt,
                                             tools=[{"type": "function", "function": t} for t in tools or []])
    if not has_kanana_tokens(tokenizer):
        raise KananaQuantError("this model's chat template does not take tools and its tokenizer lacks Kanana's "
                               "special tokens for the Kanana tool format; tools cannot be used with it")
    return render_kanana(messages, tools or [], add_generation_prompt)


# ---------------------------------------------------------------------------------------------------------
# The grammar of a reply when tools are offered (llguidance's Lark dialect, runtimes.grammar)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_grammar(tools: list[dict], choice: str | None = "auto", parallel: bool = True,
                 python_tag: bool = False) -> str:
    """A Lark grammar for the reply. `choice`: "auto" (text, calls, or text then calls; once `<function`
    appears it must become a whole, schema-valid call), "required" (one or more calls, nothing else) or a
    tool's name (exactly one call of it). `parallel` False allows at most one call. `python_tag`: the
    tokenizer has `<|python_tag|>`, so a "python" tool's calls are code after it."""
    from kanana_quant.runtimes.grammar import inline_json  # llguidance: only servers need it

    parallel = parallel and choice in ("auto", "required")  # a named tool is called once
    lines = ["%llguidance {}"]
    fns, python = [], False
    for i, tool in enumerate(tools):
        if tool["name"] == PYTHON_TOOL and python_tag:
            python = True
            continue
        if choice not in ("auto", "required") and tool["name"] != choice:
            continue
        schema = tool.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        lines.append(f"fn_{i}: {_literal(CALL_OPEN + tool['name'] + '>')} {inline_json(schema)} "
                     f"{_literal(CALL_CLOSE)}")
        fns.append(f"fn_{i}")
    if python and choice in ("auto", "required", PYTHON_TOOL):
        lines.append(f"python_call: {PYTHON_TAG} CODE")
        lines.append("CODE: /(?s:.*)/")
    else:
        python = False
    alternatives = []
    if fns:
        lines.append(f"fn: {' | '.join(fns)}")
        alternatives.append("fn+" if parallel else "fn")
        if python and parallel:
            alternatives.append("fn+ python_call")
    if python:
        alternatives.append("python_call")
    if not alternatives:
        raise KananaQuantError(f"tool_choice names {choice!r}, which is not among the tools")
    lines.append(f"calls: {' | '.join(alternatives)}")
    if choice == "auto":
        # Text that never contains "<function": once the model writes it, only a valid call can follow.
        lines.append("start: TEXT? calls?")
        lines.append(f"TEXT: /(?s:.+)/ & ~/(?s:.*){CALL_OPEN[:-1]}(?s:.*)/")
    else:
        lines.append("start: calls")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Parsing generated text into content and calls


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArguments:
    index: int
    text: str


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _JsonExtent:
    """Finds where a JSON object ends in text arriving piece by piece (brackets outside strings)."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.started = 0, False, False, False

    def feed(self, text: str) -> int | None:
        """Characters of `text` up to and including the closing bracket, or None if it has not closed."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.started and self.depth == 0:
                    return i + 1
        return None


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Splits generated text into content and calls as it arrives. `feed` takes decoded text (special
    tokens dropped), `python_tag` marks the `<|python_tag|>` token; each returns the events now certain.
    Text that could still turn into a call marker is held back until it is decided."""

    MAX_NAME = 64

    def __init__(self):
        self.state, self.buf, self.calls = "text", "", []  # calls: [{"id", "name", "arguments"}]
        self._extent = _JsonExtent()

    def feed(self, text: str) -> list:
        self.buf += text
        events: list = []
        steps = {"text": self._on_text, "name": self._on_name, "arguments": self._on_arguments,
                 "close": self._on_close, "code": self._on_code}
        while self.state in steps:
            before = (self.state, len(self.buf))
            steps[self.state](events)
            if (self.state, len(self.buf)) == before:
                break
        return events

    def python_tag(self) -> list:
        events: list = []
        if self.state in ("text", "close") and self.buf:
            events.append(Content(self.buf))  # a held-back partial marker was text
        self.buf = ""
        events += self._start(PYTHON_TOOL)
        self.state = "code"
        events += self._arguments('{"code": "')
        return events

    def finish(self) -> list:
        """Events for whatever is still held back when generation ends."""
        events: list = []
        if self.state == "code":
            events += self._arguments('"}')
        elif self.state == "text" and self.buf:
            events.append(Content(self.buf))
        # state "name": a call cut off inside its name (max_tokens) has nothing to report
        elif self.state == "close" and self.buf:
            events.append(Content(self.buf))
        self.buf, self.state = "", "done"
        return events

    def _start(self, name: str) -> list:
        call = {"id": new_call_id(), "name": name, "arguments": ""}
        self.calls.append(call)
        return [CallStart(len(self.calls) - 1, call["id"], name)]

    def _arguments(self, text: str) -> list:
        if not text:
            return []
        self.calls[-1]["arguments"] += text
        return [CallArguments(len(self.calls) - 1, text)]

    def _on_text(self, events: list) -> None:
        at = self.buf.find(CALL_OPEN)
        if at >= 0:
            if at:
                events.append(Content(self.buf[:at]))
            self.buf, self.state = self.buf[at + len(CALL_OPEN):], "name"
            return
        keep = _held_prefix(self.buf, CALL_OPEN)
        if len(self.buf) > keep:
            events.append(Content(self.buf[:len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep:]

    def _on_name(self, events: list) -> None:
        at = self.buf.find(">")
        if at < 0:
            if len(self.buf) > self.MAX_NAME:  # not a call after all
                events.append(Content(CALL_OPEN + self.buf))
                self.buf, self.state = "", "text"
            return
        events += self._start(self.buf[:at])
        self.buf, self.state, self._extent = self.buf[at + 1:], "arguments", _JsonExtent()

    def _on_arguments(self, events: list) -> None:
        end = self._extent.feed(self.buf)
        if end is None:
            events += self._arguments(self.buf)
            self.buf = ""
            return
        events += self._arguments(self.buf[:end])
        self.buf, self.state = self.buf[end:], "close"

    def _on_close(self, events: list) -> None:
        if self.buf.startswith(CALL_CLOSE):
            self.buf, self.state = self.buf[len(CALL_CLOSE):], "text"
        elif not CALL_CLOSE.startswith(self.buf):
            self.state = "text"  # a call without its closing tag: what follows is text

    def _on_code(self, events: list) -> None:
        if self.buf:
            events += self._arguments(json.dumps(self.buf, ensure_ascii=False)[1:-1])
            self.buf = ""


def parse_reply(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a whole reply in Kanana's format."""
    parser = ToolCallParser()
    events = parser.feed(text) + parser.finish()
    return "".join(e.text for e in events if isinstance(e, Content)), parser.calls
