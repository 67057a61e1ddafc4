"""The asyncio twin of wsgi_app.py: a plain ASGI callable for uvicorn, same answer, same record.

    BENCH_ANALYTICS=1 uvicorn --port 8000 asgi_app:application   (PYTHONPATH=bench)

The handler and the what-if knobs (``BENCH_*`` environment variables) are wsgi_app.py's: the
reporter is created on the first request in the uvicorn process and ``record_hit`` is called
from the event loop's thread, as a FastAPI/Starlette endpoint would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from wsgi_app import answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


async def application(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Answer an authorization request; record it when analytics is on."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    body = answer(scope.get("path", "/"), scope.get("query_string", b"").decode("latin-1"))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
