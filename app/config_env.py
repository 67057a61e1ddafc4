"""Environment overrides: ``IAM_PUMP_<KEY PATH>`` sets any key of the configuration, as in iam.

iam reads its options through viper with the prefix ``IAM_PUMP``, ``AutomaticEnv`` and a key
replacer turning ``.`` and ``-`` into ``_``: the key ``redis.host`` is read from
``IAM_PUMP_REDIS_HOST``, ``purge-delay`` from ``IAM_PUMP_PURGE_DELAY``. viper goes from the keys it
knows to variable names, never back (``_`` is ambiguous), so only known keys can be set. Here the
known keys are every field of the models (as iam binds a flag for each of its options) and, under
``pumps:``, every field of each pump the file names plus the ``meta`` keys the file gives:
``pumps.csv.meta.csv_dir`` is read from ``IAM_PUMP_PUMPS_CSV_META_CSV_DIR`` when the file has a
``csv`` pump with a ``csv_dir``. No variable creates a pump or a ``meta`` key the file lacks.

An empty variable counts as unset (viper's default). Values are strings, converted by the field's
type when the models validate; a list field takes a comma-separated list, as viper's decoding does.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

ENV_PREFIX = "IAM_PUMP_"


def env_name(path: tuple[str, ...]) -> str:
    """The variable setting a key path: ``redis.ssl-ca-file`` -> ``IAM_PUMP_REDIS_SSL_CA_FILE``."""
    joined = "_".join(path)
    return ENV_PREFIX + joined.replace(".", "_").replace("-", "_").upper()


def apply_env_overrides(
    raw: dict[str, Any],
    model: type[BaseModel],
    environ: Mapping[str, str],
    reserved: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw mapping with every set ``IAM_PUMP_`` variable applied to its key.

    Returns the new mapping (``raw`` is not changed) and, for each key set from the
    environment, its dotted path (as the file spells it) -> the variable's name. ``reserved``
    variables (``IAM_PUMP_CONFIG``, the config file's path) are never taken for a key.
    """
    result = _copy(raw)
    applied: dict[str, str] = {}
    for path, is_list in list(_known_leaves(result, model, ())):
        name = env_name(path)
        value = environ.get(name)
        if not value or name in reserved:
            continue
        _set(result, path, _split(value) if is_list else value)
        applied[".".join(path)] = name
    return result, applied


def annotate(problems: list[tuple[str, str]], applied: Mapping[str, str]) -> list[tuple[str, str]]:
    """Problems with the variable named wherever a key, or a key under it, came from the
    environment (a block's own check, such as ``redis``'s, reports the block's path)."""
    out = []
    for path, message in problems:
        sources = [
            f"{name} sets {key}"
            for key, name in applied.items()
            if key == path or key.startswith(f"{path}.")
        ]
        out.append((path, f"{message} (environment: {'; '.join(sources)})" if sources else message))
    return out


def unused_env(
    environ: Mapping[str, str], applied: Mapping[str, str], reserved: frozenset[str]
) -> list[str]:
    """The ``IAM_PUMP_`` variables that set nothing (no such key, or empty)."""
    used = set(applied.values()) | reserved
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in used)


def _known_leaves(
    raw: Mapping[str, Any], model: type[BaseModel], prefix: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], bool]]:
    # (path, whether the field is a list) of every key a variable may set, spelled as in raw.
    for field_name, field in model.model_fields.items():
        if field.exclude:
            continue
        alias = field.alias or field_name
        key = next((k for k in (alias, field_name) if k in raw), alias)
        path = (*prefix, key)
        inner = raw.get(key)
        kind = _unwrap(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _known_leaves(inner if isinstance(inner, dict) else {}, kind, path)
        elif typing.get_origin(kind) is dict:
            entry_type = typing.get_args(kind)[1]
            if not isinstance(inner, dict):
                continue
            for name, entry in inner.items():
                if not isinstance(name, str):
                    continue
                if isinstance(entry_type, type) and issubclass(entry_type, BaseModel):
                    if isinstance(entry, dict):
                        yield from _known_leaves(entry, entry_type, (*path, name))
                else:
                    yield from _given_leaves(entry, (*path, name))
        else:
            yield path, typing.get_origin(kind) in (tuple, list)


def _given_leaves(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], bool]]:
    # The leaves of a free-form mapping (a pump's meta) that the file gives.
    if isinstance(value, dict):
        for key, inner in value.items():
            if isinstance(key, str):
                yield from _given_leaves(inner, (*path, key))
    else:
        yield path, isinstance(value, list)


def _unwrap(annotation: Any) -> Any:
    # X | None -> X
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(inner) for key, inner in value.items()}
    return value


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        inner = tree.get(key)
        if not isinstance(inner, dict):
            inner = tree[key] = {}
        tree = inner
    tree[path[-1]] = value


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]
