"""The text side of the configuration: ``${VAR}`` expansion, Go durations, masking secrets.

Kept apart from the models in :mod:`app.config`, which use these while validating and when
printing the effective configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_KEY_HINTS = ("password", "secret", "token", "api_key", "apikey", "credential")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_DURATION_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration_s(value: Any) -> float:
    """Seconds from a number (seconds) or a Go duration string such as ``24h0m0s`` or ``1m30s``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        if text and _GO_DURATION.sub("", text) == "":
            return sum(
                float(number) * _GO_DURATION_UNITS_S[unit]
                for number, unit in _GO_DURATION.findall(text)
            )
    raise ValueError(f"expected seconds or a Go duration like '24h0m0s', got {value!r}")


def expand_env(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree.

    A string that is a single reference to an unset variable without a default is removed from
    its mapping, so the key's default applies.
    """
    env = os.environ if environ is None else environ
    missing = object()

    def expand(item: Any) -> Any:
        if isinstance(item, dict):
            out = {}
            for key, inner in item.items():
                expanded = expand(inner)
                if expanded is not missing:
                    out[key] = expanded
            return out
        if isinstance(item, list):
            return [inner for inner in map(expand, item) if inner is not missing]
        if isinstance(item, str) and "${" in item:
            whole = _ENV_REFERENCE.fullmatch(item)
            if whole and whole.group(2) is None and not env.get(whole.group(1)):
                return missing
            text = _ENV_REFERENCE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), item)
            return _scalar(text) if whole else text
        return item

    return expand(value)


def _scalar(text: str) -> Any:
    # A value that was only a reference is typed like YAML would type it ("6379" -> 6379).
    try:
        return load_yaml(text) if text.strip() else text
    except ValueError:
        return text


def load_yaml(text: str) -> Any:
    """Parse YAML text; raise ValueError (a :class:`yaml.YAMLError` or not) if it cannot be.

    PyYAML raises more than YAMLError: ValueError for a date that does not exist or an
    integer of more than 4300 digits, RecursionError for deep nesting.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def check_tree(value: Any) -> None:
    """Raise ValueError unless a parsed YAML tree is of a size a configuration can be.

    YAML aliases let a few bytes stand for a tree that refers to itself, or that is
    exponentially large once each alias is followed (as expanding and validating do), so the
    tree is measured as if expanded - each shared node once - before anything walks it.
    """
    _measure(value, 0, {})


#: Bounds of a configuration tree, aliases followed: far beyond any real file.
MAX_TREE_DEPTH = 64
MAX_TREE_NODES = 100_000


def _measure(value: Any, depth: int, seen: dict[int, tuple[int, int]]) -> tuple[int, int]:
    # (nodes, height) of value's tree; raises ValueError past the bounds.
    if not isinstance(value, dict | list):
        return 1, 0
    if depth >= MAX_TREE_DEPTH:
        raise ValueError(f"nested more than {MAX_TREE_DEPTH} deep, or an alias refers to itself")
    known = seen.get(id(value))
    if known is None:
        children = value.values() if isinstance(value, dict) else value
        measures = [_measure(child, depth + 1, seen) for child in children]
        nodes = 1 + sum(count for count, _ in measures)
        known = nodes, 1 + max((height for _, height in measures), default=0)
        seen[id(value)] = known
    if depth + known[1] > MAX_TREE_DEPTH:
        raise ValueError(f"nested more than {MAX_TREE_DEPTH} deep")
    if known[0] > MAX_TREE_NODES:
        raise ValueError(f"more than {MAX_TREE_NODES} values once its aliases are followed")
    return known


def shown_value(location: list[str], value: Any) -> str:
    """A bad value as an error message echoes it: never a secret, URLs without passwords."""
    if location and is_secret(location[-1]):
        return "***"
    if isinstance(value, str) and "://" in value:
        value = mask_url(value)
    return f"{value!r:.80}"


def is_secret(key: str) -> bool:
    """Whether a key names a secret (its value is masked wherever it is shown)."""
    lowered = key.lower()
    return any(hint in lowered for hint in _SECRET_KEY_HINTS)


def mask_url(url: str) -> str:
    """A URL with its password replaced by ``***`` (all after the scheme if it does not parse)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        scheme, separator, _ = url.partition("://")
        return f"{scheme}{separator}***"
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
