"""The alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``,
one where the no-consumer alert fires); every query of the Grafana dashboard parses (promtool
checks a rules file made of them). Debian's ``prometheus`` package ships promtool."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import redis
import yaml

from tests.deploy.support import DEPLOY, run, tool
from tests.support import (
    Proc,
    base_config,
    read_csv_rows,
    start_worker,
    wait_until,
    write_config,
)

RULES = DEPLOY / "prometheus" / "iam-pump-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "iam-pump-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "iam-pump-dashboard.json"
#: The metrics the health endpoint, the workers and the reporter's collector expose, under their
#: exposed names (counters with ``_total``; a histogram's series end in ``_bucket``, ...).
METRICS = {
    "iam_pump_queue_consumers",
    "iam_pump_queue_length",
    "iam_pump_queue_oldest_age_seconds",
    "iam_pump_redis_list_length",
    "iam_pump_redis_list_oldest_age_seconds",
    "iam_pump_redis_up",
    "iam_pump_write_duration_seconds",
    "iam_pump_written_records_total",
    "iam_pump_write_retries_total",
    "iam_pump_dead_letter_entries",
    "iam_pump_lost_batches_total",
    "iam_pump_reporter_records_dropped_total",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool() -> str:
    return tool("promtool", "Debian prometheus")


def check_rules(path: Path) -> tuple[int, str]:
    result = run([promtool(), "check", "rules", path])
    return result.returncode, result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["expr"]] if isinstance(node.get("expr"), str) else []
            return found + [q for value in node.values() for q in walk(value)]
        if isinstance(node, list):
            return [q for item in node for q in walk(item)]
        return []

    return walk(json.loads(DASHBOARD.read_text()))


def queries_as_rules(queries: list[str], path: Path) -> Path:
    """A rules file with one recording rule per query: promtool parses each expression."""
    rules = [{"record": f"dashboard:query_{i}", "expr": query} for i, query in enumerate(queries)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def metric_names(expression: str) -> set[str]:
    names = set()
    for name in re.findall(r"\biam_pump_[a-z_]+", expression):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_alert_rules_pass_promtool_check() -> None:
    code, output = check_rules(RULES)
    assert code == 0, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_alert_rules_unit_tests_pass_including_the_no_consumer_alert() -> None:
    result = run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    # Every alert has a unit test in which it fires.
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_the_issue_s_alerts_exist() -> None:
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "iam_pump_queue_consumers == 0" in expressions["IamPumpQueueWithoutConsumer"]
    assert "iam_pump_dead_letter_entries" in expressions["IamPumpDeadLettersAppearing"]
    assert "iam_pump_lost_batches_total" in expressions["IamPumpLostBatches"]
    assert "iam_pump_reporter_records_dropped_total" in expressions["IamPumpReporterDropping"]
    assert "oldest_age_seconds" in expressions["IamPumpRedisListLagGrowing"]
    assert "oldest_age_seconds" in expressions["IamPumpQueueLagGrowing"]


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    code, output = check_rules(queries_as_rules(queries, tmp_path / "dashboard.yaml"))
    assert code == 0, output
    assert f"SUCCESS: {len(queries)} rules found" in output


def test_a_broken_query_is_refused(tmp_path: Path) -> None:
    # The same check on a query with a PromQL error fails: the parse is real.
    broken = ["sum by (pump) (rate(iam_pump_written_records_total[5m])"]
    code, output = check_rules(queries_as_rules(broken, tmp_path / "broken.yaml"))
    assert code != 0
    assert "parse error" in output


def test_rules_and_dashboard_use_only_exposed_metric_names() -> None:
    used: set[str] = set()
    for expression in [rule["expr"] for rule in alert_rules()] + dashboard_queries():
        used |= metric_names(expression)
    assert used <= METRICS, used - METRICS


def exposed_names(text: str) -> set[str]:
    """Metric names in a text exposition, each histogram's series under its family's name."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
                    name = name.removesuffix(suffix)
            names.add(name)
    return names


def test_the_metric_names_are_those_the_real_endpoints_expose(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    """What the rules and the dashboard read is what is served: the pipeline's ``/metrics``,
    scraped over HTTP after records went through a real worker into the CSV pump, and
    ``ReporterCollector`` registered in a host application's own registry."""
    from prometheus_client import CollectorRegistry, generate_latest

    from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
    from app.analytics_stats import ReporterCollector
    from app.config import parse_settings
    from app.health import HealthServer
    from app.stores.clients import redis_client

    config = write_config(tmp_path / "c.yaml", base_config(tmp_path))
    procs.append(start_worker(config, tmp_path / "worker.log"))
    reporter = Analytics(AnalyticsOptions.from_yaml(str(config)))
    reporter.start()
    for index in range(50):
        assert reporter.record_hit(AnalyticsRecord(username="m", request=f"metrics-{index}"))
    reporter.stop()
    assert wait_until(lambda: len(read_csv_rows(tmp_path / "csv")) == 50, 60)
    settings = parse_settings(config.read_text())
    server = HealthServer(settings, redis_client(settings))
    server.start()
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as reply:
            served = exposed_names(reply.read().decode())
    finally:
        server.stop()
    registry = CollectorRegistry()
    registry.register(ReporterCollector(reporter))
    served |= exposed_names(generate_latest(registry).decode())
    assert served >= METRICS, METRICS - served
