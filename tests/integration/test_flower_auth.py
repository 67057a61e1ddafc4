"""Flower, started as the README shows it, asks for a password and then shows our worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.flower import get, start_flower
from tests.support import (
    Proc,
    base_config,
    free_port,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "pump-ops", "correct-horse-7"


def test_flower_with_basic_auth_refuses_strangers_and_lists_the_worker(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path))
    procs.append(start_worker(config, tmp_path / "w.log", concurrency=1, name="flowerseen"))
    port = free_port()
    # The password in the environment, not on the command line, where `ps` shows it to everyone.
    flower = start_flower(
        config, tmp_path / "flower.log", port=port, credentials=f"{USER}:{PASSWORD}"
    )
    procs.append(flower)
    base = f"http://127.0.0.1:{port}"

    assert get(f"{base}/")[0] == 401
    assert get(f"{base}/api/workers")[0] == 401
    assert get(f"{base}/", f"{USER}:wrong")[0] == 401
    # What the README warns of: these two answer without a password.
    assert get(f"{base}/healthcheck")[0] == 200
    # Flower learns of workers from their events, which it switches on: the page lists the
    # worker once its first heartbeat arrived.
    seen: list[tuple[int, str]] = []

    def lists_the_worker() -> bool:
        seen.append(get(f"{base}/workers", f"{USER}:{PASSWORD}"))
        return seen[-1][0] == 200 and "flowerseen@" in seen[-1][1]

    assert wait_until(lists_the_worker, 30, interval_s=0.5), seen[-1][1][-2000:]
    status, body = get(f"{base}/", f"{USER}:{PASSWORD}")
    assert status == 200 and "flowerseen@" in body
    print(f"\nflower: 401 without or with wrong credentials, 200 with them; {len(seen)} polls")
