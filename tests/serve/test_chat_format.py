"""V4 prompt rendering against prompts derived by hand from spec/serving.md Appendix A.

Every expected string below is written out from the Appendix A rules (the tools section and the "max"
preamble are the Appendix A text with ␤ -> newline and DSML -> ｜DSML｜), never from our own output.
"""

import pytest

from v4.chat import ChatFormatError, encode_messages, load_chat_template, render_jinja
from v4.errors import InputError

B = "<｜begin▁of▁sentence｜>"
E = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"

# Appendix A, the tools section around `{tool_schemas}` (ends with one newline after "tool calls.").
TOOLS_HEAD = (
    "## Tools\n"
    "\n"
    "You have access to a set of tools to help answer the user's question. "
    "You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n"
    "\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n"
    "\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, "
    "arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n"
    "\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n"
    "\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n"
    "\n"
    "### Available Tool Schemas\n"
    "\n"
)
TOOLS_TAIL = (
    "\n"
    "\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
MAX_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n"
    "\n"
)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Wetter für eine Stadt",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# One JSON object per line, default separators, non-ASCII kept (ü stays ü).
WEATHER_JSON = ('{"name": "get_weather", "description": "Wetter für eine Stadt", "parameters": {"type": "object", '
                '"properties": {"city": {"type": "string"}}, "required": ["city"]}}')
TOOLS = TOOLS_HEAD + WEATHER_JSON + TOOLS_TAIL


def dsml_call(name, *params):
    """One invoke exactly as Appendix A spells it; params are (key, string_flag, value_text)."""
    lines = [f'<｜DSML｜parameter name="{k}" string="{s}">{v}</｜DSML｜parameter>' for k, s, v in params]
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(lines) + "\n</｜DSML｜invoke>"


def test_tools_section_text_is_the_appendix_text():
    assert TOOLS_HEAD.startswith("## Tools\n\nYou have access")
    assert TOOLS_TAIL.endswith("invoke tool calls.\n") and not TOOLS_TAIL.endswith("\n\n")


def test_chat_mode_single_turn():
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs, thinking=False) == B + "You are helpful." + U + "Hi" + A + "</think>"


def test_thinking_mode_single_turn():
    assert encode_messages([{"role": "user", "content": "Hi"}]) == B + U + "Hi" + A + "<think>"


def test_no_generation_prompt():
    assert encode_messages([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == B + U + "Hi"


def test_trailing_assistant_is_rendered_whole_without_generation_prompt():
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Ans", "reasoning_content": "R"}]
    # The assistant comes after the last user message, so its reasoning is kept.
    assert encode_messages(msgs) == B + U + "Q" + A + "<think>" + "R</think>Ans" + E


MULTI = [
    {"role": "system", "content": "S"},
    {"role": "developer", "content": "dev note"},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
    {"role": "user", "content": "Q2"},
]


def test_multi_turn_thinking_drops_old_reasoning_and_developer():
    # drop_thinking on: the developer turn and R1 come before the last user message and go; the first
    # user turn therefore gets "</think>" after <｜Assistant｜>, and the assistant turn no thinking part.
    expected = B + "S" + U + "Q1" + A + "</think>" + "A1" + E + U + "Q2" + A + "<think>"
    assert encode_messages(MULTI) == expected


def test_reasoning_key_is_accepted_like_reasoning_content():
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Ans", "reasoning": "R"}]
    assert encode_messages(msgs) == B + U + "Q" + A + "<think>" + "R</think>Ans" + E


def test_multi_turn_chat_mode_keeps_developer_and_has_no_thinking_part():
    expected = (B + "S" + U + "dev note" + U + "Q1" + A + "</think>" + "A1" + E
                + U + "Q2" + A + "</think>")
    assert encode_messages(MULTI, thinking=False) == expected


def test_multi_turn_with_tools_keeps_reasoning_and_developer():
    # Tools turn drop_thinking off: everything kept, every user turn opens with <think>.
    expected = (B + "S" + "\n\n" + TOOLS + U + "dev note" + U + "Q1" + A + "<think>" + "R1</think>A1" + E
                + U + "Q2" + A + "<think>")
    assert encode_messages(MULTI, tools=[WEATHER]) == expected


TOOL_FLOW = [
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need both.",
        "tool_calls": [
            {
                "id": "call_p",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
            },
            {
                "id": "call_t",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Tokyo", "units": ["C", "F"]}'},
            },
        ],
    },
    # results arrive in the other order: the encoding puts them back in call order
    {"role": "tool", "tool_call_id": "call_t", "content": "Tokyo: 18C"},
    {"role": "tool", "tool_call_id": "call_p", "content": [{"type": "text", "text": "Paris: 21C"}]},
]
CALLS = ("\n\n<｜DSML｜tool_calls>\n"
         + dsml_call("get_weather", ("city", "true", "Paris"), ("days", "false", "3")) + "\n"
         + dsml_call("get_weather", ("city", "true", "Tokyo"), ("units", "false", '["C", "F"]'))
         + "\n</｜DSML｜tool_calls>")
RESULTS = "<tool_result>Paris: 21C</tool_result>\n\n<tool_result>Tokyo: 18C</tool_result>"


def test_tool_calls_and_results_with_tools():
    # No system message: an empty one carries the tools ("" + "\n\n" + section). The tool messages
    # become one user turn; reasoning is kept because tools are present.
    expected = (B + "\n\n" + TOOLS + U + "Weather in Paris and Tokyo?" + A + "<think>"
                + "Need both.</think>" + CALLS + E + U + RESULTS + A + "<think>")
    assert encode_messages(TOOL_FLOW, tools=[WEATHER]) == expected


def test_user_text_after_tool_results_joins_their_turn():
    msgs = TOOL_FLOW + [{"role": "user", "content": "Which is warmer?"}]
    expected = (B + "\n\n" + TOOLS + U + "Weather in Paris and Tokyo?" + A + "<think>"
                + "Need both.</think>" + CALLS + E + U + RESULTS + "\n\nWhich is warmer?" + A + "<think>")
    assert encode_messages(msgs, tools=[WEATHER]) == expected


def test_tool_flow_without_tools_drops_reasoning_before_the_results_turn():
    # No request tools: drop_thinking stays on, and the merged tool-result turn is the last user turn.
    expected = (B + U + "Weather in Paris and Tokyo?" + A + "</think>" + CALLS + E + U + RESULTS + A + "<think>")
    assert encode_messages(TOOL_FLOW) == expected


def test_arguments_that_are_not_an_object_become_one_parameter():
    msgs = [{"role": "user", "content": "Q"},
            {"role": "assistant", "content": "ok", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]
    calls = "\n\n<｜DSML｜tool_calls>\n" + dsml_call("f", ("arguments", "false", "[1, 2]")) + "\n</｜DSML｜tool_calls>"
    assert encode_messages(msgs, thinking=False) == B + U + "Q" + A + "</think>" + "ok" + calls + E


def test_reasoning_effort_max_preamble():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs, reasoning_effort="max") == B + MAX_PREAMBLE + "S" + U + "Hi" + A + "<think>"


def test_reasoning_effort_max_in_chat_mode_has_no_preamble():
    msgs = [{"role": "user", "content": "Hi"}]
    assert encode_messages(msgs, thinking=False, reasoning_effort="max") == B + U + "Hi" + A + "</think>"


def test_reasoning_effort_high_and_none():
    msgs = [{"role": "user", "content": "Hi"}]
    assert encode_messages(msgs, reasoning_effort="high") == B + U + "Hi" + A + "<think>"
    assert encode_messages(msgs, reasoning_effort="none") == B + U + "Hi" + A + "</think>"  # none = chat mode


def test_system_content_parts_join_with_blank_line():
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
        {"role": "user", "content": "Hi"},
    ]
    assert encode_messages(msgs) == B + "Part one.\n\nPart two." + U + "Hi" + A + "<think>"


@pytest.mark.parametrize(
    "messages, kwargs, field",
    [
        ([], {}, "messages"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], {}, "messages[1].role"),
        ([{"role": "user", "content": "a"}], {"reasoning_effort": "medium"}, "reasoning_effort"),
        ([{"role": "user", "content": 5}], {}, "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
            {},
            "messages[0].content[1]",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}],
            {},
            "messages[1].tool_call_id",
        ),
        (TOOL_FLOW[:2] + [{"role": "tool", "tool_call_id": "call_x", "content": "r"}], {}, "messages[2].tool_call_id"),
    ],
)
def test_errors_name_the_field(messages, kwargs, field):
    with pytest.raises(ChatFormatError) as err:
        encode_messages(messages, **kwargs)
    assert str(err.value).startswith(field)
    assert isinstance(err.value, InputError)


def test_bad_role_message_lists_the_roles():
    with pytest.raises(
        ChatFormatError,
        match=r"messages\[0\]\.role must be one of system, developer, user, assistant, tool, got 'robot'",
    ):
        encode_messages([{"role": "robot", "content": "x"}])


TEMPLATE = """{% for m in messages %}
{{ m.role }}: {{ m.content }}
{% endfor %}
{% if add_generation_prompt %}assistant:{% endif %}
"""


def test_jinja_renders_with_trim_and_lstrip_blocks():
    msgs = [{"role": "user", "content": "Hi"}]
    # trim_blocks eats the newline after each block tag; the trailing newline is dropped.
    assert render_jinja(TEMPLATE, msgs) == "user: Hi\nassistant:"
    assert render_jinja(TEMPLATE, msgs, add_generation_prompt=False) == "user: Hi\n"
    assert render_jinja("{{ bos_token }}{{ flag }}", msgs, bos_token="<s>", flag=1) == "<s>1"


def test_jinja_errors_are_chat_format_errors():
    with pytest.raises(ChatFormatError, match="^chat_template: no system role"):
        render_jinja("{{ raise_exception('no system role') }}", [])
    with pytest.raises(ChatFormatError, match="^chat_template: "):
        render_jinja("{% for %}", [])


def test_load_chat_template(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "T"}')
    assert load_chat_template(tmp_path) == "T"
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "D"}]}')
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 1}')
    assert load_chat_template(tmp_path) is None
