"""CPU time and memory of processes, read from /proc (no psutil needed).

``cpu_seconds`` is user + system time of a process and all its threads;
``tree_cpu`` adds the live descendants of a process and the CPU time of the
children it has already reaped (cutime/cstime), which is how Postfix's
short-lived daemons are accounted for: ``master`` reaps them.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def stolen_seconds() -> float:
    """CPU time the hypervisor gave other guests while this one wanted it,
    summed over the CPUs (``steal`` in /proc/stat); 0 where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / TICK if len(fields) > 8 and fields[0] == "cpu" else 0.0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after its ")"
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime (fields 14, 15), optionally + cutime + cstime (16, 17)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = parent(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root``, its live descendants and every child it has reaped."""
    total = cpu_seconds(root, reaped_children=True)
    for pid in descendants(root):
        total += cpu_seconds(pid, reaped_children=True)
    return total


def status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` figure from /proc/PID/status: VmRSS, VmHWM, ..."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def tree_pss_kb(root: int) -> int:
    """Sum of PSS over a process tree: what the tree as a whole occupies."""
    return sum(pss_kb(pid) for pid in [root, *descendants(root)])


def tree_max_kb(root: int, field: str) -> int | None:
    """The largest ``field`` (e.g. VmHWM) of any process in a tree: a worker's own peak."""
    found = [status_kb(pid, field) for pid in [root, *descendants(root)]]
    return max((kb for kb in found if kb is not None), default=None)


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"
