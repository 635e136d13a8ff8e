"""``relay bounce`` as a mail system's pipe runs it: a real bounce and a real
complaint about documents a real relay delivered, read from standard input."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest

from relay.audit.search import search
from relay.feedback import command
from relay.feedback.syslog import SystemLog
from relay.policy.load import load
from relay.spool.tools import RESIGNED
from relay.suppression import Suppression, SuppressionFile
from tests.dkimtools import dkimpy_verify, make_key
from tests.readonly import read_only
from tests.relayproc import RelayProcess
from tests.sink import Sink, SinkServer, free_port
from tests.test_feedback_act import _dsn, _lone
from tests.test_queue_e2e import ROOT, audit_events, configure, relay_cli, send

FEEDBACK = Path(__file__).parent / "messages" / "feedback"
MAIL_INFO = 2 * 8 + 6  # facility mail, severity info (RFC 5424)
MAIL_WARNING = 2 * 8 + 4


class LogSocket:
    """A datagram socket where syslog would listen, and the lines sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def __enter__(self) -> LogSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def lines(self) -> list[tuple[int, str, str]]:
        """(priority, tag, text) of each datagram received so far."""
        found = []
        with contextlib.suppress(BlockingIOError):
            while True:
                datagram = self.sock.recv(65536).decode()
                pri, _, rest = datagram.partition(">")
                tag, _, text = rest.partition(": ")
                found.append((int(pri.lstrip("<")), tag, text))
        return found


def _send(port: int, message_id: str, rcpts: tuple[str, ...]) -> str:
    data = (
        f"From: jan@acme.example\r\nTo: {', '.join(rcpts)}\r\nSubject: Rechnung 4711\r\n"
        f"Message-ID: {message_id}\r\n\r\nanbei die Rechnung.\r\n"
    ).encode()
    return send(port, data, rcpts)


def _send_invoice(port: int) -> str:
    """The document postfix-two-failed.eml bounces: two of its recipients."""
    return _send(
        port, "<4711.erp@acme.example>", ("nobody@buyer.example", "Full.Box@Supplier.example")
    )


def _invoice_delivered(policy_file: Path, tmp_path: Path, extra: str = "") -> tuple[Path, str]:
    """The policy of a relay that delivered ``_send_invoice``'s document, and its
    queue ID; the relay is stopped again: relay bounce needs none running."""
    with SinkServer(Sink()) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port, extra)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            invoice = _send_invoice(port)
            server.sink.wait(1)
    return policy, invoice


def _bounce(
    policy: Path, report: bytes, syslog: Path | str = "off"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "bounce", "-c", str(policy), "--syslog", str(syslog)],
        input=report.decode("latin-1"),
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, encoding="latin-1",
    )  # fmt: skip


def _listed(policy: Path) -> dict[str, tuple[str | None, str]]:
    settings = load(policy).suppression
    assert settings is not None
    listing = SuppressionFile(settings.file).entries()
    return {e.address: (e.tenant, e.reason) for e in listing.entries}


def test_a_bounce_and_a_complaint_piped_in_are_acted_on_and_the_sender_told(
    policy_file: Path, tmp_path: Path
) -> None:
    sink = Sink()
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            invoice = _send_invoice(port)
            quote = _send(port, "<4716.erp@acme.example>", ("Buyer.Desk@yahoo-mail.example",))
            sink.wait(2)
        with LogSocket(tmp_path / "log") as syslog:
            bounced = _bounce(
                policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes(), syslog.path
            )
            complained = _bounce(policy, (FEEDBACK / "yahoo-arf.eml").read_bytes(), syslog.path)
            ignored = _bounce(policy, (FEEDBACK / "out-of-office.eml").read_bytes(), syslog.path)
            logged = syslog.lines()
        with RelayProcess(policy, port, tmp_path / "again.log"):  # delivers the notices queued
            sink.wait(4)
    assert bounced.returncode == 0, bounced.stderr
    assert bounced.stdout.splitlines() == [
        f"bounce about {invoice} (acme/jan)",
        "Full.Box@Supplier.example: bounced (5.2.2), not suppressed (not a hard bounce code)",
        "nobody@buyer.example: bounced (5.1.1), suppressed",
        bounced.stdout.splitlines()[3],
    ]
    assert bounced.stdout.splitlines()[3].startswith("jan@acme.example told (notice ")
    assert complained.returncode == 0, complained.stderr
    assert complained.stdout.splitlines()[:2] == [
        f"complaint about {quote} (acme/jan)",
        "Buyer.Desk@yahoo-mail.example: complained, suppressed",
    ]
    assert ignored.returncode == 0 and ignored.stdout == ""
    head = bounced.stdout.splitlines()[0]
    said = [(pri, text) for pri, tag, text in logged if tag.startswith("erp-relay/bounce[")]
    assert said == [
        *((MAIL_INFO, f"{head}: {line}") for line in bounced.stdout.splitlines()[1:]),
        *((MAIL_INFO, f"{complained.stdout.splitlines()[0]}: {line}")
          for line in complained.stdout.splitlines()[1:]),
        (MAIL_INFO, "neither a bounce nor a complaint: ignored"),
    ]  # fmt: skip
    assert "neither a bounce nor a complaint: ignored" in ignored.stderr
    assert _listed(policy) == {
        "nobody@buyer.example": ("acme", "bounce"),
        "Buyer.Desk@yahoo-mail.example": ("acme", "complaint"),
    }
    assert ("bounced", "nobody@buyer.example") in audit_events(policy, invoice)
    assert ("complained", "Buyer.Desk@yahoo-mail.example") in audit_events(policy, quote)
    notices = [m for m in sink.messages if m.rcpt_tos == ["jan@acme.example"]]
    subjects = sorted(str(message_from_bytes(m.data, policy=default)["Subject"]) for m in notices)
    # subjects are not on record: the reports' ("Rechnung 4711 für März", the
    # invoice was sent as "Rechnung 4711") are not taken
    assert [s.split(", sent ")[0] for s in subjects] == [
        "Complaint about: your document to Buyer.Desk@yahoo-mail.example",
        "Undelivered: your document to nobody@buyer.example and 1 more",
    ]
    report = relay_cli(policy, "audit", "report", "--format", "json")
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    other = next(r for r in rows if r["doc_type"] != "notice")
    assert (other["bounced"], other["complaints"]) == (2, 1)


def test_a_policy_that_does_not_load_keeps_the_report_for_later(tmp_path: Path) -> None:
    """EX_TEMPFAIL: the mail system keeps the bounce and tries again, rather than
    bouncing the bounce (to nobody) while the sysadmin fixes the policy."""
    policy = tmp_path / "relay.yaml"
    policy.write_text("version: 1\nplatform: [\n")
    done = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes())
    assert done.returncode == 75
    assert f"{policy}:" in done.stderr and "not taken, try again later" in done.stderr


def test_a_report_not_taken_is_a_warning_in_the_system_log(tmp_path: Path) -> None:
    policy = tmp_path / "relay.yaml"
    policy.write_text("version: 1\nplatform: [\n")
    with LogSocket(tmp_path / "log") as syslog:
        done = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes(), syslog.path)
        ((pri, tag, text),) = syslog.lines()
    assert done.returncode == 75
    assert pri == MAIL_WARNING and tag == f"erp-relay/bounce[{tag[17:-1]}]", tag
    assert text.startswith(f"not taken, the mail system keeps it: {policy}:"), text
    assert "\n" not in text


def test_a_bounce_goes_by_the_policy_the_relay_runs_while_the_file_does_not_load(
    policy_file: Path, tmp_path: Path
) -> None:
    """An edit the running relay refused at its reload: every report waited in
    the mail system's queue (exit 75) until the file was fixed, and the relay
    went on sending to the addresses that had bounced."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path, "workers: 2\n")
    good = policy.read_text()
    policy.write_text(good + "tenants: [\n")
    with LogSocket(tmp_path / "log") as syslog:
        done = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes(), syslog.path)
        logged = [(pri, text) for pri, _, text in syslog.lines()]
    kept = tmp_path / "state" / "policy.checked.yaml"
    said = f"{policy} does not load, so this goes by the policy the relay runs or last ran ({kept})"
    problem = done.stderr.splitlines()[0]
    assert done.returncode == 0, done.stderr
    assert problem.startswith(f"{policy}:")
    assert done.stderr == f"{problem}\nrelay bounce: {said}\n"
    assert done.stdout.splitlines()[:3] == [
        f"bounce about {invoice} (acme/jan)",
        "Full.Box@Supplier.example: bounced (5.2.2), not suppressed (not a hard bounce code)",
        "nobody@buyer.example: bounced (5.1.1), suppressed",
    ]
    assert logged[0] == (MAIL_WARNING, f"{said}: {problem}")
    assert ("bounced", "nobody@buyer.example") in audit_events(policy, invoice)
    policy.write_text(good)
    assert _listed(policy) == {"nobody@buyer.example": ("acme", "bounce")}


def test_a_bounce_waits_where_the_policy_the_relay_runs_is_not_there_to_go_by(
    policy_file: Path, tmp_path: Path
) -> None:
    """The running relay's text stands in for a file that does not load only
    where it is that relay's, and only while it loads whole: a copy brought
    along from another state directory (``cp -a``) runs nowhere here, a DKIM
    key it names may have been replaced since, and a relay in one process
    keeps none. Each report waits in the mail system's queue (exit 75)."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path, "workers: 2\n")
    good, report = policy.read_text(), (FEEDBACK / "postfix-two-failed.eml").read_bytes()
    key = tmp_path / "keys" / "platform.example.s1.private"
    kept = tmp_path / "state" / "policy.checked.yaml"
    shutil.copytree(tmp_path / "state", tmp_path / "state2", symlinks=True)
    policy.write_text("state_directory: state2\n" + good + "tenants: [\n")
    waited = [_bounce(policy, report)]
    policy.write_text(good + "tenants: [\n")
    key_text = key.read_bytes()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ncut short\n")
    waited.append(_bounce(policy, report))
    key.write_bytes(key_text)
    kept_text = kept.read_bytes()
    kept.unlink()
    waited.append(_bounce(policy, report))
    for done in waited:
        assert done.returncode == 75, done.stderr
        assert done.stderr.startswith(f"{policy}:")
        assert done.stderr.endswith("\nrelay bounce: not taken, try again later\n")
        assert "goes by" not in done.stderr
    kept.write_bytes(kept_text)
    assert ("bounced", "nobody@buyer.example") not in audit_events(policy, invoice)
    taken = _bounce(policy, report)
    assert taken.returncode == 0, taken.stderr
    assert audit_events(policy, invoice).count(("bounced", "nobody@buyer.example")) == 1


def test_without_a_system_log_a_report_is_still_taken(tmp_path: Path) -> None:
    """A socket named but not there is said on stderr; the default, quietly skipped."""
    policy = tmp_path / "relay.yaml"
    policy.write_text("version: 1\nplatform: [\n")
    done = _bounce(policy, b"", tmp_path / "nothing-here")
    assert f"relay bounce: no system log at {tmp_path / 'nothing-here'}: " in done.stderr


def test_a_report_cannot_forge_a_line_of_the_system_log(tmp_path: Path) -> None:
    """Addresses and texts in a report are the sender's: a line end in one is shown,
    not kept, as are the controls beyond ASCII; a line too long for a syslog
    daemon is cut, not lost."""
    with LogSocket(tmp_path / "log") as socket_log:
        system_log = SystemLog(str(socket_log.path), io.StringIO())
        system_log.say(logging.INFO, "x@buyer.example: bounced\nerp-relay/bounce[1]: forged")
        system_log.say(logging.INFO, "<a\u009b2J\u2028b@example>")
        system_log.say(logging.INFO, "y" * 10_000 + "@buyer.example: bounced")
        system_log.say(logging.INFO, "用" * 3_000 + "@buyer.example: bounced")
        system_log.close()
        forged, c1, long, wide = socket_log.lines()
    assert forged[:1] == (MAIL_INFO,)
    assert forged[2] == "x@buyer.example: bounced\\x0aerp-relay/bounce[1]: forged"
    assert c1[2] == "<a\\x9b2J\\u2028b@example>"
    assert long[2] == "y" * 4000 + f"... ({10_000 + 23 - 4000} more bytes)"
    assert wide[2] == "用" * 1333 + f"... ({3 * 3_000 + 23 - 3999} more bytes)"  # whole ones


def test_a_stream_socket_gets_each_line_ended_by_a_nul(tmp_path: Path) -> None:
    """Some syslog daemons listen on a stream socket: the C library's syslog()
    writes there when a datagram is refused, and so does the relay."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "log"))
        server.listen(1)
        server.settimeout(10)
        system_log = SystemLog(str(tmp_path / "log"), io.StringIO())
        system_log.say(logging.WARNING, "first")
        system_log.say(logging.INFO, "second")
        system_log.close()
        connection, _ = server.accept()
        with connection:
            received = b""
            while chunk := connection.recv(4096):
                received += chunk
    lines = received.split(b"\0")
    assert lines[-1] == b"" and len(lines) == 3
    assert lines[0].startswith(b"<20>erp-relay/bounce[") and lines[0].endswith(b"]: first")
    assert lines[1].startswith(b"<22>erp-relay/bounce[") and lines[1].endswith(b"]: second")


def test_a_socket_that_cannot_be_named_is_said_with_its_reason(tmp_path: Path) -> None:
    err = io.StringIO()
    SystemLog("/tmp/" + "d" * 120, err).close()
    assert err.getvalue().startswith("relay bounce: no system log at /tmp/ddd")
    assert "None" not in err.getvalue() and err.getvalue().rstrip().endswith("too long")


def test_one_report_delivered_several_times_at_once_is_taken_once(
    policy_file: Path, tmp_path: Path
) -> None:
    """A mail system delivers to a pipe in parallel, and a server that lost the
    relay's reply sends its report again: each run looked in the audit log
    before the others had written, and all recorded, listed and told."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    report = (FEEDBACK / "postfix-two-failed.eml").read_bytes()
    command = [sys.executable, "-m", "relay", "bounce", "-c", str(policy), "--syslog", "off"]
    runs = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        for _ in range(4)
    ]
    time.sleep(1)  # each has loaded the policy and waits for its standard input
    for run in runs:
        assert run.stdin is not None
        run.stdin.write(report)
    for run in runs:  # all at once, not one after the other's end
        assert run.stdin is not None
        run.stdin.close()
    outputs = []
    for run in runs:
        assert run.stdout is not None
        outputs.append(run.stdout.read().decode())  # a few lines: no pipe fills
        run.wait(timeout=60)
    assert [run.returncode for run in runs] == [0, 0, 0, 0]
    told = [out for out in outputs if "jan@acme.example told (notice " in out]
    assert len(told) == 1, outputs
    events = audit_events(policy, invoice)
    assert events.count(("bounced", "nobody@buyer.example")) == 1
    assert events.count(("bounced", "Full.Box@Supplier.example")) == 1
    settings = load(policy).suppression
    assert settings is not None
    assert settings.file.read_text().count('"nobody@buyer.example"') == 1


def test_a_report_waits_for_another_and_is_kept_when_it_waits_too_long(tmp_path: Path) -> None:
    held = os.open(tmp_path / command.LOCK_NAME, os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = pytest.raises(command.TakeBusy, match="another relay bounce held")
        with busy, command.one_at_a_time(tmp_path, wait=0.2):
            pass
        fcntl.flock(held, fcntl.LOCK_UN)
        with command.one_at_a_time(tmp_path, wait=0.2):
            pass
    finally:
        os.close(held)


def test_a_report_whose_lock_cannot_be_had_is_kept_for_later(
    policy_file: Path, tmp_path: Path
) -> None:
    """Exit 75, not a traceback: any other status, and the mail system returns
    the report to its null sender, that is to nobody, and the dead address is
    never listed."""
    policy = configure(policy_file, free_port(), free_port())
    state = load(policy).queue.directory.parent
    (state / command.LOCK_NAME).mkdir(parents=True)  # no lock can be taken on it
    done = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes())
    assert done.returncode == command.EX_TEMPFAIL, done.stderr
    assert done.stderr.startswith("relay bounce: not taken, try again later: cannot open ")
    assert "Traceback" not in done.stderr


def test_a_report_that_lists_nobody_is_taken_while_the_list_cannot_be_written(
    policy_file: Path, tmp_path: Path
) -> None:
    """A full mailbox (5.2.2) lists nobody, yet the empty write to a read-only
    list sent every such report back to the mail system's queue (exit 75)."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    settings = load(policy).suppression
    assert settings is not None
    SuppressionFile(settings.file).create()
    soft = (FEEDBACK / "postfix-two-failed.eml").read_bytes().replace(b"5.1.1", b"5.2.2")
    with read_only(settings.file, 0o444):
        taken = _bounce(policy, soft)
    assert taken.returncode == 0, taken.stderr
    assert ("bounced", "nobody@buyer.example") in audit_events(policy, invoice)
    assert _listed(policy) == {}


def test_a_report_while_the_queue_is_not_there_is_kept_for_later(
    policy_file: Path, tmp_path: Path
) -> None:
    """The notice goes into the queue: with the queue's directory not there (a
    state disk not mounted yet), the report must wait in the mail system's
    queue (75), not end in a traceback, which it returns to its null sender,
    that is to nobody, the dead address never listed."""
    policy, _ = _invoice_delivered(policy_file, tmp_path)
    queue = load(policy).queue.directory
    away = queue.with_name("queue.away")
    queue.rename(away)
    report = (FEEDBACK / "postfix-two-failed.eml").read_bytes()
    kept = _bounce(policy, report)
    assert kept.returncode == 75, kept.stderr
    assert "not taken, try again later" in kept.stderr and "no queue here" in kept.stderr
    assert _listed(policy) == {}
    away.rename(queue)
    taken = _bounce(policy, report)
    assert taken.returncode == 0, taken.stderr
    assert _listed(policy) == {"nobody@buyer.example": ("acme", "bounce")}


def test_a_bounce_finds_a_message_whose_message_id_was_folded(
    policy_file: Path, tmp_path: Path
) -> None:
    """The record kept " <id>" as the ERP folded it, which no report's ID matched:
    the bounce reached no message, listed nobody and told nobody."""
    with SinkServer(Sink()) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            rcpts = ("nobody@buyer.example", "Full.Box@Supplier.example")
            invoice = _send(port, "\r\n <4711.erp@acme.example>  ", rcpts)
            server.sink.wait(1)
    taken = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes())
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.splitlines()[0] == f"bounce about {invoice} (acme/jan)"
    assert "nobody@buyer.example" in _listed(policy)
    (received,) = search(load(policy).audit.directory, queue_id=invoice, status="received")
    assert received["message_id"] == "<4711.erp@acme.example>"  # as reports quote it


def test_a_delay_warning_leaves_the_bounce_after_it_to_list_the_address(
    policy_file: Path, tmp_path: Path
) -> None:
    """Exim's warning in words was taken for a bounce: the user was told, and
    the final bounce that came a day later was "already recorded", so a
    mailbox that does not exist was never listed."""
    sink = Sink()
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            queue_id = _send(port, "<4719.erp@acme.example>", ("slow@buyer.example",))
            sink.wait(1)
    warned = _bounce(policy, (FEEDBACK / "exim-delayed.eml").read_bytes())
    final = (FEEDBACK / "exim-failure.eml").read_bytes()
    final = final.replace(b"bob@", b"slow@").replace(b"4718", b"4719")
    bounced = _bounce(policy, final)
    assert (warned.returncode, warned.stdout) == (0, ""), warned.stderr
    assert bounced.returncode == 0, bounced.stderr
    assert bounced.stdout.splitlines()[:2] == [
        f"bounce about {queue_id} (acme/jan)",
        "slow@buyer.example: bounced (5.1.1), suppressed",
    ]
    assert _listed(policy) == {"slow@buyer.example": ("acme", "bounce")}
    assert audit_events(policy, queue_id).count(("bounced", "slow@buyer.example")) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_lock_root_makes_is_the_state_directorys_owners(tmp_path: Path) -> None:
    """``sudo relay bounce`` under root's umask left a lock only root could open:
    each later run of the service user's pipe was "not taken, try again later"."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    before = os.umask(0o077)
    try:
        with command.one_at_a_time(state, wait=0.2):
            pass
    finally:
        os.umask(before)
    info = os.stat(state / command.LOCK_NAME)
    assert (info.st_uid, info.st_gid) == (65534, 65534)
    assert info.st_mode & 0o777 == 0o600  # its owner opens it read-only


# imported as root, then another user: the interpreter may be where no other user may look
_TAKE = """import os, sys
from pathlib import Path
from relay.feedback import command
os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[2]))
try:
    with command.one_at_a_time(Path(sys.argv[1]), wait=0.5):
        print("taken")
except command.TakeBusy as exc:
    print(exc)
"""


@contextlib.contextmanager
def _lock_made_by_root(umask: int, mode: int) -> Iterator[Path]:
    """A state directory of nobody's (``mode``), where root took the lock under
    ``umask``; in a directory other users may reach (pytest's is root's alone)."""
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        state = Path(top) / "state"
        state.mkdir()
        os.chown(state, 65534, 65534)
        os.chmod(state, mode)
        before = os.umask(umask)
        try:
            with command.one_at_a_time(state, wait=0.2):
                pass
        finally:
            os.umask(before)
        yield state


def _take_as(state: Path, uid: int, gid: int) -> str:
    taken = subprocess.run(
        [sys.executable, "-c", _TAKE, str(state), str(uid), str(gid)],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    )  # fmt: skip
    return taken.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a command as another user")
def test_the_service_user_takes_the_lock_a_run_as_root_made() -> None:
    """The mail system's pipe runs as the service user (here ``nobody``, the state
    directory's owner): the lock ``sudo relay bounce`` left under root's umask,
    0600, is one that user opens and takes, not only one its owner is said to be."""
    with _lock_made_by_root(0o077, 0o700) as state:
        assert _take_as(state, 65534, 65534) == "taken\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a command as another user")
def test_a_member_of_the_state_directorys_group_cannot_hold_the_lock() -> None:
    """A log shipper in the service's group (a state directory made 0750 for it)
    opened the lock ``sudo relay bounce`` made under a umask of 022, 0644, and
    could hold it: every report after it waited its minute and went back to the
    mail system's queue. Only the service user and root take it."""
    with _lock_made_by_root(0o022, 0o750) as state:
        assert os.stat(state / command.LOCK_NAME).st_mode & 0o777 == 0o600
        said = _take_as(state, 65533, 65534)
        assert said == f"cannot open {state / command.LOCK_NAME}: Permission denied\n"


def test_a_report_over_the_limit_is_not_acted_on_in_part(policy_file: Path, tmp_path: Path) -> None:
    """Cut at the limit, a report was read as what was left of it, and acted on."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    report = (FEEDBACK / "postfix-two-failed.eml").read_bytes()
    padded = report + b"x" * (command.MAX_REPORT + 1 - len(report))  # after its last part
    with LogSocket(tmp_path / "log") as syslog:
        ignored = _bounce(policy, padded, syslog.path)
        ((pri, _, text),) = syslog.lines()
    assert (ignored.returncode, ignored.stdout) == (0, "")
    assert ignored.stderr == "relay bounce: larger than 64 MiB, the most a report may be: ignored\n"
    assert (pri, text) == (MAIL_WARNING, ignored.stderr[14:-1])
    assert _listed(policy) == {}
    assert ("bounced", "nobody@buyer.example") not in audit_events(policy, invoice)
    taken = _bounce(policy, padded[: command.MAX_REPORT])  # the most there may be
    assert taken.stdout.splitlines()[0] == f"bounce about {invoice} (acme/jan)", taken.stderr


@dataclass(frozen=True)
class _Delivered:
    sink: Sink
    port: int
    policy: Path
    queue_id: str
    header: bytes  # as the recipient got it: its Received names the queue ID


@contextlib.contextmanager
def _copied_invoice_delivered(
    policy_file: Path, tmp_path: Path, number: int
) -> Iterator[_Delivered]:
    """An invoice to buyer@example.org, with its sender's automatic copy, taken
    and delivered by a real relay, now stopped; the sink still up for the next
    start to deliver a notice to."""
    sink = Sink()
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            queue_id = send(port, _lone(number, copy=True), ("buyer@example.org",))
            (received,) = sink.wait(1)
        header = received.data.split(b"\r\n\r\n", 1)[0]
        yield _Delivered(sink, port, policy, queue_id, header)


def test_a_forged_bounce_of_the_senders_own_copy_does_not_silence_the_sender(
    policy_file: Path, tmp_path: Path
) -> None:
    """Anyone who got one document has its queue ID (the Received field) and its
    sender's address (Reply-To): a bounce they wrote of the sender's automatic
    copy listed the sender, who was told of no failed delivery again."""
    with _copied_invoice_delivered(policy_file, tmp_path, 4720) as delivered:
        policy, queue_id, header = delivered.policy, delivered.queue_id, delivered.header
    with LogSocket(tmp_path / "log") as syslog:
        forged = _bounce(policy, _dsn(header, "jan@acme.example"), syslog.path)
        logged = [(pri, text) for pri, _, text in syslog.lines()]
    assert forged.returncode == 0, forged.stderr
    said = (
        "jan@acme.example: bounced (5.1.1), not suppressed (user jan of acme: the relay's"
        " notices and copies are the user's; a mailbox really gone is taken out of the policy)"
    )
    head = f"bounce about {queue_id} (acme/jan)"
    assert forged.stdout.splitlines() == [
        head,
        said,
        "no notice: the report is about the sender's own copy",
    ]
    assert (MAIL_WARNING, f"{head}: {said}") in logged
    assert _listed(policy) == {}
    assert ("bounced", "jan@acme.example") in audit_events(policy, queue_id)
    real = _bounce(policy, _dsn(header, "buyer@example.org"))
    assert real.stdout.splitlines()[1] == "buyer@example.org: bounced (5.1.1), suppressed"
    assert real.stdout.splitlines()[2].startswith("jan@acme.example told (notice ")


def test_a_forged_bounce_cannot_name_the_document_in_the_senders_notice(
    policy_file: Path, tmp_path: Path
) -> None:
    """With subjects not on record, the notice took its Subject and "Document:"
    from the header the bounce returned, which its writer chose: a real queue ID
    (the Received field) under a forged Subject made the relay sign and send the
    sender "Undelivered: URGENT: ... new bank account", threaded under the real
    invoice. The notice names the document by what the relay has, and the
    reason by the status code, not the report's words."""
    with _copied_invoice_delivered(policy_file, tmp_path, 4722) as delivered:
        policy, queue_id, sink = delivered.policy, delivered.queue_id, delivered.sink
        header = delivered.header
        forged = b"Subject: URGENT: Invoice 6000 was not paid - new bank account NO93"
        header = header.replace(b"Subject: Invoice 4711", forged)
        assert forged in header
        report = _dsn(header, "buyer@example.org").replace(
            b"550 5.1.1 no such user", b"550 5.1.1 Our bank details changed: pay to NO93 today"
        )
        bounced = _bounce(policy, report)
        assert bounced.stdout.splitlines()[0] == f"bounce about {queue_id} (acme/jan)"
        with RelayProcess(policy, delivered.port, tmp_path / "again.log"):
            sink.wait(2)
    notice = next(m for m in sink.messages if m.rcpt_tos == ["jan@acme.example"])
    view = message_from_bytes(notice.data, policy=default)
    assert view["In-Reply-To"] == "<inv-4722@erp.acme.example>"
    assert str(view["Subject"]).startswith("Undelivered: your document to buyer@example.org, sent ")
    text = view.get_content()
    assert "URGENT" not in text and "bank" not in text and "URGENT" not in str(view["Subject"])
    assert "NO93" not in text  # nor the report's diagnostic, which is as much its writer's
    lines = text.splitlines()
    assert "Document:   (its subject was not recorded; the date and recipients name it)" in lines
    assert not any(line.startswith("Sent:") for line in lines)  # the document's Date: not known
    assert any(line.startswith("Received:") and "by the mail relay" in line for line in lines)
    assert f"Queue ID:   {queue_id}" in lines


def test_a_notice_is_signed_with_the_keys_of_the_relay_that_sends_it(
    policy_file: Path, tmp_path: Path, dns_records: dict[str, str]
) -> None:
    """A key rotation: the file names the new selector s5 before its DNS record is
    published and the relay reloads. relay bounce reads the file, and its notice
    went out signed by s5, failing DKIM while the relay's own mail passed."""
    sink = Sink()
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            _send_invoice(port)
            (invoice,) = sink.wait(1)
            make_key(tmp_path / "keys", "platform.example", "s5")
            text = policy.read_text()
            policy.write_text(text.replace("selector: s1", "selector: s5").replace(
                "platform.example.s1.private", "platform.example.s5.private"
            ))  # fmt: skip
            bounced = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes())
            notice_id = bounced.stdout.split("(notice ")[1].rstrip(")\n")
            listed = relay_cli(policy, "queue", "list", "--json").stdout.splitlines()
            (stored,) = [r["dkim"] for r in map(json.loads, listed) if r["queue_id"] == notice_id]
            assert stored == ["platform.example/s5", "platform.example/e1"]  # made anew as it goes
            assert RESIGNED in relay_cli(policy, "queue", "show", notice_id).stdout
            relay_cli(policy, "queue", "retry", notice_id)  # now, not at the next rescan
            notice = sink.wait(2)[1]
    assert notice.rcpt_tos == ["jan@acme.example"]
    assert dkimpy_verify(invoice.data, dns_records)
    assert b"s=s1;" in notice.data.replace(b" ", b"")
    assert dkimpy_verify(notice.data, dns_records)


def _arf_about_the_invoice(feedback_type: bytes) -> bytes:
    """yahoo-arf.eml about ``_send_invoice``'s document, complained of by
    nobody@, with ``feedback_type`` as its Feedback-Type line (empty: none)."""
    return (
        (FEEDBACK / "yahoo-arf.eml")
        .read_bytes()
        .replace(b"Feedback-Type: abuse\n", feedback_type)
        .replace(b"<Buyer.Desk@yahoo-mail.example>", b"<nobody@buyer.example>")
        .replace(b"<4716.erp@acme.example>", b"<4711.erp@acme.example>")
    )


@pytest.mark.parametrize("feedback_type", [b"", b"Feedback-Type: not-spam\n"])
def test_a_feedback_report_without_its_type_is_ignored_as_not_spam_is(
    policy_file: Path, tmp_path: Path, feedback_type: bytes
) -> None:
    """RFC 5965 requires Feedback-Type; a report without it was taken for abuse:
    the customer suppressed and the sender told of a complaint nobody made."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    taken = _bounce(policy, _arf_about_the_invoice(feedback_type))
    assert (taken.returncode, taken.stdout) == (0, "")
    assert taken.stderr == "relay bounce: neither a bounce nor a complaint: ignored\n"
    assert _listed(policy) == {}
    assert ("complained", "nobody@buyer.example") not in audit_events(policy, invoice)
    assert relay_cli(policy, "queue", "list", "--json").stdout == ""  # nobody told


def test_a_complaint_naming_no_recipient_is_taken_about_its_message(
    policy_file: Path, tmp_path: Path
) -> None:
    """Microsoft's feedback loop names nobody: the report is still a complaint,
    found by its Message-ID and said so, not ignored as neither a bounce nor
    a complaint. The invoice went to two, so nobody is listed."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    report = (FEEDBACK / "microsoft-jmrp.eml").read_bytes()
    taken = _bounce(policy, report.replace(b"<4717.erp@acme.example>", b"<4711.erp@acme.example>"))
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.splitlines() == [
        f"complaint about {invoice} (acme/jan)",
        "names no recipient, and its message went to 3 (the sender's own copy among them):"
        " which one complained is not known, none is suppressed",
    ]
    assert _listed(policy) == {}


def test_a_bounce_cut_short_is_recorded_each_time_as_a_second_may_be_another(
    policy_file: Path, tmp_path: Path
) -> None:
    """A DSN cut off before the header it returns names no message: known by its
    recipient, a second, genuine bounce of the same address about another
    message was taken for the first and never recorded."""
    policy, _ = _invoice_delivered(policy_file, tmp_path)
    whole = (FEEDBACK / "postfix-two-failed.eml").read_bytes()
    cut = whole.split(b"Content-Description: Undelivered Message", 1)[0]
    other = cut.replace(b"5.1.1", b"5.1.2")  # another failure, a week later say
    first, second = _bounce(policy, cut), _bounce(policy, other)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert "already recorded" not in second.stdout
    bounced = search(load(policy).audit.directory, status="bounced")
    assert sorted(r["recipient"] for r in bounced).count("nobody@buyer.example") == 2


def test_a_bounce_about_a_message_the_audit_log_does_not_have_names_the_log(
    policy_file: Path, tmp_path: Path
) -> None:
    """Staging's policy file given for production's: a pipe discards what an exit
    0 printed, and the system log said only that the audit log did not have
    it, as for a forged report."""
    policy, _ = _invoice_delivered(policy_file, tmp_path)
    staging, staging_port = tmp_path / "staging.yaml", free_port()
    text = re.sub(r"port: \d+", f"port: {staging_port}", policy.read_text(), count=1)
    staging.write_text(text + f"state_directory: {tmp_path / 'staging'}\n")
    with RelayProcess(staging, staging_port, tmp_path / "staging.log"):
        pass  # its own state, its audit log holding none of production's mail
    with LogSocket(tmp_path / "log") as syslog:
        done = _bounce(staging, (FEEDBACK / "postfix-two-failed.eml").read_bytes(), syslog.path)
        logged = syslog.lines()
    assert done.returncode == 0, done.stderr
    head = (
        f"bounce about a message the audit log in {tmp_path / 'staging' / 'audit'} does not"
        " have (Message-ID <4711.erp@acme.example>)"
    )
    assert done.stdout.splitlines()[0] == head
    assert logged and all(text.startswith(f"{head}: ") for _, _, text in logged), logged


@pytest.mark.parametrize(("max_recipients", "left", "most"), [(None, 201, 101), (200, 101, 201)])
def test_a_bounce_naming_more_recipients_than_a_message_has_says_how_many_were_left(
    policy_file: Path, tmp_path: Path, max_recipients: int | None, left: int, most: int
) -> None:
    """Blocks past the most the relay acts on are not read at all (a forged DSN
    of 600,000 took a minute and a GB); the command still says how many. A
    listener that takes 200 recipients a message: a report is read for as
    many (and the sender's copy), not for the 100 a policy without any has."""
    if max_recipients is not None:
        policy_file.write_text(
            policy_file.read_text().replace(
                "    auth: optional\n",
                f"    auth: optional\n    max_recipients: {max_recipients}\n",
                1,
            )
        )
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    report = (FEEDBACK / "postfix-two-failed.eml").read_bytes()
    more = b"".join(
        b"Final-Recipient: rfc822; x%d@example.org\nAction: failed\nStatus: 5.1.1\n\n" % n
        for n in range(300)
    )
    end = b"\n--4F2A31C0E5.1795511702/mail.platform.example\nContent-Description: Undelivered"
    done = _bounce(policy, report.replace(end, b"\n" + more + end[1:], 1))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"bounce about {invoice} (acme/jan)"
    assert lines[-1] == (
        f"{left} more recipients not acted on: a report is taken for at most {most},"
        " as many as one message goes to"
    )
    assert _listed(policy) == {"nobody@buyer.example": ("acme", "bounce")}


def _bounce_as_an_admin_adds(
    policy: Path, monkeypatch: pytest.MonkeyPatch, *add: str
) -> tuple[str, str, Suppression]:
    """``relay bounce`` of postfix-two-failed.eml, with ``relay suppression add
    nobody@buyer.example ADD...`` run just after the bounce read the list: what
    the add said, what the bounce said of nobody@, and the one entry listed."""
    read = SuppressionFile.current
    added: list[subprocess.CompletedProcess[str]] = []

    def read_then_added(self: SuppressionFile) -> object:
        found = read(self)
        if not added:
            added.append(relay_cli(policy, "suppression", "add", "nobody@buyer.example", *add))
        return found

    monkeypatch.setattr(SuppressionFile, "current", read_then_added)
    out, err = io.StringIO(), io.StringIO()
    report = io.BytesIO((FEEDBACK / "postfix-two-failed.eml").read_bytes())
    assert command.main(policy, report, out, err, "off") == 0, err.getvalue()
    (said,) = (line for line in out.getvalue().splitlines() if line.startswith("nobody@"))
    settings = load(policy).suppression
    assert settings is not None
    (entry,) = SuppressionFile(settings.file).entries().entries
    return added[0].stdout, said, entry


NOT_SUPPRESSED = (
    "nobody@buyer.example: bounced (5.1.1), not suppressed (on the list already, since "
)


def test_a_bounce_keeps_an_entry_a_sysadmin_adds_as_it_is_taken(
    policy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounce read the list, a sysadmin's ``relay suppression add`` came
    in between, and the bounce's entry replaced the sysadmin's: its reason,
    note and author gone. The list keeps an address's first entry."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    complaint = ("--tenant", "acme", "--reason", "complaint", "--note", "customer asked")
    added, said, entry = _bounce_as_an_admin_adds(policy, monkeypatch, *complaint)
    assert added == "nobody@buyer.example: added (complaint, tenant acme)\n"
    assert said.startswith(NOT_SUPPRESSED)
    assert (entry.reason, entry.detail) == ("complaint", "customer asked")
    assert ("listed", "nobody@buyer.example") not in audit_events(policy, invoice)


def test_a_bounce_adds_no_tenant_entry_beside_one_for_every_tenant(
    policy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sysadmin listed the address for every tenant as the bounce was
    taken: under the lock only the tenant's own entry was looked for, and the
    bounce wrote one beside it, recorded as listed, though the entry for
    every tenant kept the address from the tenant's mail already."""
    policy, invoice = _invoice_delivered(policy_file, tmp_path)
    added, said, entry = _bounce_as_an_admin_adds(policy, monkeypatch)
    assert added == "nobody@buyer.example: added (manual, all tenants)\n"
    assert said.startswith(NOT_SUPPRESSED)
    assert (entry.tenant, entry.reason) == (None, "manual")
    assert ("listed", "nobody@buyer.example") not in audit_events(policy, invoice)
