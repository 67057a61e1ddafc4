"""The ``meta`` of the elasticsearch pump.

``meta`` takes iam's keys (so an iam-pump.yaml works) and adds TLS, bulk size and retries::

    elasticsearch_url       one URL, a comma-separated list, or a YAML list (default
                            http://localhost:9200); credentials in a URL are used
    index_name              default ``iam_analytics``
    rolling_index           write to ``<index_name>-YYYY.MM.DD``, the day of the record (UTC)
    auth_basic_username, auth_basic_password        basic authentication
    auth_api_key_id, auth_api_key                   API key (id and key, or the encoded key alone)
    ssl_ca_file, ssl_cert_file, ssl_key_file        CA bundle and client certificate (PEM)
    ssl_insecure_skip_verify                        accept any certificate
    use_sniffing            discover the cluster's nodes at start and when one fails
    bulk_size               records per bulk request; default 1000
    bulk_item_retries       how often documents refused with 429/5xx are sent again within one
                            write; default 3
    bulk_config             iam's block: ``bulk_actions`` (records per request, if ``bulk_size`` is
                            not given) and ``bulk_size`` (bytes per request, estimated) are used;
                            ``workers`` and ``flush_interval`` belong to iam's background bulk
                            processor, which this pump does not need: ignored with a warning
    document_type, disable_bulk   iam keys without meaning here (Elasticsearch 8 has no mapping
                            types; writes are always bulk); accepted, ignored with a warning
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config import mask_url

DEFAULT_ELASTICSEARCH_URL = "http://localhost:9200"
DEFAULT_INDEX_NAME = "iam_analytics"
DEFAULT_BULK_SIZE_RECORDS = 1000
MAX_BULK_SIZE_RECORDS = 100_000
DEFAULT_BULK_ITEM_RETRIES = 3
MAX_BULK_ITEM_RETRIES = 10
_MAX_INDEX_NAME_BYTES = 255
_ROLLING_SUFFIX_BYTES = len("-YYYY.MM.DD")
_INDEX_NAME_FORBIDDEN = set('\\/*?"<>| ,#:')


class IamBulkConfig(BaseModel):
    """iam's ``bulk_config`` block; see the module docstring for what is used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(default=0, ge=0)
    flush_interval: int = Field(default=0, ge=0)
    bulk_actions: int = Field(default=0, ge=0, le=MAX_BULK_SIZE_RECORDS)
    bulk_size: int = Field(default=0, ge=0)


def validate_index_name(value: str) -> str:
    """Check an index name against Elasticsearch's rules; raise ValueError naming the rule."""
    if not value or value in {".", ".."}:
        raise ValueError("an index name may not be empty, '.' or '..'")
    if value != value.lower():
        raise ValueError("an index name must be lowercase")
    if value[0] in "-_+":
        raise ValueError("an index name may not start with '-', '_' or '+'")
    bad = sorted(_INDEX_NAME_FORBIDDEN.intersection(value))
    if bad:
        raise ValueError(f"an index name may not contain {' '.join(repr(c) for c in bad)}")
    if len(value.encode("utf-8")) + _ROLLING_SUFFIX_BYTES > _MAX_INDEX_NAME_BYTES:
        raise ValueError(f"an index name is at most {_MAX_INDEX_NAME_BYTES} bytes with its suffix")
    return value


class ElasticsearchMeta(BaseModel):
    """``meta`` of the elasticsearch pump."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    elasticsearch_url: tuple[str, ...] = (DEFAULT_ELASTICSEARCH_URL,)
    index_name: str = DEFAULT_INDEX_NAME
    rolling_index: bool = False
    auth_basic_username: str = ""
    auth_basic_password: str = ""
    auth_api_key_id: str = ""
    auth_api_key: str = ""
    ssl_ca_file: str = ""
    ssl_cert_file: str = ""
    ssl_key_file: str = ""
    ssl_insecure_skip_verify: bool = False
    use_sniffing: bool = False
    bulk_size: int = Field(default=DEFAULT_BULK_SIZE_RECORDS, ge=1, le=MAX_BULK_SIZE_RECORDS)
    bulk_item_retries: int = Field(
        default=DEFAULT_BULK_ITEM_RETRIES, ge=0, le=MAX_BULK_ITEM_RETRIES
    )
    bulk_config: IamBulkConfig = IamBulkConfig()
    document_type: str = ""
    disable_bulk: bool = False

    @field_validator("elasticsearch_url", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("elasticsearch_url")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one URL is needed")
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"expected http(s)://host[:port], got {mask_url(url)!r}")
        return tuple(dict.fromkeys(value))

    @field_validator("index_name")
    @classmethod
    def _index(cls, value: str) -> str:
        return validate_index_name(value)

    @model_validator(mode="after")
    def _auth(self) -> ElasticsearchMeta:
        if bool(self.auth_basic_username) != bool(self.auth_basic_password):
            raise ValueError("auth_basic_username and auth_basic_password go together")
        if self.auth_api_key_id and not self.auth_api_key:
            raise ValueError("auth_api_key_id needs auth_api_key")
        if self.auth_basic_username and self.auth_api_key:
            raise ValueError("use basic authentication or an API key, not both")
        if self.ssl_key_file and not self.ssl_cert_file:
            raise ValueError("ssl_key_file needs ssl_cert_file")
        return self

    @property
    def records_per_request(self) -> int:
        """``bulk_size``, or iam's ``bulk_config.bulk_actions`` when only that is given."""
        if "bulk_size" not in self.model_fields_set and self.bulk_config.bulk_actions:
            return self.bulk_config.bulk_actions
        return self.bulk_size

    @property
    def ignored_keys(self) -> list[str]:
        """iam keys that were given but mean nothing here."""
        ignored: list[str] = [
            key for key in ("document_type", "disable_bulk") if key in self.model_fields_set
        ]
        ignored += [
            f"bulk_config.{key}"
            for key in ("workers", "flush_interval")
            if key in self.bulk_config.model_fields_set
        ]
        return ignored
