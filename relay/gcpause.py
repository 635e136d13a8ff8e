"""Python's cycle collector held off while a large policy is built or read back.

Building a policy of thousands of tenants makes hundreds of thousands of
objects and no garbage. Each young-generation collection meanwhile walked
all of them again: with the collector running, libyaml's composing of a
5.7 MB policy took 3.4 s where it takes 0.9 s without it, and every tool
that reads the policy paid for it. The collector runs again as the block
ends, and a block in a thread leaves it off only if another turned it off.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_holders = 0
_was_enabled = True


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Nestable, and shared by threads: the collector runs again when the last
    block ends, unless it was off before the first began."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()
