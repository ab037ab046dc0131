"""DeepSeek V4 prompt rendering: OpenAI chat messages -> the exact prompt text the model was trained on.

The format (spec/serving.md §6 and Appendix A, from the checkpoint's ``encoding_dsv4.py``) in short:
BOS, the system text raw, ``<｜User｜>…`` user turns, ``<｜Assistant｜>`` + ``<think>``/``</think>``,
assistant turns ``{reasoning}</think>{content}{DSML tool calls}`` + EOS. There is no tool role: tool
results merge into a user turn as ``<tool_result>`` blocks. We re-implement it from those rules.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InputError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
DSML = "｜DSML｜"
# Task tokens (internal classification tasks; OpenAI requests never set them, listed for completeness).
ACTION, QUERY, AUTHORITY, DOMAIN, TITLE, READ_URL = (
    "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>")

TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_END = f"</{DSML}parameter>"
TOOL_RESULT_START, TOOL_RESULT_END = "<tool_result>", "</tool_result>"

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = (None, "none", "high", "max")

MAX_EFFORT_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")

TOOLS_SECTION_TEMPLATE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")


class ChatFormatError(InputError):
    """A request's messages/tools cannot be rendered; the message names the field and what to do."""


def to_json(value: Any) -> str:
    """JSON as the format writes it: default separators, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- validation / normalisation


def _text(value: Any, where: str, *, allow_none: bool = False) -> str:
    """A message content as one string: a str, or OpenAI text parts joined by a blank line."""
    if value is None and allow_none:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(
                    f"{where}[{j}] must be a text part {{'type': 'text', 'text': str}}, got {kind!r}; "
                    "this model reads text only"
                )
            parts.append(part["text"])
        return "\n\n".join(parts)
    raise ChatFormatError(f"{where} must be a string or a list of text parts, got {type(value).__name__}")


def _arguments(raw: Any, where: str) -> dict:
    """OpenAI tool-call arguments (a JSON string, or an already-decoded object) as a parameter dict.

    Arguments that are not a JSON object become one parameter named ``arguments`` (Appendix A)."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ChatFormatError(f"{where} must be a JSON string, got {type(raw).__name__}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # not JSON at all: pass it on as a string parameter rather than refuse the history
    return value if isinstance(value, dict) else {"arguments": value}


def _tool_calls(raw: Any, i: int) -> list[dict]:
    """An assistant's OpenAI tool_calls as [{id, name, params}]."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ChatFormatError(f"messages[{i}].tool_calls must be a list, got {type(raw).__name__}")
    calls = []
    for k, call in enumerate(raw):
        where = f"messages[{i}].tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(
                f"{where}.function.name must be a string (OpenAI shape {{'id', 'type': 'function', 'function': "
                "{'name', 'arguments'}})"
            )
        calls.append({"id": call.get("id"), "name": fn["name"],
                      "params": _arguments(fn.get("arguments", "{}"), f"{where}.function.arguments")})
    return calls


def _normalise(messages: Any) -> list[dict]:
    """Validate OpenAI messages; return internal dicts {role, content, reasoning, tool_calls, tool_call_id}."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        msg = {
            "role": role,
            "content": _text(m.get("content"), f"messages[{i}].content", allow_none=role == "assistant"),
        }
        if role == "assistant":
            # OpenAI-style clients send `reasoning_content` (DeepSeek API) or `reasoning` (vLLM); same meaning.
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatFormatError(
                    f"messages[{i}].reasoning_content must be a string, got {type(reasoning).__name__}"
                )
            msg["reasoning"] = reasoning or ""
            msg["tool_calls"] = _tool_calls(m.get("tool_calls"), i)
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            msg["index"] = i
        out.append(msg)
    return out


def _merge_tool_messages(msgs: list[dict]) -> list[dict]:
    """Fold each run of tool messages (and a user message right after it) into one user message.

    Its content is the ``<tool_result>`` blocks in the order of the preceding assistant's tool calls
    (clients may send results in any order), then the user text, joined by a blank line."""
    out: list[dict] = []
    calls: list[dict] = []  # tool calls of the latest assistant message
    for msg in msgs:
        open_turn = out[-1] if out and "results" in out[-1] and not out[-1]["text"] else None
        if msg["role"] == "assistant":
            calls = msg["tool_calls"]
        if msg["role"] == "tool":
            order = [c["id"] for c in calls]
            if msg["tool_call_id"] not in order:
                raise ChatFormatError(
                    f"messages[{msg['index']}].tool_call_id {msg['tool_call_id']!r} matches no tool call of the "
                    "preceding assistant message; use the id from its tool_calls"
                )
            if open_turn is None:
                open_turn = {"role": "user", "results": [], "text": []}
                out.append(open_turn)
            open_turn["results"].append((order.index(msg["tool_call_id"]), msg["content"]))
        elif msg["role"] == "user" and open_turn is not None:
            open_turn["text"].append(msg["content"])
        else:
            out.append(msg)
    for msg in out:
        if "results" in msg:
            ordered = sorted(msg.pop("results"), key=lambda r: r[0])  # stable: equal ids keep arrival order
            blocks = [f"{TOOL_RESULT_START}{content}{TOOL_RESULT_END}" for _, content in ordered]
            msg["content"] = "\n\n".join(blocks + msg.pop("text"))
    return out


# ---------------------------------------------------------------- rendering


def tools_section(tools: list[dict]) -> str:
    """The "## Tools" section: the template with one JSON line per tool (its ``function`` object)."""
    return TOOLS_SECTION_TEMPLATE.replace("{tool_schemas}", "\n".join(to_json(t["function"]) for t in tools))


def _validate_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise ChatFormatError(
            f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {type(tools).__name__}"
        )
    for k, t in enumerate(tools):
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise ChatFormatError(
                f"tools[{k}] must be {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}"
            )
    return tools


def render_tool_calls(calls: list[dict]) -> str:
    """``␤␤<DSMLtool_calls>␤{invokes}␤</DSMLtool_calls>``; strings as is, other values as JSON."""
    invokes = []
    for call in calls:
        params = [
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else to_json(v)}{PARAMETER_END}"
            for key, v in call["params"].items()]
        invokes.append(f'<{DSML}invoke name="{call["name"]}">\n' + "\n".join(params) + f"\n{INVOKE_END}")
    return f"\n\n{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _render(msg: dict, *, keep_reasoning: bool, thinking: bool) -> str:
    role = msg["role"]
    extra = f"\n\n{tools_section(msg['tools'])}" if msg.get("tools") else ""
    if role == "system":
        return msg["content"] + extra
    if role == "developer":
        return USER + msg["content"] + extra
    if role == "user":
        return USER + msg["content"]
    thinking_part = f"{msg['reasoning']}{THINK_END}" if thinking and keep_reasoning else ""
    calls = render_tool_calls(msg["tool_calls"]) if msg["tool_calls"] else ""
    return thinking_part + msg["content"] + calls + EOS


def _last_user_index(msgs: list[dict]) -> int:
    # Developer turns render as <｜User｜> turns, so they count as user turns here.
    return max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)


def encode_messages(messages: list[dict], *, thinking: bool = True, reasoning_effort: str | None = None,
                    tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """Render OpenAI chat ``messages`` (and request-level ``tools``) as V4's prompt text, BOS first.

    - ``thinking``: thinking mode (generation prompt ``<｜Assistant｜><think>``) or chat mode (``…</think>``).
    - ``reasoning_effort``: None or "high" change nothing; "max" (thinking mode only) prefixes the first
      message with the Appendix A preamble; "none" means chat mode (as vLLM maps it): thinking is turned off.
    - ``tools`` attach to the first message if it is a system message, else to an empty system message
      inserted first; any tools turn ``drop_thinking`` off, so every assistant turn keeps its reasoning.
    - Without tools, in thinking mode, assistant turns before the last user turn lose their reasoning and
      developer turns before it are dropped.
    - ``add_generation_prompt``: append ``<｜Assistant｜>`` + ``<think>``/``</think>`` after a final user,
      developer or tool turn. A final assistant turn is rendered complete (with EOS) and nothing is
      appended, as the format's rules say; a final system message likewise gets nothing appended.
    """
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of none, high, max (or null), got {reasoning_effort!r}")
    if reasoning_effort == "none":
        thinking = False
    msgs = _merge_tool_messages(_normalise(messages))
    if tools:
        if msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": ""})
        msgs[0] = {**msgs[0], "tools": _validate_tools(tools)}
    drop_thinking = not tools
    if thinking and drop_thinking:
        last = _last_user_index(msgs)
        msgs = [m for i, m in enumerate(msgs) if not (m["role"] == "developer" and i < last)]
    last = _last_user_index(msgs)

    parts = [BOS]
    if thinking and reasoning_effort == "max":
        parts.append(MAX_EFFORT_PREAMBLE)
    for i, msg in enumerate(msgs):
        after_last_user = i >= last
        parts.append(_render(msg, keep_reasoning=not drop_thinking or after_last_user, thinking=thinking))
        nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        if msg["role"] in ("user", "developer") and (nxt == "assistant" or (nxt is None and add_generation_prompt)):
            think = thinking and (not drop_thinking or after_last_user)
            parts.append(ASSISTANT + (THINK_START if think else THINK_END))
    return "".join(parts)
