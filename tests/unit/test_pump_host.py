"""PumpHost: opens each pump once per process, checks truthfully (opening if need be), closes."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from elasticsearch import Elasticsearch
from pymongo.database import Database

from app.config import parse_settings
from app.record import AnalyticsRecord
from pumps.deadline import CHECK_TIMEOUT_S, Deadline
from pumps.host import CHECK_OK, PumpHost
from pumps.memory import MemoryPump
from tests.stores import mongo_url_for
from tests.support import free_port

#: How much longer than its deadline a check of a sink that is down may take.
CHECK_SLACK_S = 2.0


@pytest.fixture
def make_host() -> Iterator[Any]:
    hosts: list[PumpHost] = []

    def make(pumps: dict[str, Any], **settings: Any) -> PumpHost:
        host = PumpHost(parse_settings(json.dumps({"pumps": pumps, **settings})))
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.close()


def test_a_pump_is_opened_once_and_shared(make_host: Any) -> None:
    host = make_host({"mem": {"type": "memory"}})
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(host.pump("mem"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(seen) == 8 and all(pump is seen[0] for pump in seen)
    assert isinstance(seen[0], MemoryPump)
    record = AnalyticsRecord(username="a", id="b-0")
    assert host.pump("mem").write([record], deadline=Deadline.after(5)).rejected == []
    assert MemoryPump.records("mem") == [record]


def test_a_failed_open_is_not_kept_and_the_next_use_tries_again(
    make_host: Any, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    host = make_host({"csv": {"type": "csv", "meta": {"csv_dir": str(blocker / "csv")}}})
    assert "cannot create" in host.check("csv")
    blocker.unlink()
    assert host.check("csv") == CHECK_OK
    assert (blocker / "csv").is_dir()


def test_check_all_names_every_enabled_pump(make_host: Any, tmp_path: Path) -> None:
    host = make_host(
        {
            "csv": {"type": "csv", "meta": {"csv_dir": str(tmp_path / "csv")}},
            "mem": {"type": "memory"},
            "off": {"type": "memory", "enabled": False},
        }
    )
    assert host.check_all() == {"csv": CHECK_OK, "mem": CHECK_OK}


def test_an_unknown_pump_is_reported_not_raised(make_host: Any) -> None:
    host = make_host({"mem": {"type": "memory"}})
    assert "not in the configuration" in host.check("nope")


def test_pipelines_are_built_once_and_leave_size_to_pumps_that_handle_it(make_host: Any) -> None:
    host = make_host(
        {
            "mem": {"type": "memory"},
            "mongo": {"type": "mongo", "meta": {"mongo_url": "mongodb://x"}},
        }
    )
    assert host.pipeline("mem") is host.pipeline("mem")
    assert len(host.pipeline("mem")) == 1  # the size limit
    assert host.pipeline("mongo") == []


def test_close_is_safe_twice_and_a_later_use_opens_afresh(make_host: Any) -> None:
    host = make_host({"mem": {"type": "memory"}})
    first = host.pump("mem")
    host.close()
    host.close()
    assert host.pump("mem") is not first


@pytest.mark.integration
def test_stores_are_checked_without_being_used_first(
    make_host: Any, mongo_db: Database[dict[str, Any]], es_url: str
) -> None:
    """The health server's bug: it checked pumps it never opened, so stores said "not open"."""
    index_name = f"test_{uuid.uuid4().hex[:12]}"
    host = make_host(
        {
            "mongo": {"type": "mongo", "meta": {"mongo_url": mongo_url_for(mongo_db.name)}},
            "es": {
                "type": "elasticsearch",
                "meta": {"elasticsearch_url": es_url, "index_name": index_name},
            },
        }
    )
    try:
        assert host.check_all() == {"mongo": CHECK_OK, "es": CHECK_OK}
    finally:
        with Elasticsearch(es_url.split(",")) as es:
            if es.indices.exists_index_template(name=index_name):
                es.indices.delete_index_template(name=index_name)


@pytest.mark.integration
def test_a_store_that_is_down_is_reported_within_the_check_deadline(make_host: Any) -> None:
    url = mongo_url_for("down", port=free_port())
    host = make_host({"mongo": {"type": "mongo", "timeout": 30, "meta": {"mongo_url": url}}})
    started = time.monotonic()
    assert host.check("mongo") != CHECK_OK
    assert time.monotonic() - started < CHECK_TIMEOUT_S + CHECK_SLACK_S
