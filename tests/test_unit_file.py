"""The systemd unit against the README's install, and against systemd's own reading."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "erp-relay.service"


def _setting(name: str) -> str:
    found = re.search(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert found is not None, name
    return found.group(1)


def _installed_mode(directory: str) -> str:
    found = re.search(
        rf"install -d -m (\d+) .*{re.escape(directory)}\b", (ROOT / "README.md").read_text()
    )
    assert found is not None, directory
    return found.group(1)


@pytest.mark.parametrize(
    ("setting", "directory"),
    [
        ("StateDirectoryMode", "/var/lib/erp-relay"),
        ("ConfigurationDirectoryMode", "/etc/erp-relay"),
    ],
)
def test_the_unit_keeps_the_modes_the_install_gives_its_directories(
    setting: str, directory: str
) -> None:
    """Without them systemd set the state directory to 0755 at each start: any
    user listed the queue and the audit log's files."""
    assert _setting(setting) == _installed_mode(directory)


def test_the_unit_raises_the_journal_rate_limit_the_readme_quotes() -> None:
    """journald's default, 10,000 lines in 30 s, drops lines at a few hundred
    messages a second, three lines each."""
    quoted = re.search(r"`LogRateLimitBurst=(\d+)` in (\d+) s", (ROOT / "README.md").read_text())
    assert quoted is not None
    assert _setting("LogRateLimitBurst") == quoted.group(1)
    assert _setting("LogRateLimitIntervalSec") == f"{quoted.group(2)}s"
    assert int(quoted.group(1)) // int(quoted.group(2)) >= 3 * 1000


def test_systemd_reads_every_setting_of_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = re.sub(r"/opt/erp-relay/\.venv/bin/relay", "/bin/true", UNIT.read_text())
    unit = tmp_path / "erp-relay.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
