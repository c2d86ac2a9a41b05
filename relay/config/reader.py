"""Reading YAML configuration: typed access that collects problems (file + key) instead of stopping at one.

Used by :mod:`relay.config` and :mod:`relay.config.auth`; ``${ENV_VAR}`` expansion and credential paths
(``cred:NAME`` from ``$CREDENTIALS_DIRECTORY``) live here too. A reader made with ``files=False`` resolves
file keys without looking at the files: operator commands that only use the store must work where the
service's credentials are out of reach (systemd hands them to the running service alone).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from relay.errors import ConfigError, ConfigProblem

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MISSING = object()


class Reader:
    """Typed access to one YAML mapping that records problems instead of raising at the first one."""

    def __init__(self, data: Any, file: str, prefix: str, problems: list[ConfigProblem], *,
                 files: bool = True) -> None:
        self.file, self.prefix, self.problems = file, prefix, problems
        self.files = files  # False: file keys are resolved, never opened or checked
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem("", f"must be a mapping, not {type(data).__name__}")
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, self.key(name) if name else self.prefix, message))

    def raw(self, name: str) -> Any:
        self.used.add(name)
        value = self.data.get(name, MISSING)
        return expand_env(value, self, name) if value is not MISSING else MISSING

    def text(self, name: str, default: Any = MISSING) -> Any:
        value = self.raw(name)
        if value is MISSING or value is None:
            if default is MISSING:
                self.problem(name, "is required")
                return ""
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problem(name, f"must be a string, not {type(value).__name__}")
            return default if default is not MISSING else ""
        return str(value)

    def choice(self, name: str, choices: tuple[str, ...], default: Any = MISSING) -> Any:
        before = len(self.problems)
        value = self.text(name, default)
        if len(self.problems) > before:  # missing or not a string: named once already
            return choices[0] if default is MISSING else default
        if value not in choices and value is not default:
            self.problem(name, f"must be one of {', '.join(choices)}, not {value!r}")
            return choices[0]
        return value

    def number(self, name: str, default: float, *, minimum: float = 0, integer: bool = False) -> Any:
        value = self.raw(name)
        if value is MISSING or value is None:
            return default
        if isinstance(value, str):
            try:
                value = float(value) if not integer else int(value)
            except ValueError:
                pass
        wrong_kind = isinstance(value, bool) or not isinstance(value, (int, float))
        if wrong_kind or (integer and not float(value).is_integer()):
            self.problem(name, f"must be {'an integer' if integer else 'a number'}, not {value!r}")
            return default
        if value < minimum:
            self.problem(name, f"must be at least {minimum}, not {value}")
            return default
        return int(value) if integer else float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is MISSING or value is None:
            return default
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false, not {value!r}")
            return default
        return value

    def section(self, name: str) -> Reader:
        self.used.add(name)
        return Reader(self.data.get(name), self.file, self.key(name), self.problems, files=self.files)

    def finish(self) -> None:
        for extra in sorted(set(self.data) - self.used):
            self.problem(str(extra), "unknown key")


def read_secret(reader: Reader, name: str, value: str, base: Path) -> str:
    """The secret a ``cred:NAME`` (systemd credential) or ``file:PATH`` value names: the file's text without its
    final newline. A value that starts so is never taken literally: a missing file is a problem."""
    path = resolve_file(value.removeprefix("file:"), base)
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reader.problem(name, f"cannot read the secret {value!r} from {path}: {getattr(exc, 'strerror', None) or exc}")
        return ""
    if not text:
        reader.problem(name, f"the secret file {path} is empty")
    return text


def expand_env(value: Any, reader: Reader, name: str) -> Any:
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in os.environ:
            reader.problem(name, f"environment variable {var} is not set")
            return ""
        return os.environ[var]

    return _ENV_RE.sub(sub, value)


def resolve_file(value: str, base: Path) -> Path:
    """A credential path: ``cred:NAME`` from ``$CREDENTIALS_DIRECTORY``, else relative to ``base``."""
    if value.startswith("cred:"):
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        name = value[len("cred:") :]
        return Path(creds or "/run/credentials/parley-relay.service") / name
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def read_file(reader: Reader, name: str, base: Path, *, required: bool) -> Path | None:
    """The path a file key names; a missing or unreadable file is a problem unless ``reader.files`` is off."""
    if not reader.files:
        return _unchecked_file(reader, name, base, required=required)
    value = reader.text(name, MISSING if required else None)
    if not value:
        return None
    path = resolve_file(value, base)
    if not path.is_file():
        reader.problem(name, f"file not found: {path}")
    elif not os.access(path, os.R_OK):
        reader.problem(name, f"file not readable: {path}")
    return path


def _unchecked_file(reader: Reader, name: str, base: Path, *, required: bool) -> Path | None:
    """A file key's path, not opened; an unset ``${VAR}`` in a path nobody opens is no reason to refuse it."""
    reader.used.add(name)
    value = reader.data.get(name)
    if value is None or value == "":
        if required:
            reader.problem(name, "is required")
        return None
    if not isinstance(value, str):
        reader.problem(name, f"must be a string, not {type(value).__name__}")
        return None
    return resolve_file(_ENV_RE.sub(lambda match: os.environ.get(match.group(1), ""), value), base)


def load_yaml(path: Path) -> Any:
    """Read one YAML file with the C loader when available; errors name the file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with path.open("rb") as fh:
            return yaml.load(fh, Loader=loader)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), "", f"cannot read: {exc.strerror or exc}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(str(path), "", f"invalid YAML: {exc}")]) from exc
