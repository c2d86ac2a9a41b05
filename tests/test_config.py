"""Configuration: typed loading, every problem named by file and key, and `check-config`'s exit code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from relay.cli import main
from relay.config import ApnsApp, FcmApp, load_config
from relay.errors import ConfigError
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.testing.sandbox import Sandbox


def test_sandbox_config_loads_into_typed_apps(sandbox: Sandbox) -> None:
    """A complete config loads into frozen, typed settings with defaults filled in."""
    config = load_config(sandbox.write())
    assert isinstance(config.apps["ios"], ApnsApp) and isinstance(config.apps["android"], FcmApp)
    assert config.webhook.max_body_bytes == 65536 and config.webhook.dedupe_window == 600
    assert config.apps["ios"].policy.delivery_for(5) == "silent"
    assert config.apps["ios"].policy.delivery_for(99) == "alert"
    assert config.registry == sandbox.root / "devices.yaml"


def test_every_problem_is_reported_with_file_and_key(sandbox: Sandbox) -> None:
    """Unknown keys, wrong types, missing required keys and missing files are all listed at once."""
    path = sandbox.write(
        webhook={"path": "no-slash", "max_body_bytes": "big", "surprise": 1},
        apps={"ios": {"topic": None, "key_file": "missing.p8"}, "android": {"platform": "gcm"}},
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for expected in (
        "webhook.path: must start with /",
        "webhook.max_body_bytes: must be an integer",
        "webhook.surprise: unknown key",
        "apps.ios.topic: is required",
        "apps.ios.key_file: file not found",
        "apps.android.platform: 'gcm' is not a platform",
    ):
        assert expected in text
    assert all(p.file == str(path) for p in info.value.problems)


@pytest.mark.parametrize(("platform", "expected"), [
    ("gcm", "apps.android.platform: 'gcm' is not a platform (GCM, FCM's former name): use apns"),
    (None, "apps.android.platform: is required: use apns"),
])
def test_a_wrong_platform_is_one_line_naming_the_valid_values(
        sandbox: Sandbox, capsys: pytest.CaptureFixture[str], platform: str | None, expected: str) -> None:
    """`platform: gcm` (or none) is answered with ONE line naming apns and fcm, not a cascade of the keys
    that depend on the platform."""
    path = sandbox.write(apps={"android": {"platform": platform}})
    assert main(["check-config", "--config", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(re.escape(f"error: {path}: {expected} (iOS, Apple Push Notification "
                                                      "service) or fcm (Android, Firebase Cloud Messaging)")
                                            + r" \(line \d+\)", lines[0])


def test_check_config_names_each_problem_once(sandbox: Sandbox, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every missing credential file (apps, signature, OAuth, API keys; `cred:` names included) is one
    line, naming its key; no line repeats and no key gets a second, consequential line."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "empty"))
    path = sandbox.write(
        apps={"ios": {"key_file": "cred:apns.p8"}, "android": {"service_account_file": "cred:firebase.json"}},
        auth={"headers": {"X-Key": "secret-value"},
              "signature": {"header": "X-Sig", "secret_file": "cred:sig.key"},
              "oauth": {"clients": {"parley": {"secret_file": "cred:client.secret"}},
                        "signing_secret_file": "cred:oauth.key"}},
        api={"keys": {"backend": {"key_file": "cred:api.key", "apps": ["ios"]}}},
    )
    assert main(["check-config", "--config", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    keys = [line.split(": ")[2] for line in lines]
    assert sorted(keys) == sorted([
        "apps.ios.key_file", "apps.android.service_account_file", "auth.signature.secret_file",
        "auth.oauth.clients.parley.secret_file", "auth.oauth.signing_secret_file", "api.keys.backend.key_file"])
    assert all("file not found" in line for line in lines)


def test_check_config_reports_every_unusable_credential_file(sandbox: Sandbox,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Two apps with unusable credentials (a .p8 that is no key, a service account that is no JSON) are
    both reported, not only the first one."""
    (sandbox.root / "AuthKey.p8").write_text("garbage")
    (sandbox.root / "firebase.json").write_text("not json")
    assert main(["check-config", "--config", str(sandbox.write())]) == 1
    err = capsys.readouterr().err
    assert "apps.ios.key_file: not a usable APNs .p8" in err
    assert "apps.android.service_account_file: not a usable service account JSON" in err


def test_a_device_without_app_is_named_as_such(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """A registry entry without `app:` says the app is required and lists the apps, not "unknown app None"."""
    path = sandbox.write(devices={"tok1": {"device_token": "b" * 64}})
    assert main(["check-config", "--config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {sandbox.root / 'devices.yaml'}: devices.tok1.app: is required: the app this device belongs to "
        "(one of: ios, android) (line 2)"]


def test_no_inbound_authentication_is_an_error_unless_allowed(sandbox: Sandbox,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A config without any auth layer fails check-config and serve (nothing starts) naming `auth`;
    `auth.allow_unauthenticated: true` makes it a deliberate choice that loads. A configured but broken
    layer is reported as itself, not also as "no authentication"."""
    path = sandbox.write(auth={"rate_limit": {"max_failures": 5}})
    assert main(["check-config", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: auth: no inbound authentication" in err and "allow_unauthenticated: true" in err
    assert main(["serve", "--config", str(path)]) == 1
    assert "auth: no inbound authentication" in capsys.readouterr().err
    allowed = sandbox.write(auth={"allow_unauthenticated": True})
    assert main(["check-config", "--config", str(allowed)]) == 0
    config = load_config(allowed)
    assert config.auth.allow_unauthenticated and not config.auth.headers
    # A layer that is configured but broken gets its own line only, not the no-auth line as well.
    broken = sandbox.write(auth={"signature": {"header": "X-Sig", "secret_file": "missing.key"}})
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert [p.key for p in info.value.problems] == ["auth.signature.secret_file"]


def test_env_vars_are_substituted_and_missing_ones_named(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """`${VAR}` inside values comes from the environment; an unset variable is an error naming the key."""
    monkeypatch.setenv("RELAY_TEST_SECRET", "s3cret")
    config = load_config(sandbox.write(auth={"headers": {"X-Key": "${RELAY_TEST_SECRET}"}}))
    assert config.auth.headers == {"X-Key": ("s3cret",)}
    monkeypatch.delenv("RELAY_TEST_SECRET")
    with pytest.raises(ConfigError, match=r"auth\.headers\.X-Key: environment variable RELAY_TEST_SECRET is not set"):
        load_config(sandbox.write(auth={"headers": {"X-Key": "${RELAY_TEST_SECRET}"}}))


def test_systemd_credentials_are_read_from_credentials_directory(sandbox: Sandbox, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`cred:NAME` resolves in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "apns.p8").write_text((sandbox.root / "AuthKey.p8").read_text())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(sandbox.write(apps={"ios": {"key_file": "cred:apns.p8"}}))
    app = config.apps["ios"]
    assert isinstance(app, ApnsApp) and app.key_file == creds / "apns.p8"


def test_registry_device_naming_unknown_app_is_an_error(sandbox: Sandbox) -> None:
    """A device that names an app the config does not define fails with the registry file and key."""
    config = load_config(sandbox.write(devices={"tok1": {"app": "nope"}}))
    with pytest.raises(ConfigError, match=r"devices\.yaml: devices\.tok1\.app: unknown app 'nope'"):
        load_registry(config.registry, config.apps)


def test_registry_device_token_defaults_to_the_key_and_rules_apply_in_order(sandbox: Sandbox) -> None:
    """device_token defaults to the Parley token; routing rules route tokens without an entry."""
    config = load_config(sandbox.write(
        devices={"a" * 64: {"app": "ios"}, "tok2": {"app": "ios", "device_token": "b" * 64}},
        routing=[{"match": "apns-hex", "app": "ios"}, {"match": "any", "app": "android"}],
    ))
    registry = Registry(config.apps, load_registry(config.registry, config.apps))
    assert registry.lookup("a" * 64).device_token == "a" * 64  # type: ignore[union-attr]
    assert registry.lookup("tok2").device_token == "b" * 64  # type: ignore[union-attr]
    assert registry.lookup("c" * 64).app.name == "ios"  # type: ignore[union-attr]
    assert registry.lookup("fcm:token").app.name == "android"  # type: ignore[union-attr]


def test_apns_environment_settings_have_safe_defaults_and_are_checked(sandbox: Sandbox) -> None:
    """``sandbox_fallback`` is on unless turned off, ``sandbox_endpoint`` is a base URL; both belong to APNs apps."""
    ios = load_config(sandbox.write()).apps["ios"]
    assert isinstance(ios, ApnsApp) and (ios.sandbox_fallback, ios.sandbox_endpoint) == (True, None)
    ios = load_config(sandbox.write(apps={"ios": {"sandbox_fallback": False,
                                                  "sandbox_endpoint": "https://127.0.0.1:9443/"}})).apps["ios"]
    assert isinstance(ios, ApnsApp) and (ios.sandbox_fallback, ios.sandbox_endpoint) == (False, "https://127.0.0.1:9443")
    with pytest.raises(ConfigError) as info:
        load_config(sandbox.write(apps={"ios": {"sandbox_fallback": "maybe", "sandbox_endpoint": "sandbox.host"},
                                        "android": {"sandbox_fallback": True}}))
    text = str(info.value)
    for expected in ("apps.ios.sandbox_fallback: must be true or false",
                     "apps.ios.sandbox_endpoint: must be a base URL", "apps.android.sandbox_fallback: unknown key"):
        assert expected in text


def test_registry_device_environment_is_checked(sandbox: Sandbox) -> None:
    """A device's ``environment`` is sandbox or production, and only APNs devices have one; errors name the key."""
    config = load_config(sandbox.write(devices={"tok1": {"app": "ios", "environment": "staging"},
                                                "tok2": {"app": "android", "environment": "sandbox"}}))
    with pytest.raises(ConfigError) as info:
        load_registry(config.registry, config.apps)
    text = str(info.value)
    assert "devices.tok1.environment: must be one of production, sandbox, not 'staging'" in text
    assert "devices.tok2.environment: app 'android' is FCM: only APNs devices have an environment" in text
    config = load_config(sandbox.write(devices={"a" * 64: {"app": "ios", "environment": "sandbox"},
                                                "tok3": {"app": "ios", "device_token": "b" * 64}}))
    registry = Registry(config.apps, load_registry(config.registry, config.apps))
    assert registry.lookup("a" * 64).environment == "sandbox"  # type: ignore[union-attr]
    assert registry.lookup("tok3").environment is None  # type: ignore[union-attr]


def test_check_config_accepts_a_good_config(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """`parley-relay check-config` loads credentials like serve does and exits 0."""
    assert main(["check-config", "--config", str(sandbox.write())]) == 0
    assert "ok (2 apps, 2 devices" in capsys.readouterr().out


def test_check_config_rejects_a_broken_config_naming_file_and_key(sandbox: Sandbox,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A broken config exits non-zero and prints each problem with its file and key."""
    path = sandbox.write(apps={"android": {"service_account_file": "nowhere.json"}})
    assert main(["check-config", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: apps.android.service_account_file: file not found" in err


def test_check_config_rejects_an_unusable_key(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """A key file that exists but is not a key is caught by check-config, naming file and key."""
    (sandbox.root / "AuthKey.p8").write_text("garbage")
    assert main(["check-config", "--config", str(sandbox.write())]) == 1
    err = capsys.readouterr().err
    assert "AuthKey.p8" in err and "apps.ios.key_file" in err


def test_invalid_yaml_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A YAML syntax error is reported with the file name."""
    path = tmp_path / "relay.yaml"
    path.write_text("apps: [unclosed\n")
    assert main(["check-config", "--config", str(path)]) == 1
    assert f"{path}: invalid YAML" in capsys.readouterr().err


def test_example_configs_document_every_key(sandbox: Sandbox) -> None:
    """config/relay.example.yaml parses with the same loader (credentials replaced by the sandbox's)."""
    example = yaml.safe_load((Path(__file__).parent.parent / "config" / "relay.example.yaml").read_text())
    example["auth"]["headers"] = {"X-Parley-Relay-Key": "x"}
    example["apps"]["ios-prod"].update(key_file=str(sandbox.root / "AuthKey.p8"))
    example["apps"]["android"].update(service_account_file=str(sandbox.root / "firebase.json"))
    (sandbox.root / "example.yaml").write_text(yaml.safe_dump(example))
    (sandbox.root / "devices.yaml").write_text("devices: {}\n")
    config = load_config(sandbox.root / "example.yaml")
    assert set(config.apps) == {"ios-prod", "android"}
    devices = yaml.safe_load((Path(__file__).parent.parent / "config" / "devices.example.yaml").read_text())
    assert set(devices) == {"devices", "routing"}
