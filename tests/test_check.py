"""``relay check`` as the unit's ExecStartPre and ``systemctl reload`` run it: a real
process on real files, so that what it passes the daemon can run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def check(policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", str(policy)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def line_of(policy: Path, text: str) -> int:
    (number,) = [n for n, line in enumerate(policy.read_text().splitlines(), 1) if text in line]
    return number


@pytest.mark.parametrize(
    ("key", "content", "problem"),
    [
        ("s1", b"garbage\n", "not an RSA private key in PEM form"),
        ("s1", None, "an Ed25519 key, but algorithm says rsa"),
    ],
    ids=["garbage", "ed25519-as-rsa"],
)
def test_check_refuses_a_dkim_key_the_relay_cannot_sign_with(
    policy_file: Path, key: str, content: bytes | None, problem: str
) -> None:
    """Both passed before, and then every message was refused with 451 at signing."""
    keys = policy_file.parent / "keys"
    path = keys / f"platform.example.{key}.private"
    path.write_bytes(
        (keys / "platform.example.e1.private").read_bytes() if content is None else content
    )
    done = check(policy_file)
    assert done.returncode == 78, done.stdout + done.stderr
    line = line_of(policy_file, f"key_file: keys/platform.example.{key}.private")
    where = f"{policy_file}:{line}:17: dkim.keys[0].key_file: cannot sign with {path}: {problem}"
    assert where in done.stderr
    assert f"{policy_file}: 1 problem" in done.stderr
