"""The benchmark's measure of the machine's speed, printed beside its results."""

from __future__ import annotations

from pathlib import Path

from bench import calibrate


def test_measures_a_signature_and_an_fsync_and_leaves_no_file(tmp_path: Path) -> None:
    assert 0 < calibrate.rsa_sign_ms(count=5) < 1000
    assert 0 < calibrate.fsync_ms(tmp_path, count=5) < 1000
    assert list(tmp_path.iterdir()) == []
