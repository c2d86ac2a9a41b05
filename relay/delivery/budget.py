"""Payload budget (SPEC §5): a push described as a :class:`Draft`, shrunk in a fixed order until it fits.

Pure, no I/O. Translation describes one push as a ``Draft`` (Parley's object as received plus the visible title,
text and image) and a renderer that returns the size the provider counts; :func:`fit` returns the draft
unchanged when it fits (the common case: one render), else walks :data:`STEPS` in order. Each step is taken only
while the push still does not fit, and within a step the largest setting that fits is kept, so a push loses no
more than it must. The last steps leave only the fixed skeleton (ids, type id, event name), which always fits.

Sizes are counted the most conservative way each provider might count them (FCM's JSON form, see
:func:`fcm_size`); a provider that still answers "too big" gets the push fitted again to a smaller budget.

The order, as the operator docs state it. "Other strings" are the strings anywhere in the ``parley`` object
except a message's ``body``/``title``/``image`` and an event's ``name``; other strings are shortened the longest
first, and one that is a URL (``scheme://`` or ``data:``) is never cut: it becomes ``null`` instead.

1. other strings longer than 256 characters are shortened to no less than 256;
2. the text (alert body, FCM ``message``, ``parley`` ``body``) is shortened to no less than 200 characters;
3. the image is dropped (FCM ``notification.image``, APNs ``mutable-content``, ``parley`` ``image`` = null)
   and the text is given back in full;
4. the text is shortened again, to no less than 200 characters;
5. other strings are shortened further, down to empty;
6. members of the ``parley`` object the SDKs do not read are removed, the largest first (all but a message's
   ``id``/``typeId``/``body``/``title``/``image`` and an event's ``name``/``body.agent.id``);
7. the text is shortened further, down to empty;
8. the title (at most 256 characters from the start) is shortened, down to empty.

Text is cut on a code point boundary and ends with ``…``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any, NamedTuple, TypeVar

ELLIPSIS = "…"
APNS_MAX_PAYLOAD = 4096  # Apple: "The maximum size of a notification payload is 4 KB (4096 bytes)" (regular pushes)
FCM_MAX_PAYLOAD = 4096  # Google: "Maximum payload for both message types is 4096 bytes" (FCM message types)
MAX_TITLE = 256  # characters; the title is capped before budgeting starts
OTHER_FLOOR = 256  # step 1 shortens other strings no further than this
TEXT_FLOOR = 200  # steps 2 and 4 keep at least this much text; below it only after every other step

# Built once: ``json.dumps`` with options builds a new encoder per call, a measurable share of a small push.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# A scheme is short (RFC 3986 §3.1 sets no bound; 32 covers every registered one) so a long string is not scanned.
_URL = re.compile(r"(?:[a-z][a-z0-9+.\-]{0,31}://|data:)", re.IGNORECASE)

Path = tuple[str, ...]
T = TypeVar("T")


def shorten(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters (ellipsis included) on a code point boundary."""
    if len(text) <= max_chars:
        return text
    return text[: max_chars - 1] + ELLIPSIS if max_chars > 0 else ""


def is_url(text: str) -> bool:
    """Whether ``text`` is an absolute URL (``scheme://...`` or ``data:``): such a string is dropped, never cut."""
    return _URL.match(text) is not None


_CONTROL = bytes(range(32))  # JSON escapes these as \n or \u00XX (bytes.translate deletes them: a fast test)
_FCM_FRAME = len('{"notification":{},"data":{}}')


def fcm_size(title: str | None, body: str | None, image: str | None, data: Mapping[str, str],
             channel_id: str | None = None) -> int:
    """FCM's count, the most conservative plausible one (Google does not publish its own): the UTF-8 bytes of
    ``{"notification": {...}, "data": {...}}`` as compact JSON, braces, quotes and escapes included. The
    ``parley`` value is JSON inside a JSON string, so each of its quotes counts twice. The channel id is counted
    with the notification.

    Computed rather than encoded, for a small push's sake: JSON escapes character by character, so the values'
    escaped length is that of their concatenation; without a control character that is its UTF-8 length plus one
    byte per quote and backslash. The keys are the relay's own (plain ASCII).
    """
    values = []
    keys = 0
    if title is not None:
        values.append(title)
        keys += 5
    if body is not None:
        values.append(body)
        keys += 4
    if image is not None:
        values.append(image)
        keys += 5
    if channel_id is not None:
        values.append(channel_id)
        keys += 10
    note = len(values)
    values.extend(data.values())
    keys += sum(map(len, data))
    joined = "".join(values)
    raw = joined.encode()
    if len(raw.translate(None, _CONTROL)) == len(raw):  # no control character: quotes and backslashes get a "\\"
        content = len(raw) + raw.count(b'"') + raw.count(b"\\")
    else:
        content = len(encode_basestring(joined).encode()) - 2
    commas = max(0, note - 1) + max(0, len(data) - 1)
    return _FCM_FRAME + keys + 5 * len(values) + content + commas


class DoesNotFit(ValueError):
    """Even the smallest push (the skeleton: ids, type id, event name, operator settings) is over the limit.

    Anything Parley can send fits once the operator settings pass the check made at config load
    (:func:`relay.delivery.translate.check_fits`); this is raised instead of handing a provider an oversize.
    """


class Draft(NamedTuple):
    """One push before rendering: the parts that may be shrunk and how far each is shrunk so far.

    A ``NamedTuple`` rather than a frozen dataclass: it is built for every push, and is as immutable but
    several times cheaper to build (a measurable share of a small push).

    ``obj`` is the ``parley`` object (Parley's as received, ids set); ``fixed`` are its top-level keys the budget
    manages itself (never "other strings"); ``protected`` the member paths never removed (step 6). The caps are
    None while untouched.
    """

    kind: str
    obj: Mapping[str, Any]
    fixed: frozenset[str]
    protected: frozenset[Path]
    text: str | None  # the message text, None for events
    title: str | None  # the visible title, None for silent pushes
    image: str | None  # the visible image URL
    other_cap: int | None = None
    removal: tuple[Path, ...] = ()  # step 6: removable members, largest first (computed when it starts)
    removed: int = 0  # step 6: how many of ``removal`` are removed
    text_cap: int | None = None
    title_cap: int | None = None
    image_kept: bool = True

    @property
    def body(self) -> str | None:
        """The text as it is sent (alert body, FCM ``message``, ``parley`` ``body``)."""
        if self.text is None or self.text_cap is None:
            return self.text
        return shorten(self.text, self.text_cap)

    @property
    def shown_title(self) -> str | None:
        if self.title is None or self.title_cap is None:
            return self.title
        return shorten(self.title, self.title_cap)

    @property
    def shown_image(self) -> str | None:
        return self.image if self.image_kept else None

    def parley_object(self) -> dict[str, Any]:
        """The ``object`` of the ``parley`` key, with every cap applied (``obj`` itself is never changed)."""
        obj: Mapping[str, Any] = self.obj
        if self.other_cap is not None:
            obj = {k: v if k in self.fixed else _cap(v, self.other_cap) for k, v in obj.items()}
        if self.removed:
            obj = _without(obj, frozenset(self.removal[: self.removed]))
        result = dict(obj)
        if self.text is not None:
            result["body"] = self.body
        if self.title is not None:
            result["title"] = self.shown_title
        if not self.image_kept and "image" in result:
            result["image"] = None
        return result

    def parley_string(self) -> str:
        """The ``parley`` key: always valid JSON, since it is encoded from the (shrunk) object, never cut."""
        doc = {"type": self.kind, "object": self.parley_object()}
        return _COMPACT.encode(doc)


def _cap(value: Any, cap: int) -> Any:
    """``value`` with every string longer than ``cap`` shortened (a URL: replaced by None, never cut)."""
    if isinstance(value, str):
        if len(value) <= cap:
            return value
        return None if is_url(value) else shorten(value, cap)
    if isinstance(value, dict):
        return {k: _cap(v, cap) for k, v in value.items()}
    if isinstance(value, list):
        return [_cap(v, cap) for v in value]
    return value


def _longest(value: Any) -> int:
    """Length of the longest string anywhere in ``value``."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return max((_longest(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max((_longest(v) for v in value), default=0)
    return 0


def removable_members(obj: Mapping[str, Any], protected: frozenset[Path]) -> list[Path]:
    """Paths of the members step 6 may remove, largest (encoded) first; ties keep document order."""
    sized: list[tuple[int, Path]] = []

    def walk(node: Mapping[str, Any], path: Path) -> int:
        total = 2
        for key, value in node.items():
            member = (*path, key)
            size = len(key) + 4 + (walk(value, member) if isinstance(value, dict) else _encoded_len(value))
            if member not in protected:
                sized.append((size, member))
            total += size
        return total

    walk(obj, ())
    sized.sort(key=lambda item: -item[0])  # stable: equal sizes stay in document order
    return [path for _, path in sized]


def _encoded_len(value: Any) -> int:
    """Characters of ``value`` as compact JSON, near enough to rank members (escapes are not counted)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, dict):
        return 2 + sum(len(k) + 4 + _encoded_len(v) for k, v in value.items())
    if isinstance(value, list):
        return 2 + sum(_encoded_len(v) + 1 for v in value)
    if value is None or value is True:
        return 4
    return 5 if value is False else len(repr(value))


def _without(obj: Mapping[str, Any], dropped: frozenset[Path], path: Path = ()) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in obj.items():
        member = (*path, key)
        if member in dropped:
            continue
        result[key] = _without(value, dropped, member) if isinstance(value, dict) else value
    return result


@dataclass(frozen=True)
class Step:
    """One shrinking step: a setting between ``low`` (the most shrunk) and ``high`` (as the draft is now).

    ``prepare`` runs once when the step starts (work every setting shares, kept out of the bisection).
    """

    name: str
    low: Callable[[Draft], int]
    high: Callable[[Draft], int]
    apply: Callable[[Draft, int], Draft]
    prepare: Callable[[Draft], Draft] = lambda d: d


def _other_len(d: Draft) -> int:
    longest = _longest({k: v for k, v in d.obj.items() if k not in d.fixed})
    return longest if d.other_cap is None else min(longest, d.other_cap)


def _text_len(d: Draft) -> int:
    if d.text is None:
        return 0
    return len(d.text) if d.text_cap is None else min(len(d.text), d.text_cap)


def _cap_others(d: Draft, n: int) -> Draft:
    return d._replace(other_cap=n)


def _cap_text(d: Draft, n: int) -> Draft:
    return d._replace(text_cap=n)


def _prepare_removal(d: Draft) -> Draft:
    """Bake the string caps into ``obj`` once, and rank what may be removed (the bisection then only removes)."""
    obj = d.obj if d.other_cap is None else {
        k: v if k in d.fixed else _cap(v, d.other_cap) for k, v in d.obj.items()}
    return d._replace(obj=obj, other_cap=None, removal=tuple(removable_members(obj, d.protected)))


def _drop_image(d: Draft, n: int) -> Draft:
    return d if n else d._replace(image_kept=False, text_cap=None)  # the text gets the room back


STEPS: tuple[Step, ...] = (  # the order of the module docstring
    Step("other strings down to 256", lambda d: OTHER_FLOOR, _other_len, _cap_others),
    Step("text down to 200", lambda d: min(TEXT_FLOOR, _text_len(d)), _text_len, _cap_text),
    Step("image dropped", lambda d: 0, lambda d: int(d.shown_image is not None), _drop_image),
    Step("text down to 200 again", lambda d: min(TEXT_FLOOR, _text_len(d)), _text_len, _cap_text),
    Step("other strings down to empty", lambda d: 0, _other_len, _cap_others),
    Step("other members removed", lambda d: 0, lambda d: len(d.removal),
         lambda d, n: d._replace(removed=len(d.removal) - n),
         prepare=_prepare_removal),
    Step("text down to empty", lambda d: 0, _text_len, _cap_text),
    Step("title down to empty", lambda d: 0, lambda d: len(d.shown_title or ""),
         lambda d, n: d._replace(title_cap=n)),
)


def fit(draft: Draft, render: Callable[[Draft], tuple[T, int]], limit: int, *, strict: bool = True) -> T:
    """``render(draft)`` when its size is within ``limit``; else the render of the draft shrunk by :data:`STEPS`.

    When even the skeleton is over ``limit``: :class:`DoesNotFit` (``strict``), or the skeleton itself (a refit
    to a budget below the provider's limit, which the skeleton is known to meet).

    ``render`` returns the push and its size as the provider counts it; the common case renders once. Within
    the step that makes the push fit, the largest setting that fits is found by bisection (a cut adds a
    three-byte ``…``, so the size is not strictly monotonic: the setting found always fits, it may be a few
    characters short of the very largest).
    """
    result, size = render(draft)
    if size <= limit:
        return result
    for step in STEPS:
        draft = step.prepare(draft)
        low, high = step.low(draft), step.high(draft)
        if high <= low:
            continue  # nothing this step could shrink
        floor = step.apply(draft, low)
        best, size = render(floor)
        if size > limit:
            draft, result = floor, best
            continue
        while low < high:
            mid = (low + high + 1) // 2
            candidate, size = render(step.apply(draft, mid))
            if size <= limit:
                low, best = mid, candidate
            else:
                high = mid - 1
        return best
    if strict:
        raise DoesNotFit(f"the smallest push is {size} bytes, over the limit of {limit}")
    return result  # only the skeleton is left
