"""parley-relay: Parley push webhooks in, APNs and FCM out (see README.md, "Development", for the map)."""

from __future__ import annotations

import sys

# structlog imports rich, when it is installed, for a console renderer the relay never uses (it renders logfmt
# or JSON): some 5 MiB in every relay process. A None entry in sys.modules makes that import fail, which
# structlog expects and handles; nothing the relay runs needs rich.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

# The one place the version is written: pyproject.toml reads it from here (setuptools' ``attr:``, without
# importing the package), and `--version`, the "relay ready" line and parley_relay_build_info report it. Asking
# importlib.metadata instead cost every relay process 4 MiB (it imports email, zipfile and csv to read it).
__version__ = "0.2.0"
