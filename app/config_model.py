"""The base of every configuration model: iam's kebab-case keys, nothing unknown, frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def kebab(name: str) -> str:
    """The file's spelling of a field name (``purge_delay`` -> ``purge-delay``)."""
    return name.replace("_", "-")


class ConfigModel(BaseModel):
    """A block of the configuration file: unknown keys are errors, values never change."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=kebab, populate_by_name=True, frozen=True
    )
