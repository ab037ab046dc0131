"""The FastAPI app: routes, the error envelope on every failure, and a cap on request bodies.

    app = build_app(ctx)      # ctx: ServerContext (engine, tokenizer, names, metrics)

Every failure answers with vLLM's envelope and the server keeps serving: pydantic's 422 becomes a
400 (vLLM does the same), a body over the cap a 413, a full queue or a dead engine a 503.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from .. import __version__
from ..errors import DSV4Error
from .chat import ChatServing
from .completions import CompletionServing
from .errors import classify, envelope, error_response
from .openai_serving import ClientGone, ServerContext
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("dsv4")

MAX_BODY_BYTES = 32 * 2**20


def build_app(ctx: ServerContext, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio

        ctx.engine.start(asyncio.get_running_loop())
        yield
        ctx.engine.shutdown()

    app = FastAPI(title="dsv4", version=__version__, lifespan=lifespan)
    completions, chat = CompletionServing(ctx), ChatServing(ctx)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request):
        return await completions.create(req, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request):
        return await chat.create(req, raw)

    @app.get("/v1/models")
    async def models():
        card = {"id": ctx.model_name, "object": "model", "created": int(time.time()), "owned_by": "dsv4",
                "root": ctx.model_name, "parent": None, "max_model_len": ctx.max_model_len, "permission": []}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return Response(status_code=200 if ctx.engine.alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        completions.check_model(req.model)
        ids = chat.tokenize(req)
        out = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [completions.token_str(t) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        completions.check_model(req.model)
        if req.tokens:
            completions.check_ids(req.tokens, "tokens")
        return {"prompt": ctx.tokenizer.decode(req.tokens)}

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(_, exc: RequestValidationError):
        errors = exc.errors()[:10]
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            why = (bad_json.get("ctx") or {}).get("error", "")
            return error_response(f"the request body is not valid JSON ({why}); send a JSON object", 400, None,
                                  "Bad Request")
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}" + (f" (got {str(e.get('input'))[:200]})" if loc else ""))
        first = errors[0].get("loc", ()) if errors else ()
        param = next((str(x) for x in first if x != "body"), None)
        return error_response("; ".join(parts) or "invalid request body", 400, param, "Bad Request")

    @app.exception_handler(ClientGone)
    async def gone(_, exc: ClientGone):
        return Response(status_code=499)  # nobody is listening; nginx's code, for the access log

    @app.exception_handler(Exception)
    async def anything(_, exc: Exception):
        status, param = classify(exc)
        if status == 500:
            log.exception("request failed")
            return error_response(f"internal error: {type(exc).__name__}: {exc}", 500)
        return error_response(str(exc), status, param)

    # Starlette re-raises what reaches the catch-all `Exception` handler (to log it): the expected
    # failures get handlers of their own, so a 4xx is answered quietly
    for cls in (DSV4Error, ValueError, TypeError, OverflowError, NotImplementedError):
        app.add_exception_handler(cls, anything)


class BodyLimit:
    """A pure ASGI middleware: refuse bodies over `max_bytes` with 413 before they are read whole
    (by Content-Length, and by counting for chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(
            envelope(f"the request body is over {self.max_bytes} bytes; send a smaller one", 413)
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
