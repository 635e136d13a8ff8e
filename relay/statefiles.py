"""Files and directories of the relay's state as a tool run by root opens them.

The state directory is the service user's, and the README has root run the
queue tools there: a link that user put in a file's place had root chown
and overwrite, or print, a file the user could not touch. The state's files
are opened without following a link, and given to the state's owner only
when they are plain files of one name. A directory may be a link when root
made it (an audit log moved to a disk of its own), not when another user did.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

#: For every open of a file in the state: none is ever a link.
NOFOLLOW = os.O_NOFOLLOW


def owner_for(info: os.stat_result) -> tuple[int, int] | None:
    """Whom what root makes in a directory (``info``) goes to: its owner, when
    that is not root; None when nothing is to be handed over."""
    return (info.st_uid, info.st_gid) if os.geteuid() == 0 and info.st_uid else None


def adopt(fd: int, owner: tuple[int, int] | None) -> None:
    """The open file given to ``owner`` (see ``owner_for``). One that is not a
    plain file of its own is refused: a hard link to another file would hand
    that file over (where the kernel does not protect hard links)."""
    if owner is None:
        return
    info = os.fstat(fd)
    if (info.st_uid, info.st_gid) == owner:
        return
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise OSError(errno.EPERM, "not a plain file of its own: is it a link put in its place?")
    os.fchown(fd, *owner)


def check_directory(path: Path) -> None:
    """As root, refuse a directory that is a symbolic link another user made."""
    if os.geteuid() != 0:
        return
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) and info.st_uid != 0:
        raise OSError(
            errno.ELOOP,
            f"a symbolic link made by uid {info.st_uid}, which root does not follow",
            str(path),
        )


#: What a state file is, when it is not one: said in place of the file.
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, where a plain file was wanted."""
    return _KINDS.get(stat.S_IFMT(mode), "not a file")


class NotAFile(OSError):
    """A state file that is not a plain file: a FIFO's open waits for a writer for
    ever, and one such file in the queue hung the start, the scan and the tools."""

    def __init__(self, mode: int) -> None:
        super().__init__(errno.EINVAL, f"{kind_of(mode)}, not a regular file")


def open_plain(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o777) -> int:
    """A plain state file opened, not through a link; anything else raises
    NotAFile without waiting (``O_NONBLOCK`` changes nothing for a plain file).
    ``mode``: as ``os.open`` takes it, for a file ``O_CREAT`` makes."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | NOFOLLOW, mode)
    except OSError as exc:
        # a link, a socket, a directory opened to write: refused by the open
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise _as_found(path, exc) from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _as_found(path: Path | str, refused: OSError) -> OSError:
    """NotAFile for what the open refused without saying what it is: the queue
    tools skipped a FIFO under ALL, and took a link or a socket, named only
    "Too many levels of symbolic links", for an entry they had failed."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return refused
    return refused if stat.S_ISREG(mode) else NotAFile(mode)


def read_plain(path: Path | str, buffering: int = -1) -> BinaryIO:
    """``open_read`` for a file that must be a plain one (see ``open_plain``)."""
    return open(path, "rb", buffering=buffering, opener=open_plain)


def open_read(path: Path | str, buffering: int = -1) -> BinaryIO:
    """A state file opened for reading, not through a link."""
    return open(path, "rb", buffering=buffering, opener=_not_through_a_link)


def _not_through_a_link(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC | NOFOLLOW)
