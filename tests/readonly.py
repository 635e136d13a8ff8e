"""A file or directory made read-only for the test's length, for root too."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only(path: Path, mode: int) -> Iterator[None]:
    """Nothing in or of ``path`` can be changed while inside: ``mode`` for a user,
    and for root (who writes anywhere) the file system's immutable flag."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("no chattr +i on this file system")
        undo = ["chattr", "-i", str(path)]
    else:
        before = path.stat().st_mode & 0o777
        path.chmod(mode)
        undo = ["chmod", f"{before:o}", str(path)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)
