"""Queue IDs: unique, sortable by arrival time, short enough to read aloud.

Like Postfix's long queue IDs they start with the arrival time, so a sorted
listing of IDs is a listing by age.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: IDs never spell words


def _encode(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def new_queue_id(now_ns: int | None = None) -> str:
    """11 characters of microseconds since the epoch, then 5 random ones."""
    micros = (time.time_ns() if now_ns is None else now_ns) // 1000
    return _encode(micros, 11) + _encode(secrets.randbits(25), 5)


def queue_id_time(queue_id: str) -> float | None:
    """When the ID was made, in seconds since the epoch; None if it is not one of ours."""
    if len(queue_id) != 16:
        return None
    micros = 0
    for char in queue_id[:11]:
        digit = _ALPHABET.find(char)
        if digit < 0:
            return None
        micros = micros * len(_ALPHABET) + digit
    return micros / 1e6
