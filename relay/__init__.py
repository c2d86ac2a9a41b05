"""parley-relay: Parley push webhooks in, APNs and FCM out (see README.md, "Development", for the map)."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

# structlog imports rich, when it is installed, for a console renderer the relay never uses (it renders logfmt
# or JSON): some 5 MiB in every relay process. A None entry in sys.modules makes that import fail, which
# structlog expects and handles; nothing the relay runs needs rich.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

try:
    # The installed distribution's version (pyproject.toml): what `--version`, the "relay ready" line and
    # parley_relay_build_info report, so the three always agree.
    __version__ = version("parley-relay")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
