"""Fuzz the config loader: a YAML file's bytes, and the environment, to validated settings.

Target: :func:`app.config.load_settings` with every pump's ``meta`` checked by its class (the
worker's path, :mod:`pumps.settings`), which covers reading the file, YAML, ``${VAR}``
expansion (:mod:`app.config_text`), Go durations and validation.
Documented error: :class:`app.errors.ConfigError`, which names each problem by its key path;
anything else is a bug. Contract checked beyond not crashing: a ConfigError lists at least one
(path, message) problem; settings that validate can be used (every derived value the worker
and the commands read works, and the effective configuration prints with secrets masked).

Input: the file's bytes. Leading lines ``#! NAME=value`` (YAML comments, so part of the file
too) set the environment the file expands from; nothing else is in it.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from fuzz.runner import check, fuzz, instrumented

with instrumented():
    from app.config import Settings, load_settings, masked
    from app.errors import ConfigError
    from pumps.registry import meta_problems

#: The errors load_settings documents.
DOCUMENTED_ERRORS = (ConfigError,)

_ENV_LINE = re.compile(rb"#! ([A-Za-z_][A-Za-z0-9_]*)=(.*)")
_WORKDIR = Path(tempfile.mkdtemp(prefix="fuzz-config-"))
_FILE = _WORKDIR / "iam-pump.yaml"


def environment(data: bytes) -> dict[str, str]:
    """The variables the input's leading ``#! NAME=value`` lines set."""
    env: dict[str, str] = {}
    for line in data.split(b"\n"):
        match = _ENV_LINE.fullmatch(line)
        if match is None:
            break
        env[match[1].decode()] = match[2].decode("utf-8", "replace")
    return env


def check_usable(settings: Settings) -> None:
    """What the worker, the reporter and the commands read from validated settings."""
    check(isinstance(settings.broker, str), "broker")
    check(isinstance(settings.batches_on_broker, bool), "batches_on_broker")
    host, port = settings.redis.address
    check(isinstance(host, str) and 0 <= port <= 65535, f"redis address {port}")
    check("://" in settings.redis.url, "redis url")
    check(isinstance(settings.health_host_port[1], int), "health-check-address")
    check(settings.visibility_timeout_s > 0, "visibility timeout")
    check(all(isinstance(key, str) for key in settings.ignored_keys()), "ignored keys")
    check(all(entry.timeout_s > 0 for entry in settings.enabled_pumps.values()), "pump timeout")
    for group in [*settings.pumps, "ingest"]:
        treatments = set(settings.dead_letter_fields(group).values())
        check(treatments <= {"keep", "redact", "drop"}, f"dead-letter fields of {group}")
    shown = masked(settings)
    password = settings.redis.password
    if password:
        check(shown["redis"]["password"] == "***", "the Redis password is shown")


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point."""
    _FILE.write_bytes(data)
    try:
        settings = load_settings(_FILE, meta_problems=meta_problems, environ=environment(data))
    except DOCUMENTED_ERRORS as exc:
        check(bool(exc.problems), "a ConfigError names no problem")
        check(
            all(isinstance(path, str) and isinstance(text, str) for path, text in exc.problems),
            "a problem is not a (path, message) pair",
        )
        return
    check_usable(settings)


if __name__ == "__main__":
    fuzz(test_one_input)
