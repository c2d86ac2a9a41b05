"""Configuration problems as an operator meets them: YAML 1.1 coercions, Apple's ids, cross-field rules, one
line per problem with its YAML line, a "did you mean", and the registry's tokens checked as the API does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.cli import main
from relay.config import load_config
from relay.errors import ConfigError
from relay.runtime.relay import reload
from relay.testing.sandbox import AUTH_HEADER, Sandbox
from tests.conftest import MakeRelay


def _raw(path: Path, marker: str, written: str) -> Path:
    """Put ``written`` into the file exactly as an operator would type it (safe_dump would quote it)."""
    path.write_text(path.read_text().replace(f"'{marker}'", written).replace(marker, written))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(("written", "reads"), [("0123", "83"), ("0x1F", "31"), ("1_0", "10"), ("12.50", "12.5")])
def test_a_yaml_number_for_a_text_key_is_refused_with_a_quote_hint(sandbox: Sandbox, written: str,
                                                                   reads: str) -> None:
    """`key_id: 0123` (YAML 1.1 reads the number 83) is refused, naming key and line, with "put it in quotes"."""
    path = _raw(sandbox.write(apps={"ios": {"key_id": "KEY_ID_HERE"}}), "KEY_ID_HERE", written)
    [problem] = _problems(path)
    assert re.search(rf"apps\.ios\.key_id: must be text, not (int|float): put it in quotes "
                     rf"\(key_id: \"{written}\"\); YAML reads {written} as the number {reads} \(line \d+\)$", problem)


def test_a_device_key_number_is_named_in_check_config(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config prints the device key's problem once: quote hint, file and line."""
    sandbox.write(devices={"DEVICE_KEY": {"app": "android"}})
    _raw(sandbox.root / "devices.yaml", "DEVICE_KEY", "0777")
    assert main(["check-config", "--config", str(sandbox.root / "relay.yaml")]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith("devices.yaml: devices.0777: must be text, not int: put it in quotes (\"0777\": ...); "
                         "YAML reads 0777 as the number 511 (line 2)")


@pytest.mark.parametrize("value", ["XYZ987", "abcde12345", "ABCDE123456"])
def test_key_id_and_team_id_are_ten_characters_of_a_to_z_and_digits(sandbox: Sandbox, value: str) -> None:
    """Apple's Key ID and Team ID are 10 characters of A-Z 0-9: the README's old `XYZ987` is refused."""
    problems = _problems(sandbox.write(apps={"ios": {"key_id": value, "team_id": value}}))
    assert [p.split(": ")[1] for p in problems] == ["apps.ios.key_id", "apps.ios.team_id"]
    assert all("must be 10 characters of A-Z and 0-9" in p for p in problems)


def test_an_unset_environment_variable_is_one_line(sandbox: Sandbox, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`X-Key: ${UNSET}` is one problem (the variable), not also "must not be empty" for the same key."""
    monkeypatch.delenv("RELAY_TEST_UNSET", raising=False)
    path = sandbox.write(auth={"headers": {AUTH_HEADER: "${RELAY_TEST_UNSET}"}})
    assert main(["check-config", "--config", str(path)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(re.escape(f"error: {path}: auth.headers.{AUTH_HEADER}: environment variable RELAY_TEST_UNSET "
                                  "is not set") + r" \(line \d+\)", line)


@pytest.mark.parametrize(("section", "written", "meant"), [
    ("webhook", "max_body_byte", "max_body_bytes"), ("delivery", "backoff_maximum", "backoff_max"),
    ("listen", "hots", "host"),
])
def test_a_misspelt_key_gets_a_did_you_mean(sandbox: Sandbox, section: str, written: str, meant: str) -> None:
    """An unknown key close to a known one names it, with the line of the misspelt key."""
    [problem] = _problems(sandbox.write(**{section: {written: 1}}))
    assert re.search(rf"{section}\.{written}: unknown key \(did you mean {meant}\?\) \(line \d+\)$", problem)


@pytest.mark.parametrize(("section", "key"), [("delivery", "max_age"), ("webhook", "dedupe_window")])
def test_an_infinite_time_is_refused_at_load(sandbox: Sandbox, section: str, key: str) -> None:
    """YAML's `.inf` ("forever") passed the parser: a `max_age` of it failed every push (its time to live is a
    whole number of seconds) and a `dedupe_window` of it every webhook (the store's JSON has no infinity)."""
    path = _raw(sandbox.write(**{section: {key: 12345}}), "12345", ".inf")
    assert any(f"{section}.{key}: Input should be a finite number" in p for p in _problems(path)), _problems(path)


def test_a_send_timeout_that_could_outlast_the_claims_lease_is_refused(sandbox: Sandbox) -> None:
    """A send (and its one resend after a 401) must end within its claim's 300 s lease, half of which it may
    have spent claimed ahead: past the lease another claim takes the delivery again and sends it twice."""
    assert load_config(sandbox.write(delivery={"send_timeout": 60})).delivery.send_timeout == 60
    [problem] = _problems(sandbox.write(delivery={"send_timeout": 61}))
    assert re.search(r"delivery\.send_timeout: must be at most 60(\.0)?, not 61 \(line \d+\)$", problem)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"delivery": {"backoff_initial": 10, "backoff_max": 5}},
     "delivery.backoff_initial: must not exceed backoff_max (5), not 10"),
    ({"metrics": {"listen": {"host": "127.0.0.1", "port": 9000}}, "listen": {"host": "127.0.0.1", "port": 9000}},
     "metrics.listen: must differ from listen (127.0.0.1:9000)"),
    ({"webhook": {"reject_dead_tokens": "yes"}}, "webhook.reject_dead_tokens: must be true or false, not 'yes'"),
    ({"delivery": {"concurrency": True}}, "delivery.concurrency: must be a number, not True"),
])
def test_cross_field_and_strict_rules_are_refused_at_load(sandbox: Sandbox, overrides: dict[str, object],
                                                          expected: str) -> None:
    """Rules that used to pass the parser (and fail later, or coerce) are named at load."""
    assert any(expected in p for p in _problems(sandbox.write(**overrides)))


async def test_a_reload_with_backoff_initial_above_backoff_max_is_rejected_and_changes_nothing(
        make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Before, the swap happened and `dispatcher.configure()` then raised: a half-applied reload."""
    r = await make_relay()
    before = r.relay.config
    sandbox.write(delivery={"backoff_initial": 10, "backoff_max": 5})
    assert not await reload(r.relay)
    assert r.relay.config is before


@pytest.mark.parametrize(("token", "entry"), [
    ("0801fc577294c34e0b28ad2839435945", {"app": "ios"}),  # 32 hex: the README's old example
    ("xcode", {"app": "ios",
               "device_token": "<7f3a9c0d 5e1b2a4c 6d8e0f1a 3b5c7d9e 1f3a5b7c 9d1e3f5a 7b9c1d3e 5f7a9b1c>"}),
    ("z" * 64, {"app": "ios"}),
    ("eJ9xQ2-fcm-registration-token:APA91bH_on_the_wrong_app", {"app": "ios"}),
    ("short", {"app": "android"}),
])
def test_check_config_refuses_registry_tokens_the_device_api_refuses(
        sandbox: Sandbox, capsys: pytest.CaptureFixture[str], token: str, entry: dict[str, str]) -> None:
    """Each registry entry goes through the API's token check: file, key, why and line."""
    path = sandbox.write(devices={**sandbox.devices, token: entry})
    assert main(["check-config", "--config", str(path)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    key = f"devices.{token}" + (".device_token" if "device_token" in entry else "")
    platform = "FCM: the registration token" if entry["app"] == "android" else "APNs: the device token"
    assert line.startswith(f"error: {sandbox.root / 'devices.yaml'}: {key}: app '{entry['app']}' is {platform}")
    assert re.search(r" \(line \d+\)$", line)
