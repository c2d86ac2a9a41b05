"""The config-load check of SPEC §5: the smallest push of every app fits its provider's limit.

The budget shortens or drops whatever Parley sends, down to a skeleton it never cuts: the ids and type id, an
event's name (at most 256 characters) and agent id, and the operator's own settings (``sound``, ``thread_id``,
``channel_id``). Only those settings can make the skeleton too big, so they are checked once, when the
configuration is built, against the costliest skeleton Parley can cause: the longest ids and a name of the
characters whose escapes cost most (a control character is ``\\u0001`` in the ``parley`` string, and its
backslash is escaped again in the payload). After that, :func:`~relay.delivery.budget.fit` never meets a push it
cannot fit, and raises if it does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from relay.config import App
from relay.delivery.budget import DoesNotFit
from relay.delivery.translate import translate
from relay.errors import ConfigProblem
from relay.inbound.parse import MAX_EVENT_NAME, Agent, Event, Message, Notification
from relay.registry.device import Route

_LONGEST_INT = -(2**63)  # the longest integer the webhook accepts, 20 characters
_COSTLIEST_NAME = "\x01" * MAX_EVENT_NAME  # 7 bytes a character once escaped twice
_AGENT = Agent(_LONGEST_INT, "", None)
_WORST: tuple[Notification, ...] = (
    Message(id=_LONGEST_INT, type_id=None, text="", agent=_AGENT, image="https://x", time=None, raw=None),
    Event(name=_COSTLIEST_NAME, agent=_AGENT, raw=None),
)


def _worst_cases(app: App) -> list[Notification]:
    """The costliest skeletons this app's policy can produce: an alert, a silent message, an event."""
    cases = list(_WORST)
    silent = [type_id for type_id, delivery in app.policy.type_policy.items() if delivery == "silent"]
    if silent:
        cases.append(Message(id=_LONGEST_INT, type_id=silent[0], text="", agent=_AGENT, image="https://x",
                             time=None, raw=None))
    return cases


def check_fits(apps: Mapping[str, App], source: Path | str) -> list[ConfigProblem]:
    """One problem per app whose smallest push is over its provider's limit (names the settings to shorten)."""
    problems = []
    for name, app in apps.items():
        route = Route(app, "0" * 64)
        for notification in _worst_cases(app):
            try:
                translate(notification, route, "00000000-0000-0000-0000-000000000000", 0.0, 30.0)
            except DoesNotFit as exc:
                settings = "sound, thread_id" if app.platform == "apns" else "channel_id"
                problems.append(ConfigProblem(str(source), f"apps.{name}",
                                              f"{exc}: shorten {settings} (SPEC §5, payload limits)"))
                break
    return problems
