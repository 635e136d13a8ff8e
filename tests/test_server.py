"""``relay serve`` as a real process: uvloop, signals, reload, TLS, start-up failures.

Messages go to the test policy's directory upstream, where the From
display name shows which policy (which tenant name) a message met.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from pathlib import Path

import pytest

from relay import lowports, message
from relay import server as server_module
from relay.audit import AuditLog, events, reader, verify
from relay.ingress.listen import Ingress
from relay.keygen import generate
from relay.passwd import hash_password
from relay.policy import tlspair
from relay.policy.load import load
from relay.policy.model import DkimAlgorithm, Policy
from relay.server import _listener_changes, _open_state, reloaded
from tests.certs import Certs, der, make_certs, served_certificate
from tests.ingress_harness import swaks
from tests.minimal_policy import listener
from tests.policyfiles import variant
from tests.relayproc import reloaded_everywhere, terminate, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_policy_load import _self_signed

MESSAGE = b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: x\r\n\r\nx\r\n"


class Daemon:
    def __init__(self, policy: Path, log: Path) -> None:
        self.log_path = log
        self.outbox = policy.parent / "outbox"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(policy)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
            env={"PATH": "/usr/bin:/bin"},
            cwd=Path(__file__).parent.parent,
        )

    def sent_from(self, count: int) -> str:
        """The From display name of the count-th message the upstream received."""
        self.wait_for(lambda: len(list(self.outbox.glob("*.eml"))) >= count)
        newest = sorted(self.outbox.glob("*.eml"))[count - 1]
        return parseaddr(message.read(newest.read_bytes()).get("From") or "")[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"condition not reached; log:\n{self.log()}")

    def wait_log(self, text: str) -> None:
        self.wait_for(lambda: text in self.log())

    def wait_reloaded(self, times: int) -> None:
        """Until the policy is reloaded ``times`` times, in every worker process."""
        self.wait_log(" serving")
        self.wait_for(lambda: reloaded_everywhere(self.log(), times))

    def stop(self) -> int:
        return terminate(self.proc, 20)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def policy(policy_file: Path, port: int) -> Path:
    policy_file.write_text(policy_file.read_text().replace("port: 2525", f"port: {port}"))
    return policy_file


@pytest.fixture
def daemon(policy: Path, tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(policy, tmp_path / "relay.log")
    try:
        yield running
    finally:
        running.stop()


def send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo()
        client.mail("jan@acme.example")
        client.rcpt("one@example.org")
        code, reply = client.data(MESSAGE)
    assert reply.startswith(b"2.0.0 Ok: queued as ") or code != 250, reply
    return code, reply


def test_serves_logs_and_stops_cleanly(daemon: Daemon, port: int) -> None:
    daemon.wait_log(f"listening on 127.0.0.1:{port} (listener local)")
    daemon.wait_log(" serving")
    assert send(port)[0] == 250
    assert daemon.sent_from(1) == "Jan Janssens via Acme AS"
    assert daemon.stop() == 0
    log = daemon.log()
    assert " relay[" in log and " INFO stopped" in log
    assert "Traceback" not in log
    assert ">> b'MAIL" not in log  # aiosmtpd's per-command chatter stays out


def test_the_directory_upstream_writes_for_the_relays_user_alone(
    policy: Path, port: int, tmp_path: Path
) -> None:
    """Started from a shell's umask (0022), not the unit's 0077, it wrote each
    message and its envelope 0644 in a 0755 directory: every user of the host
    read the invoices, and the BCC recipients the envelope names."""
    policy.write_text(policy.read_text().replace("path: outbox", "path: outbox/new"))
    before = os.umask(0o022)
    try:
        daemon = Daemon(policy, tmp_path / "relay.log")
    finally:
        os.umask(before)
    try:
        daemon.wait_log(" serving")
        assert send(port)[0] == 250
        outbox = tmp_path / "outbox" / "new"
        daemon.wait_for(lambda: len(list(outbox.glob("*.envelope.json"))) == 1)
    finally:
        daemon.stop()
    modes = {path.suffix: path.stat().st_mode & 0o777 for path in outbox.iterdir()}
    assert modes == {".eml": 0o600, ".json": 0o600}
    assert outbox.stat().st_mode & 0o777 == 0o700


def test_reload_keeps_old_policy_on_error_and_swaks_on_good_one(
    daemon: Daemon, policy: Path, port: int
) -> None:
    daemon.wait_log(" serving")
    good = policy.read_text()
    policy.write_text(good.replace("name: Acme AS", "name: Acme AS\n    bogus: 1"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload failed: keeping policy")
    assert "bogus" in daemon.log()
    assert send(port)[0] == 250
    assert daemon.sent_from(1) == "Jan Janssens via Acme AS"

    policy.write_text(good.replace("name: Acme AS", "name: Acme Norge AS"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_reloaded(1)
    assert send(port)[0] == 250
    assert daemon.sent_from(2) == "Jan Janssens via Acme Norge AS"
    assert "restart" not in daemon.log()

    policy.write_text(good.replace("auth: optional", "auth: required"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_reloaded(2)
    daemon.wait_log("listener settings changed (local: auth): they take effect after a restart")
    assert send(port)[0] == 250  # still the listener as started: auth optional

    renamed = good.replace("  default:\n    type: directory", "  outbox:\n    type: directory")
    policy.write_text(renamed.replace("upstream: default", "upstream: outbox"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_reloaded(3)
    daemon.wait_log("upstreams removed (default): messages already queued for them go through")


def test_a_reload_refuses_a_value_its_tag_does_not_fit_in_one_line(
    daemon: Daemon, policy: Path, port: int
) -> None:
    """The old policy was kept, but PyYAML's traceback was logged, with no line
    of the file: the sysadmin had to guess which value it meant."""
    daemon.wait_log(" serving")
    good = policy.read_text()
    policy.write_text(good.replace("name: Acme AS", "name: !!bool x"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload failed: keeping policy")
    log = daemon.log()
    assert "Traceback" not in log
    line = good.splitlines().index("    name: Acme AS") + 1
    assert f"{policy}:{line}:11: tenants.acme.name: expected a company name, but the tag" in log
    assert send(port)[0] == 250
    assert daemon.sent_from(1) == "Jan Janssens via Acme AS"


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            "default: [sender, company]",
            "default: ['Økonomi <okonomi@acme.example>, Ops <ops@acme.example>']",
            "tenants.acme.reply_to.default[0]: 'Økonomi <okonomi@acme.example>, Ops"
            " <ops@acme.example>' holds 2 addresses: expected one, with a name if wanted",
        ),
        (
            "name: Jan Janssens",
            "name: '=?utf-8?q?J=C3=A5n?='",
            "tenants.acme.users.jan.name: '=?utf-8?q?J=C3=A5n?=' is an encoded word;"
            " write the name as it reads: 'Jån'",
        ),
    ],
    ids=["two-mailboxes", "encoded-word"],
)
def test_a_reload_keeps_the_policy_when_a_name_would_not_go_out_as_written(
    daemon: Daemon, policy: Path, port: int, old: str, new: str, problem: str
) -> None:
    """Both were taken at a reload: the Reply-To went out as one mailbox named
    after the other, the name encoded again."""
    daemon.wait_log(" serving")
    good = policy.read_text()
    policy.write_text(good.replace(old, new))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload failed: keeping policy")
    ((line, text),) = [(n, t) for n, t in enumerate(policy.read_text().splitlines(), 1) if new in t]
    column = text.index("'") + 1  # where the value starts
    assert f"{policy}:{line}:{column}: {problem}" in daemon.log()
    assert send(port)[0] == 250
    daemon.wait_for(lambda: len(list(daemon.outbox.glob("*.eml"))) == 1)
    (sent,) = daemon.outbox.glob("*.eml")
    view = message.read(sent.read_bytes())
    assert parseaddr(view.get("From") or "")[0] == "Jan Janssens via Acme AS"
    assert view.get("Reply-To") == "Jan Janssens <jan@acme.example>"


def test_sigterm_lets_the_transaction_in_progress_finish(policy: Path, tmp_path: Path) -> None:
    """Immediate mode towards a slow upstream keeps the ERP's transaction open."""
    port = int(policy.read_text().split("port: ", 1)[1].split()[0])
    with SinkServer(Sink(delay=1.5)) as sink:
        upstream = (
            f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {sink.port}\n"
            "    tls: none\n    timeout: 10\n"
        )
        text = policy.read_text().replace(
            "  default:\n    type: directory\n    path: outbox\n", upstream
        )
        policy.write_text(text.replace("auth: optional", "auth: optional\n    immediate: 5"))
        _finish_during_sigterm(policy, port, tmp_path)
        assert len(sink.sink.messages) == 1


def _finish_during_sigterm(policy: Path, port: int, tmp_path: Path) -> None:
    running = Daemon(policy, tmp_path / "relay.log")
    try:
        running.wait_log(" serving")
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo()
            client.mail("jan@acme.example")
            client.rcpt("one@example.org")
            client.putcmd("data")
            assert client.getreply()[0] == 354
            client.send(MESSAGE + b".\r\n")
            time.sleep(0.3)
            running.proc.send_signal(signal.SIGTERM)
            code, reply = client.getreply()
            assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as "), reply
        # each worker closes its listening socket at the SIGTERM the supervisor
        # passes on: one slow to run on a busy host still took a connection
        wait_for(lambda: not _accepts(port), timeout=10)
        assert running.proc.wait(15) == 0
    finally:
        running.stop()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_sigterm_gives_transactions_and_deliveries_one_grace_in_all(
    policy: Path, tmp_path: Path
) -> None:
    """A client silent mid-message and an upstream silent after it: the stop took
    the grace for the first, then a grace again for the second."""
    port = int(policy.read_text().split("port: ", 1)[1].split()[0])
    with SinkServer(Sink(delay=60)) as sink:
        upstream = (
            f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {sink.port}\n"
            "    tls: none\n    timeout: 10\n"
        )
        text = policy.read_text().replace(
            "  default:\n    type: directory\n    path: outbox\n", upstream
        )
        policy.write_text(text + "workers: 1\n")  # both in the one process
        running = Daemon(policy, tmp_path / "relay.log")
        try:
            running.wait_log(" serving")
            assert send(port)[0] == 250  # its delivery waits for the upstream's reply
            time.sleep(0.5)
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            try:
                client.ehlo()
                client.mail("jan@acme.example")
                client.rcpt("one@example.org")
                client.putcmd("data")
                assert client.getreply()[0] == 354
                client.send(MESSAGE)  # and no final dot
                started = time.monotonic()
                running.proc.send_signal(signal.SIGTERM)
                assert running.proc.wait(30) == 0
                took = time.monotonic() - started
            finally:
                client.close()
        finally:
            running.stop()
    log = running.log()
    assert "stop grace of 10s over" in log and "cutting off 1 delivery attempt" in log, log
    assert took < server_module.STOP_GRACE + 3, (took, log)


def test_starttls_and_auth_under_uvloop(policy: Path, tmp_path: Path) -> None:
    port = int(policy.read_text().split("port: ", 1)[1].split()[0])
    certs = make_certs(tmp_path / "tls")
    text = policy.read_text().replace(
        "    auth: optional\n",
        f"    auth: required\n    tls: {{cert: {certs.cert}, key: {certs.key}}}\n",
    )
    policy.write_text(text)
    running = Daemon(policy, tmp_path / "relay.log")
    try:
        running.wait_log(" serving")
        done = swaks(
            port, "--tls",
            "--auth", "PLAIN", "--auth-user", "erp-acme", "--auth-password", "demo-password",
            "--from", "jan@acme.example", "--to", "customer@example.org",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + running.log()
        assert "250 2.0.0 Ok: queued as" in done.stdout
        assert running.sent_from(1) == "Jan Janssens via Acme AS"
    finally:
        assert running.stop() == 0


def test_a_reload_takes_up_a_renewed_certificate_and_refuses_a_mismatched_one(
    policy: Path, tmp_path: Path
) -> None:
    port = int(policy.read_text().split("port: ", 1)[1].split()[0])
    first, renewed, other = (make_certs(tmp_path / name) for name in ("first", "renewed", "other"))
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "relay.crt", live / "relay.key"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    text = policy.read_text().replace(
        "    auth: optional\n", f"    auth: optional\n    tls: {{cert: {cert}, key: {key}}}\n"
    )
    policy.write_text(text)
    running = Daemon(policy, tmp_path / "relay.log")
    try:
        running.wait_log(" serving")
        assert served_certificate(port) == der(first.cert)
        shutil.copy(renewed.cert, cert)  # as a renewal hook would, then reload
        shutil.copy(renewed.key, key)
        running.proc.send_signal(signal.SIGHUP)
        running.wait_reloaded(1)
        assert {served_certificate(port) for _ in range(8)} == {der(renewed.cert)}
        shutil.copy(other.cert, cert)  # its key left behind: the pair does not match
        running.proc.send_signal(signal.SIGHUP)
        running.wait_log("reload failed: keeping policy")
        assert f"{key} is not the key of the certificate in {cert}" in running.log()
        assert {served_certificate(port) for _ in range(8)} == {der(renewed.cert)}
    finally:
        assert running.stop() == 0


def test_a_reload_serves_a_renewed_certificate_on_a_listener_of_implicit_tls(
    policy: Path, tmp_path: Path
) -> None:
    """As with STARTTLS: the renewal is served to new connections, in each worker."""
    port = int(policy.read_text().split("port: ", 1)[1].split()[0])
    first, renewed = make_certs(tmp_path / "first"), make_certs(tmp_path / "renewed")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "relay.crt", live / "relay.key"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    tls = f"    tls: {{cert: {cert}, key: {key}, mode: implicit}}\n"
    text = policy.read_text().replace("    auth: optional\n", f"    auth: optional\n{tls}")
    policy.write_text(text + "workers: 2\n")
    running = Daemon(policy, tmp_path / "relay.log")
    try:
        running.wait_log("2 workers serving")
        assert {served_certificate(port, implicit=True) for _ in range(8)} == {der(first.cert)}
        shutil.copy(renewed.cert, cert)  # as a renewal hook would, then reload
        shutil.copy(renewed.key, key)
        running.proc.send_signal(signal.SIGHUP)
        running.wait_reloaded(1)
        assert {served_certificate(port, implicit=True) for _ in range(8)} == {der(renewed.cert)}
    finally:
        assert running.stop() == 0


def _name_tls(policy: Path, text: str, cert: Path, key: Path) -> None:
    """``text``, the policy, with its listener serving STARTTLS from ``cert`` and ``key``."""
    tls = f"    auth: optional\n    tls: {{cert: {cert}, key: {key}}}\n"
    policy.write_text(text.replace("    auth: optional\n", tls))


def _started_then_renewed(
    policy: Path, tmp_path: Path, first: Certs, renewed: Certs
) -> tuple[Path, Path, str, Policy]:
    """The policy loaded serving ``first`` from relay.crt and relay.key, whose
    bytes are then renewed in place: the files, the policy's text and the policy."""
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    text = policy.read_text()
    _name_tls(policy, text, cert, key)
    started = load(policy)
    shutil.copy(renewed.cert, cert)
    shutil.copy(renewed.key, key)
    return cert, key, text, started


def test_a_reload_keeps_the_state_directory_and_its_suppression_list_as_opened(
    policy: Path,
) -> None:
    """The workers read the list opened at the start: a reload that moved
    ``state_directory`` had hard bounces listed in the new directory's file,
    which nothing read, and mail to those addresses went on."""
    started = load(policy)
    policy.write_text(policy.read_text() + "state_directory: elsewhere\n")
    assert load(policy).suppression.file != started.suppression.file  # type: ignore[union-attr]
    new = reloaded(policy, started, quiet=True)
    assert new is not None and new.suppression is not None and started.suppression is not None
    assert new.suppression.file == started.suppression.file
    assert new.queue.directory == started.queue.directory
    assert new.audit.directory == started.audit.directory


def test_a_reload_takes_a_renewed_pair_and_keeps_the_bound_one_when_moved(
    policy: Path, tmp_path: Path
) -> None:
    """The listeners stay as bound: a reload takes up new bytes in the same
    files (a renewal), while other files named wait for a restart."""
    first, renewed = make_certs(tmp_path / "first"), make_certs(tmp_path / "renewed")
    cert, _, text, started = _started_then_renewed(policy, tmp_path, first, renewed)
    new = reloaded(policy, started, quiet=True)
    assert new is not None and new.listeners[0].tls is not None
    assert new.listeners[0].tls.cert_pem == renewed.cert.read_bytes()
    assert new.listeners[0].tls.key_pem == renewed.key.read_bytes()
    _name_tls(policy, text, first.cert, first.key)
    moved = reloaded(policy, new, quiet=True)
    assert moved is not None and moved.listeners[0].tls is not None
    assert moved.listeners[0].tls.cert == cert
    assert moved.listeners[0].tls.cert_pem == renewed.cert.read_bytes()


def test_a_listener_whose_tls_moved_serves_its_own_files_read_again(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Other files named wait for a restart; until then a renewal of the files
    bound is taken up, and the log says which files are served. Before, it said
    the certificate was read again and served the bytes held since the start."""
    first, renewed, moved = (make_certs(tmp_path / name) for name in ("first", "renewed", "moved"))
    cert, key, text, started = _started_then_renewed(policy, tmp_path, first, renewed)
    _name_tls(policy, text, moved.cert, moved.key)
    with caplog.at_level(logging.INFO, logger="relay"):
        new = reloaded(policy, started)
    assert new is not None and new.listeners[0].tls is not None
    assert new.listeners[0].tls.cert == cert
    assert new.listeners[0].tls.cert_pem == renewed.cert.read_bytes()
    assert new.listeners[0].tls.key_pem == renewed.key.read_bytes()
    changed = next(i for i, m in enumerate(caplog.messages) if "after a restart" in m)
    serves = f"listener local: until a restart it serves {cert} and {key}, as bound, read again"
    assert caplog.messages.index(serves) == changed + 1
    cert.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="relay"):
        kept = reloaded(policy, new)
    assert kept is not None and kept.listeners[0].tls == new.listeners[0].tls
    assert kept.listeners[0].tls.cert_pem == renewed.cert.read_bytes()
    assert f"cannot read {cert} and {key} again" in caplog.text


def test_the_log_of_a_reload_says_whether_the_certificate_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, renewed = make_certs(tmp_path / "first"), make_certs(tmp_path / "renewed")
    served = tlspair.read_pair(first.cert, first.key)
    ingress = Ingress(tls={"test": tlspair.server_context(served)})
    ingress.served["test"] = served
    again = tlspair.read_pair(first.cert, first.key)
    shutil.copy(renewed.cert, first.cert)
    shutil.copy(renewed.key, first.key)
    changed = tlspair.read_pair(first.cert, first.key)
    with caplog.at_level(logging.INFO, logger="relay"):
        ingress.reload_tls([listener(tls=again)])
        before = ingress.tls["test"]
        ingress.reload_tls([listener(tls=changed)])
    assert caplog.messages == [
        f"listener test: TLS certificate {first.cert} unchanged",
        f"listener test: TLS certificate {first.cert} read again: a new one served",
    ]
    assert ingress.tls["test"] is not before


def _expired(directory: Path, ended: datetime) -> Certs:
    """A pair whose certificate ended at ``ended``, a month after it began."""
    pair = make_certs(directory)
    pair.cert.write_bytes(_self_signed(pair.key, ended - timedelta(days=30), ended))
    return pair


def test_a_reload_says_the_certificate_served_ends_soon(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """relay check said so, but a reload by SIGHUP alone, or a start without the
    unit's ExecStartPre, said nothing, and clients refused it the day after."""
    first = make_certs(tmp_path / "first")
    ending = make_certs(tmp_path / "ending")  # ends tomorrow
    cert, _, _, started = _started_then_renewed(policy, tmp_path, first, ending)
    with caplog.at_level(logging.INFO, logger="relay"):
        new = reloaded(policy, started)
    assert new is not None
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage().startswith(f"listener local: {cert} ends on ")
    assert warning.getMessage().endswith(", within 14 days: renew it, then reload")
    caplog.clear()
    assert reloaded(policy, started, quiet=True) is not None  # as each worker builds it
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_reload_does_not_swap_a_valid_certificate_for_one_clients_refuse(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal hook that copied the wrong file (an expired one) and sent SIGHUP
    put it in service, said in the log at INFO only. Now the policy keeps the
    pair served, so a worker started later serves it too."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    ended = now - timedelta(days=1)
    valid, expired = make_certs(tmp_path / "valid"), _expired(tmp_path / "expired", ended)
    cert, _, _, started = _started_then_renewed(policy, tmp_path, valid, expired)
    with caplog.at_level(logging.INFO, logger="relay"):
        kept = reloaded(policy, started)
    assert kept is not None and kept.listeners[0].tls == started.listeners[0].tls
    why = f"{cert} expired on {ended:%Y-%m-%d %H:%M} UTC: clients refuse it; renew it"
    (error,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (error.levelno, error.getMessage()) == (
        logging.ERROR,
        f"listener local: keeping the TLS certificate served before: {why}",
    )
    assert reloaded(policy, started, quiet=True) == kept  # as each worker builds it
    assert kept.pending == (  # relay status says so (it said the file's was in use)
        f"listener local serves the certificate from before, not the one now in {cert}"
        " (the log says why)",
    )

    other = _expired(tmp_path / "other", ended)  # in place of one refused as well
    shutil.copy(other.cert, cert)
    shutil.copy(other.key, tmp_path / "relay.key")
    refused_too = load(policy)
    shutil.copy(expired.cert, cert)
    shutil.copy(expired.key, tmp_path / "relay.key")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="relay"):
        new = reloaded(policy, refused_too)
    assert new is not None and new.listeners[0].tls is not None
    assert new.listeners[0].tls.cert_pem == expired.cert.read_bytes()
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (warning.levelno, warning.getMessage()) == (
        logging.WARNING,
        f"listener local: serving it all the same: {why}",
    )


def test_a_start_says_it_serves_a_certificate_clients_refuse(policy: Path, tmp_path: Path) -> None:
    """A reload keeps the certificate it served and says why; a start has no other
    to serve, and said nothing: a restart after a bad renewal went unnoticed."""
    ended = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=1)
    expired = _expired(tmp_path / "expired", ended)
    _name_tls(policy, policy.read_text(), expired.cert, expired.key)
    running = Daemon(policy, tmp_path / "relay.log")
    try:
        running.wait_log(" serving")
    finally:
        running.stop()
    why = f"{expired.cert} expired on {ended:%Y-%m-%d %H:%M} UTC: clients refuse it; renew it"
    assert f"ERROR listener local: serving it all the same: {why}" in running.log()


def test_a_reload_keeps_the_state_directory_and_audit_key_it_started_with(
    policy: Path, tmp_path: Path
) -> None:
    """As a worker takes a reload (quiet): the spool and the audit chain stay where
    they were opened, and with their key; the rest of the audit settings change."""
    started = load(policy)
    (tmp_path / "audit.key").write_text("k3y\n")
    settings = (
        "state_directory: elsewhere\naudit: {hmac_key_file: audit.key, record_subject: yes}\n"
    )
    policy.write_text(policy.read_text() + settings)
    new = reloaded(policy, started, quiet=True)
    assert new is not None and new.digest != started.digest
    assert new.queue.directory == started.queue.directory == tmp_path / "state" / "queue"
    assert new.audit.directory == started.audit.directory
    assert new.audit.hmac_key is None and new.audit.record_subject is True


def test_a_reload_says_a_new_concurrency_waits_for_a_restart(
    policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each worker fixes an upstream's delivery limit when it first delivers
    there; a reload that changes it silently did nothing. Retry times apply at once."""
    started = load(policy)
    text = policy.read_text()
    policy.write_text(text + "queue: {concurrency: 3, first_retry: 60}\n")
    with caplog.at_level(logging.WARNING, logger="relay"):
        running = reloaded(policy, started)
    assert running is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["queue.concurrency changed (10 to 3): takes effect after a restart"]
    caplog.clear()
    policy.write_text(text)  # back to what runs: nothing waits for a restart any more
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert reloaded(policy, running) is not None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == []


@pytest.mark.timeout(20)
def test_a_reload_keeps_the_policy_when_the_file_is_a_fifo(
    policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file was read whole: a reload waited for a writer forever."""
    started = load(policy)
    policy.unlink()
    os.mkfifo(policy)
    with caplog.at_level(logging.ERROR, logger="relay"):
        assert reloaded(policy, started) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{policy}: the policy file is a FIFO, not a regular file",
        f"reload failed: keeping policy {started.digest[:12]}",
    ]


def test_the_start_logs_its_audit_upkeep_and_closes_yesterday(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The upkeep at the start deleted and compressed without a word, and left
    yesterday's file (then still the newest) plain for another day."""
    policy.write_text(policy.read_text() + "audit: {compress_after_days: 1}\n")
    audit = tmp_path / "state" / "audit"
    now = datetime.now(UTC)
    for days in (3, 1):
        AuditLog(audit, clock=lambda days=days: now - timedelta(days=days)).append(
            events.policy_loaded(policy_file=str(policy), policy_sha256="9f2c" * 16)
        )
    with caplog.at_level(logging.INFO, logger="relay"):
        assert _open_state(load(policy), policy) == (0, 1)  # its policy_loaded
    names = [reader.file_name((now - timedelta(days=days)).date()) for days in (3, 1)]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit log:")]
    assert logged == [f"audit log: compressed {names[0]}", f"audit log: compressed {names[1]}"]
    assert sorted(p.name for p in audit.glob("audit-*")) == [
        names[0] + ".gz",
        names[1] + ".gz",
        reader.file_name(now.date()),
    ]
    assert verify(audit).ok


def test_the_daily_upkeep_uses_the_audit_settings_a_reload_brought(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run in one process, the upkeep kept the settings the log was opened with."""
    monkeypatch.setattr(server_module, "AUDIT_UPKEEP", 0.01)
    audit_dir = tmp_path / "audit"
    now = datetime.now(UTC)
    for days in (3, 0):
        AuditLog(audit_dir, clock=lambda days=days: now - timedelta(days=days)).append(
            events.policy_loaded(policy_file=str(policy), policy_sha256="9f2c" * 16)
        )
    started = load(policy)
    assert started.audit.compress_after_days is None
    policy.write_text(policy.read_text() + "audit: {compress_after_days: 1}\n")
    reloaded_policy = load(policy)
    old = reader.file_name((now - timedelta(days=3)).date())

    async def upkeep() -> None:
        task = asyncio.ensure_future(
            server_module._audit_upkeep(AuditLog(audit_dir), lambda: reloaded_policy)
        )
        for _ in range(500):
            if (audit_dir / f"{old}.gz").exists():
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(upkeep())
    assert (audit_dir / f"{old}.gz").exists()
    assert verify(audit_dir).ok


def test_a_login_a_reload_removed_sends_nothing_more_in_its_open_session(
    daemon: Daemon, policy: Path, port: int
) -> None:
    """Read as no login at all, the session was no longer bound to its tenant:
    refused as another tenant's sender before the reload, it sent as one after."""
    daemon.wait_log(" serving")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.login("erp-globex", "demo-password")

        def send_as(sender: str) -> tuple[int, bytes]:
            client.mail(sender)
            client.rcpt("one@example.org")
            try:
                return client.data(MESSAGE.replace(b"jan@acme.example", sender.encode()))
            except smtplib.SMTPDataError as refused:
                return refused.smtp_code, refused.smtp_error

        assert send_as("hank@globex.example")[0] == 250
        assert send_as("jan@acme.example")[0] == 550
        text = policy.read_text()
        login = text[text.index("  erp-globex:") : text.index("tenants:")]
        policy.write_text(text.replace(login, ""))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_reloaded(1)
        refused = (
            454,
            b"4.7.0 Temporary authentication failure: no login 'erp-globex' in the policy"
            b" since this session logged in; log in again",
        )
        assert send_as("jan@acme.example") == refused
        assert send_as("hank@globex.example") == refused
        with pytest.raises(smtplib.SMTPAuthenticationError) as again:  # as it is told to
            client.login("erp-globex", "demo-password")
        assert again.value.smtp_code == 535
    assert len(list(daemon.outbox.glob("*.eml"))) == 1


def test_a_password_a_reload_changed_sends_nothing_more_in_its_open_session(
    daemon: Daemon, policy: Path, port: int
) -> None:
    """The first thing done about a leaked password: a session that logged in
    with the old one went on sending, under the tenant, after the reload. It is
    told to log in again, and can: with the old password it cannot, with the
    new one it sends."""
    daemon.wait_log(" serving")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.login("erp-globex", "demo-password")

        def send() -> tuple[int, bytes]:
            client.mail("hank@globex.example")
            client.rcpt("one@example.org")
            try:
                return client.data(MESSAGE.replace(b"jan@acme.example", b"hank@globex.example"))
            except smtplib.SMTPDataError as refused:
                return refused.smtp_code, refused.smtp_error

        assert send()[0] == 250
        text = policy.read_text()
        start = text.index("password_hash:", text.index("  erp-globex:"))
        old = text[start : text.index("\n", start)]
        policy.write_text(text.replace(old, f'password_hash: "{hash_password("new-password")}"'))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_reloaded(1)
        refused = (
            454,
            b"4.7.0 Temporary authentication failure: the password of login 'erp-globex'"
            b" changed since this session logged in; log in again",
        )
        assert send() == refused
        assert send() == refused  # a 4xx each time until it logs in: the ERP keeps it
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("erp-globex", "demo-password")
        client.login("erp-globex", "new-password")
        assert send()[0] == 250
    daemon.wait_for(lambda: len(list(daemon.outbox.glob("*.eml"))) == 2)
    audit = load(policy).audit.directory
    rejected = [r for r in reader.records(audit) if r["event"] == "rejected"]
    assert [(r["auth_login"], r["reply"][:3]) for r in rejected] == [("erp-globex", "454")] * 2


def test_the_warning_of_a_listener_change_says_what_changed() -> None:
    old = (listener(name="local"), listener(name="lan", port=25))
    new = (listener(name="local", port=2526, max_recipients=9), listener(name="wan"))
    assert _listener_changes(old, new) == [
        "lan: removed",
        "local: port, max_recipients",
        "wan: added",
    ]
    assert _listener_changes(old, old) == []


def _sighup_held(pid: int) -> bool:
    """Whether the process blocks SIGHUP now (``SigBlk`` in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    blocked = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(int(blocked.split()[1], 16) >> (signal.SIGHUP - 1) & 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sighup_while_the_relay_starts_is_a_reload_once_it_serves(
    policy: Path, tmp_path: Path, port: int, workers: int
) -> None:
    """``systemctl reload`` just after a start: SIGHUP's default action ended the
    relay before it served (and systemd does not restart a service SIGHUP ended).
    It is held from before the policy is read, then taken as a reload."""
    policy.write_text(policy.read_text() + f"workers: {workers}\n")
    running = Daemon(policy, tmp_path / "relay.log")
    try:
        running.wait_for(lambda: _sighup_held(running.proc.pid))
        assert " serving" not in running.log()  # still starting
        running.proc.send_signal(signal.SIGHUP)
        running.wait_reloaded(1)
        assert running.proc.poll() is None
        assert send(port)[0] == 250
    finally:
        assert running.stop() == 0


def test_invalid_policy_does_not_start(policy: Path, tmp_path: Path) -> None:
    policy.write_text(policy.read_text().replace("name: Acme AS", "name: Acme AS\n    bogus: 1"))
    running = Daemon(policy, tmp_path / "relay.log")
    assert running.proc.wait(20) == 78
    assert "bogus" in running.log()


def test_port_in_use_does_not_start(policy: Path, tmp_path: Path) -> None:
    port = int(policy.read_text().split("port: ", 1)[1].split()[0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        running = Daemon(policy, tmp_path / "relay.log")
        assert running.proc.wait(20) == 71
    where = f"ERROR cannot listen on 127.0.0.1:{port} (listener local): Address already in use"
    assert where in running.log()
    # nothing of the state touched: a second relay (the port is the first one's) wrote a
    # policy_loaded record in the running relay's audit log for a policy that never served
    assert not (tmp_path / "state").exists()


def test_a_relay_started_as_root_says_so(daemon: Daemon) -> None:
    """Every worker, parsing what clients send, ran as root, and nothing said so."""
    daemon.wait_log(" serving")
    if os.geteuid() == 0:
        assert "WARNING running as root: the supervisor and every worker" in daemon.log()
        assert "(User=erp-relay, ports below 1024 with" in daemon.log()
    else:
        assert "running as root" not in daemon.log()


AS_NOBODY = """
import contextlib, io, os, sys
import relay.server, relay.ingress.listen, relay.lowports
from relay.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main(["check", "-c", sys.argv[1]])  # as root first: root's files imported while they can be
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(main(["serve", "-c", sys.argv[1]]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the relay as another user")
def test_a_port_only_root_may_bind_says_what_binding_it_needs(policy: Path, port: int) -> None:
    """A service user's relay on 587 said only "Permission denied", which reads
    like a file's mode, where the port wants a capability."""
    start = lowports.unprivileged_start()
    if start <= 1:
        pytest.skip("this host lets every user bind every port")
    low = min(587, start - 1)
    base = Path(tempfile.mkdtemp(prefix="relay-low-port-"))
    try:
        base.chmod(0o755)
        shutil.copytree(policy.parent, base / "conf", ignore=shutil.ignore_patterns("*.log"))
        conf = base / "conf" / policy.name
        conf.write_text(conf.read_text().replace(f"port: {port}", f"port: {low}"))
        for path in [base / "conf", *(base / "conf").rglob("*")]:
            os.chown(path, 65534, 65534)
        done = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, str(conf)],
            capture_output=True, text=True, timeout=60, check=False,
            cwd=Path(__file__).parent.parent,
        )  # fmt: skip
    finally:
        shutil.rmtree(base)
    assert done.returncode == 71, done.stderr
    assert (
        f"ERROR cannot listen on 127.0.0.1:{low} (listener local): Permission denied: ports"
        f" below {start} need root or the CAP_NET_BIND_SERVICE capability"
        " (systemd/erp-relay.service gives it with AmbientCapabilities=CAP_NET_BIND_SERVICE)"
    ) in done.stderr
    assert "running as root" not in done.stderr


@pytest.mark.parametrize(
    ("code", "port", "hinted"),
    [
        (errno.EACCES, 587, True),
        (errno.EACCES, 1023, True),
        (errno.EACCES, 1024, False),  # not the port, then: a policy of the host's (SELinux)
        (errno.EADDRINUSE, 587, False),
        (errno.EACCES, 0, False),
    ],
)
def test_only_a_refused_port_below_the_unprivileged_start_is_hinted_at(
    code: int, port: int, hinted: bool
) -> None:
    assert bool(lowports.hint(code, port, start=1024)) is hinted


def test_the_unprivileged_start_falls_back_to_the_kernels_default(tmp_path: Path) -> None:
    assert lowports.unprivileged_start(str(tmp_path / "missing")) == 1024
    (tmp_path / "set").write_text("80\n")
    assert lowports.unprivileged_start(str(tmp_path / "set")) == 80
    assert lowports.hint(errno.EACCES, 587, start=80) == ""


def test_a_second_relay_on_the_same_state_directory_does_not_start(
    daemon: Daemon, policy: Path, port: int, tmp_path: Path
) -> None:
    """Other ports, same spool: it would deliver the first one's mail a second time."""
    daemon.wait_log(" serving")
    audit = {p: p.read_bytes() for p in (tmp_path / "state" / "audit").iterdir()}
    second_port = free_port()
    second = tmp_path / "second.yaml"
    second.write_text(policy.read_text().replace(f"port: {port}", f"port: {second_port}"))
    _refused_as_busy(second, tmp_path / "second.log", daemon)
    state = tmp_path / "state"
    assert {p: p.read_bytes() for p in (state / "audit").iterdir()} == audit
    with pytest.raises(OSError):  # its listener was closed again
        socket.create_connection(("127.0.0.1", second_port), timeout=2).close()
    assert send(port)[0] == 250  # the first one serves on
    assert daemon.stop() == 0
    # the lock went with the first relay's processes; the file stays and is taken over
    after = Daemon(second, tmp_path / "after.log")
    try:
        after.wait_log(" serving")
        assert (state / "relay.pid").read_text().split("\n")[0] == str(after.proc.pid)
    finally:
        assert after.stop() == 0


def test_the_same_policy_started_twice_names_the_running_relay(
    daemon: Daemon, policy: Path, tmp_path: Path
) -> None:
    """The usual slip, ``relay serve`` by hand beside the service: its ports are
    taken, and it said only "Address already in use" (exit 71), not which relay
    holds them, as it does for a relay on other ports (exit 75)."""
    daemon.wait_log(" serving")
    running = _refused_as_busy(policy, tmp_path / "again.log", daemon)
    assert "Address already in use" not in running.log()


def _refused_as_busy(policy: Path, log: Path, first: Daemon) -> Daemon:
    """A second relay on ``first``'s state directory, ended: exit 75, naming it."""
    running = Daemon(policy, log)
    try:
        assert running.proc.wait(20) == 75
    finally:
        running.stop()
    state = log.parent / "state"
    busy = f"ERROR state directory {state} is in use by the relay with PID {first.proc.pid}"
    assert busy in running.log()
    return running


def test_a_reload_keeps_the_policy_when_a_dkim_key_cannot_sign(
    daemon: Daemon, policy: Path, port: int
) -> None:
    """Such a key used to be taken up, and every message then got 451."""
    daemon.wait_log(" serving")
    key = policy.parent / "keys" / "platform.example.e1.private"
    key.write_bytes(b"garbage\n")
    policy.write_text(policy.read_text().replace("name: Acme AS", "name: Acme Norge AS"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload failed: keeping policy")
    assert f"dkim.keys[1].key_file: cannot sign with {key}: not an Ed25519 private key" in (
        daemon.log()
    )
    assert send(port)[0] == 250
    assert daemon.sent_from(1) == "Jan Janssens via Acme AS"
    signed = next(daemon.outbox.glob("*.eml")).read_bytes()
    assert signed.count(b"DKIM-Signature:") == 2 and b"s=e1" in signed


def test_a_reload_warns_of_a_new_key_under_a_selector_in_use(
    daemon: Daemon, policy: Path, port: int
) -> None:
    """A key file removed and made again under its selector, as keygen's refusal
    advised, was taken up in silence: the mail queued signed with the old key
    failed DKIM once the record changed. A key saved again (CR LF) is the same key."""
    daemon.wait_log(" serving")
    key = policy.parent / "keys" / "platform.example.s1.private"
    key.write_bytes(key.read_bytes().replace(b"\n", b"\r\n"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_reloaded(1)
    assert "is another key under the same selector" not in daemon.log()
    key.unlink()
    generate("platform.example", "s1", DkimAlgorithm.RSA, key.parent)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_reloaded(2)
    assert (
        f"WARNING DKIM key s1._domainkey.platform.example is another key under the same"
        f" selector ({key}): mail queued signed with the key before fails DKIM while the record"
        " publishes this one, and one record cannot publish both; give each key a selector of"
        " its own (docs/queue.md)"
    ) in daemon.log()
    assert "e1._domainkey" not in daemon.log()
    assert send(port)[0] == 250


def test_what_waits_for_a_restart_is_still_said_after_the_next_reload(tmp_path: Path) -> None:
    """The metrics address moved in the file was taken as running after one more
    reload, while the old one was still the one served."""
    metrics = "metrics: {address: 127.0.0.1, port: 9325}\n"
    path = variant(tmp_path, "    path: outbox\n", f"    path: outbox\n{metrics}")
    started = load(path)
    path.write_text(path.read_text().replace("port: 9325", "port: 9400"))
    first = reloaded(path, started)
    assert first is not None
    path.write_text(path.read_text().replace("name: Jan Janssens", "name: Jan Jansen"))
    second = reloaded(path, first)
    assert second is not None
    waiting = ("waits for a restart: metrics 127.0.0.1:9325 to 127.0.0.1:9400",)
    assert first.pending == second.pending == waiting


def test_the_start_says_one_queued_message_and_one_listed_address_in_the_singular(
    policy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``1 messages queued`` and ``suppression list ...: 1 entries``."""
    from relay.spool import Spool
    from relay.suppression import BOUNCE, Suppression, SuppressionFile
    from tests import spoolkit

    state = tmp_path / "state"
    AuditLog(state / "audit").close()
    Spool(state / "queue").put(spoolkit.make_entry(), b"Subject: x\r\n\r\nx\r\n")
    listing = SuppressionFile(state / "suppression.jsonl")
    listing.add([Suppression("gone@example.org", None, BOUNCE, "2026-12-01T10:00:00.000Z")])
    with caplog.at_level(logging.INFO, logger="relay"):
        assert _open_state(load(policy), policy)[0] == 0
        server_module._load_suppressions(listing)
    said = [m for m in caplog.messages if m.startswith(("spool ", "suppression list "))]
    assert said == [
        f"spool {state / 'queue'}: 1 message queued, any on hold included (relay queue list)",
        f"suppression list {listing.path}: 1 entry",
    ]
