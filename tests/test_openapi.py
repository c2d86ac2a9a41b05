"""The device API keeps its OpenAPI 3.1 contract: a schemathesis run against the live relay finds no 500s and
no answer that the document does not describe.

The relay runs on its own thread and event loop (schemathesis calls it synchronously over a real socket),
on a sandbox config with one API key (scope manage) limited to the ``ios`` app, so that generated requests meet every
branch: unknown apps (404), the other app (403), bad tokens (400), missing keys (401), creations (201).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from relay.config import load_config
from relay.runtime.relay import create_app
from relay.testing.sandbox import Sandbox

API_KEY = "schemathesis-ios-key-4d2c9b8a7f6e5d4c"
MAX_EXAMPLES = 50  # per operation: keeps the whole file well under 30 s
DOCUMENT = Path(__file__).parent.parent / "relay" / "http" / "openapi.json"
_DOCUMENTED = {f"{method.upper()} {path}" for path, item in json.loads(DOCUMENT.read_text())["paths"].items()
               for method in item if method != "parameters"}


@dataclass
class LiveRelay:
    """A relay app served on 127.0.0.1 from a background thread; ``calls`` counts requests schemathesis made."""

    url: str = ""
    calls: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self, config_path: Path) -> LiveRelay:
        ready = threading.Event()
        errors: list[BaseException] = []

        async def serve() -> None:
            runner = web.AppRunner(create_app(load_config(config_path)), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"  # the port chosen for port 0
            ready.set()
            try:
                await asyncio.Event().wait()
            finally:
                await runner.cleanup()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            task = self._loop.create_task(serve())
            try:
                self._loop.run_until_complete(task)
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                errors.append(exc)
                ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="relay-under-schemathesis", daemon=True)
        self._thread.start()
        if not ready.wait(20) or errors:
            raise RuntimeError(f"the relay did not start: {errors}")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:

            def cancel_all() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()  # serve() then cleans the runner up: store closed, fakes' clients closed

            loop.call_soon_threadsafe(cancel_all)
            self._thread.join(20)


@pytest.fixture(scope="module")
def live_relay(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LiveRelay]:
    """The sandbox (fake APNs and FCM) and a relay with the device API enabled, for the whole module."""
    box = Sandbox.start(tmp_path_factory.mktemp("openapi"))
    path = box.write(api={"keys": {"ios-backend": {"key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                                                   "apps": ["ios"], "scope": "manage"}}})
    relay = LiveRelay().start(path)
    try:
        yield relay
    finally:
        relay.stop()
        box.stop()
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None and relay.calls:
            documented = {op: n for op, n in relay.calls.items() if op in _DOCUMENTED}
            summary = ", ".join(f"{op}: {n}" for op, n in sorted(documented.items()))
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nschemathesis: {sum(relay.calls.values())} requests, "
                                    f"{sum(documented.values())} to documented operations ({summary}); "
                                    f"statuses {dict(sorted(relay.statuses.items()))}")


# Loaded from the repository at collection time (schemathesis' lazy fixture loader does not run on pytest 9);
# the last test proves that the live relay serves exactly this document.
# The key goes through schemathesis' OpenAPI-aware auth (not a header forced onto every call), so that its
# negative cases without the key are seen as such and expected to get 401.
schema = schemathesis.openapi.from_path(DOCUMENT, config=SchemathesisConfig.from_dict(
    {"auth": {"openapi": {"apiKey": {"bearer": API_KEY}}}}))


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_openapi_document(case: Any, live_relay: LiveRelay) -> None:
    """Generated requests (valid and invalid, with and without the key) get no 5xx and documented answers."""
    operation = f"{case.method} {case.path}"
    live_relay.calls[operation] = live_relay.calls.get(operation, 0) + 1
    # A schema-valid PUT can still be refused with 400: whether a device token fits depends on the platform of
    # the app it names (APNs: 64 hex characters), which JSON Schema cannot tie to app names from the config.
    excluded = [schemathesis.checks.positive_data_acceptance] if case.method == "PUT" else []
    response = case.call_and_validate(base_url=live_relay.url, excluded_checks=excluded)
    live_relay.statuses[response.status_code] = live_relay.statuses.get(response.status_code, 0) + 1


def test_generated_requests_reached_every_kind_of_answer(live_relay: LiveRelay) -> None:
    """The run above got past the key and the checks (201 created) as well as each refusal the API gives."""
    if not live_relay.calls:
        pytest.skip("run together with test_every_operation_conforms_to_the_openapi_document")
    assert {200, 201, 400, 401, 403, 404, 405} <= set(live_relay.statuses)
    assert 500 not in live_relay.statuses


def test_served_document_is_the_one_in_the_repository(live_relay: LiveRelay) -> None:
    """GET /v1/openapi.json serves relay/openapi.json byte for byte (the package ships that file)."""
    with urllib.request.urlopen(f"{live_relay.url}/v1/openapi.json", timeout=5) as response:
        assert response.read() == DOCUMENT.read_bytes()
    assert json.loads(DOCUMENT.read_text())["openapi"] == "3.1.0"
