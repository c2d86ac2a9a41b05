"""The configuration describes itself: shipped JSON Schemas, key table and example are what the model generates,
and every shipped or documented example validates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from relay.cli import main
from relay.cli.config_commands import TABLE_END, TABLE_START, example_yaml, key_table, schema
from relay.config.parse import RELAY_FILE
from relay.registry.file import DEVICES_FILE, RegistryFile, token_problems

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "config"
DOCS = ROOT / "docs" / "configuration.md"


@pytest.mark.parametrize("kind", ["relay", "devices"])
def test_shipped_schema_is_the_models(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`config/KIND.schema.json` equals `parley-relay config schema KIND` (regenerate it when a key changes)."""
    assert main(["config", "schema", kind]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == schema(kind) == json.loads((CONFIG / f"{kind}.schema.json").read_text())


def test_docs_key_table_and_example_are_generated_from_the_model() -> None:
    """docs/configuration.md's key table and config/relay.example.yaml are the generated ones, and list
    the keys that were once missing from them."""
    text = DOCS.read_text()
    table = text[text.index(TABLE_START) + len(TABLE_START):text.index(TABLE_END)].strip()
    assert table == key_table()
    assert (CONFIG / "relay.example.yaml").read_text() == example_yaml()
    for key in ("processes", "listen.backlog", "shutdown_timeout", "metrics.listen"):
        assert f"| `{key}` |" in table
    example = yaml.safe_load(example_yaml())
    assert {"processes", "shutdown_timeout"} <= set(example) and "backlog" in example["listen"]


def _validates(kind: str, document: Any) -> None:
    """As an editor validates: the document in its JSON form (mapping keys are text there)."""
    jsonschema_rs.validator_for(schema(kind)).validate(json.loads(json.dumps(document)))


def test_shipped_examples_validate_against_the_schema_and_the_model() -> None:
    """Both example files pass the JSON Schema (what an editor checks) and the model (what the relay checks)."""
    relay_doc = yaml.safe_load((CONFIG / "relay.example.yaml").read_text())
    devices_doc = yaml.safe_load((CONFIG / "devices.example.yaml").read_text())
    _validates("relay", relay_doc)
    _validates("devices", devices_doc)
    RELAY_FILE.validate_python(relay_doc, context={"base": CONFIG, "files": False})
    DEVICES_FILE.validate_python(devices_doc)


def test_the_schema_refuses_what_the_model_refuses() -> None:
    """An unknown key, a wrong platform and a text flag fail the schema, as they fail the model."""
    good = yaml.safe_load(example_yaml())
    for bad in ({**good, "surprise": 1}, {**good, "apps": {"a": {"platform": "gcm"}}},
                {**good, "webhook": {"reject_dead_tokens": "maybe"}}):
        with pytest.raises(jsonschema_rs.ValidationError):
            _validates("relay", bad)


def test_documented_registry_example_passes_the_token_check() -> None:
    """The devices.yaml block of docs/configuration.md and config/devices.example.yaml hold tokens that Apple
    and Google accept (check-config's token check), and validate against the schema."""
    block = re.search(r"```yaml\n(devices:.*?)```", DOCS.read_text(), re.S)
    assert block is not None
    example = yaml.safe_load(example_yaml())
    apps = RELAY_FILE.validate_python(example, context={"base": CONFIG, "files": False}).apps
    for document in (yaml.safe_load(block.group(1)), yaml.safe_load((CONFIG / "devices.example.yaml").read_text())):
        _validates("devices", document)
        parsed = DEVICES_FILE.validate_python(document, context={"apps": apps})
        registry = RegistryFile({t: (e.app, e.device_token) for t, e in (parsed.devices or {}).items()}, ())
        assert token_problems(registry, CONFIG / "devices.example.yaml", apps) == []
