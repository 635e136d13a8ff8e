"""Whether a Date field says a time receivers can read (RFC 5322 3.3).

Read as receivers read it: the obsolete forms of RFC 5322 4.3 (a two-digit
year, ``GMT``, ``UT``, ``EST`` and the other zone names, no day of the
week, white space around the colons) pass, as they do there. A value
without a zone, or no date-time at all (``06.12.2026 18:00:00``, an ERP's
locale), is scored as spam (SpamAssassin's ``INVALID_DATE``) and shown by
each client its own way.
"""

from __future__ import annotations

import re
from datetime import datetime

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAY_TIME = (
    r"\s*(?:(?:mon|tue|wed|thu|fri|sat|sun)\s*,\s*)?"
    r"(?P<day>\d{1,2})\s*(?P<month>" + "|".join(_MONTHS) + r")\s*(?P<year>\d{2,4})\s+"
    r"(?P<hour>\d{2})\s*:\s*(?P<minute>\d{2})(?:\s*:\s*(?P<second>\d{2}))?\s*"
)
# obs-zone: UT, GMT, the US zones and the military letters (J is none)
_ZONE = r"(?P<zone>[+-]\d{4}|ut|gmt|[ecmp][sd]t|[a-ik-z])\s*"
_DATE_TIME = re.compile(_DAY_TIME + _ZONE, re.IGNORECASE | re.ASCII)
_ZONELESS = re.compile(_DAY_TIME, re.IGNORECASE | re.ASCII)


def fault(value: str) -> str | None:
    """What keeps ``value`` (its comments taken out) from being a date-time,
    or None when it is one. The date must be one the calendar has and the
    time one a clock shows (a leap second too): ``31 Feb`` or ``25:00``
    is read by each client its own way."""
    found = _DATE_TIME.fullmatch(value)
    if found is None:
        if _ZONELESS.fullmatch(value):
            return "has no time zone, which RFC 5322 3.3 requires"
        return "is not a date and time as RFC 5322 3.3 writes one"
    if not _real(found):
        return "names a day or a time that does not exist"
    return None


def _real(found: re.Match[str]) -> bool:
    """Whether the day, the time and a numeric zone's minutes exist; a year
    of two or three digits is read as RFC 5322 4.3 says."""
    year = int(found["year"])
    if len(found["year"]) < 4:
        year += 2000 if len(found["year"]) == 2 and year < 50 else 1900
    second = int(found["second"] or 0)
    zone = found["zone"]
    if second > 60 or (zone[0] in "+-" and int(zone[3:]) > 59):
        return False
    try:
        datetime(
            year,
            _MONTHS.index(found["month"].lower()) + 1,
            int(found["day"]),
            int(found["hour"]),
            int(found["minute"]),
            min(second, 59),
        )
    except ValueError:
        return False
    return True
