"""The ``iam-pump`` command line.

Exit status: 0 success, 1 an operation failed (unhealthy, entry not found, ...), 2 bad
configuration or usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

from app.config import CONFIG_ENV_VAR, Settings, masked, warn_ignored_keys
from app.config_env import unused_env
from app.errors import ConfigError
from app.progress import progress
from app.stores.clients import broker_redis_client, check_certificate, redis_client
from pumps.settings import load_pump_settings

if TYPE_CHECKING:
    from app.stores.eviction import Finding

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line (``log.format: json``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log.format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.python_level)


def _settings(args: argparse.Namespace) -> Settings:
    """Load the config named on the command line; also make it the one Celery reads."""
    if args.config:
        os.environ[CONFIG_ENV_VAR] = os.path.abspath(args.config)
    settings = load_pump_settings(args.config)
    for url in dict.fromkeys((settings.redis.url, settings.broker)):
        check_certificate(url, source=settings.source)
    _configure_logging(settings)
    warn_ignored_keys(settings)
    return settings


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(f"# {settings.source}: valid")
    print(
        f"# derived: visibility timeout {settings.visibility_timeout_s:g} s; shutdown grace "
        f"period {settings.shutdown_grace_period_s:g} s (terminationGracePeriodSeconds, "
        "TimeoutStopSec)"
    )
    for key, name in settings.env_overrides.items():
        print(f"# {key}: from {name}")
    for name in unused_env(os.environ, settings.env_overrides, frozenset({CONFIG_ENV_VAR})):
        print(f"# {name}: sets no key (none of that name, or empty)")
    print(yaml.safe_dump(masked(settings), sort_keys=False), end="")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from app.health import HealthServer

    settings = _settings(args)
    env = dict(os.environ, REMAP_SIGTERM="SIGQUIT")
    with tempfile.TemporaryDirectory(prefix="iam-pump-") as state_dir:
        # Its own session: a Ctrl+C in the terminal reaches this process only, which then asks
        # the worker for one soft shutdown (a second signal would make it a cold one).
        worker = subprocess.Popen(
            _worker_command(args, settings, state_dir), env=env, start_new_session=True
        )
        # Alive while the worker (with its embedded beat) runs: it has its own loops.
        health = HealthServer(
            settings,
            redis_client(settings),
            liveness=lambda: None if worker.poll() is None else "the worker has exited",
        )
        health.start()
        demo = None
        if args.demo:
            from app.demo import DemoProducer

            demo = DemoProducer(settings, rate_per_s=args.demo_rate)
            demo.start()
            print(f"demo producer: {args.demo_rate} records/s; Ctrl+C to stop", flush=True)
        _wait_for_a_stop_signal(worker)
        if demo is not None:
            demo.stop()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        code = worker.wait()
        health.stop()
        return code if code >= 0 else EXIT_FAILED


def cmd_health_server(args: argparse.Namespace) -> int:
    """The health and metrics endpoint alone, for a deployment whose workers and beat run as
    their own services: the metrics come from Redis, so one such process shows the whole fleet."""
    from app.health import HealthServer

    settings = _settings(args)
    health = HealthServer(settings, redis_client(settings))
    health.start()
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopping.wait()
    health.stop()
    return EXIT_OK


def _worker_command(args: argparse.Namespace, settings: Settings, state_dir: str) -> list[str]:
    # One worker with an embedded beat; the schedule file lives as long as the run.
    command = [sys.executable, "-m", "celery", "-A", "app", "worker", "--beat"]
    command += ["-s", os.path.join(state_dir, "beat-schedule")]
    command += ["-l", args.loglevel or settings.log.python_level]
    if args.concurrency:
        command += ["-c", str(args.concurrency)]
    return command


def _wait_for_a_stop_signal(worker: subprocess.Popen[bytes]) -> None:
    # Until SIGTERM or SIGINT arrives, or the worker exits by itself.
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and worker.poll() is None:
        time.sleep(0.2)


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import DemoProducer

    settings = _settings(args)
    demo = DemoProducer(settings, rate_per_s=args.rate)
    demo.start()
    with contextlib.suppress(KeyboardInterrupt), progress("demo", args.duration) as steps:
        ends = time.monotonic() + args.duration
        while (left := ends - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            steps.advance(min(1.0, left))
    demo.stop()
    stats = demo.analytics.stats()
    print(
        f"produced {demo.produced} records; reporter shipped {stats.shipped_records}, "
        f"dropped {stats.dropped}"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    status = _status(_settings(args))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return EXIT_OK if status["status"] == "ok" else EXIT_FAILED


def _status(settings: Settings) -> dict[str, Any]:
    # Everything `status` tells, as one JSON-ready dict (its --json output).
    from app.health import HealthChecker, queue_consumers
    from app.stores.batches import BatchStore, EnvelopeStore
    from app.stores.dead_letters import DeadLetterStore
    from app.stores.eviction import Verdict
    from app.stores.ledger import Ledger
    from app.stores.stats import Stats, is_write_duration

    client = redis_client(settings)
    checker = HealthChecker(settings, client, consumers=queue_consumers(settings))
    report = checker.check()
    checker.close()
    findings = _redis_memory(settings) if report.checks["redis"] == "ok" else []
    refused = any(finding.verdict is Verdict.REFUSE for finding in findings)
    status: dict[str, Any] = {
        "status": "ok" if report.healthy and not refused else "unhealthy",
        "checks": report.checks,
        "consumers": report.consumers,
    }
    if report.checks["redis"] != "ok":
        return status
    status["redis_memory"] = [
        {"verdict": finding.verdict.value, "message": finding.message} for finding in findings
    ]
    status["redis_list"] = {
        "key": settings.analytics_key,
        "records": int(client.llen(settings.analytics_key)),
    }
    values = Stats(client, settings).read().values
    # The write-duration histogram's buckets are for /metrics, not for reading here.
    status["counters"] = {key: values[key] for key in sorted(values) if not is_write_duration(key)}
    broker = broker_redis_client(settings)
    if broker is not None:
        ledger = Ledger(broker, settings.key_prefix)
        oldest = ledger.oldest()
        status["kept_batches"] = {
            "waiting_for_ingest": EnvelopeStore(broker, settings.key_prefix).waiting(),
            "waiting_for_pumps": BatchStore(broker, settings.key_prefix).held(),
        }
        status["ledger"] = {
            "claims_owed": ledger.owed(),
            "oldest_progress_age_s": None if oldest is None else round(time.time() - oldest, 1),
        }
    store = DeadLetterStore(client, settings)
    status["dead_letters"] = {group: store.count(group) for group in store.groups()}
    return status


def _print_status(status: dict[str, Any]) -> None:
    print(f"status: {'ok' if status['status'] == 'ok' else 'UNHEALTHY'}")
    for name, result in status["checks"].items():
        print(f"  {name:<24} {result}")
    if status["consumers"] is not None:
        print("consumers per queue (live workers):")
        for queue, count in status["consumers"].items():
            print(f"  {queue:<24} {count}{'' if count else '  <- no consumer'}")
    if "redis_memory" not in status:
        return
    print("redis memory (a worker refuses to start on 'refused'):")
    for finding in status["redis_memory"]:
        print(f"  {finding['verdict']:<9} {finding['message']}")
    redis_list = status["redis_list"]
    print(f"redis list {redis_list['key']}: {redis_list['records']} records")
    for key, value in status["counters"].items():
        print(f"  {key:<40} {value}")
    if "ledger" in status:
        kept, ledger = status["kept_batches"], status["ledger"]
        print(
            f"batches kept on the broker: {kept['waiting_for_ingest']} waiting for ingest, "
            f"{kept['waiting_for_pumps']} for pumps"
        )
        age = ledger["oldest_progress_age_s"]
        moved = "" if age is None else f", oldest last moved {age:.0f}s ago"
        print(f"ledger: {ledger['claims_owed']} claims owed{moved}")
    for group, count in status["dead_letters"].items():
        print(f"dead letters {group}: {count} entries")


def _redis_memory(settings: Settings) -> list[Finding]:
    # Each Redis we keep data on, its eviction policy judged (app/stores/eviction.py).
    from app.stores.clients import batch_servers
    from app.stores.eviction import check_servers

    servers = batch_servers(settings)
    try:
        return check_servers(settings, servers)
    finally:
        for _name, server in servers:
            server.close()


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from app import dead_letter_cli

    settings = _settings(args)
    return dead_letter_cli.run(args, settings)


def cmd_redis_acl(args: argparse.Namespace) -> int:
    from app.redis_acl import acl_setuser

    # No connection: this prints what to give a Redis administrator.
    settings = load_pump_settings(args.config)
    print(acl_setuser(settings, user=args.user))
    return EXIT_OK


def _add_run(commands: Any, common: argparse.ArgumentParser) -> None:
    run = commands.add_parser(
        "run", parents=[common], help="worker + beat + health endpoint in one command"
    )
    run.add_argument("--demo", action="store_true", help="also run a demo producer")
    run.add_argument("--demo-rate", type=int, default=200, help="demo records per second")
    run.add_argument("--concurrency", type=int, default=0, help="worker processes")
    run.add_argument("--loglevel", default=None, help="worker log level (default: log.level)")
    run.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iam-pump",
        description="Collect analytics records and deliver them to MongoDB, Elasticsearch, "
        "CSV and more, through Celery.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"YAML config file (default: ${CONFIG_ENV_VAR}, else the embedded default)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_run(commands, common)

    health = commands.add_parser(
        "health-server",
        parents=[common],
        help="only the health and metrics endpoint (health-check-address), for the whole fleet",
    )
    health.set_defaults(func=cmd_health_server)

    check = commands.add_parser(
        "check-config", parents=[common], help="validate the config and print it (secrets masked)"
    )
    check.set_defaults(func=cmd_check_config)

    status = commands.add_parser(
        "status", parents=[common], help="health checks, backlog, counters, dead letters"
    )
    status.add_argument("--json", action="store_true", help="print it as one JSON object")
    status.set_defaults(func=cmd_status)

    demo = commands.add_parser("demo", parents=[common], help="produce demo records for a while")
    demo.add_argument("--rate", type=int, default=200, help="records per second")
    demo.add_argument("--duration", type=float, default=10.0, help="seconds")
    demo.set_defaults(func=cmd_demo)

    acl = commands.add_parser(
        "redis-acl",
        parents=[common],
        help="print the ACL SETUSER line of a Redis user with only what the pump needs",
    )
    acl.add_argument("--user", default="iam-pump", help="the Redis user name")
    acl.set_defaults(func=cmd_redis_acl)

    from app import dead_letter_cli

    dead = commands.add_parser("dead-letters", help="list, show, replay or drop dead letters")
    dead_letter_cli.add_commands(dead, common)
    dead.set_defaults(func=cmd_dead_letters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"iam-pump: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return code


if __name__ == "__main__":
    sys.exit(main())
