"""The aiosmtpd handler of one listener: envelope checks, then the pipeline.

The policy is fetched once per message through ``current_policy``, so a
reload takes effect between transactions and a message never sees two
policies. Whatever goes wrong inside the pipeline, the client gets a
definite reply: the pipeline's own refusal, or ``451 4.3.0`` for anything
unexpected, and never a 250 for a message the relay did not take.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import tally
from relay.audit import AuditError
from relay.errors import SmtpReply
from relay.ingress import content
from relay.ingress.address import RECIPIENT, SENDER, mailbox_refusal
from relay.ingress.auth import Mechanisms
from relay.ingress.authcache import Verified
from relay.ingress.authlimit import AuthFailures
from relay.ingress.diskspace import DiskGuard, reserve_for
from relay.ingress.protocol import RelaySMTP, hook_names, submission_of
from relay.policy.model import AuthMode, Listener, Policy
from relay.spool import SpoolError
from relay.submission import Submission, listed, log_refused
from relay.tally import TallyRow

log = logging.getLogger("relay")

Process = Callable[[Policy, Submission], Awaitable[str]]
#: Puts on record a message the SMTP side refused for its content.
Refused = Callable[[Submission, SmtpReply], Awaitable[None]]

LOCAL_ERROR = "451 4.3.0 Local error, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"

_REPLY = re.compile(r"[2-5][0-9][0-9]( [^\x00-\x1f\x7f]*)?")


class RelayHandler(Mechanisms):
    def __init__(
        self,
        listener: Listener,
        current_policy: Callable[[], Policy],
        process: Process,
        in_flight: set[asyncio.Task[str]] | None = None,
        verified: Verified | None = None,
        failures: AuthFailures | None = None,
        refused: Refused | None = None,
        disk: DiskGuard | None = None,
        tally: TallyRow | None = None,
    ) -> None:
        self._listener = listener
        self._tally = tally
        self._current_policy = current_policy
        self._process = process
        self._in_flight = in_flight if in_flight is not None else set()
        self._verified = verified if verified is not None else Verified()
        self._failures = failures if failures is not None else AuthFailures()
        self._refused = refused
        self._disk = disk if disk is not None else DiskGuard()

    def __dir__(self) -> list[str]:
        """See ``RelaySMTP.__dir__``: aiosmtpd looks for its hooks here on every connection."""
        return hook_names(self, ("auth_", "handle_"))

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to an EHLO hook
        if self._listener.auth is AuthMode.OFF:
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        if responses:  # every other reply has an RFC 3463 code (``RelaySMTP``)
            responses = [*responses[:-1], "250-ENHANCEDSTATUSCODES", responses[-1]]
        # aiosmtpd writes each line it is given on its own: one system call, and
        # one wake-up of the client, per line of a reply sent on every connection
        return ["\r\n".join(responses)] if responses else responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        given = _path_as_given(server)
        refused = None if address == "<>" else mailbox_refusal(address, SENDER, given)
        if refused is not None:
            return refused.line
        full = self._no_room(self._current_policy(), _declared_size(options))
        if full is not None:
            return full.line
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refused = mailbox_refusal(address, RECIPIENT, _path_as_given(server))
        if refused is not None:
            return refused.line
        if listed(address, envelope.rcpt_tos):
            return "250 2.1.5 OK, a recipient already given: sent once"
        if len(envelope.rcpt_tos) >= self._listener.max_recipients:
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        hung_up = server.hung_up if isinstance(server, RelaySMTP) else None
        submission = submission_of(self._listener.name, session, envelope, data, hung_up)
        policy = self._current_policy()
        refusal = content.refusal(data) or self._no_room(policy, len(data))
        if refusal is not None:
            log_refused(submission, refusal.line)
            if self._refused is not None:
                await self._refused(submission, refusal)
            return refusal.line
        self._disk.charge(_state(policy), len(data))
        task = asyncio.ensure_future(self._reply_for(policy, submission))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        try:
            if isinstance(server, RelaySMTP):
                with server.processing():
                    return await asyncio.shield(task)
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The client went away (or we are stopping): the delivery goes on
            # rather than being cut off half-way; say how it ended.
            task.add_done_callback(lambda t: _log_orphan(t, submission))
            raise

    async def handle_exception(self, error: Exception) -> str:
        """Failed TLS handshakes are logged by ``RelaySMTP``, which has the client."""
        log.error("SMTP session error", exc_info=error)
        return LOCAL_ERROR

    def _no_room(self, policy: Policy, size: int) -> SmtpReply | None:
        """Counted for the metrics: a refusal at MAIL leaves no audit record (there
        is no message yet, and the disk is full), and was seen nowhere else."""
        reserve = reserve_for(self._listener.max_message_size)
        refusal = self._disk.refusal(_state(policy), reserve, size)
        if refusal is not None and self._tally is not None:
            self._tally.add(tally.NO_ROOM, self._listener.name)
        return refusal

    async def _reply_for(self, policy: Policy, submission: Submission) -> str:
        try:
            reply = await self._process(policy, submission)
        except SmtpReply as refused:
            if _out_of_space(refused) and self._tally is not None:
                self._tally.add(tally.NO_ROOM, self._listener.name)
            return refused.line
        except Exception:
            log.exception(
                "processing failed client=%s login=%s from=<%s>",
                submission.client_address,
                submission.auth_login or "-",
                submission.mail_from,
            )
            return LOCAL_ERROR
        if not isinstance(reply, str) or not _REPLY.fullmatch(reply):
            log.error("pipeline returned an unusable reply %r; answering 451", reply)
            return LOCAL_ERROR
        return reply


def _out_of_space(refused: SmtpReply) -> bool:
    """The spool or the audit log ran out of space as the message was written: the
    reserve's check had let it in, and the 452 was counted nowhere."""
    return refused.status == "4.3.1" and isinstance(refused.__cause__, SpoolError | AuditError)


def _state(policy: Policy) -> tuple[Path, Path]:
    """Where a message is written: the spool and the audit log."""
    return policy.queue.directory, policy.audit.directory


def _declared_size(options: list[str]) -> int:
    """The client's ``SIZE=`` (RFC 1870), 0 if it gave none; of two, the larger,
    as the size limit takes it (``RelaySMTP._getparams``)."""
    sizes = [v for n, _, v in (o.partition("=") for o in options) if n.upper() == "SIZE"]
    return max((int(v) for v in sizes if v.isdigit()), default=0)


def _path_as_given(server: SMTP) -> str | None:
    """The path of this command as the client wrote it."""
    return server.path_as_given() if isinstance(server, RelaySMTP) else None


def _log_orphan(task: asyncio.Task[str], submission: Submission) -> None:
    outcome = "cancelled" if task.cancelled() else task.result()
    log.warning(
        "client=%s from=<%s> left before the reply; it would have been: %s",
        submission.client_address,
        submission.mail_from,
        outcome,
    )
