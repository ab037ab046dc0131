"""POST /v1/completions: a text or token-id prompt, streamed or not (serving.md §1.2–1.4)."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .errors import RequestError
from .openai_serving import OpenAIServing, request_id, sse, sse_error, usage
from .protocol import CompletionRequest


class CompletionServing(OpenAIServing):
    async def create(self, req: CompletionRequest, raw: Request):
        arrival = time.monotonic()
        req.check_supported()
        self.check_model(req.model)
        prompt_ids, prompt_text = self.prompt(req)
        params = req.sampling_params(self.max_tokens(req.max_tokens, len(prompt_ids)), req.logprobs)
        stream = await self.submit(prompt_ids, params, arrival)
        rid, created = request_id("cmpl"), int(time.time())
        echo = prompt_text if req.echo else ""
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            body = self._stream(stream, rid, created, echo, len(prompt_ids), include_usage)
            return StreamingResponse(body, media_type="text/event-stream")
        outs = await self.collect(stream, raw)
        ids = [t for o in outs for t in o.new_token_ids]
        logprobs = [lp for o in outs for lp in (o.logprobs or [])] if req.logprobs is not None else None
        choice = {"index": 0, "text": echo + "".join(o.new_text for o in outs),
                  "logprobs": self._logprobs(logprobs, len(echo)) if logprobs is not None else None,
                  "finish_reason": outs[-1].finish_reason, "stop_reason": None}
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": self.ctx.model_name,
                             "choices": [choice], "usage": usage(len(prompt_ids), len(ids))})

    def prompt(self, req: CompletionRequest) -> tuple[list[int], str]:
        """(ids, text) of the one prompt: a string is tokenised (BOS first unless add_special_tokens is
        false); token ids are taken as they are."""
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError(f"prompt holds {len(p)} prompts; dsv4 serve takes one prompt per request", "prompt")
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise RequestError("prompt is empty: give at least one character", "prompt")
            return self.ctx.tokenizer.encode(p, add_bos=req.add_special_tokens), p
        ids = self.check_ids([int(t) for t in p], "prompt")
        return ids, self.ctx.tokenizer.decode(ids)

    async def _stream(self, stream, rid: str, created: int, echo: str, n_prompt: int,
                      include_usage: bool) -> AsyncIterator[str]:
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.ctx.model_name}
        n_out, offset = 0, len(echo)
        try:
            if echo:
                yield sse({**head, "choices": [_choice(echo, None, None)], "usage": None})
            async for out in self.follow(stream):
                n_out += len(out.new_token_ids)
                if not (out.new_text or out.logprobs or out.finished):
                    continue  # a token whose text is held back (a stop string may be forming)
                lp = self._logprobs(out.logprobs, offset) if out.logprobs is not None else None
                offset += len(out.new_text)
                yield sse({**head, "choices": [_choice(out.new_text, lp, out.finish_reason)], "usage": None})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(n_prompt, n_out)})
        except Exception as e:  # noqa: BLE001 - the status line has gone; the error goes in-band
            yield sse_error(e)
        yield sse("[DONE]")

    def _logprobs(self, lps, offset: int) -> dict:
        """OpenAI's legacy form: tokens, token_logprobs, top_logprobs [{token: logprob}], text_offset."""
        tokens = [self.token_str(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token_str(i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}


def _choice(text: str, logprobs, finish_reason) -> dict:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": None}

