"""Configuration loading: ``relay.yaml`` -> ``${VAR}`` expanded -> validated :class:`RelayFile` -> :class:`Config`.

Every problem is collected (not just the first) and reported once with the file, the dotted key and its line,
so that ``parley-relay check-config`` can list them all. ``load_config(path, credentials=False)`` is for
commands that only use the store and the registry: it neither reads nor checks credential files and leaves
out the secrets of ``auth`` and ``api``. The device registry file is loaded by :mod:`relay.registry.file`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from relay.config.auth import ApiSettings, AuthSettings, build_api, build_auth
from relay.config.model import Config, RelayFile
from relay.config.problems import Loc, YamlNodes, dotted, line_of, load_yaml, problems_from
from relay.errors import ConfigError, ConfigProblem

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
RELAY_FILE = TypeAdapter(RelayFile)


# Keys where null means "none" (metrics.listen: null = no operations listener of its own), not "the default".
_NULL_IS_A_VALUE = {("metrics", "listen")}


def expand_env(data: Any, unset: list[tuple[Loc, str]], loc: Loc = ()) -> Any:
    """``${VAR}`` in every text value, from the environment; an unset one expands to "" and is listed."""
    if isinstance(data, dict):  # a key without a value (null) is a key not given, as it always was
        return {key: expand_env(value, unset, (*loc, key)) for key, value in data.items()
                if value is not None or (*loc, key) in _NULL_IS_A_VALUE}
    if isinstance(data, list):
        return [expand_env(value, unset, (*loc, i)) for i, value in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def sub(match: re.Match[str]) -> str:
        if match.group(1) not in os.environ:
            unset.append((loc, match.group(1)))
        return os.environ.get(match.group(1), "")

    return _ENV_RE.sub(sub, data)


def parse_config(data: Any, source: Path, *, credentials: bool = True) -> Config:
    """Validate the parsed YAML of ``source``; raises :class:`ConfigError` listing every problem once.

    ``credentials=False``: credential files are resolved but neither read nor checked, and the ``auth`` and
    ``api`` sections (secrets only the service needs) are left out; such a config must never serve.
    """
    file = str(source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, "", f"must be a mapping, not {type(data).__name__}")])
    if credentials:
        data = {"auth": {}, **data}  # no auth section at all is checked as an empty one
    else:
        data = {key: value for key, value in data.items() if key not in ("auth", "api")}
    unset: list[tuple[Loc, str]] = []
    data = expand_env(data, unset)
    if not credentials:  # an unset ${VAR} in a path nobody opens is no reason to refuse it
        unset = [(loc, var) for loc, var in unset if not str(loc[-1]).endswith("_file")]
    nodes = YamlNodes(source)
    problems = [ConfigProblem(file, dotted(loc), f"environment variable {var} is not set", line_of(nodes.find(loc)[0]))
                for loc, var in unset]
    try:
        relay = RELAY_FILE.validate_python(data, context={"base": source.parent, "files": credentials})
    except ValidationError as exc:
        problems += problems_from(exc, RelayFile, source, quiet=[loc for loc, _ in unset])
        raise ConfigError(list(dict.fromkeys(problems))) from None
    if problems:
        raise ConfigError(problems)
    state_dir = Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or source.parent)
    store_path = relay.store.path.expanduser()
    store = dataclasses.replace(relay.store, path=store_path if store_path.is_absolute() else state_dir / store_path)
    return Config(source, relay.listen, relay.webhook, build_auth(relay.auth) if credentials else AuthSettings(),
                  store, relay.registry, relay.delivery, relay.logging, relay.apps,
                  build_api(relay.api) if credentials else ApiSettings(), relay.metrics, relay.shutdown_timeout,
                  credentials, relay.processes, relay.dedupe)


def load_config(path: str | Path, *, credentials: bool = True) -> Config:
    """Load and validate the main configuration file.

    ``credentials=False`` loads what store and registry commands need (store, registry, app names and
    platforms) without reading or checking credential files or secrets: see :func:`parse_config`.
    """
    source = Path(path).resolve()
    return parse_config(load_yaml(source), source, credentials=credentials)
