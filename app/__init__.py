"""iam-pump: analytics records from busy applications to the stores people query.

``celery -A app ...`` finds the Celery application here.
"""

from app.celery_app import app

__all__ = ["app"]
