"""The directory upstream: each message becomes two files instead of being sent.

``NAME.eml`` holds the exact bytes that would have gone out and
``NAME.envelope.json`` (``{"mail_from": ..., "rcpt_tos": [...]}``) says to
whom, because the envelope recipients (the BCC among them) are not in the
message. NAME is ``<UTC timestamp>-<random>``, so a listing sorts by time.

Each file is written under a dot-prefixed temporary name, fsynced and
renamed; the envelope comes last, so its presence means the pair is
complete and a reader never sees half a message. Both are the relay's user's
alone, as the spool's are: each is a message as it went out, and the
envelope names the BCC recipients the message hides.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from relay.errors import UpstreamError
from relay.policy.model import DirectoryUpstream
from relay.upstream import DeliveryResult

#: Not left to the umask: a relay started from a root shell with ``run_as``
#: has the shell's (0022), not the unit's 0077, and wrote every message 0644.
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


async def write(
    upstream: DirectoryUpstream, mail_from: str, rcpt_tos: Sequence[str], data: bytes
) -> DeliveryResult:
    envelope = {"mail_from": mail_from, "rcpt_tos": list(rcpt_tos)}
    try:
        path = await asyncio.to_thread(_write_pair, upstream.path, data, envelope)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        text = f"Upstream {upstream.name} cannot write to {upstream.path}: {reason}"
        raise UpstreamError(451, "4.3.0", text) from exc
    return DeliveryResult(f"written to {path}")


def _write_pair(directory: Path, data: bytes, envelope: dict[str, object]) -> Path:
    try:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    except FileExistsError:  # said "File exists" of a file where the directory should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
    name = f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(4)}"
    message = directory / f"{name}.eml"
    _write_atomic(message, data)
    meta = json.dumps(envelope, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
    _write_atomic(directory / f"{name}.envelope.json", meta)
    _fsync_directory(directory)
    return message


def _write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())  # an upstream's disk, not the state's: not watched
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
