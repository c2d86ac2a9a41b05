"""Topic and sender mismatches judged in context (SPEC §4): a dead token, or an app's configuration mistake.

APNs ``DeviceTokenNotForTopic`` and FCM ``SENDER_ID_MISMATCH`` say "this token is not for this topic / sender".
For one device that is another app's token, dead to this one; for every device it is the app's own topic, key or
service account that is wrong, and marking the tokens dead would lose every user. One answer cannot tell the
two apart; the app's other deliveries can. So an answer is evidence, never a verdict on its own:

* the first mismatch of a token is **held**: the delivery waits (retry backoff) and the token becomes a suspect;
* a suspect that answers a mismatch again **after the app delivered to some device** (a success between its
  two answers) is **dead**: the same credentials demonstrably work;
* mismatches of :data:`ALARM_DEVICES` different tokens with **no success in between** are a configuration
  **alarm**: the app's deliveries are kept (``config_error``) until a reload or a probe that succeeds.

Time is counted in successes, not seconds: each suspect remembers how many successes the app had when it first
answered. Several delivery processes or instances each judge on what they saw themselves; the one that saw no
success holds or alarms, it never marks dead, which is the direction that keeps the notification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

ALARM_DEVICES = 2  # different tokens answering a mismatch with no success in between: the app's config
MAX_SUSPECTS = 10_000  # per app; the oldest suspect is forgotten first (it is then only held again)


class Verdict(StrEnum):
    """What one mismatch answer was judged to be (also the ``judged`` label of its metric)."""

    HELD = "held"
    TOKEN_DEAD = "token_dead"  # noqa: S105 - a verdict name, not a secret
    APP_ALARM = "app_alarm"


@dataclass
class Mismatches:
    """One app's evidence: its successes so far and the tokens that answered a mismatch."""

    successes: int = 0
    suspects: dict[str, int] = field(default_factory=dict)  # token -> ``successes`` when it first answered

    def succeeded(self, token: str) -> None:
        """The app delivered to ``token``: evidence that its credentials and topic work (and ``token`` too)."""
        self.successes += 1
        self.suspects.pop(token, None)

    def judge(self, token: str) -> Verdict:
        """A mismatch answer for ``token``: held, dead, or the app's alarm (see the module docstring)."""
        first = self.suspects.get(token)
        if first is not None and self.successes > first:
            del self.suspects[token]
            return Verdict.TOKEN_DEAD
        if first is None:
            if len(self.suspects) >= MAX_SUSPECTS:
                del self.suspects[next(iter(self.suspects))]
            self.suspects[token] = self.successes
        return Verdict.APP_ALARM if self.run() >= ALARM_DEVICES else Verdict.HELD

    def run(self) -> int:
        """Different tokens that answered a mismatch since the app's last success."""
        return sum(1 for seen in self.suspects.values() if seen == self.successes)
