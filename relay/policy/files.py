"""Reading a file the policy loader trusts no further than its size and kind.

The policy file and every file it names (keys, certificates, password
files) are read at ``relay check`` and at each reload, where a FIFO made
the reader wait for a writer forever and /dev/zero was read until memory
ran out: each is read only if it is a regular file, and only up to a limit.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from relay.statefiles import kind_of


class RefusedFile(Exception):
    """A file the loader will not read; ``reason`` says why, without the path."""

    def __init__(self, path: Path, reason: str, detail: str = "") -> None:
        super().__init__(f"{path} {reason}{detail}")
        self.path = path
        self.reason = reason


class Reads:
    """The files one load of the policy read, by path: they are part of what the
    policy is (its version covers them) and of what a worker is handed to load
    it again. ``given`` stands in for the files: a worker builds its policy from
    the bytes its supervisor checked, not from files that may have changed since."""

    def __init__(self, given: Mapping[str, bytes] | None = None) -> None:
        self.given = dict(given or {})
        self.read: dict[str, bytes] = {}

    def bytes_of(self, path: Path, limit: int, what: str) -> bytes:
        """A file read twice in one load is the same both times."""
        key = os.fspath(path)
        data = self.read.get(key, self.given.get(key))
        if data is None:
            data = _read_limited(path, limit, what)
        elif len(data) > limit:
            raise RefusedFile(path, f"is larger than {_size(limit)}", f", too large for {what}")
        self.read[key] = data
        return data


_READS: ContextVar[Reads | None] = ContextVar("policy_reads", default=None)


@contextmanager
def reading(reads: Reads) -> Iterator[Reads]:
    """``read_limited`` goes through ``reads`` within this block (in this thread)."""
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; raises OSError or
    RefusedFile."""
    reads = _READS.get()
    if reads is not None:
        return reads.bytes_of(path, limit, what)
    return _read_limited(path, limit, what)


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    _regular(path, os.stat(path).st_mode)  # before opening: a device's open may act
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _regular(path, os.fstat(fd).st_mode)  # replaced in between
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    raise RefusedFile(path, f"is larger than {_size(limit)}", f", too large for {what}")


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit // 2**10} KiB"


def _regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise RefusedFile(path, f"is {kind_of(mode)}, not a regular file")
