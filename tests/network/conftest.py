"""Fixtures of the network-fault tests: they need root, iproute2 and the MongoDB stand-in."""

from __future__ import annotations

import pytest

from tests.conftest import require
from tests.network.harness import mongo_standin
from tests.network.topology import netns_unavailable, remove_stale


@pytest.fixture(scope="session")
def netns() -> None:
    """Skip (with the reason) where network namespaces cannot be built."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    remove_stale()
    require(mongo_standin() is not None, "the MongoDB stand-in (scripts/test-servers.sh install)")
