"""POST /v1/chat/completions: messages rendered in V4's chat format (v4.chat, serving.md §6 and
Appendix A), or with the checkpoint's Jinja template when it ships one; the output read back into
reasoning, content and tool calls, whole or while streaming, with no DSML markup leaking out.

The reasoning goes out under both `reasoning` (vLLM) and `reasoning_content` (SGLang, DeepSeek's
API), so clients of either work. Output is read in thinking mode exactly when the rendered
prompt ends with `<think>`, which holds for V4's format and for templates that copy it.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat import THINK_START, DeltaMessage, StreamingParser, encode_messages, parse_completion, render_jinja
from .errors import RequestError
from .openai_serving import OpenAIServing, request_id, sse, sse_error, usage
from .protocol import ChatCompletionRequest, TokenizeRequest, thinking_mode


class ChatServing(OpenAIServing):
    async def create(self, req: ChatCompletionRequest, raw: Request):
        arrival = time.monotonic()
        req.check_supported()
        if req.echo:
            raise RequestError("echo is not supported on chat completions; use /v1/completions", "echo")
        self.check_model(req.model)
        text = self.render(req.messages, req.tools, req.thinking, req.reasoning_effort, req.add_generation_prompt,
                           req.chat_template_kwargs)
        prompt_ids = self.check_ids(self.ctx.tokenizer.encode(text, add_bos=False), "messages")
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_tokens(req.max_completion_tokens if field == "max_completion_tokens" else req.max_tokens,
                                     len(prompt_ids), field)
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        stream = await self.submit(prompt_ids, params, arrival)
        out = _Reply(req, thinking=text.endswith(THINK_START), rid=request_id("chatcmpl"), created=int(time.time()),
                     model=self.ctx.model_name, n_prompt=len(prompt_ids))
        if req.stream:
            return StreamingResponse(self._stream(stream, out), media_type="text/event-stream")
        outs = await self.collect(stream, raw)
        parsed = parse_completion("".join(o.new_text for o in outs), thinking=out.thinking)
        calls = parsed.tool_calls if out.tools_on else []
        message = {"role": "assistant", "content": parsed.content if parsed.content or not calls else None}
        message.update(out.reasoning_fields(parsed.reasoning))
        message["tool_calls"] = [_tool_call(c.id, c.name, c.arguments) for c in calls]
        lps = [lp for o in outs for lp in (o.logprobs or [])]
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(lps) if req.logprobs else None,
                  "finish_reason": out.finish_reason(outs[-1].finish_reason, bool(calls)), "stop_reason": None}
        return JSONResponse(
            {
                "id": out.rid,
                "object": "chat.completion",
                "created": out.created,
                "model": out.model,
                "choices": [choice],
                "usage": usage(out.n_prompt, sum(len(o.new_token_ids) for o in outs)),
            }
        )

    def render(self, messages, tools, thinking: bool, effort: str | None, add_generation_prompt: bool,
               template_kwargs: dict | None = None) -> str:
        if self.ctx.chat_template is not None:
            kw = {
                "thinking": thinking,
                "enable_thinking": thinking,
                "reasoning_effort": effort,
                **(template_kwargs or {}),
            }
            return render_jinja(self.ctx.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                tools=tools, bos_token=self.ctx.bos_token, eos_token=self.ctx.eos_token, **kw)
        return encode_messages(messages, thinking=thinking, reasoning_effort=effort, tools=tools,
                               add_generation_prompt=add_generation_prompt)

    def tokenize(self, req: TokenizeRequest) -> list[int]:
        """POST /tokenize: a prompt (BOS first unless add_special_tokens is false), or messages in the chat format."""
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give exactly one of prompt or messages", "prompt")
        tok = self.ctx.tokenizer
        if req.prompt is not None:
            return tok.encode(req.prompt, add_bos=req.add_special_tokens is not False)
        if not req.messages:
            raise RequestError("messages must hold at least one message", "messages")
        text = self.render(req.messages, req.tools, thinking_mode(req.chat_template_kwargs, req.reasoning_effort),
                           req.reasoning_effort, req.add_generation_prompt, req.chat_template_kwargs)
        return tok.encode(text, add_bos=bool(req.add_special_tokens))

    async def _stream(self, stream, out: "_Reply") -> AsyncIterator[str]:
        parser, n_out = StreamingParser(thinking=out.thinking), 0
        try:
            yield sse(out.chunk({"role": "assistant", "content": ""}))
            async for o in self.follow(stream):
                n_out += len(o.new_token_ids)
                delta = _merge(parser.feed(o.new_text) if o.new_text else None, parser.finish() if o.finished else None)
                fields = out.delta_fields(delta)
                lp = self._logprobs(o.logprobs) if o.logprobs else None
                if not (fields or lp or o.finished):
                    continue  # text held back: a tag or a stop string may be forming
                reason = out.finish_reason(o.finish_reason, parser.tool_calls_seen) if o.finished else None
                yield sse(out.chunk(fields, lp, reason))
            if out.include_usage:
                yield sse({**out.head, "choices": [], "usage": usage(out.n_prompt, n_out)})
        except Exception as e:  # noqa: BLE001 - the status line has gone; the error goes in-band
            yield sse_error(e)
        yield sse("[DONE]")

    def _logprobs(self, lps) -> dict:
        def entry(token_id, logprob):
            s = self.token_str(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in lps]}


class _Reply:
    """One chat answer's fixed parts: ids, how to read the output, and how to shape chunks."""

    def __init__(
        self, req: ChatCompletionRequest, *, thinking: bool, rid: str, created: int, model: str, n_prompt: int
    ):
        self.thinking, self.rid, self.created, self.model, self.n_prompt = thinking, rid, created, model, n_prompt
        self.tools_on = bool(req.tools) and req.tool_choice != "none"
        self.include_reasoning = req.include_reasoning
        self.include_usage = req.stream_options is not None and req.stream_options.include_usage
        self.head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    def reasoning_fields(self, reasoning: str | None) -> dict:
        if reasoning is None or not self.include_reasoning:
            return {}
        return {"reasoning": reasoning, "reasoning_content": reasoning}

    def delta_fields(self, d: DeltaMessage | None) -> dict:
        if d is None:
            return {}
        fields = self.reasoning_fields(d.reasoning or None)
        if d.content:
            fields["content"] = d.content
        calls = [c for c in d.tool_calls if self.tools_on]
        if calls:
            fields["tool_calls"] = [{"index": c.index, **_tool_call(c.id, c.name, c.arguments)} for c in calls]
        return fields

    def chunk(self, delta: dict, logprobs=None, finish_reason=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": None}
        return {**self.head, "choices": [choice], "usage": None}

    def finish_reason(self, engine_reason: str | None, saw_tool_calls: bool) -> str | None:
        if engine_reason == "stop" and saw_tool_calls and self.tools_on:
            return "tool_calls"
        return engine_reason


def _tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _merge(a: DeltaMessage | None, b: DeltaMessage | None) -> DeltaMessage | None:
    if a is None or b is None:
        return a or b
    cat = lambda x, y: (x or "") + (y or "") or None  # noqa: E731
    return DeltaMessage(cat(a.reasoning, b.reasoning), cat(a.content, b.content), a.tool_calls + b.tool_calls)
