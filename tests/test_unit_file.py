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
