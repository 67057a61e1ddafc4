"""The CSV pump's disk fills up (a real tmpfs of 512 KB) under a real worker: writes that do not
fit fail as temporary errors without a torn row, are retried, then dead-lettered; once space is
freed, ``iam-pump dead-letters replay`` delivers every record exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import mounted_small_disk
from tests.faults.conftest import fault_config
from tests.faults.helpers import await_delivery, make_records, report, requests_in
from tests.support import (
    TEST_REDIS_DB,
    Proc,
    run_cli,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISK_BYTES = 512 * 1024
#: Room left next to the ballast: a couple of the ~35 KB batches fit, the rest do not.
ROOM_BYTES = 64 * 1024
RECORDS = 3000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_small_disk(tmp_path / "disk", DISK_BYTES) as directory:
        yield directory


def _dead_lettered(client: redis.Redis) -> int:
    return int(client.hget("iam-pump:stats", "dead_lettered_records:csv") or 0)


def test_full_disk_dead_letters_the_batches_that_do_not_fit_and_replay_delivers_them_once(
    tmp_path: Path, broker: str, redis_db: redis.Redis, small_disk: Path, procs: list[Proc]
) -> None:
    csv_dir = small_disk / "csv"
    csv_dir.mkdir()
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            broker,
            db=TEST_REDIS_DB,
            pumps={"csv": {"type": "csv", "max-retries": 2, "meta": {"csv_dir": str(csv_dir)}}},
            analytics={"records-buffer-size": 2000, "pool-size": 4},
            delivery={"retry-backoff-base-s": 0.2, "retry-backoff-max-s": 0.5},
        ),
    )
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"x" * (DISK_BYTES - ROOM_BYTES))
    worker = start_worker(config, tmp_path / "w.log")
    procs.append(worker)
    records = make_records("disk", RECORDS)
    expected = {r.request for r in records}
    report(records, config)

    # Every record ends up either in the file (whole rows only) or in the dead letters.
    assert wait_until(
        lambda: sum(requests_in(csv_dir).values()) + _dead_lettered(redis_db) == RECORDS, 60
    ), (requests_in(csv_dir).__len__(), _dead_lettered(redis_db), worker.output()[-2000:])
    on_disk = requests_in(csv_dir)
    dead = _dead_lettered(redis_db)
    retries = int(redis_db.hget("iam-pump:stats", "retries:csv") or 0)
    print(f"\n[disk full] on disk {sum(on_disk.values())}, dead-lettered {dead}, retries {retries}")
    assert dead > 0 and retries > 0
    assert "No space left on device" in worker.output()
    assert all(count == 1 for count in on_disk.values())
    assert [path.read_bytes()[-1:] for path in csv_dir.glob("*.csv")] == [b"\n"]

    ballast.unlink()
    replayed = run_cli("dead-letters", "replay", "csv", "--all", "--config", str(config))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    lost, duplicated, _ = await_delivery(
        csv_dir, expected, timeout_s=60, label=f"disk full ({'amqp' if broker else 'redis'})"
    )
    assert lost == 0 and duplicated == 0
    assert redis_db.hlen("iam-pump:dead-letters:csv") == 0
