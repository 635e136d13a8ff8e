"""Reading a file the policy loader trusts no further than its size and kind.

The policy file and every file it names (keys, certificates, password
files) are read at ``relay check`` and at each reload, where a FIFO made
the reader wait for a writer forever and /dev/zero was read until memory
ran out: each is read only if it is a regular file, and only up to a limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class RefusedFile(Exception):
    """A file the loader will not read; ``reason`` says why, without the path."""

    def __init__(self, path: Path, reason: str, detail: str = "") -> None:
        super().__init__(f"{path} {reason}{detail}")
        self.path = path
        self.reason = reason


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; raises OSError or
    RefusedFile."""
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
        kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
        raise RefusedFile(path, f"is {kind}, not a regular file")
