"""What the Elasticsearch pump adds to the contract: mappings and daily indices, item errors,
resends of 429s, bulk cutting and splitting (server at ``ES_URL``; each test its own index)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, TypeVar

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError, Elasticsearch

from app.record import GO_ZERO_TIME
from pumps.base import Pump, WriteResult
from pumps.elasticsearch import ElasticsearchPump
from pumps.errors import PumpTemporaryError
from pumps.testing import copies, make_records, opened
from pumps.testing.contract import soon

pytestmark = pytest.mark.integration

P = TypeVar("P", bound=Pump)
ALL_WRITTEN = WriteResult()


def es_usernames(es: Elasticsearch, index_name: str) -> Counter[str]:
    es.indices.refresh(index=f"{index_name}*")
    hits = es.search(index=f"{index_name}*", query={"match_all": {}}, size=10_000).body["hits"]
    return Counter(hit["_source"]["username"] for hit in hits["hits"])


def item_429(action: dict[str, Any]) -> dict[str, Any]:
    """A bulk response item as Elasticsearch answers a document it has no room for now."""
    error = {"type": "es_rejected_execution_exception", "reason": "queue full"}
    return {"index": {"_id": action["index"]["_id"], "status": 429, "error": error}}


class FlakyElasticsearchPump(ElasticsearchPump):
    """Answers 429 for the documents whose username is in ``flaky`` on the first ``refusals``
    requests (the other documents really go to the server); records each request's size."""

    def __init__(self, name: str, meta: Any, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self.flaky: frozenset[str] = frozenset()
        self.refusals = 1
        self.sizes: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.sizes)

    def _send_bulk(self, client: Elasticsearch, operations: list[dict[str, Any]]) -> list[Any]:
        self.sizes.append(len(operations) // 2)
        pairs = list(zip(operations[::2], operations[1::2], strict=True))
        refused = {
            index
            for index, (_action, document) in enumerate(pairs)
            if self.calls <= self.refusals and document["username"] in self.flaky
        }
        sent = [part for index, pair in enumerate(pairs) if index not in refused for part in pair]
        answers = iter(super()._send_bulk(client, sent) if sent else [])
        return [
            item_429(action) if index in refused else next(answers)
            for index, (action, _document) in enumerate(pairs)
        ]


def es_pump(sink_url: str, index_name: str, cls: type[P], **meta: Any) -> P:
    meta = {"elasticsearch_url": sink_url, "index_name": index_name, **meta}
    pump = cls.create("es", meta, timeout_s=10)
    assert isinstance(pump, cls)
    return pump


def test_es_template_mappings_and_rolling_daily_index(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    day_one = make_records("day1", 3, timestamp=1_795_500_000)  # 2026-11-24
    day_two = make_records("day2", 2, timestamp=1_795_500_000 + 86_400)
    with opened(es_pump(es_url, es_index, ElasticsearchPump, rolling_index=True)) as pump:
        assert pump.write(day_one + day_two, deadline=soon()) == ALL_WRITTEN
    template = es.indices.get_index_template(name=es_index).body["index_templates"][0]
    assert template["index_template"]["index_patterns"] == [es_index, f"{es_index}-*"]
    indices = sorted(es.indices.get(index=f"{es_index}*").body)
    assert indices == [f"{es_index}-2026.11.24", f"{es_index}-2026.11.25"]
    mapping = es.indices.get_mapping(index=indices[0]).body[indices[0]]["mappings"]["properties"]
    assert mapping["@timestamp"]["type"] == "date"
    assert mapping["expireAt"]["type"] == "date"
    assert (mapping["username"]["type"], mapping["effect"]["type"]) == ("keyword", "keyword")
    es.indices.refresh(index=indices[0])
    source = es.get(index=indices[0], id=day_one[0].id).body["_source"]
    assert source["@timestamp"] == "2026-11-24T06:00:00+00:00"
    assert source["expireAt"] == "2030-06-01T12:00:00+00:00"
    assert source["request"] == day_one[0].request


def test_es_mapping_error_goes_alone_to_the_dead_letters(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    # An index whose username is numeric: a name that is not a number cannot be indexed.
    es.indices.create(index=es_index, mappings={"properties": {"username": {"type": "long"}}})
    records = [
        dataclasses.replace(record, username=str(100 + n))
        for n, record in enumerate(make_records("map", 4))
    ]
    records[2] = dataclasses.replace(records[2], username="alice")
    with opened(es_pump(es_url, es_index, ElasticsearchPump)) as pump:
        result = pump.write(records, deadline=soon())
    assert isinstance(result, WriteResult)
    assert [
        (record.id, "400 document_parsing_exception" in reason)
        for record, reason in result.rejected
    ] == [(records[2].id, True)]
    es.indices.refresh(index=es_index)
    assert es.count(index=es_index)["count"] == 3


def test_es_items_refused_with_429_are_sent_again_and_the_rest_committed(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    records = make_records("flaky", 10)
    with opened(es_pump(es_url, es_index, FlakyElasticsearchPump)) as pump:
        pump.flaky = frozenset({records[3].username, records[7].username})
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
        assert pump.sizes == [10, 2]
    assert es_usernames(es, es_index) == {record.username: 1 for record in records}


def test_es_items_still_refused_raise_temporary_and_redelivery_is_idempotent(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    records = make_records("stuck", 6)
    with opened(es_pump(es_url, es_index, FlakyElasticsearchPump, bulk_item_retries=2)) as pump:
        pump.flaky = frozenset({records[0].username})
        pump.refusals = 99
        with pytest.raises(PumpTemporaryError, match="still refuses 1 document"):
            pump.write(records, deadline=soon())
        assert pump.calls == 3
    # The batch comes back whole; the five documents already in are overwritten, not doubled.
    with opened(es_pump(es_url, es_index, ElasticsearchPump)) as pump:
        assert pump.write(copies(records), deadline=soon()) == ALL_WRITTEN
    assert es_usernames(es, es_index) == {record.username: 1 for record in records}


def test_es_bulks_are_cut_at_bulk_size(es: Elasticsearch, es_url: str, es_index: str) -> None:
    records = make_records("cut", 10)
    with opened(es_pump(es_url, es_index, FlakyElasticsearchPump, bulk_size=4)) as pump:
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
        assert pump.sizes == [4, 4, 2]
    assert sum(es_usernames(es, es_index).values()) == 10


class TooLargeElasticsearchPump(FlakyElasticsearchPump):
    """Answers 413 to any request of more than two documents, and for one document always."""

    huge: str = ""

    def _send_bulk(self, client: Elasticsearch, operations: list[dict[str, Any]]) -> list[Any]:
        if len(operations) > 4 or operations[1]["username"] == self.huge:
            meta = ApiResponseMeta(
                status=413,
                http_version="1.1",
                headers=HttpHeaders(),
                duration=0.0,
                node=NodeConfig("http", "localhost", 9200),
            )
            raise ApiError("Request Entity Too Large", meta=meta, body={})
        return super()._send_bulk(client, operations)


def test_es_request_too_large_is_split_and_a_lone_huge_document_refused(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    records = make_records("413", 7)
    with opened(es_pump(es_url, es_index, TooLargeElasticsearchPump)) as pump:
        pump.huge = records[5].username
        result = pump.write(records, deadline=soon())
    assert isinstance(result, WriteResult)
    assert [(record.id, "413" in reason) for record, reason in result.rejected] == [
        (records[5].id, True)
    ]
    assert sum(es_usernames(es, es_index).values()) == 6


def test_es_expired_go_zero_time_is_left_out(es: Elasticsearch, es_url: str, es_index: str) -> None:
    record = dataclasses.replace(make_records("zero", 1)[0], expire_at=GO_ZERO_TIME)
    with opened(es_pump(es_url, es_index, ElasticsearchPump)) as pump:
        pump.write([record], deadline=soon())
    es.indices.refresh(index=es_index)
    assert "expireAt" not in es.get(index=es_index, id=record.id).body["_source"]
