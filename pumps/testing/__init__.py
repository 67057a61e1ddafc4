"""A test kit for pump authors: subclass :class:`PumpContract` to run the pump contract.

::

    from pumps.testing import PumpContract

    class TestMySink(PumpContract):
        pump_class = MySinkPump
        pump_type = "mysink"                       # its entry-point name, if it has one

        def meta(self, tmp_path): return {"url": ...}
        def stored_ids(self, pump): return collections.Counter(...)  # copies per record id

It needs pytest, and only test code imports it: nothing in the pumps or the workers does.
"""

from __future__ import annotations

from pumps.testing.contract import PumpContract, opened
from pumps.testing.records import copies, make_records
from pumps.testing.servers import TcpProxy, silent_server

__all__ = ["PumpContract", "TcpProxy", "copies", "make_records", "opened", "silent_server"]
