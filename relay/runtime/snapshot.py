"""The configuration the supervisor validated, kept as bytes so that every child runs exactly that.

A multi-process relay's children never read ``relay.yaml`` (or the registry file) from where the operator
edits it: a child restarted after a crash would otherwise run whatever the file says now, unvalidated, beside
children running the old one. The supervisor reads the files once, validates what it read and copies those
bytes into the shared state directory under a generation number (1 at start, one more per reload it accepts)::

    config/<generation>/relay.yaml      the main file's bytes
    config/<generation>/registry/NAME   the registry file's bytes under its own name (absent without one)
    config/latest                       the generation a reload asks the children to take

A child loads one generation (the one it last ran when restarted, ``latest`` on ``SIGHUP``) and parses it as
if it were the original file: relative credential paths resolve against the original file's directory, and
error messages name the original file. Credential files are not copied (they are the same files a single
relay reads; a rotated key takes effect on reload).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from relay.config import Config
from relay.config.parse import parse_config
from relay.config.problems import load_yaml
from relay.delivery.policy import RetryPolicy
from relay.errors import ConfigError, ConfigProblem

CONFIG_DIR = "config"


def take(root: Path, generation: int, source: Path) -> Config:
    """Read ``source`` (and the registry file it names), validate it, and keep the bytes as ``generation``.

    Raises :class:`ConfigError` (nothing kept) when the file is invalid.
    """
    source = source.resolve()
    where = root / CONFIG_DIR / str(generation)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    main = where / "relay.yaml"
    try:
        main.write_bytes(source.read_bytes())
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(source), "", f"cannot read: {exc.strerror or exc}")]) from exc
    try:
        config = parse_config(load_yaml(main), source)
        check_runnable(config)
    except ConfigError:
        main.unlink(missing_ok=True)
        raise
    registry = where / "registry"
    registry.mkdir(mode=0o700, exist_ok=True)
    try:
        (registry / config.registry.name).write_bytes(config.registry.read_bytes())
    except OSError:  # no registry file (or unreadable): the children see what a single relay would see
        pass
    return config


def load(root: Path, generation: int, source: Path) -> Config:
    """The configuration kept as ``generation``, parsed as the original ``source`` (see the module docstring)."""
    where = root / CONFIG_DIR / str(generation)
    source = source.resolve()
    config = parse_config(load_yaml(where / "relay.yaml"), source)
    registry = where / "registry" / config.registry.name
    return dataclasses.replace(config, registry=registry) if registry.exists() else config


def publish(root: Path, generation: int) -> None:
    """Make ``generation`` the one a reloading child takes."""
    path = root / CONFIG_DIR / "latest"
    tmp = path.with_name(f".latest.{os.getpid()}")
    tmp.write_text(str(generation))
    os.replace(tmp, path)


def latest(root: Path) -> int:
    """The generation a reloading child takes."""
    return int((root / CONFIG_DIR / "latest").read_text())


def check_runnable(config: Config) -> None:
    """Raise :class:`ConfigError` for settings the parser lets through but the running parts refuse (a reload
    checks them before it swaps anything in; the supervisor before it keeps a generation)."""
    delivery = config.delivery
    try:
        RetryPolicy(delivery.backoff_initial, delivery.backoff_max)
    except ValueError as exc:
        message = f"{exc} (backoff_initial {delivery.backoff_initial:g}, backoff_max {delivery.backoff_max:g})"
        raise ConfigError([ConfigProblem(str(config.source), "delivery.backoff_initial", message)]) from exc
