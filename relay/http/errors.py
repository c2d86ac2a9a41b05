"""JSON errors for every answer, and request ids: the middleware every listener shares."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.observability import bound_request, event

REQUEST_ID_KEY = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(message: str, field_name: str | None = None) -> dict[str, object]:
    """The JSON body of every error answer: ``{"status": "error", "error": ..., "field": ...}``."""
    body: dict[str, object] = {"status": "error", "error": message}
    if field_name:
        body["field"] = field_name
    return body


def error_response(status: int, message: str, field_name: str | None = None, **extra: str) -> web.Response:
    """:func:`error_body` answered with ``status``, ``extra`` as headers."""
    return web.json_response(error_body(message, field_name), status=status, headers=extra or None)


def request_id(given: str) -> str:
    """The caller's ``X-Request-Id`` as printable ASCII, at most 64 characters, or a new id when none is left.

    HTTP lets a header carry bytes above 0x7f; aiohttp hands them over as lone surrogates, which no store can
    keep as text (the webhook was answered 503, and Parley's retries carry the same header). A new id is a
    tracing id, not a secret: Python's generator (reseeded in every forked process), not uuid4's system call.
    """
    if not (given.isascii() and given.isprintable()):
        given = "".join(c for c in given if " " <= c < "\x7f")
    return given[:64] or f"{random.getrandbits(64):016x}"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ids, JSON errors for everything, and never a stack trace to the client."""
    request[REQUEST_ID_KEY] = request_id(request.headers.get("X-Request-Id", ""))
    try:
        with bound_request(request[REQUEST_ID_KEY]):
            response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            return error_response(413, "body too large")
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}  # RFC 9110 §15.5.6: 405 lists methods
        return error_response(exc.status, exc.reason, **allow)
    except Exception:
        logging.getLogger(__name__).exception("unhandled error")
        event(logging.ERROR, "unhandled error", request_id=request[REQUEST_ID_KEY], path=request.path)
        return error_response(500, "internal error")
    response.headers["X-Request-Id"] = request[REQUEST_ID_KEY]
    return response
