"""`parley-relay deliveries` (SPEC §8): an operator asked "did the push for message 3651 to this phone go out?"
answers it from the store, with the real CLI in a shell that has none of the credential files, while a relay
with the real provider clients against the fakes delivers (SQLite, and Redis once its store has deliveries)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.cli.deliveries import age
from relay.outcome import WaitReason
from relay.store.base import DeliveryRecord
from relay.testing.process import relay_command
from relay.testing.sandbox import ANDROID_TOKEN, IOS_TOKEN, Sandbox, sample
from tests.conftest import REDIS_URL, MakeRelay, RelayUnderTest, redis_keyspace

REFUSED_TOKEN = "a1b2c3d4e5f60718293a4b5c6d7e8f90" * 2  # a registered iPhone whose pushes APNs refuses for good
PHONE_TOKEN = "c0ffee0123456789abcdef0123456789" * 2  # an iPhone's APNs token, registered under another Parley token
PARLEY_TOKEN = "parley-push-token-of-the-phone"
UNKNOWN_TOKEN = "eJ9x-no-registry-entry:APA91b_unknown"  # no registry entry, no routing rule: unroutable
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(params=["sqlite", "redis"])
def store_section(request: pytest.FixtureRequest, sandbox: Sandbox) -> Iterator[dict[str, Any]]:
    """The ``store`` config section of each backend (a fresh key prefix on Redis, deleted afterwards)."""
    if request.param == "sqlite":
        yield {"backend": "sqlite", "path": str(sandbox.root / "relay.db")}
        return
    with redis_keyspace("deliveries") as prefix:
        yield {"backend": "redis", "url": REDIS_URL, "prefix": prefix}


@pytest.fixture
def devices(sandbox: Sandbox) -> dict[str, dict[str, str]]:
    """The registry: the sandbox's iPhone and Android phone, an iPhone APNs refuses, and one registered under a
    Parley token other than its APNs token."""
    return {**sandbox.devices, REFUSED_TOKEN: {"app": "ios"},
            PARLEY_TOKEN: {"app": "ios", "device_token": PHONE_TOKEN}}


@pytest.fixture
async def relay(make_relay: MakeRelay, sandbox: Sandbox, store_section: dict[str, Any],
                devices: dict[str, dict[str, str]]) -> AsyncIterator[RelayUnderTest]:
    """A relay at default delivery settings on that registry."""
    sandbox.apns.respond(REFUSED_TOKEN, status=400, reason="BadCollapseId")  # a permanent refusal: dead letter
    yield await make_relay(devices=devices, store=store_section, delivery={})


@pytest.fixture
def cli_config(sandbox: Sandbox, store_section: dict[str, Any], devices: dict[str, dict[str, str]]) -> Path:
    """The operator's config: the documented systemd setup, every credential a `cred:` name that only the running
    service is handed, the webhook secret in its environment; the same store as the relay's."""
    return sandbox.write(
        "operator.yaml", devices=devices, store=store_section,
        apps={"ios": {"key_file": "cred:apns.p8"}, "android": {"service_account_file": "cred:firebase.json"}},
        auth={"headers": {"X-Parley-Relay-Key": "${PARLEY_RELAY_KEY}"}},
    )


async def deliveries_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """Run the installed `parley-relay deliveries` in a shell without credentials; exit code, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("PARLEY_RELAY_KEY", "CREDENTIALS_DIRECTORY")}
    env["CREDENTIALS_DIRECTORY"] = str(config.parent / "no-credentials-here")
    child = await asyncio.create_subprocess_exec(
        *relay_command(), "deliveries", *args, "--config", str(config), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def until(relay: RelayUnderTest, message_id: str, state: str,
                wait_reason: WaitReason | None = None) -> DeliveryRecord:
    """Wait until every delivery of ``message_id`` is in ``state`` (and waits for ``wait_reason``, if given):
    the store is the only witness of that event."""
    deadline = time.monotonic() + 15
    while True:
        found = await relay.relay.store.deliveries(message_id=message_id)
        if found and all(d.state == state and (wait_reason is None or d.wait_reason is wait_reason) for d in found):
            return found[0]
        assert time.monotonic() < deadline, f"message {message_id} never reached {state}: {found}"
        await asyncio.sleep(0.02)


def table(out: str) -> list[dict[str, str]]:
    """The aligned table back into rows, split at the header's column starts."""
    header, *lines = out.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    return [{name: line[start:end].strip() for name, start, end in zip(names, starts, [*starts[1:], None],
                                                                            strict=True)} for line in lines]


async def test_a_delivered_message_is_found_by_message_token_and_request_id(
        relay: RelayUnderTest, cli_config: Path) -> None:
    """The push for message 3651 sent with X-Request-Id shows as sent, one attempt, with that request id and
    message id, whichever of --message, --token or --request the operator has; the token is shortened."""
    status, _ = await relay.post(sample("message", to=[IOS_TOKEN], id=3651),
                                 headers={"X-Request-Id": "parley-req-3651"})
    assert status == 200
    stored = await until(relay, "3651", "sent")
    assert (stored.request_id, stored.message_id, stored.token) == ("parley-req-3651", "3651", IOS_TOKEN)

    for args in (["--message", "3651"], ["--token", IOS_TOKEN], ["--request", "parley-req-3651"],
                 ["--message", "3651", "--token", IOS_TOKEN]):
        code, out, err = await deliveries_cli(cli_config, *args)
        assert code == 0, err
        (row,) = table(out)
        assert row["STATE"] == "sent" and row["ATTEMPTS"] == "1" and row["APP"] == "ios"
        assert row["REQUEST"] == "parley-req-3651" and row["MESSAGE"] == "3651" and row["WAIT"] == "-"
        assert row["TOKEN"] == "0801fc…b2c4" and IOS_TOKEN not in out
        assert re.fullmatch(ISO + r" \(\d+s ago\)", row["RECEIVED"]) and re.fullmatch(ISO + r" \(\d+s ago\)",
                                                                                      row["FINISHED"])
        assert row["NEXT"] == "-" and "error" not in err
        assert "1 delivery for" in err and "store.keep_finished = 3600 s" in err

    code, out, _ = await deliveries_cli(cli_config, "--message", "3651", "--json", "--full-token")
    (doc,) = [json.loads(line) for line in out.splitlines()]
    assert doc["state"] == "sent" and doc["attempts"] == 1 and doc["token"] == IOS_TOKEN
    assert doc["request_id"] == "parley-req-3651" and doc["message_id"] == "3651" and doc["kind"] == "message"
    assert re.fullmatch(ISO, doc["finished_at"]) and doc["next_at"] is None and doc["wait_reason"] is None


async def test_a_waiting_and_a_dead_lettered_delivery_say_why(relay: RelayUnderTest, cli_config: Path) -> None:
    """A message to a token without a registry entry shows pending, waiting as unroutable, with the time it is
    due again; one APNs refused for good shows dead_letter with APNs' reason. Newest first, one per line in JSON."""
    await relay.post(sample("message", to=[UNKNOWN_TOKEN], id=3652), headers={"X-Request-Id": "req-waiting"})
    await until(relay, "3652", "pending", WaitReason.UNROUTABLE)  # tried once, no route found
    await relay.post(sample("message", to=[REFUSED_TOKEN], id=3653), headers={"X-Request-Id": "req-refused"})
    await until(relay, "3653", "dead_letter")

    code, out, _ = await deliveries_cli(cli_config, "--message", "3652")
    (row,) = table(out)
    assert code == 0 and row["STATE"] == "pending" and row["WAIT"] == WaitReason.UNROUTABLE.value
    assert re.fullmatch(ISO + r" \(in \w+\)", row["NEXT"]) and row["FINISHED"] == "-"
    assert row["REQUEST"] == "req-waiting" and row["APP"] == "-"

    code, out, _ = await deliveries_cli(cli_config, "--message", "3653")
    (row,) = table(out)
    assert code == 0 and row["STATE"] == "dead_letter" and "BadCollapseId" in row["REASON"]
    assert row["ATTEMPTS"] == "1" and row["TOKEN"] == "a1b2c3…8f90"

    await relay.post(sample("message", to=[IOS_TOKEN, ANDROID_TOKEN], id=3654), headers={"X-Request-Id": "two"})
    await until(relay, "3654", "sent")
    code, out, _ = await deliveries_cli(cli_config, "--request", "two", "--json")
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["token"] for d in docs] == ["eJ9xQ2…vice", "0801fc…b2c4"]  # newest (last stored) first
    assert {d["state"] for d in docs} == {"sent"} and {d["app"] for d in docs} == {"ios", "android"}


async def test_the_phones_provider_token_finds_the_deliveries_of_its_parley_token(
        relay: RelayUnderTest, cli_config: Path, sandbox: Sandbox) -> None:
    """An operator holding the phone's APNs token (not the Parley token it is registered under) still finds its
    deliveries, told which Parley token they were for."""
    await relay.post(sample("message", to=[PARLEY_TOKEN], id=3655))
    await until(relay, "3655", "sent")
    assert [r.device_token for r in sandbox.apns.requests] == [PHONE_TOKEN]
    code, out, err = await deliveries_cli(cli_config, "--token", PHONE_TOKEN)
    (row,) = table(out)
    assert code == 0 and row["STATE"] == "sent" and row["MESSAGE"] == "3655" and row["TOKEN"] == "parley…hone"
    assert "note: --token is the provider token of the registered Parley token parley…hone" in err


async def test_nothing_found_exits_1_and_says_how_long_deliveries_are_kept(
        relay: RelayUnderTest, cli_config: Path) -> None:
    """An unknown message id finds nothing: exit 1, and the operator learns that finished deliveries are kept
    store.keep_finished seconds (3600 by default); no filter at all is a usage error (2)."""
    code, out, err = await deliveries_cli(cli_config, "--message", "999999")
    assert code == 1 and out == ""
    assert "no deliveries found for --message 999999" in err and "store.keep_finished = 3600 s" in err
    code, _, err = await deliveries_cli(cli_config)
    assert code == 2 and "give --token, --request or --message" in err
    code, _, err = await deliveries_cli(cli_config, "--message", "1", "--limit", "0")
    assert code == 2 and "must be at least 1" in err


def test_ages_read_at_a_glance() -> None:
    """Durations print as seconds, minutes, hours or days with the next unit, never as raw seconds."""
    assert [age(s) for s in (0, 42, 307, 3 * 3600 + 12 * 60 + 5, 2 * 86400 + 4 * 3600)] == [
        "0s", "42s", "5m07s", "3h12m", "2d04h"]
