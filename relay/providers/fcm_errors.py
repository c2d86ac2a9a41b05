"""FCM HTTP v1 answers -> :class:`SendResult`: pure functions over (status, body, headers), no I/O.

An FCM v1 error answer is a ``google.rpc.Status`` JSON body, ``{"error": {"code", "message", "status",
"details": [...]}}``, whose details may hold an ``FcmError`` (``errorCode``) and a ``google.rpc.BadRequest``
(``fieldViolations``). References: firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode and
cloud.google.com/apis/design/errors.

The outcome table is the one the relay used while firebase-admin raised exceptions for these answers
(``UnregisteredError``, ``NotFoundError``...): the same precedence, read from the body directly. A specific
``FcmError`` code decides first; otherwise the body's ``status`` (a ``google.rpc.Code`` name), or, without one,
the name firebase-admin derives from the HTTP status; a name it does not know counts as ``UNKNOWN``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import google.auth.exceptions

from relay.outcome import Outcome, SendResult
from relay.providers.network_errors import describe_failure
from relay.providers.retry_after import parse_retry_after

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"

# FcmError.errorCode -> outcome; only the codes firebase-admin turns into their own exception types
# (the others, e.g. INVALID_ARGUMENT or UNAVAILABLE, are read from the rpc status below).
FCM_ERROR_CODES: Mapping[str, Outcome] = {
    "UNREGISTERED": Outcome.TOKEN_DEAD,  # 404: the app was uninstalled or the token expired
    # 403: the token belongs to another sender, or our service account to another project: judged in context
    "SENDER_ID_MISMATCH": Outcome.MISMATCH,
    "THIRD_PARTY_AUTH_ERROR": Outcome.CONFIG_ERROR,  # 401: the APNs certificate / web push key in Firebase
    "APNS_AUTH_ERROR": Outcome.CONFIG_ERROR,  # the legacy name of the same error
    "QUOTA_EXCEEDED": Outcome.RETRY,  # 429: per-device or per-project rate
}

# google.rpc.Code name (the body's error.status) -> outcome. INVALID_ARGUMENT about the registration token
# is TOKEN_DEAD (see :func:`_about_token`); a name missing here is UNKNOWN (retry).
RPC_STATUS: Mapping[str, Outcome] = {
    "UNAUTHENTICATED": Outcome.CONFIG_ERROR,  # our access token, after one refresh (see FcmProvider.send)
    "PERMISSION_DENIED": Outcome.CONFIG_ERROR,  # the service account lacks the FCM role
    "NOT_FOUND": Outcome.CONFIG_ERROR,  # 404 without UNREGISTERED: wrong project id or endpoint
    "RESOURCE_EXHAUSTED": Outcome.RETRY,
    "UNAVAILABLE": Outcome.RETRY,
    "INTERNAL": Outcome.RETRY,
    "DEADLINE_EXCEEDED": Outcome.RETRY,
    "UNKNOWN": Outcome.RETRY,
    "ABORTED": Outcome.RETRY,
    "CANCELLED": Outcome.RETRY,
    "INVALID_ARGUMENT": Outcome.PERMANENT,  # unless about the token
    "FAILED_PRECONDITION": Outcome.PERMANENT,
    "OUT_OF_RANGE": Outcome.PERMANENT,
    "ALREADY_EXISTS": Outcome.PERMANENT,
    "CONFLICT": Outcome.PERMANENT,
    "DATA_LOSS": Outcome.PERMANENT,
}

# FCM's words for a payload over its limit (it documents no code of its own): fitted again, smaller (SPEC §5).
TOO_BIG = "message is too big"

# HTTP status -> rpc name when the body names none (firebase-admin's own mapping; others are UNKNOWN).
HTTP_STATUS: Mapping[int, str] = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "CONFLICT",
    412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
}


def _error_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else {}


def _details(error: Mapping[str, Any]) -> list[dict[str, Any]]:
    details = error.get("details")
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _fcm_code(error: Mapping[str, Any]) -> str | None:
    for detail in _details(error):
        if detail.get("@type") == FCM_ERROR_TYPE:
            code = detail.get("errorCode")
            return code if isinstance(code, str) else None
    return None


def _about_token(error: Mapping[str, Any], text: str) -> bool:
    for detail in _details(error):
        violations = detail.get("fieldViolations")
        for violation in violations if isinstance(violations, list) else []:
            if isinstance(violation, dict) and "token" in str(violation.get("field", "")):
                return True
    return "registration token" in text.lower()


def _retry_after(headers: Mapping[str, str]) -> float | None:
    return parse_retry_after(next((v for k, v in headers.items() if k.lower() == "retry-after"), None))


def token_rejected(status: int, body: bytes) -> bool:
    """A 401 about our OAuth access token (worth one refresh), not a ``THIRD_PARTY_AUTH_ERROR``."""
    return status == 401 and _fcm_code(_error_object(body)) is None


def classify_fcm(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
    """Classify one ``messages:send`` answer (pure): 2xx is sent, anything else by the tables above."""
    if 200 <= status < 300:
        return SendResult.sent(status)
    error = _error_object(body)
    message = error.get("message")
    text = message if isinstance(message, str) and message else \
        f"Unexpected HTTP response with status: {status}; body: {body[:200].decode(errors='replace')}"
    fcm_code = _fcm_code(error)
    if fcm_code is not None and fcm_code in FCM_ERROR_CODES:
        return SendResult(FCM_ERROR_CODES[fcm_code], f"{fcm_code}: {text}"[:300], status, _retry_after(headers))
    rpc = error.get("status")
    name = rpc if isinstance(rpc, str) and rpc else HTTP_STATUS.get(status, "UNKNOWN")
    reason = f"{fcm_code or name}: {text}"[:300]
    if name == "INVALID_ARGUMENT" and _about_token(error, text):
        return SendResult(Outcome.TOKEN_DEAD, reason, status)
    if name == "INVALID_ARGUMENT" and TOO_BIG in text.lower():
        return SendResult(Outcome.TOO_BIG, reason, status)
    return SendResult(RPC_STATUS.get(name, Outcome.RETRY), reason, status, _retry_after(headers))


def classify_transport(exc: BaseException, host: str = "FCM", port: int | None = None) -> SendResult:
    """No answer from ``host:port`` (FCM, or the proxy in between): a timeout, a refused or dropped connection, a
    broken response. All are transient; the reason names the cause and the host."""
    if isinstance(exc, TimeoutError):
        return SendResult(Outcome.RETRY, f"DEADLINE_EXCEEDED: no answer from {host} within the send timeout")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return SendResult(Outcome.RETRY, f"UNAVAILABLE: proxy {host}:{port} refused CONNECT: {exc.status} "
                                         f"{exc.message}"[:300])
    if isinstance(exc, aiohttp.ClientConnectorError):
        host, port = exc.host, exc.port  # where aiohttp was connecting: FCM, or the proxy
    elif not isinstance(exc, OSError):  # a broken or cut answer (aiohttp's ServerDisconnectedError...)
        return SendResult(Outcome.RETRY, f"UNAVAILABLE: {type(exc).__name__} from {host}"[:300])
    return SendResult(Outcome.RETRY, f"UNAVAILABLE: {describe_failure(exc, host, port)}"[:300])


def classify_refresh(exc: Exception, host: str, port: int, timeout: float | None = None) -> SendResult:
    """An OAuth token refresh failure at ``host:port`` (the token endpoint): credentials Google refuses are a config
    error; anything else (unreachable, no answer within ``timeout``) is transient."""
    if isinstance(exc, google.auth.exceptions.RefreshError):
        # google-auth's own message is its first argument ("invalid_grant: Invalid JWT Signature."); str(exc)
        # would be the repr of a tuple holding it and the whole response.
        text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
        if any(word in text for word in ("invalid_grant", "invalid_client", "unauthorized_client",
                                         "account not found")):
            return SendResult(Outcome.CONFIG_ERROR, f"OAuth token refresh refused: {text[:200]}")
        return SendResult(Outcome.RETRY, f"OAuth token refresh failed: {text[:200]}")
    return SendResult(Outcome.RETRY, f"OAuth token refresh failed: {describe_failure(exc, host, port, timeout)}")
