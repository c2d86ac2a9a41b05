"""A complete local setup: fake APNs + fake FCM, credentials, and config files pointing at them.

Used by the test suite, ``parley-relay demo`` and the benchmarks, so that all three exercise the same
real path (config loading, credential files, endpoints, test CA).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relay.testing.fake_apns import FakeApns
from relay.testing.fake_fcm import FakeFcm
from relay.testing.keys import ApnsKey, ServiceAccount, make_apns_key

IOS_TOKEN = "0801fc577294c34e0b28ad2839435945e7b3c1d09a6f2e48b5c7d3a1f0e9b2c4"
ANDROID_TOKEN = "eJ9xQ2-fcm-registration-token:APA91bH_demo_android_device"
AUTH_HEADER = "X-Parley-Relay-Key"
AUTH_VALUE = "demo-shared-secret-3f9a"

# The two notifications of Parley's webhook documentation (shapes as documented; values are samples).
SAMPLE_MESSAGE: dict[str, Any] = {
    "data": {
        "type": "message",
        "object": {
            "id": 3224,
            "time": 1583243432,
            "image": None,
            "typeId": 2,
            "agent": {"id": 1, "name": "Webuildapps", "avatar": "https://example.com/avatar.png"},
            "message": "Hello! We received your photo 📷",
        },
    },
    "to": [IOS_TOKEN],
}
SAMPLE_EVENT: dict[str, Any] = {
    "data": {
        "type": "event",
        "object": {
            "name": "startTyping",
            "body": {"agent": {"id": 1, "name": "Webuildapps", "avatar": "https://example.com/avatar.png"}},
        },
    },
    "to": [ANDROID_TOKEN],
}


def sample(kind: str, to: list[str] | None = None, **object_fields: Any) -> dict[str, Any]:
    """A copy of a sample notification with other tokens and/or object fields."""
    doc = copy.deepcopy(SAMPLE_MESSAGE if kind == "message" else SAMPLE_EVENT)
    if to is not None:
        doc["to"] = to
    doc["data"]["object"].update(object_fields)
    return doc


@dataclass
class Sandbox:
    """Fakes plus a directory of config files; ``write()`` produces a relay config for them."""

    root: Path
    apns: FakeApns
    fcm: FakeFcm
    apns_key: ApnsKey
    account: ServiceAccount
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    apns_sandbox: FakeApns | None = None  # Apple's sandbox host, once start_apns_sandbox() ran

    def start_apns_sandbox(self) -> FakeApns:
        """A second fake APNs playing Apple's sandbox host (same test CA, same key): from now on the written
        config points the ``ios`` app's ``sandbox_endpoint`` at it."""
        if self.apns_sandbox is None:
            self.apns_sandbox = FakeApns([self.apns_key], ca=self.apns.ca).start()
        return self.apns_sandbox

    @classmethod
    def start(cls, root: Path) -> Sandbox:
        """Start both fakes (each on its own thread) and write the credentials under ``root``."""
        root.mkdir(parents=True, exist_ok=True)
        key = make_apns_key()
        apns = FakeApns([key]).start()
        fcm = FakeFcm().start()
        account = fcm.make_service_account("demo-project")
        key.write_p8(root / "AuthKey.p8")
        account.write(root / "firebase.json")
        box = cls(root, apns, fcm, key, account)
        box.devices = {IOS_TOKEN: {"app": "ios"}, ANDROID_TOKEN: {"app": "android"}}
        return box

    def stop(self) -> None:
        self.apns.stop()
        self.fcm.stop()
        if self.apns_sandbox is not None:
            self.apns_sandbox.stop()

    def config_dict(self, **overrides: Any) -> dict[str, Any]:
        """The main config as a dict; ``overrides`` replace top-level sections (apps are merged)."""
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            # The operations listener (/metrics, /status) as by default, but on a free port: tests run side by side.
            "metrics": {"listen": {"host": "127.0.0.1", "port": 0}},
            "webhook": {"path": "/parley/webhook"},
            "auth": {"headers": {AUTH_HEADER: AUTH_VALUE}},
            "store": {"backend": "sqlite", "path": str(self.root / "relay.db")},
            "registry": "devices.yaml",
            "delivery": {"backoff_initial": 0.05, "backoff_max": 0.5},
            "apps": {
                "ios": {
                    "platform": "apns",
                    "topic": "com.example.parleyapp",
                    "environment": "production",
                    "key_file": "AuthKey.p8",
                    "key_id": self.apns_key.key_id,
                    "team_id": self.apns_key.team_id,
                    "endpoint": self.apns.url,
                    "ca_file": self.apns.ca_file,
                },
                "android": {
                    "platform": "fcm",
                    "service_account_file": "firebase.json",
                    "endpoint": self.fcm.url,
                },
            },
        }
        if self.apns_sandbox is not None:
            config["apps"]["ios"]["sandbox_endpoint"] = self.apns_sandbox.url
        apps_override = overrides.pop("apps", None)
        config.update(overrides)
        if apps_override:
            for name, app in apps_override.items():
                if app is None:
                    config["apps"].pop(name, None)
                else:
                    config["apps"][name] = {**config["apps"].get(name, {}), **app}
        return config

    def write(self, name: str = "relay.yaml", devices: Mapping[str, Mapping[str, str]] | None = None,
              routing: list[dict[str, str]] | None = None, **overrides: Any) -> Path:
        """Write ``name`` and its registry file; returns the main config path."""
        config = self.config_dict(**overrides)
        registry: dict[str, Any] = {"devices": dict(devices if devices is not None else self.devices)}
        if routing:
            registry["routing"] = routing
        (self.root / config["registry"]).write_text(yaml.safe_dump(registry, allow_unicode=True))
        path = self.root / name
        path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        return path


def pretty(doc: Any) -> str:
    """Indented JSON for humans (demo output)."""
    return json.dumps(doc, indent=2, ensure_ascii=False)
