"""The README and docs/: a first screen a newcomer can act on, links that resolve, examples that load."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from relay.config import load_config
from relay.registry.file import load_registry, token_problems
from relay.testing.demo import LIVE_SETUP, curl_line, run_demo
from relay.testing.sandbox import AUTH_VALUE, IOS_TOKEN, Sandbox
from tests.conftest import MakeRelay

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_BYTES = 12 * 1024  # the first screen stays short; references live in docs/
_LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_readme_is_a_short_first_screen() -> None:
    """The README stays under 12 KB; the long references are in docs/."""
    assert len(README.read_bytes()) < README_MAX_BYTES
    assert len(DOCS) >= 7


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    """Each relative link names an existing file, and each #anchor a heading of the page it points at."""
    for target in _LINK_RE.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # an outside address
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name}: {target}: no such heading"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    """No page in docs/ is an orphan: the README's documentation table lists each one."""
    linked = {target.partition("#")[0] for target in _LINK_RE.findall(README.read_text())}
    assert {f"docs/{page.name}" for page in DOCS} <= linked


def test_readme_setup_commands_are_the_ones_ci_runs() -> None:
    """The two set-up commands read exactly as before, and .ci/run runs the test command verbatim."""
    blocks = [block.strip() for block in _code_blocks(README.read_text(), "sh")]
    assert blocks[:2] == ["pip install . && parley-relay demo", "pip install '.[test]' && pytest"]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == blocks[1]


def test_readme_minimal_configuration_loads(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's smallest live relay.yaml and devices.yaml load as they are, with real credential files
    in place of the named ones."""
    relay_yaml, devices_yaml = _code_blocks(README.read_text(), "yaml")[:2]
    root = sandbox.root / "readme"
    root.mkdir()
    (root / "relay.yaml").write_text(relay_yaml)
    (root / "devices.yaml").write_text(devices_yaml)
    (root / "AuthKey_2X9R4HXF34.p8").write_bytes((sandbox.root / "AuthKey.p8").read_bytes())
    (root / "firebase.json").write_bytes((sandbox.root / "firebase.json").read_bytes())
    monkeypatch.setenv("PARLEY_RELAY_KEY", "0123456789abcdef0123456789abcdef")
    config = load_config(root / "relay.yaml")
    assert set(config.apps) == {"ios-prod", "android"} and config.auth.headers
    registry = load_registry(config.registry, config.apps)
    assert registry.devices and [rule.app for rule in registry.rules] == ["ios-prod", "android"]
    assert token_problems(registry, config.registry, config.apps) == []  # tokens Apple and Google accept
    assert yaml.safe_load(devices_yaml)["devices"]


async def test_demo_ends_with_what_to_try_next(capsys: pytest.CaptureFixture[str]) -> None:
    """`parley-relay demo` ends by saying how to keep it running with a curl line to try, and how to run
    a live relay with real credentials."""
    assert await run_demo() == 0
    out = capsys.readouterr().out
    assert "parley-relay demo --keep-running --port 8080" in out
    assert curl_line("http://127.0.0.1:8080/parley/webhook") in out
    assert out.rstrip().endswith(LIVE_SETUP)


async def test_the_demo_curl_line_is_accepted_by_the_relay(make_relay: MakeRelay) -> None:
    """The curl line the demo prints carries the demo's header and a new sample message: the relay
    answers it `200 accepted`, not a duplicate of the demo's own sample."""
    r = await make_relay()
    words = shlex.split(curl_line("http://127.0.0.1:8080/parley/webhook"))
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    body = words[words.index("-d") + 1]
    response = await r.client.post(r.relay.config.webhook.path, data=body.encode(), headers=headers)
    assert response.status == 200 and (await response.json())["status"] == "accepted"


def _smoke_test_commands() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### Smoke test", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


async def test_the_documented_smoke_test_is_accepted_and_a_rerun_is_new(make_relay: MakeRelay) -> None:
    """docs/operations.md's smoke test (a message and a typing event, by curl) is accepted by the relay; run
    again a little later, its message is a new one (a fresh id), not a duplicate."""
    r = await make_relay()
    script = _smoke_test_commands().replace(
        "URL=http://127.0.0.1:8080/parley/webhook", f"URL={r.client.make_url(r.relay.config.webhook.path)}"
    ).replace('KEY="$PARLEY_RELAY_KEY"', f"KEY={AUTH_VALUE}").replace(
        "TOKEN=a-registered-parley-push-token", f"TOKEN={IOS_TOKEN}")
    answers = []
    for _ in range(2):
        result = await asyncio.to_thread(subprocess.run, ["bash", "-c", script], capture_output=True, text=True,
                                         timeout=30)
        assert result.returncode == 0, result.stderr
        answers.append([json.loads(line) for line in result.stdout.splitlines()])
        await asyncio.sleep(0.01)
    assert answers[0] == [{"status": "accepted", "accepted": 1, "duplicates": 0}] * 2
    assert answers[1][0] == {"status": "accepted", "accepted": 1, "duplicates": 0}
