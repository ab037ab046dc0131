"""vLLM's error envelope: `{"error": {"message", "type", "param", "code": <the HTTP status as an integer>}}`
(serving.md §1.5), and the mapping from our exceptions to it."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import InputError
from .async_engine import EngineDead, QueueFull

TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLarge", 501: "NotImplementedError",
         503: "ServiceUnavailableError", 500: "InternalServerError"}


class RequestError(InputError):
    """A request the server refuses with a 4xx; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def envelope(message: str, status: int, param: str | None = None, type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or TYPES.get(status, "BadRequestError"), "param": param,
                      "code": status}}


def error_response(message: str, status: int, param: str | None = None, type_: str | None = None) -> JSONResponse:
    return JSONResponse(envelope(message, status, param, type_), status_code=status)


def classify(e: BaseException) -> tuple[int, str | None]:
    """(HTTP status, param) for an exception raised while serving a request."""
    if isinstance(e, RequestError):
        return e.status, e.param
    if isinstance(e, (QueueFull, EngineDead)):
        return 503, None
    if isinstance(e, (InputError, ValueError, TypeError, OverflowError)):
        return 400, _param_of(str(e))
    if isinstance(e, NotImplementedError):
        return 501, None
    return 500, None


_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "logprobs", "stop", "stop_token_ids",
           "seed")


def _param_of(message: str) -> str | None:
    """The engine's sentences start with the field's name (SamplingParams.validate)."""
    if "maximum context length" in message:
        return "max_tokens"
    first = message.split(" ", 1)[0]
    return first if first in _FIELDS else None
