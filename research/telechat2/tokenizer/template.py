"""The TeleChat2 chat template (3B/7B/35B releases) and the parser of generated tool calls.

Rendered text, exactly as the release's template produces it (`S` = system text, default below):

    no tools:   <_system>S\\n
    tools:      <_system>S + TOOLS_HEAD + one JSON object per tool, each + "\\n" + TOOLS_TAIL
    user:       <_user>content
    assistant:  <_bot>content[<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call>[\\n<tool_call>...]]<_end>\\n
    tool:       <_user><tool_response>\\ncontent\\n</tool_response>       (first of a run of tool messages)
                \\n<tool_response>\\ncontent\\n</tool_response>            (the following ones)
    generation: <_bot>

There is no BOS. A system message is only allowed first; without one the default system prompt is used.
Assistant messages may also be written with role "bot" (the TeleChat2 SFT files do).

For training, `render_segments` returns the same text cut into pieces flagged `learned`: exactly the assistant
content, its tool calls and its `<_end>` are learned; `<_bot>`, the `\\n` after `<_end>` and everything else are
not. Every cut falls next to a special token, so encoding the pieces one by one gives the same ids as encoding
the whole string (the tokenizer encodes the text between special tokens chunk by chunk anyway).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import TeleChat2Error

# The wording below is the one the TeleChat2 releases ship (HF tokenizer_config chat template, MindFormers'
# research/telechat2 inference script, TeleChat2's own fine-tuning code). The released models were trained
# with it, so it is kept verbatim; change it here and nowhere else.
DEFAULT_SYSTEM_PROMPT = (
    "你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）"
    "研发的人工智能助手。"
)
# Follows the system text when tools are given; the tool list goes between the two parts.
TOOLS_HEAD = (
    "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,以下是可用工具详情：\n<tools>\n"
)
TOOLS_TAIL = (
    "</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
    "下方是一个调用模板：\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n"
)

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"bot": "assistant"}


class TemplateError(TeleChat2Error):
    """A conversation cannot be rendered (unknown role, missing content, ...); the message names the turn.

    `reason` is a short category ("unknown role", "missing content", ...) that preprocessing counts.
    """

    def __init__(self, message: str, reason: str = "invalid conversation"):
        super().__init__(message)
        self.reason = reason


class ToolCallError(TeleChat2Error):
    """Generated text holds a `<tool_call>` block that is not a valid call; the message names the block."""


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass
class ParsedReply:
    content: str                       # the text outside the <tool_call> blocks
    tool_calls: list[ToolCall]


# ---- rendering -------------------------------------------------------------------------------------

def _tojson(obj) -> str:
    # the HF template's `tojson`: json.dumps with ensure_ascii=False and default separators
    return json.dumps(obj, ensure_ascii=False)


def _tool_call_parts(call, where: str) -> tuple[str, str]:
    """(name, arguments JSON text) of one call; accepts {"name", "arguments"} or OpenAI's {"function": {...}}."""
    if not isinstance(call, dict):
        raise TemplateError(f"{where}: a tool call must be an object, got {type(call).__name__}", "invalid tool call")
    if isinstance(call.get("function"), dict):
        call = call["function"]
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise TemplateError(f"{where}: tool call without a 'name'", "invalid tool call")
    args = call.get("arguments", {})
    # a string is taken as JSON text already (the OpenAI API sends arguments that way); anything else is dumped
    return name, args if isinstance(args, str) else _tojson(args)


def normalize_messages(messages) -> list[dict]:
    """Validate a conversation and return it with canonical roles; raise TemplateError naming the turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("empty conversation: expected a non-empty list of messages", "empty dialogue")
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise TemplateError(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}",
                                "invalid message")
        if "role" not in m:
            raise TemplateError(f"{where}: missing 'role'", "missing role")
        role = ROLE_ALIASES.get(m["role"], m["role"])
        if role not in ROLES:
            raise TemplateError(f"{where}: unknown role {m['role']!r} (expected system, user, assistant/bot, tool)",
                                "unknown role")
        where = f"{where} ({m['role']})"
        if role == "system" and i != 0:
            raise TemplateError(f"{where}: a system message is only allowed first", "misplaced system message")
        content = m.get("content")
        tool_calls = m.get("tool_calls") or []
        if isinstance(tool_calls, str):       # TeleChat2 SFT files may carry them as a JSON string
            try:
                tool_calls = json.loads(tool_calls)
            except json.JSONDecodeError as e:
                raise TemplateError(f"{where}: 'tool_calls' is not valid JSON: {e.msg}", "invalid tool call") from None
        if tool_calls and role != "assistant":
            raise TemplateError(f"{where}: only assistant messages may carry tool_calls", "invalid tool call")
        if not isinstance(tool_calls, list):
            raise TemplateError(f"{where}: 'tool_calls' must be a list", "invalid tool call")
        if role == "tool" and not isinstance(content, str) and content is not None:
            content = _tojson(content)        # a structured tool result is sent as its JSON text
        if content is None and not (role == "assistant" and tool_calls):
            raise TemplateError(f"{where}: missing 'content'", "missing content")
        if content is not None and not isinstance(content, str):
            raise TemplateError(f"{where}: 'content' must be a string, got {type(content).__name__}", "missing content")
        calls = [_tool_call_parts(c, f"{where} tool call {k}") for k, c in enumerate(tool_calls)]
        out.append({"role": role, "content": content or "", "tool_calls": calls})
    return out


def _normalize_tools(tools) -> list:
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise TemplateError(f"tools: not valid JSON: {e.msg}", "invalid tools") from None
    if not isinstance(tools, list):
        raise TemplateError(f"tools: expected a list of tool descriptions, got {type(tools).__name__}",
                            "invalid tools")
    return tools


def render_segments(messages, tools=None, add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, learned) pieces; their concatenation is `render(...)`."""
    msgs = normalize_messages(messages)
    tools = _normalize_tools(tools) if tools else []
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else DEFAULT_SYSTEM_PROMPT
    if tools:
        head = "<_system>" + system + TOOLS_HEAD + "".join(_tojson(t) + "\n" for t in tools) + TOOLS_TAIL
    else:
        head = "<_system>" + system + "\n"
    segs: list[tuple[str, bool]] = [(head, False)]
    prev_role = None
    for m in msgs:
        role = m["role"]
        if role == "user":
            segs.append(("<_user>" + m["content"], False))
        elif role == "assistant":
            calls = "\n".join(f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'
                              for name, args in m["tool_calls"])
            segs.append(("<_bot>", False))
            segs.append((m["content"] + calls + "<_end>", True))
            segs.append(("\n", False))
        elif role == "tool":
            opening = "\n<tool_response>\n" if prev_role == "tool" else "<_user><tool_response>\n"
            segs.append((opening + m["content"] + "\n</tool_response>", False))
        prev_role = role
    if add_generation_prompt:
        segs.append(("<_bot>", False))
    # merge neighbours with the same flag so callers see few pieces
    merged: list[tuple[str, bool]] = []
    for text, learned in segs:
        if merged and merged[-1][1] == learned:
            merged[-1] = (merged[-1][0] + text, learned)
        else:
            merged.append((text, learned))
    return merged


def render(messages, tools=None, add_generation_prompt: bool = True) -> str:
    """The conversation as the model sees it (a string with special-token names)."""
    return "".join(text for text, _ in render_segments(messages, tools, add_generation_prompt))


# ---- parsing generated tool calls --------------------------------------------------------------------

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _snippet(s: str, n: int = 60) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[:n] + "...")


def parse_tool_calls(text: str) -> ParsedReply:
    """Split a generated reply into its text and its `<tool_call>` blocks.

    Each block must hold one JSON object `{"name": str, "arguments": object}` (arguments given as a string of
    JSON are decoded). A trailing `<_end>` is dropped; the `\\n` the template puts between consecutive blocks is
    not part of the content. Raises ToolCallError naming the block (1-based) for an unclosed block, a stray
    `</tool_call>`, malformed JSON, a missing name or arguments that are not an object.
    """
    if text.endswith("<_end>"):
        text = text[: -len("<_end>")]
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(_OPEN, pos)
        stray = text.find(_CLOSE, pos)
        if stray != -1 and (start == -1 or stray < start):
            raise ToolCallError(f"'</tool_call>' at character {stray} without an opening '<tool_call>'")
        if start == -1:
            rest = text[pos:]
            content.append(rest if not calls or rest.strip() else "")
            break
        between = text[pos:start]
        content.append(between if not calls or between.strip() else "")
        k = len(calls) + 1
        end = text.find(_CLOSE, start + len(_OPEN))
        if end == -1:
            raise ToolCallError(f"tool call {k}: '<tool_call>' at character {start} is never closed")
        body = text[start + len(_OPEN): end]
        if _OPEN in body:
            raise ToolCallError(f"tool call {k}: a second '<tool_call>' opens before '</tool_call>'")
        calls.append(_parse_call_body(body, k))
        pos = end + len(_CLOSE)
    return ParsedReply("".join(content), calls)


def _parse_call_body(body: str, k: int) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"tool call {k}: malformed JSON ({e.msg} at column {e.colno}): {_snippet(body)}") from None
    if not isinstance(obj, dict):
        raise ToolCallError(f"tool call {k}: expected a JSON object, got {type(obj).__name__}: {_snippet(body)}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallError(f"tool call {k}: missing or empty 'name': {_snippet(body)}")
    if "arguments" not in obj:
        raise ToolCallError(f"tool call {k} ({name}): missing 'arguments'")
    args = obj["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool call {k} ({name}): 'arguments' is a string but not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"tool call {k} ({name}): 'arguments' must be a JSON object, got {type(args).__name__}")
    return ToolCall(name, args)
