"""Fixtures of the unit tests that use the Elasticsearch stand-in (``ES_URL``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from elasticsearch import Elasticsearch


@pytest.fixture
def es(es_url: str) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_url.split(","), request_timeout=10)
    yield client
    client.close()


@pytest.fixture
def es_index(es: Elasticsearch) -> Iterator[str]:
    """An index name of this test's own; its indices and template are deleted afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    for index in es.indices.get(index=f"{name}*").body:
        es.indices.delete(index=index)
    if es.indices.exists_index_template(name=name):
        es.indices.delete_index_template(name=name)
