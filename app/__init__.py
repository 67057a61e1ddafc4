"""iam-pump: analytics records from busy applications to the stores people query.

``celery -A app ...`` finds the Celery application here as ``app.app`` (also ``app.celery``).
It is made on first access, not at import: ``from app.analytics import Analytics`` inside a web
application creates no worker app, patches nothing and loads no sink driver.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "celery"]


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from app.celery_app import app as celery_app

        return celery_app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
