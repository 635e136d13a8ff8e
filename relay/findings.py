"""What a check tool found, step by step.

``relay upstream test`` and ``relay dkim check`` report alike, so that a
sysadmin reads them, and a script greps them, the same way: a line per thing
checked with its verdict, then one indented line per finding, marked when it
is a warning or a failure.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Level(enum.Enum):
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"


@dataclass(frozen=True)
class Finding:
    what: str  # the step it is about ("TLS", "login"); "" for none
    text: str
    level: Level = Level.OK

    @property
    def failed(self) -> bool:
        return self.level is Level.FAILED

    def line(self) -> str:
        mark = "" if self.level is Level.OK else f"{self.level.value}: "
        return f"  {self.what}: {mark}{self.text}" if self.what else f"  {mark}{self.text}"


@dataclass(frozen=True)
class Checked:
    title: str  # what was checked, and where
    findings: tuple[Finding, ...]
    note: str = ""  # said after the verdict, in brackets

    @property
    def ok(self) -> bool:
        return not any(finding.failed for finding in self.findings)

    def lines(self) -> list[str]:
        verdict = "ok" if self.ok else "FAILED"
        note = f" ({self.note})" if self.note else ""
        return [f"{self.title}: {verdict}{note}", *(f.line() for f in self.findings)]


def render(checked: Sequence[Checked]) -> str:
    return "\n".join(line for each in checked for line in each.lines())
