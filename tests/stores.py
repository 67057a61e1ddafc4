"""The MongoDB and Elasticsearch servers the store tests use (``MONGO_URI``, ``ES_URL``).

Their fixtures are made available to every test module by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pymongo
import pytest
from pymongo.database import Database

from tests.support import port_open

MONGO_URI = os.environ.get("MONGO_URI", "mongodb://127.0.0.1:27017")
ES_URL = os.environ.get("ES_URL", "http://127.0.0.1:9200")


def mongo_address(uri: str = MONGO_URI) -> tuple[str, int]:
    """The first host of a MongoDB URI."""
    first = urlsplit(uri).netloc.rpartition("@")[2].split(",")[0]
    host, _, port = first.rpartition(":") if ":" in first else (first, "", "27017")
    return host, int(port)


def mongo_url_for(database: str, *, base: str = MONGO_URI, port: int | None = None) -> str:
    """``base`` with its database (and, if given, its port on 127.0.0.1) replaced."""
    parts = urlsplit(base)
    netloc = parts.netloc if port is None else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, ""))


def es_address(url: str = ES_URL) -> tuple[str, int]:
    """The first host of an Elasticsearch URL list."""
    parts = urlsplit(url.split(",")[0])
    return parts.hostname or "127.0.0.1", parts.port or 9200


@pytest.fixture
def mongo_uri() -> str:
    """The MongoDB server's URI (skips locally, fails in CI, when it does not answer)."""
    from tests.conftest import require

    require(port_open(*mongo_address()), f"MongoDB at {MONGO_URI}")
    return MONGO_URI


@pytest.fixture
def mongo_db(mongo_uri: str) -> Iterator[Database[dict[str, Any]]]:
    """A database of this test's own, dropped afterwards."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True
    )
    database = client[f"test_{uuid.uuid4().hex[:12]}"]
    try:
        yield database
    finally:
        client.drop_database(database.name)
        client.close()


@pytest.fixture
def es_url() -> str:
    """The Elasticsearch URL (skips locally, fails in CI, when it does not answer)."""
    from tests.conftest import require

    require(port_open(*es_address()), f"Elasticsearch at {ES_URL}")
    return ES_URL
