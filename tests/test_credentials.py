"""Credentials under systemd (issue 20 item 3): a reload says which ``cred:`` files it re-read byte for byte,
since systemd copies ``LoadCredential=`` files only when the service starts."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from relay.observability import LOGGER_NAME
from relay.runtime.relay import reload
from relay.testing.keys import make_apns_key
from relay.testing.sandbox import Sandbox
from tests.conftest import MakeRelay


def _unchanged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "fields", {})["credentials"] for r in caplog.records
            if r.getMessage() == "reload re-read credentials unchanged"]


async def test_a_reload_names_the_credentials_it_reread_unchanged(
        make_relay: MakeRelay, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With the APNs key and the service account given as ``cred:`` names, a reload that finds both files as
    they were says so (and how to pick up a replaced file); once one changed, only the other is named."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.copy(sandbox.root / "AuthKey.p8", creds / "apns.p8")
    shutil.copy(sandbox.root / "firebase.json", creds / "firebase.json")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    apps = {"ios": {"key_file": "cred:apns.p8"}, "android": {"service_account_file": "cred:firebase.json"}}
    r = await make_relay(apps=apps)
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    assert await reload(r.relay)
    assert _unchanged(caplog) == ["apns.p8,firebase.json"]
    caplog.clear()
    rotated = make_apns_key(sandbox.apns_key.key_id, sandbox.apns_key.team_id)
    rotated.write_p8(creds / "apns.p8")
    sandbox.apns.add_key(rotated)
    assert await reload(r.relay)
    assert _unchanged(caplog) == ["firebase.json"]
