"""Celery settings, derived from the validated iam-pump configuration.

Celery reads this module when the app is first configured. A bad config file stops the process
here, with every bad key named, and exit status 2.
"""

from __future__ import annotations

import sys

from kombu import Exchange, Queue

from app.config import Settings
from app.errors import ConfigError
from app.messages import INGEST_QUEUE, PURGE_QUEUE, PURGE_TASK, SWEEP_TASK, pump_queue, route
from app.stores.clients import check_certificate
from pumps.settings import load_pump_settings

#: How often kombu's Redis transport looks for unacknowledged tasks to restore.
UNACKED_RESTORE_INTERVAL_S = 10
#: How long kombu's restore lock may outlive the worker that took it.
UNACKED_MUTEX_EXPIRE_S = 30
#: Longest a broker command may wait for its reply (kombu's default: forever).
BROKER_SOCKET_TIMEOUT_S = 15
#: How often kombu checks its long-lived broker connections (kombu's default: 25 s).
BROKER_HEALTH_CHECK_INTERVAL_S = 10


def _settings() -> Settings:
    try:
        settings = load_pump_settings()
        for url in dict.fromkeys((settings.redis.url, settings.broker)):
            check_certificate(url, source=settings.source)
        return settings
    except ConfigError as exc:
        print(f"iam-pump: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


_pump_settings = _settings()

broker_url = _pump_settings.broker
broker_connection_retry_on_startup = True
# A worker never gives up on a lost broker (Celery's default: exit after 100 attempts): an outage
# is not this process's failure, and its /livez stays 200 through it. Its consumer tries again
# every 2 s at most (app.celery_app.Consumer).
broker_connection_max_retries = None
worker_consumer = "app.celery_app:Consumer"
broker_transport_options = {
    "visibility_timeout": _pump_settings.visibility_timeout_s,
    # Look for tasks of dead workers every 10 s, and really scan each time (kombu's default
    # throttle scans every 10th time), so they come back within visibility timeout + 10 s.
    "unacked_restore_interval": UNACKED_RESTORE_INTERVAL_S,
    "unacked_restore_throttle": 1,
    # A worker killed while it held the restore lock blocks restores for this long only.
    "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
    # A broker that goes silent (a network partition) must not hold the worker's main process:
    # a command waits at most this long, and a BRPOP reply overdue by brpop_timeout + this
    # interval drops the connection, so the worker reconnects soon after the network returns.
    "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
    "health_check_interval": BROKER_HEALTH_CHECK_INTERVAL_S,
}
# Publishing (fan-out, retries) rides out a short broker hiccup before giving up.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 10,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 3,
}

task_serializer = "msgpack"
result_serializer = "msgpack"
accept_content = ["msgpack"]
task_ignore_result = True
result_backend = None

# At-least-once: a task is acknowledged only after it has run, a task whose pool process died is
# requeued, and a worker holds one unstarted task per process at most.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_soft_shutdown_timeout = _pump_settings.delivery.soft_shutdown_timeout_s
worker_enable_soft_shutdown_on_idle = False
worker_cancel_long_running_tasks_on_connection_loss = True


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


task_queues = [
    _queue(INGEST_QUEUE),
    _queue(PURGE_QUEUE),
    *(_queue(pump_queue(name)) for name in _pump_settings.enabled_pumps),
]
task_default_queue = INGEST_QUEUE
# ingest -> "ingest", purge -> "purge", write(<pump>, ...) -> "pump.<pump>": the same router the
# senders use (app/messages.py), so a task published any other way lands in the same queue.
task_routes = (route,)

beat_schedule = {
    "purge-redis-list": {
        "task": PURGE_TASK,
        "schedule": float(_pump_settings.purge_delay),
        "options": {"queue": PURGE_QUEUE, "expires": float(_pump_settings.purge_delay)},
    },
    # Sends again the task of any kept batch whose claim made no progress for the redelivery
    # window (a task message lost by the broker or an operator): tasks/sweep.py.
    "sweep-ledger": {
        "task": SWEEP_TASK,
        "schedule": _pump_settings.delivery.sweep_interval_s,
        "options": {"queue": PURGE_QUEUE, "expires": _pump_settings.delivery.sweep_interval_s},
    },
}
