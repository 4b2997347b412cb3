"""The TeleChat2 chat template (text and exact ids on the tiny tokenizer), fine-tuning labels, and the
tool-call parser."""
import json
import os
import re

import pytest

from telechat2.tokenizer import (DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, TeleChat2Tokenizer, TemplateError,
                                 ToolCall, ToolCallError, parse_tool_calls, render, render_segments)
from telechat2.tokenizer.template import TOOLS_HEAD, TOOLS_TAIL

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "cpu", "tokenizer", "tokenizer.model")

TOOLS = [{"name": "get_weather", "description": "Get today's weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Beijing?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Beijing"}}]},
    {"role": "tool", "content": '{"condition": "sunny", "high": 25}'},
    {"role": "assistant", "content": "It is sunny, 25 °C."},
    {"role": "user", "content": "谢谢！"},
]
TOOL_JSON = ('{"name": "get_weather", "description": "Get today\'s weather for a city", "parameters": '
             '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}')
RENDERED = (
    "<_system>You are a helpful assistant.\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,"
    "以下是可用工具详情：\n<tools>\n" + TOOL_JSON + "\n</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，"
    "并用<tool_call></tool_call>包含。下方是一个调用模板：\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>\n\n"
    "<_user>What's the weather in Beijing?"
    "<_bot><tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Beijing\"}}\n</tool_call><_end>\n"
    "<_user><tool_response>\n{\"condition\": \"sunny\", \"high\": 25}\n</tool_response>"
    "<_bot>It is sunny, 25 °C.<_end>\n"
    "<_user>谢谢！<_bot>"
)
# the ids of RENDERED on configs/cpu/tokenizer/tokenizer.model (175 ids)
RENDERED_IDS = [
    6, 669, 590, 308, 744, 680, 767, 516, 3558, 518, 3595, 311, 493, 311, 3592, 524, 532, 3563, 529, 504, 311, 506,
    305, 270, 269, 465, 3623, 461, 277, 269, 449, 270, 269, 593, 423, 3669, 3553, 549, 548, 308, 596, 277, 269, 447,
    270, 280, 302, 270, 269, 338, 277, 269, 448, 270, 280, 325, 270, 280, 302, 270, 269, 418, 436, 269, 446, 270, 435,
    325, 2820, 492, 311, 505, 517, 3558, 530, 3577, 478, 388, 531, 3577, 483, 9, 10, 494, 3575, 528, 2279, 9, 327, 305,
    270, 384, 316, 3606, 305, 473, 269, 399, 270, 384, 507, 3606, 388, 3606, 338, 474, 3558, 10, 3546, 326, 4, 571,
    3669, 3553, 538, 549, 415, 880, 3667, 5, 9, 327, 305, 270, 269, 465, 3623, 461, 277, 269, 399, 270, 280, 325, 270,
    269, 1148, 349, 3558, 10, 2, 1962, 4, 11, 327, 632, 270, 269, 1141, 277, 269, 630, 270, 3546, 3574, 3591, 1959, 12,
    5, 2553, 312, 1147, 3563, 3546, 3574, 3591, 694, 3599, 3589, 2, 1962, 4, 992, 3727, 5,
]


@pytest.fixture(scope="module")
def tok():
    return TeleChat2Tokenizer(TINY)


def test_system_multiturn_tools_text_and_exact_ids(tok):
    assert tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False) == RENDERED
    assert tok.apply_chat_template(CONVERSATION, tools=TOOLS) == RENDERED_IDS


def test_ids_follow_the_chunk_rule(tok):
    """The same ids built by hand: special ids, and SentencePiece on each text chunk between them."""
    sp = tok.sp.encode
    expected = (
        [6] + sp("You are a helpful assistant.\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,"
                 "以下是可用工具详情：\n<tools>\n" + TOOL_JSON + "\n</tools>\n\n# 调用方法\n你需要遵循工具的要求，"
                 "使用json格式返回工具名称及参数，并用")
        + [9, 10] + sp("包含。下方是一个调用模板：\n") + [9]
        + sp("\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n") + [10] + sp("\n\n")
        + [4] + sp("What's the weather in Beijing?") + [5, 9]
        + sp("\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Beijing\"}}\n") + [10, 2] + sp("\n")
        + [4, 11] + sp("\n{\"condition\": \"sunny\", \"high\": 25}\n") + [12]
        + [5] + sp("It is sunny, 25 °C.") + [2] + sp("\n") + [4] + sp("谢谢！") + [5]
    )
    assert expected == RENDERED_IDS
    assert not any(i == 1 for i in RENDERED_IDS)           # no BOS anywhere


def test_default_system_prompt_and_generation_prompt(tok):
    msgs = [{"role": "user", "content": "1 + 2 = ?"}, {"role": "bot", "content": "1 + 2 = 3."},
            {"role": "user", "content": "你好"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<_system>" + DEFAULT_SYSTEM_PROMPT + "\n<_user>1 + 2 = ?<_bot>1 + 2 = 3.<_end>\n<_user>你好<_bot>")
    assert DEFAULT_SYSTEM_PROMPT.startswith("你是中国电信星辰语义大模型，英文名是TeleChat")
    assert tok.apply_chat_template(msgs) == [
        6, 379, 3577, 374, 342, 3577, 378, 377, 364, 3639, 341, 3640, 363, 578, 4, 3546, 3573, 464, 3546, 3574, 294,
        3546, 3667, 5, 3546, 3573, 464, 3546, 3574, 294, 3546, 3584, 3589, 2, 1962, 4, 765, 5]
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False).endswith("<_bot>")
    # "bot" and "assistant" are the same role
    same = [dict(m, role="assistant") if m["role"] == "bot" else m for m in msgs]
    assert render(same) == text
    # with tools and no system message the default prompt heads the tools block
    assert render(msgs, tools=TOOLS).startswith("<_system>" + DEFAULT_SYSTEM_PROMPT + TOOLS_HEAD + TOOL_JSON + "\n"
                                                + TOOLS_TAIL + "<_user>")


def test_tool_calls_and_responses_layout():
    msgs = [{"role": "user", "content": "Beijing and Paris?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"name": "get_weather", "arguments": {"city": "北京"}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny"}, {"role": "tool", "content": {"condition": "rainy"}},
            {"role": "assistant", "content": "Sunny and rainy."}]
    text = render(msgs, add_generation_prompt=False)
    assert text.endswith(
        '<_user>Beijing and Paris?<_bot>Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><_end>\n'
        '<_user><tool_response>\nsunny\n</tool_response>\n<tool_response>\n{"condition": "rainy"}\n</tool_response>'
        '<_bot>Sunny and rainy.<_end>\n')


def test_labels_mask_exactly_the_non_assistant_tokens(tok):
    ids, labels = tok.encode_chat_with_labels(CONVERSATION, TOOLS)
    assert ids == tok.apply_chat_template(CONVERSATION, TOOLS, add_generation_prompt=False)
    assert len(labels) == len(ids)
    learned = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in learned)
    # learned runs are exactly each assistant turn after its <_bot>, up to and including its <_end>
    runs, start = [], None
    for i in range(len(ids) + 1):
        on = i < len(ids) and labels[i] != IGNORE_INDEX
        if on and start is None:
            start = i
        if not on and start is not None:
            runs.append((start, i))
            start = None
    assert [tok.decode(ids[a:b]) for a, b in runs] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Beijing"}}\n</tool_call><_end>',
        "It is sunny, 25 °C.<_end>"]
    for a, b in runs:
        assert ids[a - 1] == 5 and ids[b - 1] == 2 and labels[b] == IGNORE_INDEX   # <_bot> and "\n" not learned
    # the tiny conversation of the other test: exact labels
    ids, labels = tok.encode_chat_with_labels([{"role": "user", "content": "1 + 2 = ?"},
                                               {"role": "bot", "content": "1 + 2 = 3."}])
    assert labels == [-100] * 24 + [3546, 3573, 464, 3546, 3574, 294, 3546, 3584, 3589, 2, -100]


def test_segments_cut_next_to_special_tokens():
    segs = render_segments(CONVERSATION, TOOLS, add_generation_prompt=False)
    assert "".join(t for t, _ in segs) == render(CONVERSATION, TOOLS, add_generation_prompt=False)
    assert [t for t, learned in segs if learned][1] == "It is sunny, 25 °C.<_end>"
    for (a, _), (b, _) in zip(segs, segs[1:]):
        assert a.endswith(("<_bot>", "<_end>")) or b.startswith("<_")


@pytest.mark.parametrize("msgs,reason,needle", [
    ([], "empty dialogue", "empty conversation"),
    ([{"content": "hi"}], "missing role", "message 0: missing 'role'"),
    ([{"role": "narrator", "content": "x"}], "unknown role", "message 0: unknown role 'narrator'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "misplaced system message",
     "message 1 (system): a system message is only allowed first"),
    ([{"role": "user"}], "missing content", "message 0 (user): missing 'content'"),
    ([{"role": "user", "content": 3}], "missing content", "'content' must be a string, got int"),
    ([{"role": "user", "content": "a", "tool_calls": [{"name": "f"}]}], "invalid tool call",
     "only assistant messages may carry tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"arguments": {}}]}], "invalid tool call", "tool call without a 'name'"),
    (["hi"], "invalid message", "message 0: expected an object"),
])
def test_bad_conversations(msgs, reason, needle):
    with pytest.raises(TemplateError, match=re.escape(needle)) as e:
        render(msgs)
    assert e.value.reason == reason


def test_tools_may_be_a_json_string_but_must_be_a_list():
    msgs = [{"role": "user", "content": "x"}]
    assert render(msgs, tools=json.dumps(TOOLS)) == render(msgs, tools=TOOLS)
    with pytest.raises(TemplateError, match="tools: expected a list"):
        render(msgs, tools={"name": "f"})


# ---- parser -------------------------------------------------------------------------------------------

def test_parser_round_trips_the_template():
    calls = [{"name": "get_weather", "arguments": {"city": "北京"}}, {"name": "calc", "arguments": {"x": [1, 2]}}]
    text = render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me check.",
                                                       "tool_calls": calls}], add_generation_prompt=False)
    reply = text.split("<_bot>", 1)[1].rstrip("\n")          # what the model generated, with its <_end>
    parsed = parse_tool_calls(reply)
    assert parsed.content == "Let me check."
    assert parsed.tool_calls == [ToolCall("get_weather", {"city": "北京"}), ToolCall("calc", {"x": [1, 2]})]


def test_parser_plain_text_and_string_arguments(tok):
    assert parse_tool_calls("Just an answer.<_end>").tool_calls == []
    assert parse_tool_calls("Just an answer.").content == "Just an answer."
    p = tok.parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call> done')
    assert p.tool_calls == [ToolCall("f", {"a": 1})] and p.content == " done"


@pytest.mark.parametrize("text,needle", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
     r"tool call 1: malformed JSON \(Expecting ',' delimiter"),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{name: "g"}</tool_call>',
     r"tool call 2: malformed JSON \(Expecting property name"),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n', r"tool call 1: '<tool_call>' at character 0 is never closed"),
    ('x</tool_call>', r"'</tool_call>' at character 1 without an opening"),
    ('<tool_call><tool_call>{}</tool_call>', r"tool call 1: a second '<tool_call>' opens"),
    ('<tool_call>["f", {}]</tool_call>', r"tool call 1: expected a JSON object, got list"),
    ('<tool_call>{"arguments": {}}</tool_call>', r"tool call 1: missing or empty 'name'"),
    ('<tool_call>{"name": "f"}</tool_call>', r"tool call 1 \(f\): missing 'arguments'"),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', r"tool call 1 \(f\): 'arguments' must be a JSON object"),
    ('<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>', r"tool call 1 \(f\): 'arguments' is a string but"),
])
def test_parser_rejects_malformed_calls(text, needle):
    with pytest.raises(ToolCallError, match=needle):
        parse_tool_calls(text)
