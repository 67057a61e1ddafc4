"""Exponential backoff with jitter: the one formula every retry in iam-pump uses.

Write tasks between attempts, the reporter between shipping attempts and the Elasticsearch pump
between resends of refused items all wait ``backoff_s(attempt, base_s=..., max_s=...)``.
"""

from __future__ import annotations

import random

#: Exponents past this change nothing but could overflow a float.
_MAX_EXPONENT = 32


def backoff_s(attempt: int, *, base_s: float, max_s: float) -> float:
    """Seconds before retry ``attempt + 1``: uniform in [c/2, c], c = min(max, base * 2**attempt).

    The jitter spreads the retries of many workers that failed together, so they do not come
    back at the same instant; the lower half-bound keeps the wait from collapsing to zero.
    """
    ceiling = min(max_s, base_s * (2 ** min(max(attempt, 0), _MAX_EXPONENT)))
    return random.uniform(ceiling / 2, ceiling)
