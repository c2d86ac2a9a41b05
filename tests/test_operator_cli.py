"""The operator commands of `parley-relay` (devices, send-test, stats, dead-letters): help, output, and
exit codes that scripts can rely on (0 done, 1 the command ran and found a problem, 2 usage)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from relay.cli import main
from relay.config import load_config
from relay.outcome import EndState
from relay.store import create_store
from relay.store.base import NewDelivery
from relay.testing.process import relay_command
from relay.testing.sandbox import ANDROID_TOKEN, IOS_TOKEN, Sandbox
from tests.conftest import MakeRelay

COMMANDS = [
    [], ["serve"], ["check-config"], ["stats"], ["devices"], ["devices", "list"], ["devices", "add"],
    ["devices", "remove"], ["send-test"], ["dead-letters"], ["dead-letters", "list"], ["dead-letters", "show"],
    ["dead-letters", "retry"], ["deliveries"], ["backup"], ["restore"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "parley-relay")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` prints usage for each command and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: parley-relay")


def test_installed_entry_point_answers_help() -> None:
    """The installed `parley-relay` script runs (what the unit's ExecStart names)."""
    result = subprocess.run([*relay_command(), "dead-letters", "retry", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--all" in result.stdout


def test_usage_errors_exit_2(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown commands, missing arguments and contradictory options exit 2."""
    config = str(sandbox.write())
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["send-test", "--config", config])
    assert exit_info.value.code == 2
    assert main(["dead-letters", "retry", "--config", config]) == 2
    assert main(["dead-letters", "retry", "--all", "7", "--config", config]) == 2
    assert "dead-letters list" in capsys.readouterr().err


def test_a_bad_config_exits_1_naming_file_and_key(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command reports configuration problems as `error: FILE: KEY: problem` and exits 1."""
    config = sandbox.write(delivery={"concurrency": 0})
    assert main(["stats", "--config", str(config)]) == 1
    assert f"error: {config}: delivery.concurrency: must be at least 1" in capsys.readouterr().err


def test_devices_add_list_remove_round_trip(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """A run-time device is listed as such, removed once (0), and a second remove finds nothing (1)."""
    config = str(sandbox.write())
    token = "eJ9x-cli-added-device:APA91b_cli"
    assert main(["devices", "add", token, "--app", "android", "--config", config]) == 0
    assert main(["devices", "add", token, "--app", "no-such-app", "--config", config]) == 1
    capsys.readouterr()
    assert main(["devices", "list", "--config", config]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [token, "android", "runtime"] in rows and [IOS_TOKEN, "ios", "yaml"] in rows
    assert main(["devices", "remove", token, "--config", config]) == 0
    assert main(["devices", "remove", token, "--config", config]) == 1


def test_send_test_prints_the_provider_answer_and_exits_by_outcome(
        sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """send-test goes through the real provider: 0 and `outcome=sent`; a dead token gives 1 and its reason;
    a token with no route gives 1."""
    config = str(sandbox.write())
    assert main(["send-test", "--token", IOS_TOKEN, "--config", config]) == 0
    assert "apns app=ios outcome=sent status=200" in capsys.readouterr().out
    assert sandbox.apns.wait_for_requests(1)
    sandbox.fcm.respond(ANDROID_TOKEN, error_code="UNREGISTERED")
    assert main(["send-test", "--token", ANDROID_TOKEN, "--text", "hi", "--config", config]) == 1
    assert "outcome=token_dead" in capsys.readouterr().out
    assert main(["send-test", "--token", "unknown-token", "--config", config]) == 1
    assert "no registry entry" in capsys.readouterr().err


def _dead_letters(config: Path, count: int) -> list[str]:
    """Put ``count`` deliveries in the store as dead letters (what a provider's permanent refusal leaves)."""
    async def work() -> list[str]:
        store = create_store(load_config(config).store)
        await store.open()
        try:
            items = [NewDelivery(f"tok-{i}", "message", b'{"type":"message"}', f"k{i}", 1e12) for i in range(count)]
            await store.enqueue(items, 1.0, 0)
            jobs = await store.claim(count, 2.0, 60)
            for job in jobs:
                await store.finish(job, EndState.DEAD_LETTER, "BadRequest", 3.0)
            return [job.id for job in jobs]
        finally:
            await store.close()

    return asyncio.run(work())


def test_dead_letters_list_retry_and_retry_all_with_progress(
        sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """list shows each dead letter; retry by ID queues it (0) and an unknown ID gives 1; retry --all
    prints progress per batch on stderr and leaves none; stats stays balanced."""
    monkeypatch.setattr("relay.cli.store_commands.RETRY_BATCH", 4)
    config = sandbox.write()
    ids = _dead_letters(config, 10)
    assert main(["dead-letters", "list", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 10 and "BadRequest" in out.out and "10 dead letter(s)" in out.err
    assert main(["dead-letters", "retry", ids[0], "--config", str(config)]) == 0
    assert main(["dead-letters", "retry", "999999", "--config", str(config)]) == 1
    assert main(["dead-letters", "retry", "not-an-id", "--config", str(config)]) == 1
    assert "first column of: dead-letters list" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["dead-letters", "retry", "--all", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"dead-letters retry: {n}/9 queued again" for n in (4, 8, 9)]
    assert out.out.strip() == "queued 9 dead letter(s) again"
    assert main(["stats", "--json", "--config", str(config)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["ended"]["dead_letter"] == 0 and stats["pending"] == 10 and stats["balanced"]


def test_store_commands_work_without_the_credential_files(
        sandbox: Sandbox, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the documented systemd setup (`cred:` names, credentials handed to the running service only,
    the webhook secret in the service's environment), stats, devices and dead-letters work from a shell
    that has none of them; check-config and send-test still insist on every credential."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "not-here"))
    monkeypatch.delenv("PARLEY_RELAY_KEY", raising=False)
    config = str(sandbox.write(
        apps={"ios": {"key_file": "cred:apns.p8"}, "android": {"service_account_file": "cred:firebase.json"}},
        auth={"headers": {"X-Parley-Relay-Key": "${PARLEY_RELAY_KEY}"},
              "oauth": {"clients": {"parley": {"secret_file": "cred:client.secret"}},
                        "signing_secret_file": "cred:oauth.key"}},
        api={"keys": {"backend": {"key_file": "cred:api.key", "apps": ["ios"]}}},
    ))
    token = "eJ9x-added-without-credentials:APA91b"
    assert main(["devices", "add", token, "--app", "android", "--config", config]) == 0  # creates the store
    assert main(["stats", "--config", config]) == 0
    assert main(["devices", "list", "--config", config]) == 0
    assert main(["devices", "remove", token, "--config", config]) == 0
    assert main(["dead-letters", "list", "--config", config]) == 0
    assert "error" not in capsys.readouterr().err
    assert main(["check-config", "--config", config]) == 1
    assert "apps.ios.key_file: file not found" in capsys.readouterr().err
    assert main(["send-test", "--token", IOS_TOKEN, "--config", config]) == 1
    assert "auth.headers.X-Parley-Relay-Key: environment variable PARLEY_RELAY_KEY is not set" in (
        capsys.readouterr().err)


def test_a_config_loaded_without_credentials_says_so(sandbox: Sandbox) -> None:
    """`load_config(path, credentials=False)` keeps store, registry and apps, leaves the secrets out and
    marks the result, so that it cannot pass for a config fit to serve."""
    path = sandbox.write(apps={"ios": {"key_file": "cred:absent.p8"}})
    config = load_config(path, credentials=False)
    assert not config.credentials and not config.auth.headers and config.store.path == sandbox.root / "relay.db"
    assert set(config.apps) == {"ios", "android"} and config.apps["ios"].platform == "apns"
    assert load_config(sandbox.write()).credentials


def test_output_into_a_closed_pipe_exits_quietly(sandbox: Sandbox) -> None:
    """`parley-relay stats | head` and the like: when the reader has gone, the command exits like a tool
    killed by SIGPIPE (141) without a traceback."""
    config = str(sandbox.write())
    assert main(["devices", "add", ANDROID_TOKEN, "--app", "android", "--config", config]) == 0  # a store to read
    for command in (["stats"], ["devices", "list"]):
        with subprocess.Popen([*relay_command(), *command, "--config", config], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as child:
            assert child.stdout is not None and child.stderr is not None
            child.stdout.close()  # the reader is gone before the command writes anything
            err = child.stderr.read().decode()
            assert child.wait(timeout=60) == 141, err
        assert err == ""


def test_dead_letters_show_prints_one_in_full(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """`dead-letters show ID` prints the whole token, the provider's reason, both times and the payload;
    an unknown ID exits 1."""
    config = sandbox.write()
    ids = _dead_letters(config, 3)
    assert main(["dead-letters", "show", ids[1], "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"id:             {ids[1]}" in out and "token:          tok-1\n" in out
    assert "reason:         BadRequest" in out and "received:       1970-01-01T00:00:01Z" in out
    assert "dead-lettered:  1970-01-01T00:00:03Z" in out
    assert out.endswith('payload:\n{\n  "type": "message"\n}\n')
    assert main(["dead-letters", "show", "999999", "--config", str(config)]) == 1
    assert "no dead letter '999999'" in capsys.readouterr().err


async def test_metrics_scrape_has_no_created_series(make_relay: MakeRelay) -> None:
    """/metrics leaves out the `*_created` series (a timestamp per labelled child that nobody graphs),
    for counters and histograms alike, while their samples stay."""
    r = await make_relay()
    r.relay.metrics.webhooks.labels("ok").inc()
    r.relay.metrics.ack_latency.observe(0.01)
    text = await (await r.ops.get("/metrics")).text()
    assert "parley_relay_webhooks_total{result=\"ok\"} 1.0" in text and "parley_relay_ack_seconds_count" in text
    assert "_created" not in text
