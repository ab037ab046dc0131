"""What the completion and chat endpoints share: the model check, prompts to ids, max_tokens,
following a request's outputs (metrics, abort when the client leaves), SSE framing and usage."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request

from ..engine import RequestOutput, SamplingParams
from .async_engine import AsyncEngine, RequestStream
from .errors import RequestError, envelope, classify
from .metrics import ServerMetrics


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class ServerContext:
    engine: AsyncEngine
    tokenizer: object
    model_name: str
    vocab_size: int
    max_model_len: int
    metrics: ServerMetrics
    chat_template: str | None = None  # a checkpoint's Jinja template; None: V4's own format (v4.chat)
    bos_token: str = ""
    eos_token: str = ""


class OpenAIServing:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx

    # ------------------------------------------------------------------ request -> engine
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.ctx.model_name:
            raise RequestError(f"The model `{model}` does not exist; this server serves `{self.ctx.model_name}` "
                               "(GET /v1/models)", "model", 404)

    def check_ids(self, ids: list[int], field: str) -> list[int]:
        if not ids:
            raise RequestError(f"{field} is empty: give at least one token or character", field)
        bad = next((t for t in ids if not 0 <= t < self.ctx.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"{field} holds token id {bad}, outside the vocabulary [0, {self.ctx.vocab_size})", field
            )
        return ids

    def max_tokens(self, requested: int | None, prompt_len: int, field: str = "max_tokens") -> int:
        """None means what is left of the context (vLLM's chat default)."""
        if requested is None:
            return max(self.ctx.max_model_len - prompt_len, 1)
        if requested < 0:
            raise RequestError(f"{field} must be a non-negative integer, got {requested}", field)
        return requested

    async def submit(self, prompt_ids: list[int], params: SamplingParams, arrival: float) -> RequestStream:
        """Hand the request to the engine. The engine's refusals name the field; the context-length
        one keeps vLLM's wording ("This model's maximum context length is N tokens ...")."""
        params.validate(self.ctx.vocab_size)
        return await self.ctx.engine.add(prompt_ids, params, arrival)

    # ------------------------------------------------------------------ engine -> response
    async def follow(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """The request's outputs, with its latencies observed. If the consumer stops early (the
        client left, or the server is shutting down), the request is aborted and its blocks freed."""
        m, last = self.ctx.metrics, None
        try:
            async for out in stream:
                now = time.monotonic()
                if out.new_token_ids:
                    if last is None:
                        m.ttft.observe(now - stream.arrival)
                    else:
                        m.itl.observe(now - last)
                    last = now
                if out.queue_s is not None:
                    m.queue.observe(out.queue_s)
                if out.finished:
                    m.e2e.observe(now - stream.arrival)
                    m.finished(out.finish_reason or "abort")
                yield out
        finally:
            if not stream.finished:
                self.ctx.engine.abort(stream.request_id)
                m.finished("abort")

    async def collect(self, stream: RequestStream, raw: Request) -> list[RequestOutput]:
        """Every output of a non-streamed request; aborts it if the client disconnects meanwhile."""
        async def drain():
            return [out async for out in self.follow(stream)]

        work = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(_disconnected(raw))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()  # follow()'s finally aborts the request
            gone.cancel()
        if not work.done() or work.cancelled():
            raise ClientGone()
        return work.result()

    def token_str(self, token_id: int) -> str:
        return self.ctx.tokenizer.decode([token_id])


async def _disconnected(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(e: BaseException) -> str:
    """An error after the 200 and the first bytes have gone: one event, then [DONE] (vLLM)."""
    status, param = classify(e)
    message = str(e) if status != 500 else f"internal error: {type(e).__name__}: {e}"
    return sse(envelope(message, status, param))
