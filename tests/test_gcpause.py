"""The cycle collector held off while a policy is built (``relay.gcpause``)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from relay.gcpause import collection_paused


@pytest.fixture
def collector() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.usefixtures("collector")
def test_the_collector_runs_again_when_the_last_of_nested_blocks_ends() -> None:
    with collection_paused():
        assert not gc.isenabled()
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still builds
    assert gc.isenabled()


@pytest.mark.usefixtures("collector")
def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    with collection_paused():
        pass
    assert not gc.isenabled()


@pytest.mark.usefixtures("collector")
def test_a_thread_ending_its_block_first_leaves_the_collector_off_for_the_other() -> None:
    """A worker's reload unpickles in a thread while the event loop's thread
    may build too: the first to finish turned it back on under the other."""
    inside, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def build() -> None:
        with collection_paused():
            inside.set()
            release.wait(10)
            seen.append(gc.isenabled())

    other = threading.Thread(target=build)
    other.start()
    assert inside.wait(10)
    with collection_paused():
        pass
    release.set()
    other.join(10)
    assert seen == [False] and gc.isenabled()


@pytest.mark.usefixtures("collector")
def test_the_collector_runs_again_after_an_error() -> None:
    with pytest.raises(ValueError), collection_paused():
        raise ValueError("a policy that does not load")
    assert gc.isenabled()
