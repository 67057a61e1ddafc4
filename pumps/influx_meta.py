"""The ``meta`` of the influx pump: iam's keys, checked at start-up.

::

    database_name   the database the points go to (required); created at open if missing
    address         the InfluxDB 1.x HTTP API, ``http[s]://host[:port][/path]``
                    (default http://localhost:8086)
    username, password      basic authentication; empty: none
    fields          record attributes stored as fields (iam's names: timestamp, username,
                    effect, conclusion, request, policies, deciders, expireAt); default: every
                    attribute that is not a tag
    tags            record attributes stored as tags (the same names); default: none

Each point also carries the field ``id``, the record id, whatever ``fields`` says: it is what a
point is counted and found by. An attribute is a field or a tag, not both, and names outside
iam's eight are refused, naming the key (iam would write ``null`` or drop every point).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.record import JSON_NAMES

DEFAULT_ADDRESS = "http://localhost:8086"
#: The names ``fields`` and ``tags`` take: iam's JSON names of the record's attributes.
POINT_NAMES = JSON_NAMES


def _check_names(value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in value if name not in POINT_NAMES]
    if unknown:
        raise ValueError(
            f"unknown record attribute(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(POINT_NAMES)})"
        )
    return tuple(dict.fromkeys(value))  # each once, in the order given


class InfluxMeta(BaseModel):
    """``meta`` of the influx pump; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database_name: str = Field(min_length=1)
    address: str = DEFAULT_ADDRESS
    username: str = ""
    password: str = ""
    fields: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(
                "must be an http:// or https:// URL with a host, like " + DEFAULT_ADDRESS
            )
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        if parts.query or parts.fragment:
            raise ValueError("takes no query or fragment")
        return value

    @field_validator("fields", "tags")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_names(value)

    @model_validator(mode="after")
    def _field_or_tag(self) -> InfluxMeta:
        both = [name for name in self.fields if name in self.tags]
        if both:
            raise ValueError(
                f"{', '.join(map(repr, both))} listed in both fields and tags: an attribute is "
                "one or the other"
            )
        return self

    @property
    def field_names(self) -> tuple[str, ...]:
        """The attributes stored as fields: ``fields``, or every one that is not a tag."""
        if self.fields:
            return self.fields
        return tuple(name for name in POINT_NAMES if name not in self.tags)

    @property
    def tag_names(self) -> tuple[str, ...]:
        """The attributes stored as tags, sorted (InfluxDB's own order for a series key)."""
        return tuple(sorted(self.tags))
