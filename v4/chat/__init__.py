"""DeepSeek V4 chat format: prompt rendering (``encode_messages``) and output parsing
(``parse_completion``, ``StreamingParser``), plus Jinja chat templates for other checkpoints."""

from .encoding import (ACTION, ASSISTANT, AUTHORITY, BOS, DOMAIN, DSML, EOS, LATEST_REMINDER,
                       MAX_EFFORT_PREAMBLE, QUERY, READ_URL, THINK_END, THINK_START, TITLE,
                       TOOL_CALLS_END, TOOL_CALLS_START, USER, ChatFormatError, encode_messages,
                       tools_section)
from .jinja import load_chat_template, render_jinja
from .parser import DeltaMessage, ParsedMessage, StreamingParser, ToolCall, ToolCallDelta, parse_completion

__all__ = [
    "ACTION", "ASSISTANT", "AUTHORITY", "BOS", "DOMAIN", "DSML", "EOS", "LATEST_REMINDER",
    "MAX_EFFORT_PREAMBLE", "QUERY", "READ_URL", "THINK_END", "THINK_START", "TITLE",
    "TOOL_CALLS_END", "TOOL_CALLS_START", "USER", "ChatFormatError", "encode_messages", "tools_section",
    "load_chat_template", "render_jinja",
    "DeltaMessage", "ParsedMessage", "StreamingParser", "ToolCall", "ToolCallDelta", "parse_completion",
]
