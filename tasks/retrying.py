"""Putting a task back for later without ever dropping its message.

Celery's ``Task.retry`` publishes a new message and, if that publish fails, raises
``Reject(requeue=False)``, which deletes the original: a broker hiccup would lose the batch.
:func:`retry_later` turns that case into ``Reject(requeue=True)``; if even that cannot reach the
broker, the message stays unacknowledged and comes back after the visibility timeout.
"""

from __future__ import annotations

import random
from typing import NoReturn

from celery import Task
from celery.exceptions import Reject, Retry


def backoff_s(retries: int, *, base_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: uniform in [c/2, c], c = min(max, base * 2**retries)."""
    ceiling = min(max_s, base_s * (2 ** min(retries, 32)))
    return random.uniform(ceiling / 2, ceiling)


def delivery_backoff_s(retries: int) -> float:
    """The backoff before retry number ``retries + 1``, from the ``delivery:`` settings."""
    from app.runtime import settings

    delivery = settings().delivery
    return backoff_s(
        retries, base_s=delivery.retry_backoff_base_s, max_s=delivery.retry_backoff_max_s
    )


def retry_later(task: Task, exc: BaseException | None, *, countdown_s: float) -> NoReturn:
    """Retry ``task`` after ``countdown_s``; never lets the message be dropped."""
    try:
        raise task.retry(countdown=countdown_s, exc=exc)
    except Retry:
        raise
    except Exception as publish_error:
        raise Reject(f"retry not published: {publish_error}", requeue=True) from publish_error
