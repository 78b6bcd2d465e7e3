"""Prometheus and Grafana files against the real tools: promtool checks the config and
unit-tests the alert rules, and every query of every dashboard panel runs through a
real Prometheus that scraped a live gateway under mixed load (issue 11, done-when 2)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "llmctl.json"
# What Grafana puts in for its interval macros: windows that hold the whole load (a
# minute or two on a busy machine), so that every panel has something to show.
MACROS = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "5m"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=COMPOSE)


def test_promtool_checks_the_scrape_config_and_its_rules():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_alert_rules_pass_their_unit_tests():
    result = promtool("test", "rules", "prometheus/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert has at least one unit test.
    rules = yaml.safe_load((COMPOSE / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((COMPOSE / "prometheus" / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert alerts == tested


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for macro, value in MACROS.items():
                expr = expr.replace(macro, value)
            out.append((f'{panel["title"]} [{target["refId"]}]', expr))
    return out


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    provider = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "dashboards" /
                               "llmctl.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "datasources" /
                             "llmctl.yml").read_text())["datasources"][0]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    assert len(dashboard["panels"]) >= 15


@pytest.mark.parametrize("title,expr", panel_queries(), ids=[t for t, _ in panel_queries()])
def test_every_panel_query_returns_data_from_a_real_prometheus(operated, title, expr):
    response = httpx.get(operated.prometheus_url + "/api/v1/query",
                         params={"query": expr, "time": operated.end}, timeout=10).json()
    assert response["status"] == "success", response
    assert not response.get("warnings"), response["warnings"]
    result = response["data"]["result"]
    assert result, f"{title}: {expr} returned nothing"
    # At least one series has a number (a quantile over no observations is NaN).
    assert any(not math.isnan(float(r["value"][1])) for r in result), (title, result)
