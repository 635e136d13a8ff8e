"""How fast the machine is right now, in the two units a relayed message costs.

On a shared virtual machine the same code runs at very different speeds from one
day to the next, and a ratio against Postfix + OpenDKIM moves with it. Printing an
RSA-2048 signature's time and a small file's fsync time beside the results lets a
reader tell a slow day from a slower relay, and compare sittings on other days.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SIGNATURES = 200
FSYNCS = 100


def rsa_sign_ms(count: int = SIGNATURES) -> float:
    """Median time of one RSA-2048 PKCS#1 v1.5 signature through OpenSSL, as the
    relay makes one per message."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = b"d" * 400
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def fsync_ms(directory: Path, count: int = FSYNCS) -> float:
    """Median time of an fsync after overwriting 2 KB of a file in ``directory``,
    the disk the spool and the audit log are on."""
    fd, name = tempfile.mkstemp(prefix=".calibrate-", dir=directory)
    try:
        times = []
        for _ in range(count):
            os.pwrite(fd, b"m" * 2048, 0)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(name)
    return 1000 * statistics.median(times)


def measure(directory: Path) -> dict[str, float]:
    return {"rsa_sign_ms": rsa_sign_ms(), "fsync_ms": fsync_ms(directory)}
