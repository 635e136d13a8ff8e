"""``relay bounce``: one bounce or complaint from standard input, as a mail
system's pipe to a program hands it over (a Postfix alias
``bounces: "|relay bounce -c /etc/erp-relay/relay.yaml"``).

The exit status is the mail system's: 0 taken (acted on, or nothing to act
on: a bounce address also gets auto-replies and spam, which must not bounce
back), 75 (EX_TEMPFAIL) when the relay's state or policy cannot take it
now, so the mail system keeps the report and tries again later.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, TextIO

from relay.audit import AuditError
from relay.errors import PolicyError
from relay.feedback.act import act
from relay.feedback.parse import read
from relay.policy.load import load
from relay.record import Recorder, audit_log
from relay.spool import Spool, SpoolError
from relay.suppression import SuppressionError, SuppressionFile

EX_TEMPFAIL = 75
MAX_REPORT = 64 << 20  # a bounce returns the whole message: one of the largest the relay sends


def main(policy_path: Path, source: BinaryIO, out: TextIO, err: TextIO) -> int:
    try:
        policy = load(policy_path)
    except PolicyError as exc:
        err.write("\n".join(exc.problems) + "\nrelay bounce: not taken, try again later\n")
        return EX_TEMPFAIL
    raw = source.read(MAX_REPORT + 1)
    report = read(raw[:MAX_REPORT])
    if report is None:
        err.write("relay bounce: neither a bounce nor a complaint: ignored\n")
        return 0
    assert policy.suppression is not None  # a loaded policy has one
    try:
        with audit_log(policy.audit) as audit:
            spool = Spool(policy.queue.directory, create=False)
            outcome = act(
                policy, report, Recorder(audit), SuppressionFile(policy.suppression.file), spool
            )
    except (AuditError, SuppressionError, SpoolError) as exc:
        err.write(f"relay bounce: not taken, try again later: {exc}\n")
        return EX_TEMPFAIL
    about = outcome.original
    head = (
        f"{report.kind} about {about.queue_id} ({about.tenant}/{about.user})"
        if about is not None
        else f"{report.kind} about a message the audit log does not have"
        f" (Message-ID {report.message_id or 'not given'})"
    )
    out.write("".join(f"{line}\n" for line in [head, *outcome.lines]))
    return 0
