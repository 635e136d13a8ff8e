"""An upstream certificate, or a CA of ``ca_file``, dated ahead of this host's
clock, as ``relay upstream test`` tells it against a real TLS upstream."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509

from tests import test_upstream_probe as probe
from tests.certs import Certs, make_certs
from tests.test_upstream_probe import policy, relay

# the probe tests' smarthost, serving the certificates of this module's ``certs``
sink, upstream = probe.sink, probe.upstream


@pytest.fixture
def certs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), **request.param)


def _hint(directory: Path, port: int, ca_file: Path) -> str:
    """What the failure says after OpenSSL's words."""
    directory.mkdir()
    done = relay("-c", str(policy(directory, port, ca_file)), "smarthost")
    assert done.returncode == 1, done.stdout + done.stderr
    prefix = (
        f"  delivery: failed: 451 4.4.1 Upstream smarthost (127.0.0.1:{port}): TLS certificate"
        " not accepted: certificate is not yet valid; "
    )
    line = done.stdout.splitlines()[1]
    assert line.startswith(prefix), line
    return line.removeprefix(prefix).removesuffix(" (connecting)")


@pytest.mark.parametrize("certs", [{"early": True}], indirect=True)
def test_an_upstream_certificate_dated_ahead_says_the_clock_or_the_upstream(
    tmp_path: Path, upstream: Controller, certs: Certs
) -> None:
    """It read only "certificate is not yet valid": nothing said whose doing it
    was. Its start is not given: Python's ssl keeps no certificate it refused."""
    assert _hint(tmp_path / "policy", upstream.port, certs.ca) == (
        "this host's clock is wrong, or the upstream installed it too early"
    )


@pytest.mark.parametrize("certs", [{"ca_early": True}], indirect=True)
def test_a_ca_in_ca_file_dated_ahead_is_named_with_its_start(
    tmp_path: Path, upstream: Controller, certs: Certs
) -> None:
    """As an expired CA of ``ca_file`` is: one of the relay's own file, which
    the upstream's sysadmin cannot change."""
    begins = x509.load_pem_x509_certificate(certs.ca.read_bytes()).not_valid_before_utc
    assert _hint(tmp_path / "alone", upstream.port, certs.ca) == (
        f"ca_file: ({certs.ca}) holds the CA certificate 'relay test CA', valid from"
        f" {begins:%Y-%m-%d %H:%M} UTC: this host's clock is wrong, or it was put there too"
        " early, unless it is the upstream's own that is not valid yet"
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(certs.ca.read_bytes() + make_certs(tmp_path / "other").ca.read_bytes())
    assert _hint(tmp_path / "bundle", upstream.port, bundle) == (
        "this host's clock is wrong, or the upstream installed it too early, unless it is one"
        f" of the CAs in ca_file: ({bundle}) not valid yet: 1 of 2"
    )
