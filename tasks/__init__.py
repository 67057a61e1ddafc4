"""Celery tasks: ingest (validate and fan out), purge (drain iam's Redis list), write (one pump),
and the dead-letter store they share."""
