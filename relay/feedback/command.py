"""``relay bounce``: one bounce or complaint from standard input, as a mail
system's pipe to a program hands it over (a Postfix alias
``bounces: "|relay bounce -c /etc/erp-relay/relay.yaml"``).

The exit status is the mail system's: 0 taken (acted on, or nothing to act
on: a bounce address also gets auto-replies and spam, which must not bounce
back), 75 (EX_TEMPFAIL) when the relay's state or policy cannot take it
now, so the mail system keeps the report and tries again later. While the
policy file does not load, the policy the relay runs stands in for it,
where the relay keeps its text.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from relay import statefiles
from relay.audit import AuditError
from relay.errors import PolicyError, RelayError
from relay.feedback.act import act, most_recipients
from relay.feedback.parse import read
from relay.feedback.syslog import DEFAULT, SystemLog
from relay.policy.load import load
from relay.policy.model import Policy
from relay.policy.running import running_policy
from relay.record import Recorder, audit_log
from relay.spool import Spool, SpoolError
from relay.suppression import SuppressionError, SuppressionFile

EX_TEMPFAIL = 75
MAX_REPORT = 64 << 20  # a bounce returns the whole message: one of the largest the relay sends
LOCK_NAME = "bounce.lock"
LOCK_WAIT = 60.0  # seconds; the mail system's pipe has its own time limit (Postfix: 1000 s)


class TakeBusy(RelayError):
    pass


@contextlib.contextmanager
def one_at_a_time(state_directory: Path, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Reports are taken one after the other: each looks in the audit log for
    what an earlier one did, and the same report delivered twice at once (a
    mail system delivers to a pipe in parallel, a server that lost the reply
    sends again) was recorded, listed and told twice."""
    path = state_directory / LOCK_NAME
    fd = _open_lock(path)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TakeBusy(f"another relay bounce held {path} for {wait:g} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    """Read-only: a lock needs no more, so root's run and the service user's
    share it. One root makes is the state directory's owner's, as the state's
    other files are: left root's under root's umask (027, 077), it kept every
    later run of the service user's pipe out, each report back in the mail
    system's queue. 0600 whatever the umask: made 0644, anyone who may read
    the state directory (its group, for a log shipper) could hold it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | statefiles.NOFOLLOW, 0o600)
    except OSError as exc:
        raise TakeBusy(f"cannot open {path}: {exc.strerror}") from exc
    try:
        statefiles.adopt(fd, statefiles.owner_for(os.stat(path.parent)))
    except OSError as exc:
        os.close(fd)
        raise TakeBusy(f"cannot give {path} to the state's owner: {exc.strerror}") from exc
    return fd


def main(
    policy_path: Path, source: BinaryIO, out: TextIO, err: TextIO, syslog: str = DEFAULT
) -> int:
    """``syslog``: the system log's socket, or ``off``; each outcome goes there too."""
    system_log = SystemLog(syslog, err)
    try:
        return _take(policy_path, source, out, err, system_log)
    finally:
        system_log.close()


def _take(
    policy_path: Path, source: BinaryIO, out: TextIO, err: TextIO, system_log: SystemLog
) -> int:
    def not_taken(said: str, why: str) -> int:
        err.write(said)
        system_log.say(logging.WARNING, f"not taken, the mail system keeps it: {why}")
        return EX_TEMPFAIL

    try:
        policy = load(policy_path)
    except PolicyError as exc:
        running = _running_instead(policy_path, exc.problems, err, system_log)
        if running is None:
            problems = "\n".join(exc.problems)
            said = f"{problems}\nrelay bounce: not taken, try again later\n"
            return not_taken(said, "; ".join(exc.problems))
        policy = running
    raw = source.read(MAX_REPORT + 1)
    if len(raw) > MAX_REPORT:
        return _too_large(err, system_log)
    report = read(raw, most_recipients(policy))
    if report is None:
        err.write("relay bounce: neither a bounce nor a complaint: ignored\n")
        system_log.say(logging.INFO, "neither a bounce nor a complaint: ignored")
        return 0
    assert policy.suppression is not None  # a loaded policy has one
    try:
        with one_at_a_time(policy.queue.directory.parent), audit_log(policy.audit) as audit:
            spool = Spool(policy.queue.directory, create=False)
            outcome = act(
                policy, report, Recorder(audit), SuppressionFile(policy.suppression.file), spool
            )
    except (AuditError, SuppressionError, SpoolError, TakeBusy) as exc:
        return not_taken(f"relay bounce: not taken, try again later: {exc}\n", str(exc))
    about = outcome.original
    if about is not None:
        head = f"{report.kind} about {about.queue_id} ({about.tenant}/{about.user})"
    elif outcome.candidates:
        head = f"{report.kind} about Message-ID {report.message_id}, which is not one message's"
    else:
        head = (
            # which log: another relay's policy file (staging's) finds none of production's
            f"{report.kind} about a message the audit log in {policy.audit.directory} does not"
            f" have (Message-ID {report.message_id or 'not given'})"
        )
    out.write("".join(f"{line}\n" for line in [head, *outcome.lines]))
    for line in outcome.lines or [""]:
        level = logging.WARNING if line in outcome.warnings else logging.INFO
        system_log.say(level, f"{head}: {line}" if line else head)
    return 0


def _running_instead(
    path: Path, problems: list[str], err: TextIO, system_log: SystemLog
) -> Policy | None:
    """While the file does not load (an edit the relay refused at its reload),
    the policy the relay runs, as the queue and audit tools go by it: every
    report deferred until the file was fixed left the relay sending to the
    addresses that bounced. Said in the system log too, where the mail
    system throws away what a command that succeeded printed. None when the
    relay keeps no text of it (one process) or that no longer loads whole
    (a DKIM key it names, changed since)."""
    running = running_policy(path)
    if running is None:
        return None
    policy, kept = running
    said = f"{path} does not load, so this goes by the policy the relay runs or last ran ({kept})"
    err.write(f"{problems[0]}\nrelay bounce: {said}\n")
    system_log.say(logging.WARNING, f"{said}: {problems[0]}")
    return policy


def _too_large(err: TextIO, system_log: SystemLog) -> int:
    """Not acted on at all: cut at the limit, a report was read as what was left
    of it. Taken (0), as what is neither a bounce nor a complaint: the same
    bytes would not fit at a retry, and a refusal returns it to its null
    sender, that is to nobody. Postfix takes the unread rest's broken pipe
    after an exit 0 as delivered."""
    said = f"larger than {MAX_REPORT >> 20} MiB, the most a report may be: ignored"
    err.write(f"relay bounce: {said}\n")
    system_log.say(logging.WARNING, said)
    return 0
