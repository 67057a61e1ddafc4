"""The Celery application: ``celery -A app worker|beat|flower``.

The settings come from the YAML file named by ``--config`` (added to every celery sub-command)
or ``IAM_PUMP_CONFIG``; ``celeryconfig`` derives the Celery settings from it when the app is
first configured.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

import click
from celery import Celery, signals
from celery.worker.consumer import Consumer as CeleryConsumer

from app import kombu_guard
from app.config import CONFIG_ENV_VAR, Settings, split_address, warn_ignored_keys
from app.stores.clients import batch_servers
from app.stores.eviction import Verdict, check_servers
from app.worker_context import WorkerContext, close_context, install_context

REMAP_SIGTERM_ENV_VAR = "REMAP_SIGTERM"

#: The exit status of a worker that refuses to start, the same as for a bad configuration.
EXIT_REFUSED = 2

logger = logging.getLogger(__name__)

kombu_guard.install()

# app.worker_health (the health endpoint of a worker started with --health-address) sits above
# this module in the floors, so it is named here, not imported: Celery imports it in the worker.
app = Celery(
    "iam_pump",
    include=["tasks.ingest", "tasks.purge", "tasks.sweep", "tasks.write", "app.worker_health"],
)
app.config_from_object("celeryconfig")


#: Longest pause between two attempts to reach a lost broker (Celery's consumer: up to 30 s).
#: A worker is back, and ready, within this long of the broker's return; an attempt costs a
#: TCP connect.
RECONNECT_INTERVAL_MAX_S = 2.0


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, reconnecting to a lost broker every :data:`RECONNECT_INTERVAL_MAX_S`
    at most (``worker_consumer`` in celeryconfig), so that readiness follows the broker's return
    within one probe period however long the outage was."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=1.0,
            interval_step=1.0,
            interval_max=RECONNECT_INTERVAL_MAX_S,
        )
        return super().ensure_connected(conn)


def _use_config_file(context: click.Context, parameter: click.Parameter, path: str | None) -> None:
    # Eager: set before Celery's own options read their defaults from the configuration.
    if path:
        os.environ[CONFIG_ENV_VAR] = os.path.abspath(path)


app.user_options["preload"].add(
    click.Option(
        ["--config"],
        default=None,
        is_eager=True,
        expose_value=True,
        callback=_use_config_file,
        help=f"iam-pump YAML config file (default: ${CONFIG_ENV_VAR}, else the embedded default).",
    )
)


#: Where this process serves /livez, /readyz and /metrics (``--health-address``), if anywhere.
_health_address: tuple[str, int] | None = None


def _use_health_address(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    global _health_address
    if value:
        try:
            _health_address = split_address(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


app.user_options["preload"].add(
    click.Option(
        ["--health-address"],
        default=None,
        metavar="HOST:PORT",
        expose_value=True,
        callback=_use_health_address,
        help="serve /livez, /readyz and /metrics of this worker there (default: none).",
    )
)


def health_address() -> tuple[str, int] | None:
    """The ``--health-address`` this process was started with, or None."""
    return _health_address


@signals.user_preload_options.connect
def _remap_sigterm(sender: Any, options: dict[str, Any], **_: Any) -> None:
    if getattr(sender, "__name__", "") == "worker" and REMAP_SIGTERM_ENV_VAR not in os.environ:
        # SIGTERM must requeue unfinished tasks at once (Celery's cold shutdown after the soft
        # shutdown period), not leave them to the visibility timeout if the orchestrator's
        # SIGKILL follows. Celery reads this variable when it is imported, so start again with
        # it set. Setting REMAP_SIGTERM yourself (to anything) keeps your choice.
        os.environ[REMAP_SIGTERM_ENV_VAR] = "SIGQUIT"
        os.execv(sys.executable, [sys.executable, "-m", "celery", *sys.argv[1:]])


def _pump_settings() -> Settings:
    # The settings celeryconfig validated when Celery configured the app: the file is read once
    # per process. (Kept under a private name, so `celery inspect conf` does not list it.)
    settings = app.conf["_pump_settings"]
    assert isinstance(settings, Settings)
    return settings


@signals.worker_init.connect
@signals.beat_init.connect
def _report_ignored_keys(**_: Any) -> None:
    warn_ignored_keys(_pump_settings())


@signals.worker_init.connect
def _check_redis_memory(**_: Any) -> None:
    # Before anything is consumed: a Redis that may evict held batches stops the worker, as a
    # bad config does (app/stores/eviction.py).
    servers = batch_servers(_pump_settings())
    try:
        findings = check_servers(_pump_settings(), servers)
    finally:
        for _name, client in servers:
            client.close()
    for finding in findings:
        if finding.verdict is Verdict.REFUSE:
            print(f"iam-pump: refusing to start: {finding.message}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_REFUSED)
        if finding.verdict is Verdict.WARN:
            logger.warning("%s", finding.message)


@signals.worker_init.connect
@signals.worker_process_init.connect
def _build_context(**_: Any) -> None:
    # In the main process for the solo and threads pools, then afresh in every prefork child
    # after the fork: connections and pumps must not be shared across processes. The copy a
    # child inherits is dropped unclosed (closing would close the parent's sockets).
    install_context(WorkerContext.build(_pump_settings(), app))


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_context(**_: Any) -> None:
    close_context()
