"""Reading an assistant turn back: reasoning, content and DSML tool calls, whole or while streaming.

One state machine serves both: ``parse_completion`` feeds the whole text at once, so the streamed
pieces of any fragmentation concatenate to exactly what ``parse_completion`` returns.

It is tolerant where the checkpoint's own parser asserts (spec/serving.md §5, §8 items 7-8): it never
raises, and DSML markup never reaches ``content`` or ``arguments``. Any ``<｜DSML｜`` ends the text
(reasoning or content) and starts the tool region; inside it only complete ``invoke`` elements count.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .encoding import DSML, EOS, INVOKE_END, THINK_END, THINK_START, to_json

DSML_START = f"<{DSML}"
_TOOL_PREFIX = f"\n\n{DSML_START}"  # the blank line before the tool block belongs to neither text
_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*?){re.escape(INVOKE_END)}', re.S)
_PARAMETER = re.compile(rf'<{DSML}parameter name="([^"]*)"(?: string="(true|false)")?>(.*?)</{DSML}parameter>', re.S)

_REASONING, _CONTENT, _TOOLS, _DONE = "reasoning", "content", "tools", "done"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as a string, as OpenAI's tool_calls[].function.arguments


@dataclass
class ParsedMessage:
    reasoning: str | None  # None in chat mode; a string (maybe "") in thinking mode
    content: str
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    index: int  # position among this turn's tool calls, from 0
    id: str
    name: str
    arguments: str  # the complete arguments JSON: each call is emitted once, whole


@dataclass
class DeltaMessage:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _invoke_arguments(body: str) -> str:
    """The parameters of one invoke as a JSON object string (``string="false"`` values parsed as JSON)."""
    args = {}
    for name, is_string, value in _PARAMETER.findall(body):
        if is_string == "true":
            args[name] = value
            continue
        try:
            args[name] = json.loads(value)
        except json.JSONDecodeError:
            args[name] = value  # the model wrote invalid JSON: keep its text rather than lose the parameter
    return to_json(args)


def _held_tail(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``buf`` that could still grow into one of ``markers``."""
    for k in range(min(len(buf), max(map(len, markers))), 0, -1):
        tail = buf[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class StreamingParser:
    """Feed detokenised text of one assistant turn in any fragments; get reasoning/content/tool-call deltas.

    A tail that could still become ``</think>``, ``␤␤<｜DSML｜…`` or EOS is held back until decided.
    Tool calls are emitted whole when their ``</｜DSML｜invoke>`` arrives. In thinking mode reasoning
    ends at ``</think>`` or at the first DSML markup (the model may open tool calls without ``</think>``).
    """

    def __init__(self, *, thinking: bool = True):
        self._state = _REASONING if thinking else _CONTENT
        self._at_start = thinking  # a leading "<think>" (the prompt already has one) is dropped
        self._buf = ""
        self._calls: list[ToolCallDelta] = []

    @property
    def tool_calls_seen(self) -> bool:
        return bool(self._calls)

    def feed(self, delta_text: str) -> DeltaMessage | None:
        """Take the next piece of text; return what became certain, or None if nothing did."""
        self._buf += delta_text
        out = DeltaMessage()
        while self._step(out):
            pass
        return self._result(out)

    def finish(self) -> DeltaMessage | None:
        """End of generation: flush the held-back tail (dropped if it is partial special-token markup)."""
        out = DeltaMessage()
        self._at_start = False
        while self._step(out):
            pass
        # What is still held is only the start of a marker; a cut-off "<｜DSML｜…" or EOS is markup,
        # not text, so it is dropped (a lone "\n" or "</thi" is text and goes out).
        if self._state in (_REASONING, _CONTENT) and "<｜" not in self._buf:
            self._emit(out, self._buf)
        self._buf, self._state = "", _DONE
        return self._result(out)

    # -- internals

    def _step(self, out: DeltaMessage) -> bool:
        """Consume what can be decided now; True if the state changed and another step may progress."""
        if self._state == _DONE:
            self._buf = ""
            return False
        if self._state == _TOOLS:
            return self._step_tools(out)
        if self._at_start:
            if THINK_START.startswith(self._buf) and len(self._buf) < len(THINK_START):
                return False  # might still be "<think>"
            self._at_start = False
            if self._buf.startswith(THINK_START):
                self._buf = self._buf[len(THINK_START):]
        ends = {EOS: _DONE, DSML_START: _TOOLS}
        if self._state == _REASONING:
            ends[THINK_END] = _CONTENT
        found = [(self._buf.find(m), m) for m in ends if m in self._buf]
        if found:
            at, marker = min(found)
            text = self._buf[:at]
            if marker == DSML_START and text.endswith("\n\n"):
                text = text[:-2]
            self._emit(out, text)
            self._state = ends[marker]
            # DSML markup stays in the buffer for the tool region; other markers are consumed.
            self._buf = self._buf[at:] if marker == DSML_START else self._buf[at + len(marker):]
            return True
        keep = _held_tail(self._buf, (*ends, _TOOL_PREFIX))
        self._emit(out, self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _step_tools(self, out: DeltaMessage) -> bool:
        eos = self._buf.find(EOS)
        if eos >= 0:
            self._buf = self._buf[:eos]
        done = 0  # end of the last complete invoke: what lies before it is spent
        for match in _INVOKE.finditer(self._buf):
            call = ToolCallDelta(
                len(self._calls), new_tool_call_id(), match.group(1), _invoke_arguments(match.group(2))
            )
            self._calls.append(call)
            out.tool_calls.append(call)
            done = match.end()
        self._buf = self._buf[done:]
        if eos >= 0:
            self._buf, self._state = "", _DONE
        return False

    def _emit(self, out: DeltaMessage, text: str) -> None:
        if not text:
            return
        if self._state == _REASONING:
            out.reasoning = (out.reasoning or "") + text
        else:
            out.content = (out.content or "") + text

    @staticmethod
    def _result(out: DeltaMessage) -> DeltaMessage | None:
        return out if (out.reasoning or out.content or out.tool_calls) else None


def parse_completion(text: str, *, thinking: bool = True) -> ParsedMessage:
    """Split one assistant turn's text into reasoning, content and tool calls; never raises.

    Thinking mode: reasoning is the text up to ``</think>`` or the first DSML markup; with neither
    (generation cut off) all of it is reasoning and content is "". Chat mode: reasoning is None.
    Content runs up to EOS or the tool block (the blank line before it dropped). Only complete
    ``invoke`` elements become tool calls; incomplete trailing markup is dropped."""
    parser = StreamingParser(thinking=thinking)
    reasoning, content, calls = [], [], []
    for delta in (parser.feed(text), parser.finish()):
        if delta is not None:
            reasoning.append(delta.reasoning or "")
            content.append(delta.content or "")
            calls += [ToolCall(c.id, c.name, c.arguments) for c in delta.tool_calls]
    return ParsedMessage("".join(reasoning) if thinking else None, "".join(content), calls)
