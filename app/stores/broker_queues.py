"""Read-only looks at the task messages kombu's Redis transport keeps (the ledger sweep).

A queue ``<name>`` is a list per priority step (``<name>``, ``<name>\\x06\\x163``, ...) of JSON
messages; a message a worker has taken but not acknowledged is a JSON ``[message, exchange,
routing key]`` in the ``unacked`` hash. Nothing here changes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import redis

#: kombu's Redis transport: the hash of delivered, unacknowledged messages.
UNACKED_KEY = "unacked"
#: kombu's Redis transport: priority steps, and the separator of a priority list's name.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEPARATOR = "\x06\x16"
_PAGE = 500


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold queue ``queue``'s messages."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def waiting_messages(client: redis.Redis, queues: Iterable[str]) -> Iterator[bytes | str]:
    """Every message waiting in ``queues``, page by page (a long queue is never read at once)."""
    for queue in queues:
        for name in priority_lists(queue):
            start = 0
            while True:
                page = client.lrange(name, start, start + _PAGE - 1)
                yield from page
                if len(page) < _PAGE:
                    break
                start += _PAGE


def unacked_messages(client: redis.Redis) -> Iterator[bytes | str]:
    """Every message delivered to a worker and not yet acknowledged."""
    for _tag, raw in client.hscan_iter(UNACKED_KEY, count=_PAGE):
        yield raw
