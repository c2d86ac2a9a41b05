"""Rotating the webhook's header secret (issue 20 item 2, SPEC §3): a header accepts several values, each may
come from a systemd credential or a file, and the documented procedure never answers Parley a non-200 (three
of which delete users' push tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import load_config
from relay.errors import ConfigError
from relay.inbound.auth import AuthFailed, StaticHeaders
from relay.runtime.relay import reload
from relay.testing.sandbox import AUTH_HEADER, Sandbox, sample
from tests.conftest import MakeRelay

OLD, NEW = "old-webhook-secret-1c2f", "new-webhook-secret-9e7a"


def test_any_of_a_headers_values_passes_and_nothing_else() -> None:
    """With two values configured, each passes; a third value, a prefix or a missing header is refused."""
    layer = StaticHeaders({AUTH_HEADER: (OLD, NEW)})
    layer.verify({AUTH_HEADER: OLD}, b"")
    layer.verify({AUTH_HEADER: NEW}, b"")
    for headers in ({}, {AUTH_HEADER: "guess"}, {AUTH_HEADER: OLD[:-1]}, {AUTH_HEADER: f"{OLD},{NEW}"}):
        with pytest.raises(AuthFailed):
            layer.verify(headers, b"")


async def test_the_documented_rotation_answers_parley_200_throughout(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """docs/security.md's procedure: add the new secret beside the old (reload), switch Parley, remove the old
    (reload). Parley's requests get 200 at every step; the old secret is refused only at the end."""
    r = await make_relay(auth={"headers": {AUTH_HEADER: OLD}})

    async def status(secret: str, n: int) -> int:
        doc = sample("message")
        doc["data"]["object"]["id"] = n
        return (await r.post(doc, headers={AUTH_HEADER: secret}, auth=False))[0]

    assert await status(OLD, 1) == 200
    sandbox.write(auth={"headers": {AUTH_HEADER: [OLD, NEW]}})
    assert await reload(r.relay)
    assert (await status(OLD, 2), await status(NEW, 3)) == (200, 200)  # Parley switches whenever it likes
    sandbox.write(auth={"headers": {AUTH_HEADER: [NEW]}})
    assert await reload(r.relay)
    assert (await status(NEW, 4), await status(OLD, 5)) == (200, 401)


async def test_a_header_secret_is_read_from_a_systemd_credential(make_relay: MakeRelay, sandbox: Sandbox,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cred:NAME`` reads ``$CREDENTIALS_DIRECTORY/NAME`` (final newline dropped); so does ``file:PATH``, and a
    reload re-reads it, so no secret need sit in relay.yaml."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook.key").write_text(OLD + "\n")
    (sandbox.root / "next.key").write_text(NEW)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    r = await make_relay(auth={"headers": {AUTH_HEADER: ["cred:webhook.key", "file:next.key"]}})
    assert r.relay.config.auth.headers[AUTH_HEADER] == (OLD, NEW)
    assert (await r.post(sample("message"), headers={AUTH_HEADER: OLD}, auth=False))[0] == 200
    assert (await r.post(sample("message"), headers={AUTH_HEADER: "cred:webhook.key"}, auth=False))[0] == 401


@pytest.mark.parametrize(("value", "key", "words"), [
    ("cred:webhook.key", "auth.headers.X-Parley-Relay-Key", "cannot read the secret"),
    (["ok-secret-value", 12345], "auth.headers.X-Parley-Relay-Key[1]", "put in quotes"),
    ([], "auth.headers.X-Parley-Relay-Key", "at least one value"),
    ("file:missing.key", "auth.headers.X-Parley-Relay-Key", "cannot read the secret"),
])
def test_a_header_value_that_cannot_be_a_secret_is_a_config_problem(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: object, key: str, words: str) -> None:
    """A ``cred:`` value whose credential is missing is refused with its key, never taken as the literal secret
    ``cred:webhook.key``; so are a number, an empty list and a missing file."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(sandbox.write(auth={"headers": {AUTH_HEADER: value}}))
    (problem,) = info.value.problems
    assert problem.key == key and words in problem.message
