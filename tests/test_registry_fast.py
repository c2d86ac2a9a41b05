"""The flat-registry fast path reads exactly what the YAML loader reads, and steps aside for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ApnsApp, FcmApp
from relay.config.problems import load_yaml
from relay.registry.fast import read_flat_devices
from relay.registry.file import parse_registry

APPS = {"ios": ApnsApp(name="ios", topic="com.example", cert_file=Path("c.pem")),
        "android": FcmApp(name="android", service_account_file=Path("sa.json"))}

FLAT = """devices:
  0801fc577294c34e0b28ad2839435945e7b3c1d09a6f2e48b5c7d3a1f0e9b2c4: {app: ios}
  'eJ9x:APA91bH_x': {app: android}
  "quoted-token": {app: android, device_token: other-device}
  same-device: {app: ios, device_token: same-device}
  fcm-1:APA91bH_plain_colon: {app: android}

  # a comment line
  0801fc577294c34e0b28ad2839435945e7b3c1d09a6f2e48b5c7d3a1f0e9b2c4: {app: android}
  dev-build: {app: ios, environment: sandbox}
  store-build: {app: ios, device_token: store-device, environment: production}
  was-sandbox: {app: ios, environment: sandbox}
  was-sandbox: {app: ios}
"""


def _yaml_devices(path: Path) -> dict[str, tuple[str, str | None]]:
    raw = load_yaml(path)["devices"]
    return {str(t): (e["app"], None if e.get("device_token") in (None, str(t)) else e["device_token"])
            for t, e in raw.items()}


def test_flat_file_reads_the_same_as_yaml(tmp_path: Path) -> None:
    """Quoted and plain tokens, device_token overrides, APNs environments, comments, blank lines and a repeated
    key (last wins, its environment too)."""
    path = tmp_path / "devices.yaml"
    path.write_text(FLAT)
    flat = read_flat_devices(path, APPS)
    assert flat is not None
    assert flat.devices == _yaml_devices(path)
    assert flat.environments == parse_registry(load_yaml(path), path, APPS).environments
    assert flat.environments == {"dev-build": "sandbox", "store-build": "production"}


@pytest.mark.parametrize("line", [
    "  123: {app: ios}",  # YAML reads an int: the full parser decides what that means
    "  yes: {app: ios}",  # a YAML 1.1 bool
    "  2001-12-14: {app: ios}",  # a timestamp
    "  token: {app: unknown-app}",  # an error the full parser names
    "  token: {app: ios}  # trailing comment",
    "  'it''s': {app: ios}",  # an escaped quote
    '  "tab\\t": {app: ios}',  # an escape sequence
    "    token: {app: ios}",  # other indentation
    "  token: {device_token: x, app: ios}",  # other key order
    "  token: {app: android, environment: sandbox}",  # FCM devices have none: the full parser names it
    "  token: {app: ios, environment: staging}",  # not an environment
    "  token: {app: ios, environment: 'sandbox'}",  # quoted
    "  token: {app: ios, environment: sandbox, device_token: x}",  # other key order
])
def test_anything_else_falls_back_to_the_yaml_loader(tmp_path: Path, line: str) -> None:
    """One line outside the flat form makes the fast path return None (the caller then parses YAML)."""
    path = tmp_path / "devices.yaml"
    path.write_text(f"devices:\n  plain-token: {{app: ios}}\n{line}\n")
    assert read_flat_devices(path, APPS) is None


def test_routing_rules_fall_back_to_the_yaml_loader(tmp_path: Path) -> None:
    """A file with a routing: section is left to the full parser."""
    path = tmp_path / "devices.yaml"
    path.write_text("devices:\n  t: {app: ios}\nrouting:\n  - {match: any, app: ios}\n")
    assert read_flat_devices(path, APPS) is None


def test_devices_without_their_own_token_share_one_tuple(tmp_path: Path) -> None:
    """Memory: every device of an app without a device_token points at one shared (app, None) value."""
    path = tmp_path / "devices.yaml"
    path.write_text("devices:\n" + "".join(f"  token-{n}: {{app: ios}}\n" for n in range(100)))
    flat = read_flat_devices(path, APPS)
    assert flat is not None
    assert len({id(value) for value in flat.devices.values()}) == 1
