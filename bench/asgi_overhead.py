"""Benchmark 6b: what analytics costs an asyncio application on uvicorn, driven by wrk.

    .venv/bin/python bench/asgi_overhead.py [--rounds 3] [--seconds 10] [--connections 8] [--quick]

wsgi_overhead.py with ``--server uvicorn``: the plain ASGI app bench/asgi_app.py, analytics on
and off in the same run, same targets (p99 <= 1.10x, p99.9 <= 1.25x, requests/s >= 0.97x).
"""

from __future__ import annotations

from wsgi_overhead import main

if __name__ == "__main__":
    main(server="uvicorn")
