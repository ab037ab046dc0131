"""Reading V4 completions back (spec/serving.md Appendix A, §5, §8 items 7-8).

Expected values are written by hand from the completion texts. The streaming tests check that any
fragmentation of a text streams exactly what parse_completion returns, and that no DSML markup ever
reaches streamed content or arguments (the §5 leaks other servers had).
"""

import json
import random

import pytest

from v4.chat import StreamingParser, parse_completion

E = "<｜end▁of▁sentence｜>"


def param(name, string, value):
    return f'<｜DSML｜parameter name="{name}" string="{string}">{value}</｜DSML｜parameter>'


def invoke(name, *params):
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def block(*invokes):
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


WEATHER = invoke("get_weather", param("city", "true", "Paris"), param("days", "false", "3"))
SEARCH = invoke(
    "search", param("q", "true", 'café "best"'), param("filters", "false", '{"open": true, "tags": [1, 2]}')
)
WEATHER_ARGS = '{"city": "Paris", "days": 3}'
SEARCH_ARGS = '{"q": "café \\"best\\"", "filters": {"open": true, "tags": [1, 2]}}'

# (text, thinking, reasoning, content, [(name, arguments)]) — all written out by hand.
CASES = {
    "reasoning_content": ("Let me think.</think>The answer is 4." + E, True, "Let me think.", "The answer is 4.", []),
    "two_invokes": (
        "Need weather.</think>Checking." + block(WEATHER, SEARCH) + E,
        True,
        "Need weather.",
        "Checking.",
        [("get_weather", WEATHER_ARGS), ("search", SEARCH_ARGS)],
    ),
    "dsml_ends_reasoning": ("Plan.\n\nStep" + block(invoke("f", "")), True, "Plan.\n\nStep", "", [("f", "{}")]),
    "chat_mode": ("Hello there.\n\nBye." + E, False, None, "Hello there.\n\nBye.", []),
    "chat_mode_tools_only": (block(WEATHER) + E, False, None, "", [("get_weather", WEATHER_ARGS)]),
    "cut_mid_reasoning": ("I am still thinking about x < y and", True, "I am still thinking about x < y and", "", []),
    "cut_mid_dsml_invoke": (
        "r</think>Sure." + "\n\n<｜DSML｜tool_calls>\n" + WEATHER + "\n" + '<｜DSML｜invoke name="b">\n<｜DSML｜param',
        True,
        "r",
        "Sure.",
        [("get_weather", WEATHER_ARGS)],
    ),
    "cut_mid_parameter_value": (
        "r</think>Sure.\n\n<｜DSML｜tool_calls>\n"
        + '<｜DSML｜invoke name="b">\n'
        + '<｜DSML｜parameter name="x" string="true">1',
        True,
        "r",
        "Sure.",
        [],
    ),
    "cut_mid_start_tag": ("r</think>Sure.\n\n<｜DS", True, "r", "Sure.", []),
    "cut_mid_think_end": ("reasoning</thi", True, "reasoning</thi", "", []),
    "invalid_json_kept_as_string": (
        "</think>" + block(invoke("f", param("x", "false", "not json"))),
        True,
        "",
        "",
        [("f", '{"x": "not json"}')],
    ),
    "leading_think_tag": ("<think>r</think>c" + E, True, "r", "c", []),
    "text_after_eos_ignored": ("r</think>c" + E + "junk", True, "r", "c", []),
    "three_newlines_before_block": (
        "</think>c\n\n\n" + block(WEATHER)[2:],
        True,
        "",
        "c\n",
        [("get_weather", WEATHER_ARGS)],
    ),
    "bare_invoke_without_wrapper": (
        "</think>c" + invoke("f", param("a", "true", "x")),
        True,
        "",
        "c",
        [("f", '{"a": "x"}')],
    ),
    "content_with_lone_angle_brackets": (
        "</think>a < b and <tag> and \n\n<not dsml>",
        True,
        "",
        "a < b and <tag> and \n\n<not dsml>",
        [],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_parse_completion(name):
    text, thinking, reasoning, content, calls = CASES[name]
    parsed = parse_completion(text, thinking=thinking)
    assert parsed.reasoning == reasoning
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)
    assert len({c.id for c in parsed.tool_calls}) == len(calls)


def stream(text, pieces, thinking):
    """Feed ``pieces`` (which concatenate to ``text``); return the deltas (None answers dropped)."""
    assert "".join(pieces) == text
    parser = StreamingParser(thinking=thinking)
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    return parser, [d for d in deltas if d is not None]


def splits(text, seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def fragmentations(text):
    yield [text]
    yield list(text)  # one character at a time
    for seed in range(20):
        yield splits(text, seed)
    for at in range(1, len(text)):  # two pieces split at every position: inside every tag
        yield [text[:at], text[at:]]


def check_stream(text, pieces, thinking):
    expected = parse_completion(text, thinking=thinking)
    parser, deltas = stream(text, pieces, thinking)
    reasoning = "".join(d.reasoning or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    assert reasoning == (expected.reasoning or "")  # chat mode: no reasoning deltas at all
    assert content == expected.content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected.tool_calls]
    assert [c.index for c in calls] == list(range(len(calls)))
    assert parser.tool_calls_seen == bool(calls)
    for d in deltas:
        # §5: no DSML (or any fullwidth-bar special-token fragment) in streamed content or arguments;
        # arguments are always complete JSON objects.
        assert "｜" not in (d.content or "") and "<｜" not in (d.reasoning or "")
        for c in d.tool_calls:
            assert "｜" not in c.arguments and isinstance(json.loads(c.arguments), dict)


@pytest.mark.parametrize("name", CASES)
def test_streaming_matches_parse_completion(name):
    text, thinking = CASES[name][:2]
    for pieces in fragmentations(text):
        check_stream(text, pieces, thinking)


def test_streaming_holds_back_a_split_tag():
    p = StreamingParser()
    assert p.feed("abc</thi").reasoning == "abc"
    assert p.feed("nk>") is None
    assert p.feed("Hi\n").content == "Hi"  # the newline may still start "\n\n<｜DSML｜"
    assert p.feed("\n<｜DS") is None
    assert p.feed("ML｜tool_calls>\n" + WEATHER[:30]) is None
    assert not p.tool_calls_seen
    delta = p.feed(WEATHER[30:])
    assert [(c.index, c.name, c.arguments) for c in delta.tool_calls] == [(0, "get_weather", WEATHER_ARGS)]
    assert delta.content is None and p.tool_calls_seen
    assert p.feed("\n</｜DSML｜tool_calls>") is None
    assert p.feed("after the block: not content") is None
    assert p.finish() is None


def test_streaming_flushes_held_text_at_finish():
    p = StreamingParser(thinking=False)
    assert p.feed("x\n").content == "x"
    assert p.finish().content == "\n"
    p = StreamingParser(thinking=False)
    assert p.feed("x\n\n<｜DSML｜tool_ca").content == "x"
    assert p.finish() is None  # partial markup is dropped, never flushed into content


def test_tool_choice_none_style_leak_regression():
    # sglang#35736 / vllm#40801: DSML in the output must not surface as content, whole or streamed.
    text = "Let me call it." + block(SEARCH) + E
    for pieces in fragmentations(text):
        check_stream(text, pieces, False)
    assert parse_completion(text, thinking=False).content == "Let me call it."
