"""The YAML policies under tests/policies, copied where a test may change them."""

from __future__ import annotations

import shutil
from pathlib import Path

POLICIES = Path(__file__).parent / "policies"


def variant(tmp_path: Path, old: str, new: str) -> Path:
    """minimal.yaml with one change, beside copies of its key and TLS files."""
    shutil.copytree(POLICIES / "keys", tmp_path / "keys")
    shutil.copytree(POLICIES / "tls", tmp_path / "tls")
    for key in [*(tmp_path / "keys").iterdir(), *(tmp_path / "tls").glob("*.key")]:
        key.chmod(0o600)  # as checked out, others may read it, which check warns of
    text = (POLICIES / "minimal.yaml").read_text()
    assert text.count(old) == 1
    path = tmp_path / "relay.yaml"
    path.write_text(text.replace(old, new))
    return path
