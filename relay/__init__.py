"""parley-relay: Parley push webhooks in, APNs and FCM out (see README.md, "Development", for the map)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    # The installed distribution's version (pyproject.toml): what `--version`, the "relay ready" line and
    # parley_relay_build_info report, so the three always agree.
    __version__ = version("parley-relay")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
