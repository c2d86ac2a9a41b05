"""Parsing stage: raw webhook bytes -> a typed ``Webhook`` (no I/O).

Parley's push webhook body (SPEC §2) is ``{"data": {"type": ..., "object": {...}}, "to": [tokens]}``.
Validation errors raise :class:`InvalidWebhook` naming the JSON path at fault. What the relay stores is the
canonical JSON of ``data`` (see :func:`canonical_data`); the dispatcher parses it again with
:func:`parse_notification`, so the stored original is always what the push is built from.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.errors import InvalidWebhook

KNOWN_TYPES = ("message", "event")
KNOWN_EVENTS = ("startTyping", "stopTyping")
MAX_DEPTH = 32
MAX_STRING = 16 * 1024
MAX_TOKEN_LENGTH = 4096
MAX_EVENT_NAME = 256  # longer names are cut: the name must always fit a push (SPEC §5)


@dataclass(frozen=True, slots=True)
class Agent:
    id: int | None
    name: str | None
    avatar: str | None


@dataclass(frozen=True, slots=True)
class Message:
    """A new chat message: becomes a visible alert (or silent, by ``typeId`` policy)."""

    id: int
    type_id: int | None
    text: str
    image: str | None
    agent: Agent | None
    time: int | None
    # Parley's ``data.object`` exactly as received (after validation), never mutated: translation forwards it
    # to the SDKs in the ``parley`` key (SPEC §5). None when a message is built in code (``send-test``).
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Event:
    """A conversation event (``startTyping``/``stopTyping`` or a future name): a silent push."""

    name: str
    agent: Agent | None
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # as on ``Message``


Notification = Message | Event


@dataclass(frozen=True, slots=True)
class Webhook:
    """One parsed webhook: the notification (or ``None`` for an ignored type), its tokens and stored form."""

    type: str
    notification: Notification | None
    tokens: tuple[str, ...]
    data: bytes  # canonical JSON of ``data``: what is stored and later translated

    @property
    def ignored(self) -> bool:
        return self.notification is None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 would become Infinity, which is not JSON when stored and sent on
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                            object_pairs_hook=_no_duplicates)


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys, bounded nesting."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidWebhook(f"body is not UTF-8 (byte {exc.start})") from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    _check_depth(text)
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidWebhook(f"body is not valid JSON: {exc}") from exc


def _check_depth(text: str) -> None:
    # Cheap pre-scan so that hostile nesting never reaches the recursive decoder. A body with no more openers
    # than the bound cannot nest deeper (every webhook Parley sends): the per-character loop below, 7 % of a
    # webhook process's CPU when run on every body, is left to the others.
    if text.count("{") + text.count("[") <= MAX_DEPTH:
        return
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise InvalidWebhook(f"JSON nested deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidWebhook(f"{path} must be an object", field=path)
    return value


def _opt_str(obj: dict[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidWebhook(f"{path}.{key} must be a string or null", field=f"{path}.{key}")
    if len(value) > MAX_STRING:
        raise InvalidWebhook(f"{path}.{key} is longer than {MAX_STRING} characters", field=f"{path}.{key}")
    _check_text(value, f"{path}.{key}")
    return value


def _check_text(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from \udxxx escapes
        raise InvalidWebhook(f"{path} contains an invalid character", field=path) from exc


def _opt_int(obj: dict[str, Any], key: str, path: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise InvalidWebhook(f"{path}.{key} must be an integer", field=f"{path}.{key}")
    return value


def _agent(obj: dict[str, Any], path: str) -> Agent | None:
    value = obj.get("agent")
    if value is None:
        return None
    agent = _obj(value, f"{path}.agent")
    return Agent(
        _opt_int(agent, "id", f"{path}.agent"),
        _opt_str(agent, "name", f"{path}.agent"),
        _opt_str(agent, "avatar", f"{path}.agent"),
    )


def _message(obj: dict[str, Any]) -> Message:
    path = "data.object"
    message_id = _opt_int(obj, "id", path)
    if message_id is None:
        raise InvalidWebhook("data.object.id is required for a message", field="data.object.id")
    text = _opt_str(obj, "message", path)
    if text is None:
        text = _opt_str(obj, "body", path)
    return Message(
        id=message_id,
        type_id=_opt_int(obj, "typeId", path),
        text=text or "",
        image=_opt_str(obj, "image", path),
        agent=_agent(obj, path),
        time=_opt_int(obj, "time", path),
        raw=obj,
    )


def _event(obj: dict[str, Any]) -> Event:
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidWebhook("data.object.name must be a non-empty string", field="data.object.name")
    _check_text(name, "data.object.name")
    body = obj.get("body")
    agent = _agent(_obj(body, "data.object.body"), "data.object.body") if body is not None else None
    return Event(name=name[:MAX_EVENT_NAME], agent=agent, raw=obj)


def parse_notification(data: Any) -> tuple[str, Notification | None]:
    """Validate Parley's ``data`` member; returns its type and the notification (None when ignored)."""
    data = _obj(data, "data")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise InvalidWebhook("data.type must be a string", field="data.type")
    if kind not in KNOWN_TYPES:
        return kind, None  # a future type: valid input, acknowledged and ignored (SPEC §2)
    obj = _obj(data.get("object"), "data.object")
    return kind, _message(obj) if kind == "message" else _event(obj)


def _tokens(value: Any, max_tokens: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidWebhook("to must be a non-empty array of push tokens", field="to")
    if len(value) > max_tokens:
        raise InvalidWebhook(f"to has {len(value)} tokens, more than the limit of {max_tokens}", field="to")
    tokens: list[str] = []
    for i, token in enumerate(value):
        if not isinstance(token, str) or not token.strip():
            raise InvalidWebhook(f"to[{i}] must be a non-empty string", field=f"to[{i}]")
        if len(token) > MAX_TOKEN_LENGTH or not token.isprintable():
            raise InvalidWebhook(f"to[{i}] is not a plausible push token", field=f"to[{i}]")
        if token not in tokens:  # the same token twice in one webhook is one delivery
            tokens.append(token)
    return tuple(tokens)


def canonical_data(data: dict[str, Any]) -> bytes:
    """Stable JSON of ``data`` (sorted keys, no spaces): what is stored and hashed for dedupe."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_webhook(body: bytes, *, max_tokens: int = 100) -> Webhook:
    """Parse a raw webhook body; raises :class:`InvalidWebhook` naming the problem and field."""
    doc = decode_json(body)
    if not isinstance(doc, dict):
        raise InvalidWebhook("body must be a JSON object")
    if "data" not in doc:
        raise InvalidWebhook("data is required", field="data")
    kind, notification = parse_notification(doc["data"])
    tokens = _tokens(doc.get("to"), max_tokens)
    try:
        data = canonical_data(doc["data"])
    except UnicodeEncodeError as exc:  # a lone surrogate (\ud800 escape without its pair) in any field
        raise InvalidWebhook("data contains an invalid character (a lone UTF-16 surrogate)", field="data") from exc
    return Webhook(kind, notification, tokens, data)


def load_notification(data: bytes) -> Notification:
    """Parse a stored ``data`` blob back into its notification (the dispatcher's side)."""
    _kind, notification = parse_notification(json.loads(data))
    if notification is None:
        raise InvalidWebhook("stored notification has an unknown type")
    return notification


def dedupe_key(webhook: Webhook, token: str) -> str:
    """SPEC §2: a message by (object.id, token); an event by a hash of its body and token, which the stores
    keep for an event stored without a stream (the webhook's events have one: see :mod:`relay.inbound.accept`)."""
    if isinstance(webhook.notification, Message):
        return f"m:{webhook.notification.id}:{token}"
    digest = hashlib.sha256(webhook.data + b"\0" + token.encode()).hexdigest()[:32]
    return f"e:{digest}"
