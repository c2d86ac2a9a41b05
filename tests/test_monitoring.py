"""What ships for monitoring (docs/monitoring.md, contrib/): the metrics reference equals the registry, the alert
rules and the dashboard name series the relay exports, and the reverse-proxy snippets forward only what
Parley and the apps need."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from relay.observability import Metrics

ROOT = Path(__file__).parent.parent
CONTRIB = ROOT / "contrib"
ALERTS = CONTRIB / "prometheus-alerts.yml"
ALERT_TESTS = Path(__file__).parent / "prometheus-alerts.test.yml"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself writes for each scrape
_SERIES_RE = re.compile(r"\b(parley_relay_[a-z_]+|up)\b(?!\s*\()")


def _families() -> dict[str, str]:
    """Exported family name (counters with ``_total``) -> type, from a fresh registry."""
    found = {}
    for family in Metrics().registry.collect():
        found[family.name + ("_total" if family.type == "counter" else "")] = family.type
    return found


def _exported_series() -> set[str]:
    """Every series name a scrape can show (histograms with their three suffixes)."""
    names = set()
    for name, kind in _families().items():
        names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return names


def _reference_rows() -> dict[str, str]:
    text = (ROOT / "docs" / "monitoring.md").read_text()
    section = text.split("## Metrics reference", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(parley_relay_\w+)` \| (\w+) \|", section, re.M)}


def test_the_metrics_reference_lists_every_series_the_relay_exports_and_no_other() -> None:
    """docs/monitoring.md's table has one row per registered family, with its type, and nothing else."""
    assert _reference_rows() == _families()


def _alert_exprs() -> dict[str, str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def test_every_alert_expression_names_only_series_the_relay_exports() -> None:
    """Each rule's expression names at least one series, each a relay series (or Prometheus's own ``up``)."""
    exported = _exported_series() | PROMETHEUS_OWN
    exprs = _alert_exprs()
    assert {"ParleyRelayAppAlarm", "ParleyRelayCircuitOpen", "ParleyRelayOldestWaiting", "ParleyRelayDeadLetters",
            "ParleyRelayDown"} <= set(exprs)
    for alert, expr in exprs.items():
        named = set(_SERIES_RE.findall(expr))
        assert named and named <= exported, (alert, named - exported)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt: prometheus)")
def test_the_alert_rules_pass_promtool_and_fire_on_the_series_the_relay_exports() -> None:
    """``promtool check rules`` accepts the file, and its unit tests (each alert fires on relay-shaped series
    and stays quiet before its ``for``) pass."""
    for command in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_shows_open_circuits_alarms_and_oldest_waiting_by_app() -> None:
    """The Grafana dashboard has a panel for open circuits and alarms per app, and every query names relay series."""
    panels = json.loads((CONTRIB / "grafana-dashboard.json").read_text())["panels"]
    exprs = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in panels}
    circuits = " ".join(exprs["Open circuits and alarms by app"])
    assert "parley_relay_app_circuit_open" in circuits and "parley_relay_app_alarm" in circuits
    assert "by (app)" in circuits
    assert "parley_relay_app_oldest_waiting_seconds" in " ".join(exprs["Oldest waiting delivery by app"])
    exported = _exported_series()
    for title, queries in exprs.items():
        for query in queries:
            assert set(_SERIES_RE.findall(query)) <= exported, title


@pytest.mark.parametrize("snippet", ["nginx-parley-relay.conf", "Caddyfile"])
def test_the_reverse_proxy_snippets_forward_only_the_webhook_oauth_and_api_paths(snippet: str) -> None:
    """Each snippet forwards the webhook path, /oauth/token and /v1/, answers 404 for the rest (so never
    /metrics or /status), and sets X-Forwarded-For for ``trusted_proxies``."""
    text = (CONTRIB / snippet).read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments may mention anything
    for path in ("/parley/webhook", "/oauth/token", "/v1/"):
        assert path in code, path
    for private in ("/metrics", "/status", "/readyz", "/healthz"):
        assert private not in code, private
    assert "404" in code and "trusted_proxies" in text
    if snippet.startswith("nginx"):
        assert "proxy_set_header X-Forwarded-For $remote_addr" in code
        assert len(re.findall(r"^\s*location\b", code, re.M)) == 4  # the three forwarded, and the 404
