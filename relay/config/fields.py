"""The value types the configuration model is made of, where they carry a rule of this relay.

File paths resolve against the config file's directory, or ``cred:NAME`` against ``$CREDENTIALS_DIRECTORY``
(systemd ``LoadCredential=``); they are checked for existence only when the validation context asks for it
(``files``), so that store commands work where the service's credentials are out of reach.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationInfo
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

# An unknown key is an error (every class is also frozen); text is never coerced from a number (relay.config.model).
MODEL = ConfigDict(extra="forbid")


def problem(key: str, message: str) -> PydanticCustomError:
    """A cross-field problem that names ``key`` (dotted, relative to the model raising it)."""
    return PydanticCustomError("config", "{message}", {"key": key, "message": message})


def _no_flag(value: Any) -> Any:
    if isinstance(value, bool):  # YAML `yes`/`true` where a number belongs
        raise ValueError(f"must be a number, not {value}")
    return value


def _flag(value: Any) -> Any:
    # Text "true"/"false" only: it is what ${VAR} expands to. Never `yes`, `on` or 1 (YAML 1.1 and pydantic's lax mode).
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_no_flag)]
# Finite: YAML's `.inf` ("forever") reached int() in a provider's time to live and JSON in the store, and failed
# every push or webhook instead of the configuration.
Seconds = Annotated[float, BeforeValidator(_no_flag), Field(ge=0, allow_inf_nan=False)]
Flag = Annotated[bool, BeforeValidator(_flag)]


def _apple_id(value: str) -> str:
    if not re.fullmatch(r"[A-Z0-9]{10}", value):
        raise ValueError(f"must be 10 characters of A-Z and 0-9, as Apple shows it (e.g. ABCDE12345), not {value!r}")
    return value


AppleId = Annotated[str, AfterValidator(_apple_id)]


def _endpoint(value: str) -> str:
    if not re.fullmatch(r"https?://[^/\s]+", value.rstrip("/")):
        raise ValueError(f"must be a base URL such as https://127.0.0.1:8443, not {value!r}")
    return value.rstrip("/")


Endpoint = Annotated[str, AfterValidator(_endpoint)]


def _proxy(value: str) -> str:
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query or not port_ok:
        shown = value if parts.password is None else value.replace(parts.password, "***")
        raise ValueError("must be an HTTP proxy URL such as http://proxy.internal:3128 (the relay tunnels through it "
                         f"with CONNECT), not {shown!r}")
    return value


Proxy = Annotated[str, AfterValidator(_proxy)]  # http://[user:password@]host[:port]


def _url_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with /")
    return value


UrlPath = Annotated[str, AfterValidator(_url_path)]


def resolve_file(value: str, base: Path) -> Path:
    """A credential path: ``cred:NAME`` from ``$CREDENTIALS_DIRECTORY``, else relative to ``base``."""
    if value.startswith("cred:"):
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        return Path(creds or "/run/credentials/parley-relay.service") / value[len("cred:"):]
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _resolve(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str):
        if not value and (info.context or {}).get("files"):
            raise ValueError("must not be empty")
        return resolve_file(value, (info.context or {}).get("base", Path.cwd()))
    return value


def _exists(path: Path, info: ValidationInfo) -> Path:
    if (info.context or {}).get("files"):
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        if not os.access(path, os.R_OK):
            raise ValueError(f"file not readable: {path}")
    return path


File = Annotated[Path, BeforeValidator(_resolve), AfterValidator(_exists)]


def _sha256_hex(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError("must be 64 hex characters (e.g. the output of: printf %s KEY | sha256sum)")
    return value.lower()


Sha256Hex = Annotated[str, AfterValidator(_sha256_hex)]


@dataclass(frozen=True, config=MODEL)
class _ProcessCounts:
    ingest: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    delivery: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"


ProcessesInput = Literal["auto", 1] | _ProcessCounts


def processes_value(value: Any) -> Any:
    """``processes: auto | 1 | {ingest: N|auto, delivery: M|auto}`` as the fields of ``Processes``."""
    if value is None or value == "auto":
        return {}
    if (value == 1 and not isinstance(value, bool)) or value == "1":
        return {"single": True}
    if isinstance(value, dict) and "single" not in value:
        return {role: None if count == "auto" else count for role, count in value.items()}
    raise ValueError(f"must be auto, 1, or a mapping with ingest and delivery, not {value!r}")
