"""The ``metrics`` section: where /metrics, /healthz and /readyz are to be served."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.policy.load import load
from relay.policy.model import MetricsSettings
from tests.policyfiles import variant
from tests.test_check import check
from tests.test_policy_mistakes import line_of, problems, warnings

_EXPOSED = (
    " is not loopback: /metrics, /healthz and /readyz take no login, and /metrics names"
    " the tenants and the queue sizes; keep it on loopback, or firewall the port"
)


def with_metrics(tmp_path: Path, section: str) -> Path:
    """minimal.yaml with ``section`` added at its end."""
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    path.write_text(path.read_text() + section)
    return path


def test_without_the_section_nothing_is_served(tmp_path: Path) -> None:
    assert load(variant(tmp_path, "version: 1\n", "version: 1\n")).metrics is None


@pytest.mark.parametrize("address", ["127.0.0.1", "'::1'"])
def test_the_section_is_read(tmp_path: Path, address: str) -> None:
    path = with_metrics(tmp_path, f"metrics:\n  address: {address}\n  port: 9325\n")
    assert load(path).metrics == MetricsSettings(address.strip("'"), 9325)
    assert warnings(path) == []


@pytest.mark.parametrize(
    ("settings", "where", "problem"),
    [
        ("  address: 127.0.0.1\n", "address:", "3: metrics.port: required key is missing"),
        ("  port: 9325\n", "port:", "3: metrics.address: required key is missing"),
        (
            "  address: 127.0.0.1\n  port: 0\n",
            "port: 0",
            "9: metrics.port: 0 is out of range: expected a port number (1..65535)",
        ),
        (
            "  address: 127.0.0.1\n  port: 70000\n",
            "port: 70000",
            "9: metrics.port: 70000 is out of range: expected a port number (1..65535)",
        ),
        (
            "  address: 999.1.1.1\n  port: 9325\n",
            "999.1.1.1",
            "12: metrics.address: '999.1.1.1' is not an IP address like 127.0.0.1 or ::1",
        ),
        (
            "  address: '::ffff:127.0.0.1'\n  port: 9325\n",
            "::ffff:",
            "12: metrics.address: an IPv4-mapped address cannot be listened on"
            " (IPv6 sockets are IPv6 only): write 127.0.0.1",
        ),
        (
            "  address: 127.0.0.1\n  port: 9325\n  path: /metrics\n",
            "path:",
            "3: metrics.path: unknown key (expected one of: address, port)",
        ),
        (
            "  address: 127.0.0.1\n  port: 2525\n",
            "port: 2525\n",
            "9: metrics.port: 127.0.0.1:2525 is also listeners[0];"
            " the metrics endpoints need a port of their own",
        ),
        (
            "  address: 0.0.0.0\n  port: 2525\n",
            "port: 2525\n",
            "9: metrics.port: 0.0.0.0:2525 overlaps 127.0.0.1:2525 of listeners[0]: 0.0.0.0"
            " takes port 2525 on every IPv4 address; the metrics endpoints need a port of"
            " their own",
        ),
    ],
    ids=["no-port", "no-address", "port-0", "port-70000", "bad-address", "ipv4-mapped",
         "unknown-key", "listener-port", "wildcard-over-listener"],
)  # fmt: skip
def test_a_mistake_is_located(tmp_path: Path, settings: str, where: str, problem: str) -> None:
    path = with_metrics(tmp_path, "metrics:\n" + settings)
    text = path.read_text()
    line = text.count("\n", 0, text.rindex(where)) + 1
    assert problems(path) == [f"{path}:{line}:{problem}"]


def test_check_warns_of_endpoints_off_loopback(tmp_path: Path) -> None:
    """They take no login and name the tenants: anyone who reaches the port reads them."""
    path = with_metrics(tmp_path, "metrics:\n  address: 0.0.0.0\n  port: 9325\n")
    assert load(path).metrics == MetricsSettings("0.0.0.0", 9325)
    line = line_of(path, "address: 0.0.0.0")
    done = check(path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"{path}:{line}:12: warning: metrics.address: 0.0.0.0:9325{_EXPOSED}\n"
