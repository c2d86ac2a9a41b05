"""Outcome types shared by the providers, the dispatcher and the store.

A provider answers every send with a :class:`SendResult`; the dispatcher turns it into a stored end state
(:class:`EndState`) or a retry. Keeping both as enums (not strings and exceptions) is what lets every path
be counted and tested as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from relay.config.model import ApnsEnvironment


class Outcome(StrEnum):
    """How one provider request went (SPEC §6)."""

    SENT = "sent"
    RETRY = "retry"  # transient: 429, 5xx, timeouts, connection errors
    TOKEN_DEAD = "token_dead"  # noqa: S105 - the provider says this device token will never work again
    CONFIG_ERROR = "config_error"  # our credentials/topic are wrong: keep the push, alarm the operator
    PERMANENT = "permanent"  # any other refusal: dead-letter with the provider's reason
    # The token belongs to another topic or sender (APNs DeviceTokenNotForTopic, FCM SENDER_ID_MISMATCH): a dead
    # token, or the app's own topic/key/service account is wrong. One answer cannot tell: the dispatcher judges it
    # against the app's other deliveries (relay.delivery.mismatch).
    MISMATCH = "mismatch"
    # The provider counted the payload over its limit (APNs 413 PayloadTooLarge, FCM "Message is too big"): the
    # dispatcher fits it again to a smaller budget and sends it again.
    TOO_BIG = "too_big"


@dataclass(frozen=True, slots=True)
class SendResult:
    """A provider's answer to one push, already classified."""

    outcome: Outcome
    reason: str = ""
    status: int | None = None
    retry_after: float | None = None
    # Set when the push was sent through an APNs sandbox fallback: the dispatcher keeps it for the device token.
    learned_environment: ApnsEnvironment | None = None

    @classmethod
    def sent(cls, status: int = 200) -> SendResult:
        return cls(Outcome.SENT, "", status)


class EndState(StrEnum):
    """Where a delivery ends; every accepted delivery ends in exactly one of these (or is pending)."""

    SENT = "sent"
    EXPIRED = "expired"
    TOKEN_DEAD = "token_dead"  # noqa: S105 - a state name, not a secret
    UNROUTABLE = "unroutable"
    DEAD_LETTER = "dead_letter"
    SUPERSEDED = "superseded"  # a queued event replaced by a later one for the same push token and agent


class WaitReason(StrEnum):
    """Why a claimed delivery was put back to wait (SPEC §6): what releases it is typed, never free text.

    The provider's own words go in the separate ``detail``; ``Store.wake`` selects by these values.
    """

    RETRY = "retry"  # a transient failure (or an unexpected error): backoff, nothing else releases it
    UNROUTABLE = "unroutable"  # no registry entry yet: a device added (API, CLI, registry reload) releases it
    CONFIG_ERROR = "config_error"  # the app's credentials or topic were refused: a reload releases it
    CIRCUIT_OPEN = "circuit_open"  # the app's circuit is open: its recovery (or a reload) releases it
