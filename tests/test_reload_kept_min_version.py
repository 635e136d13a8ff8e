"""A reload that keeps a listener's certificate keeps its ``tls: min_version``
too: what the log and ``relay status`` say of it, where the policy changed it."""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path

import pytest

from relay.ingress.listen import Ingress
from relay.policy import tlspair
from relay.policy.model import TlsVersion
from tests.certs import make_certs
from tests.minimal_policy import listener
from tests.relayproc import RelayProcess
from tests.sink import free_port
from tests.test_queue_e2e import relay_cli
from tests.test_tls_versions import _policy


def test_status_says_the_kept_certificate_keeps_its_min_version(tmp_path: Path) -> None:
    """An expired certificate copied in by a renewal hook, with min_version
    lowered for a legacy ERP: the log said the old min_version was kept, and
    status, which the sysadmin asks days later, only that the certificate was."""
    port = free_port()
    path = _policy(tmp_path, port=port)
    cert = tmp_path / "tls" / "relay.crt"
    with RelayProcess(path, port, tmp_path / "relay.log") as relay:
        expired = make_certs(tmp_path / "expired", expired=True)
        cert.write_bytes(expired.cert.read_bytes())
        (tmp_path / "tls" / "relay.key").write_bytes(expired.key.read_bytes())
        path.write_text(path.read_text().replace("relay.key}", "relay.key, min_version: '1.0'}"))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(1)
        done = relay_cli(path, "status")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"policy: listener local serves the certificate from before, not the one now in {cert}"
        " (the log says why), and its min_version 1.2 (the policy's 1.0 is taken with a"
        " certificate clients take)"
    ) in done.stdout.splitlines()


def test_a_certificate_that_does_not_load_says_the_min_version_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener keeps the context it served, min_version and all: the ERROR
    named the certificate alone, and a legacy client the new policy lets in
    was refused with nothing saying why."""
    certs = make_certs(tmp_path)
    served = tlspair.read_pair(certs.cert, certs.key)
    ingress = Ingress(tls={"test": tlspair.server_context(served)})
    ingress.served["test"] = served
    broken = dataclasses.replace(served, cert_pem=b"", min_version=TlsVersion.V1_0)
    with caplog.at_level(logging.ERROR, logger="relay"):
        ingress.reload_tls([listener(tls=broken)])
    assert caplog.messages == [
        f"listener test: keeping the TLS certificate loaded before: {certs.cert}:"
        f" {certs.cert} is empty, and its min_version 1.2 (the policy's 1.0 is taken with a"
        " certificate that loads)"
    ]
    assert ingress.served["test"] is served
