"""The ``relay`` command line: serve, check, preview, dkim keygen and check, passwd,
upstream test, and the state tools.

Heavy imports stay inside the subcommands so ``relay --help`` and
``relay check`` start quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from relay.errors import OutputError
from relay.listinput import ListInputError, read_lines

if TYPE_CHECKING:
    from relay.policy.load import StateSettings
    from relay.policy.model import Policy
    from relay.spool import QueueEntry, Spool
    from relay.spool.tools import Outcome

EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_IOERR = 74
EX_CONFIG = 78
#: 128 + SIGPIPE, as a shell shows a command a closed pipe ended: for the
#: commands whose exit 1 says something of what they checked
EX_PIPE = 141
_STOPS = {signal.SIGTERM, signal.SIGINT}
_PIPE_STATUS = " 141 the reader went away before all was written (| head)."


def main(argv: Sequence[str] | None = None) -> int:
    # A container's init (PID 1): the kernel drops a signal it has no handler
    # for, and ``docker stop`` as the relay started came to SIGKILL. Held from
    # here, before the parser is built, until ``relay serve`` handles them.
    init = os.getpid() == 1
    if init:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    parser = _parser()
    args = parser.parse_args(argv)
    if init and getattr(args, "run", None) is not _serve:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    if not hasattr(args, "run"):
        getattr(args, "group", parser).print_help()
        return EX_USAGE
    if args.run is _serve:
        return int(args.run(args))
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = _Output(stdout or _Closed(), utf8=_for_programs(args))  # type: ignore[assignment]
    sys.stderr = _Errors(stderr) if stderr is not None else _Lost()  # type: ignore[assignment]
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # what is still buffered meets the closed pipe here, not at exit
        return code
    except BrokenPipeError:
        # the reader went away (``relay queue list | head``): no traceback, as the
        # Python documentation's note on SIGPIPE does it
        _drop_output(stdout)
        return int(getattr(args, "pipe_status", 1))
    except KeyboardInterrupt:  # Ctrl-C: the user knows, a traceback tells them nothing
        return 130
    except OutputError as exc:
        # ``> /dev/full``: exit 1 would read as "nothing found" or "tampered"
        _drop_output(stdout)
        _report(f"relay: cannot write the output: {exc.strerror or exc}")
        return EX_IOERR
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _for_programs(args: argparse.Namespace) -> bool:
    """JSON and CSV are read by programs (jq, a spreadsheet, verify-style tools),
    which take UTF-8 whatever the locale, as the audit log stores its lines."""
    return bool(getattr(args, "json", False)) or getattr(args, "format", None) in ("json", "csv")


class _Output:
    """Standard output, its write errors raised as OutputError: a command that
    catches OSError for what it reads tells them apart. Text for a person is in
    the locale's encoding, a character it lacks escaped (``\\u20ac``), as a
    Latin-1 terminal ended the command with a traceback; ``utf8`` output is
    UTF-8 whatever the locale."""

    def __init__(self, stream: TextIO, *, utf8: bool = False) -> None:
        self._stream = stream
        if isinstance(stream, io.TextIOWrapper):  # not a test's StringIO
            stream.reconfigure(encoding="utf-8" if utf8 else None, errors="backslashreplace")

    def write(self, text: str) -> int:
        with _as_output_error():
            return self._stream.write(text)

    def flush(self) -> None:
        with _as_output_error():
            self._stream.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _as_output_error() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise  # the reader went away: ended quietly in ``main``
    except OSError as exc:
        raise OutputError(exc.errno, exc.strerror) from exc


class _Closed(io.TextIOBase):
    """A standard stream whose descriptor was closed (``>&-``), where Python has
    None: writing to None was an AttributeError traceback, exit 1. Written to,
    it fails as a full disk does, so the command ends with exit 74."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


class _Lost(io.TextIOBase):
    """Standard error closed (``2>&-``): print() to None writes to stdout, and an
    error went into the command's output. Its messages are lost; the exit
    status says it alone (``relay check``'s, whose output they are, is 74)."""

    def write(self, text: str) -> int:
        return len(text)


class _Errors:
    """Standard error, its write errors dropped (``2> /dev/full``): a tool's
    message then ended in a traceback and exit 1, read as "not found". Its exit
    status says what happened; ``relay check``, whose report this is, writes to
    ``wrapped`` and exits 74."""

    def __init__(self, wrapped: TextIO) -> None:
        self.wrapped = wrapped

    def write(self, text: str) -> int:
        try:
            self.wrapped.write(text)
            self.wrapped.flush()
        except OSError:
            _drop_output(self.wrapped)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self.wrapped.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)


def _drop_output(stream: TextIO | None) -> None:
    """What is still buffered would fail again at exit, with a message of its own."""
    if stream is None:  # closed: nothing was buffered
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())


def _report(text: str) -> None:
    """Said on standard error, unless that is what failed (``relay check``'s
    report goes there): then the exit status says it alone, as exit 1 read
    as a traceback's."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        _drop_output(sys.stderr)


class _Parser(argparse.ArgumentParser):
    """An unknown option is told with the usage of the command it was given to
    (``usage: relay check [-h] -c FILE``), as a missing one is: argparse hands
    it up to the whole program's parser, whose usage names no option of it.
    Its subcommands' parsers are of this class too (``add_subparsers``)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay", description="SMTP relay for legacy business systems.")
    parser.add_argument("--version", action=_Version, help="print the installed version")
    sub = parser.add_subparsers(metavar="COMMAND")

    text = (
        "run the relay daemon: take mail on the policy's listeners, queue, sign and deliver"
        " it; SIGHUP reloads the policy, SIGTERM stops. Its log is on stderr."
    )
    serve = sub.add_parser("serve", help="run the relay daemon", description=text,
                           epilog=_SERVE_STATUS)  # fmt: skip
    _policy_option(serve)
    serve.set_defaults(run=_serve)

    text = (
        "validate a policy file and the files it names: every problem as FILE:LINE:COL:"
        " path: message, and warnings, on stderr; an ok line with its version on stdout"
    )
    check = sub.add_parser("check", help="validate a policy file", description=text,
                           epilog=_CHECK_STATUS)  # fmt: skip
    _policy_option(check)
    check.set_defaults(run=_check)

    text = "whether the relay runs, whether it runs the policy file as it reads now, its queue"
    status = sub.add_parser("status", help=text, description=text, epilog=_STATUS_STATUS)
    _policy_option(status)
    status.set_defaults(run=_status, pipe_status=EX_PIPE)

    text = (
        "show what the policy does to a message, without sending it: the user and document"
        " found, the headers as sent, the signatures and recipients, and why"
    )
    preview = sub.add_parser(
        "preview",
        help="show what the policy does to a message, without sending it",
        description=text,
        epilog=_PREVIEW_STATUS,
    )
    _policy_option(preview)
    preview.add_argument("message", type=Path, help="the message as an .eml file")
    preview.add_argument("--auth-login", help="act as if the client logged in as this")
    preview.add_argument(
        "--mail-from", help="envelope sender (default: the From address; <> for none)"
    )
    preview.add_argument(
        "--rcpt", action="append", default=[], help="envelope recipient (default: To, Cc, Bcc)"
    )
    preview.add_argument(
        "--listener",
        metavar="NAME",
        help="check the message against this listener's limits (default: the only one, or"
        " the most permissive of them)",
    )
    preview.add_argument("--json", action="store_true", help="print one JSON object")
    preview.set_defaults(run=_preview, pipe_status=EX_PIPE)

    dkim = _group(sub, "dkim", "DKIM key tools")
    text = (
        "create a signing key (mode 0600) and print the DNS TXT record to publish; a key"
        " is never overwritten"
    )
    keygen = dkim.add_parser(
        "keygen",
        help="create a signing key and print its DNS record",
        description=text,
        epilog=_KEYGEN_STATUS,
    )
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument(
        "--selector",
        required=True,
        help="the key's name (s=): its record is SELECTOR._domainkey.DOMAIN, its file"
        " DOMAIN.SELECTOR.private",
    )
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, help="RSA key size, 1024..4096 (default 2048)")
    keygen.add_argument("--directory", type=Path, default=Path("."), help="where to write it")
    keygen.set_defaults(run=_keygen)
    text = (
        "look up each policy key's DNS record and check that it publishes that key:"
        " a message signed with it must verify"
    )
    check_dns = dkim.add_parser("check", help=text, description=text, epilog=_DKIM_CHECK_STATUS)
    _policy_option(check_dns)
    check_dns.add_argument(
        "--nameserver",
        type=_nameserver,
        metavar="ADDRESS[:PORT]",
        help="ask this DNS server (e.g. the domain's own) instead of the system's resolver",
    )
    check_dns.set_defaults(run=_dkim_check, pipe_status=EX_PIPE)

    text = (
        "hash an AUTH password for the policy's logins: asked for twice on a terminal;"
        " otherwise the first line of stdin is the password (its line end and a"
        " byte-order mark left out)"
    )
    passwd = sub.add_parser(
        "passwd",
        help="hash an AUTH password for the policy's logins",
        description=text,
        epilog=_PASSWD_STATUS,
    )
    passwd.set_defaults(run=_passwd)
    _upstream_parsers(sub)
    _queue_parsers(sub)
    _audit_parsers(sub)
    _suppression_parsers(sub)
    text = (
        "act on a bounce or spam complaint read from stdin: record it, suppress the"
        " address, tell the sender (for a mail system's pipe to the return_path)"
    )
    from relay.feedback import syslog

    bounce = sub.add_parser("bounce", help=text, description=text, epilog=_BOUNCE_STATUS)
    _policy_option(bounce)
    bounce.add_argument(
        "--syslog",
        metavar="SOCKET",
        default=syslog.DEFAULT,
        help="the system log's socket, where each outcome is logged under the mail facility"
        " as erp-relay/bounce (default /dev/log; 'off' for none)",
    )
    bounce.set_defaults(run=_bounce)
    return parser


class _Version(argparse.Action):
    """Looked up only when asked: the package metadata takes a tenth of a second
    to read, which every command would pay."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        try:
            print(f"relay {_version()}", file=sys.stdout or _Closed(), flush=True)
        except OSError as exc:
            _drop_output(sys.stdout)
            _report(f"relay: cannot write the output: {exc.strerror or exc}")
            parser.exit(EX_IOERR)
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("erp-relay")
    except PackageNotFoundError:  # a checkout run as python -m relay, never installed
        return "(version unknown: not installed)"


_SERVE_STATUS = (
    "Exit status: 0 stopped, 70 a worker process died within 10 s of its start five"
    " times in a row, 71 a port cannot be listened on, 73 the state directory cannot be"
    " opened or locked, 75 another relay runs on the state directory, 78 the policy"
    " does not load (as the run_as user too)."
)
_CHECK_STATUS = (
    "Exit status: 0 the policy loads (warnings aside), 78 it does not, 71 the open-files"
    " limit is too few for relay serve to start, 74 its problems, warnings or ok line"
    " cannot be written."
)
_PREVIEW_STATUS = (
    "Exit status: 0 shown, 2 an option it cannot read, a --listener the policy has not, or"
    " no recipient (no --rcpt, and no To, Cc or Bcc address in the message), 65 the relay"
    " would refuse the message (its reply is said; with --json also as an object on"
    " stdout), 66 the message file cannot be read, 74 the output cannot be written, 78 the"
    " policy does not load." + _PIPE_STATUS
)
_KEYGEN_STATUS = (
    "Exit status: 0 written, 1 another failure (--directory a file, a bad name or size),"
    " 2 an option it cannot read, 73 the key file exists already (its record is printed"
    " again)."
)
_PASSWD_STATUS = (
    "Exit status: 0 the hash printed, 1 no password (empty, stdin closed, Ctrl-D at the"
    " prompt), the two differ, or it is not UTF-8 text."
)


def _group(sub: argparse._SubParsersAction, name: str, text: str) -> argparse._SubParsersAction:
    """A command of verbs. Named without one (``relay queue``), it shows its own
    usage and verbs: the whole program's list does not say what ``queue`` takes."""
    group = sub.add_parser(name, help=text, description=text)
    group.set_defaults(group=group)
    return group.add_subparsers(metavar="COMMAND")


_BOUNCE_STATUS = (
    "Exit status: 0 taken (acted on, or neither a bounce nor a complaint: ignored),"
    " 75 the state cannot take it now, or the policy does not load and the relay"
    " keeps no text of the policy it runs to go by (or that does not load either):"
    " the mail system keeps the report and tries again later."
)


def _upstream_parsers(sub: argparse._SubParsersAction) -> None:
    verbs = _group(sub, "upstream", "upstream account tools")
    text = (
        "connect to upstreams as a delivery would (TLS, certificate, login) and say"
        " what each offers; with --rcpt, try that envelope too. Nothing is sent."
    )
    test = verbs.add_parser("test", help=text, description=text, epilog=_UPSTREAM_STATUS)
    _policy_option(test)
    test.add_argument("names", nargs="*", metavar="NAME", help="these upstreams (default: all)")
    test.add_argument("--rcpt", metavar="ADDRESS", help="try MAIL FROM and RCPT TO this address")
    test.set_defaults(run=_upstream_test, pipe_status=EX_PIPE)


_UPSTREAM_STATUS = (
    "Exit status: 0 every upstream tried works (warnings aside), 1 one does not,"
    " 2 no upstream of that name or a --rcpt the relay would not take, 78 the policy"
    " does not load." + _PIPE_STATUS
)


_DKIM_CHECK_STATUS = (
    "Exit status: 0 every key is published and verifies (warnings aside), 1 one is not,"
    " 69 DNS did not answer (and nothing else failed), 78 the policy does not load or"
    " there is no resolver to ask." + _PIPE_STATUS
)


_BRACKETED_OR_V4 = re.compile(r"\[([^\]]*)\](?::(\d+))?|([^:\[\]]*)(?::(\d+))?")


def _nameserver(value: str) -> tuple[str, int]:
    """``192.0.2.53``, ``192.0.2.53:5353``, ``2001:db8::53`` or ``[2001:db8::53]:5353``."""
    import ipaddress

    found = _BRACKETED_OR_V4.fullmatch(value)
    host, port = (found[1] or found[3], found[2] or found[4] or "53") if found else (value, "53")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536:
        text = f"not an IP address with an optional port: {value!r}"
        raise argparse.ArgumentTypeError(text)
    return host, number


def _queue_parsers(sub: argparse._SubParsersAction) -> None:
    verbs = _group(sub, "queue", "list and manage queued messages (like postqueue)")
    text = (
        "list queued messages, as mailq does: ID (! when held), size, arrival, sender, the"
        " recipients not delivered yet with the last reply, the next attempt; with --json,"
        " one object a line"
    )
    listing = verbs.add_parser(
        "list", help="list queued messages", description=text, epilog=_QUEUE_STATUS
    )
    _policy_option(listing)
    listing.add_argument("--json", action="store_true", help="JSON lines, postqueue -j names")
    listing.set_defaults(run=_queue, verb="list", pipe_status=EX_PIPE)
    text = "one message's record (its times also in local time) and headers, never its body"
    show = verbs.add_parser(
        "show",
        help="one message's record and headers",
        description=text,
        epilog=_QUEUE_STATUS.replace("0 listed", "0 shown, 1 no such entry"),
    )
    _policy_option(show)
    show.add_argument("queue_id", metavar="ID", help="a queue ID (any case)")
    show.set_defaults(run=_queue, verb="show", pipe_status=EX_PIPE)
    for verb, text in (
        ("retry", "deliver now (when no relay runs, at its start)"),
        ("delete", "remove messages, each on record in the audit log first"),
        ("hold", "keep messages from delivery until released"),
        ("release", "let held messages be delivered"),
    ):
        command = verbs.add_parser(verb, help=text, description=text, epilog=_TARGETS_HELP)
        _policy_option(command)
        command.add_argument("targets", nargs="+", metavar="ID", help="ID, ALL or -")
        command.set_defaults(run=_queue, verb=verb)


_QUEUE_STATUS = (
    "Exit status: 0 listed, 66 no queue there or one this user may not read (the"
    " message says which), 74 the output cannot be written, 78 the policy does not load."
    + _PIPE_STATUS
)
_TARGETS_HELP = (
    "ID is a queue ID (any case), ALL every queued message, - the IDs on stdin, one a"
    " line, as postsuper takes them. A message being delivered at that moment is"
    " skipped as busy. Exit status: 0 done (under ALL, busy ones and files that are"
    " not plain ones skipped), 1 a named ID not handled (unknown, busy or failed), 66"
    " no queue there or one this user may not read (the message says which), 78 the"
    " policy does not load."
)


_AUDIT_STATUS = (
    "Exit status: {answers}, 2 a bad option value or a log that cannot be read, 78"
    " the policy does not load (its hmac_key_file unreadable included)."
)


def _audit_parsers(sub: argparse._SubParsersAction) -> None:
    verbs = _group(sub, "audit", "search and verify the audit log")
    search = verbs.add_parser(
        "search",
        help="events matching all the filters given",
        epilog=_AUDIT_STATUS.format(answers="0 records found, 1 none"),
    )
    _policy_option(search)
    _time_options(search)
    for option in ("tenant", "user", "recipient", "doc-type", "status"):
        search.add_argument(f"--{option}")
    search.add_argument("--message-id")
    search.add_argument("--queue-id", type=str.upper)  # as the queue tools take it
    search.add_argument("--format", choices=["table", "json", "csv"], default="table")
    search.set_defaults(run=_audit, verb="search")
    show = verbs.add_parser(
        "show",
        help="one document's timeline, by queue ID or Message-ID",
        epilog=_AUDIT_STATUS.format(answers="0 records found, 1 none"),
    )
    _policy_option(show)
    show.add_argument("ident", metavar="ID")
    show.add_argument("--format", choices=["text", "json"], default="text")
    show.set_defaults(run=_audit, verb="show")
    report = verbs.add_parser(
        "report",
        help="counts per tenant and document type",
        epilog=_AUDIT_STATUS.format(answers="0 counted"),
    )
    _policy_option(report)
    _time_options(report)
    report.add_argument("--format", choices=["text", "json", "csv"], default="text")
    report.set_defaults(run=_audit, verb="report")
    verify = verbs.add_parser(
        "verify",
        help="check the hash chain; exit 1 if tampered",
        epilog=_AUDIT_STATUS.format(answers="0 intact, 1 tampered") + _PIPE_STATUS,
    )
    _policy_option(verify)
    verify.add_argument("--since", metavar="WHEN", help=_SINCE_HELP)
    verify.add_argument(
        "--anchor",
        metavar="HEAD",
        help="a head verify printed before ('seq N hash H'): that record must still be there",
    )
    verify.set_defaults(run=_audit, verb="verify", pipe_status=EX_PIPE)


_WHEN = "a day (2024-05-01), a time (2024-05-01T10:00Z) or that long ago (7d, 12h, 30m)"
_SINCE_HELP = f"from then on: {_WHEN}"


def _time_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="WHEN", help=_SINCE_HELP)
    parser.add_argument(
        "--until", metavar="WHEN", help=f"up to then, a day given to its end: {_WHEN}"
    )


def _suppression_parsers(sub: argparse._SubParsersAction) -> None:
    from relay.suppression import REASONS

    verbs = _group(sub, "suppression", "list, add and remove addresses the relay does not send to")
    text = (
        "the entries, sorted; with addresses, theirs only (any case); with --tenant, those"
        " that keep addresses from its mail (its own and those for all tenants)"
    )
    listing = verbs.add_parser(
        "list", help="the suppressed addresses", description=text, epilog=_LIST_STATUS
    )
    _policy_option(listing)
    listing.add_argument("addresses", nargs="*", metavar="ADDRESS", help=_ADDRESSES_HELP)
    listing.add_argument("--tenant", metavar="T")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    listing.set_defaults(run=_suppression, verb="list")
    text = "stop sending to addresses, for every tenant or one"
    add = verbs.add_parser("add", help=text, description=text, epilog=_ADD_STATUS)
    _policy_option(add)
    add.add_argument("addresses", nargs="+", metavar="ADDRESS", help=_ADDRESSES_HELP)
    add.add_argument("--tenant", metavar="T", help="for this tenant's mail only")
    add.add_argument("--reason", choices=REASONS, default="manual")
    add.add_argument("--note", default="", help="why, shown by relay suppression list")
    add.set_defaults(run=_suppression, verb="add")
    text = "send to addresses again: every entry of each, or with --tenant that tenant's"
    remove = verbs.add_parser("remove", help=text, description=text, epilog=_REMOVE_STATUS)
    _policy_option(remove)
    remove.add_argument("addresses", nargs="+", metavar="ADDRESS", help=_ADDRESSES_HELP)
    remove.add_argument("--tenant", metavar="T", help="only the entries for this tenant")
    remove.set_defaults(run=_suppression, verb="remove")


_ADDRESSES_HELP = "an address, or - for those on stdin, one a line (blank lines skipped)"
_LIST_STATUS = (
    "Exit status: 0 something listed, 1 nothing matched, 2 an address whose local part is"
    " not ASCII (a domain in Unicode is taken in its xn-- form), 66 the list cannot be"
    " read, 78 the policy does not load."
)
_ADD_STATUS = (
    "Exit status: 0 done (an address already listed for that scope is left as it is),"
    " 2 an address or tenant refused (nothing added), 66 the list cannot be read, 73 it"
    " cannot be written, 78 the policy does not load."
)
_REMOVE_STATUS = (
    "Exit status: 0 done, 1 an address named had no entry (the others are removed),"
    " 2 an address whose local part is not ASCII (nothing removed), 66 the list cannot be"
    " read,"
    " 73 it cannot be written, 78 the policy does not load."
)


def _policy_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", type=_policy_path, required=True, metavar="FILE", help="the policy YAML"
    )


def _policy_path(value: str) -> Path:
    """``-c ""`` (a variable left unset) read as ``.``, "the policy file is a directory"."""
    if not value:
        raise argparse.ArgumentTypeError("an empty path: name the policy file")
    return Path(value)


def _not_ours(signum: int, _frame: object) -> None:
    """A logrotate ``postrotate`` habit (``kill -USR1``) ended the relay, by the
    signal's default action, with no line from the process that died."""
    import logging

    logging.getLogger("relay").warning(
        "%s ignored: SIGHUP reloads the policy, SIGTERM stops; the relay writes its log"
        " to standard error or the journal and has no file to reopen",
        signal.Signals(signum).name,
    )


def _serve(args: argparse.Namespace) -> int:
    # A reload asked for while the relay starts (``kill -HUP`` right after
    # ``systemctl start``) waits until it serves: SIGHUP's default action
    # would end it, and systemd does not restart a service that SIGHUP ended.
    # A stop waits too, said at once and honoured once the spool is read
    # (``relay.startwatch``): its default action ended the relay unlogged.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, *_STOPS})
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, _not_ours)
    from relay.server import run

    return run(args.config)


def _check(args: argparse.Namespace) -> int:
    from relay import oplog
    from relay.policy.load import check_main

    # its problems and warnings are its output: one it cannot write is exit 74 too
    stderr = sys.stderr.wrapped if isinstance(sys.stderr, _Errors) else sys.stderr
    closed = isinstance(stderr, _Lost)
    err: TextIO = _Output(_Closed() if closed else stderr)  # type: ignore[assignment]
    if oplog.to_journal(stderr):
        err = oplog.JournalLines(err)  # type: ignore[assignment]
    return check_main(args.config, sys.stdout, err)


_STATUS_STATUS = (
    "Exit status (LSB's): 0 running, 1 its supervisor is gone but its workers still hold"
    " the state directory, 3 not running, 4 cannot tell (relay.pid cannot be read), 78 the"
    " state cannot be found." + _PIPE_STATUS
)


def _status(args: argparse.Namespace) -> int:
    from relay.errors import PolicyError
    from relay.policy.load import load
    from relay.policy.running import state_directory
    from relay.status import main

    try:  # built whole, once: what the relay runs may have become unusable here since
        policy = load(args.config)
    except PolicyError as exc:
        problems = exc.problems
    else:
        read = (policy.digest, policy.workers, [])
        return main(args.config, policy.queue.directory, sys.stdout, read)
    state = _state_while_broken(args.config, problems)
    if state is not None:
        return main(args.config, state.queue.directory, sys.stdout, (None, None, problems))
    directory = state_directory(args.config)  # a relay runs whatever the file says now
    if directory is None or not os.path.isdir(directory):
        return EX_CONFIG
    return main(args.config, directory / "queue", sys.stdout, (None, None, problems))


def _preview(args: argparse.Namespace) -> int:
    from relay.preview import (
        NoRecipient,
        Refused,
        UnknownListener,
        limits_of,
        refusal_json,
        render,
        submission_from_file,
    )

    policy = _load_or_report(args.config)
    if policy is None:
        return EX_CONFIG
    try:
        limits_of(policy, args.listener)
    except UnknownListener as exc:
        print(f"relay preview: {exc}", file=sys.stderr)
        return 2
    try:
        raw = args.message.read_bytes()
    except OSError as exc:
        print(f"relay preview: {args.message}: {exc.strerror}", file=sys.stderr)
        return EX_NOINPUT
    try:
        submission = submission_from_file(raw, args.auth_login, args.mail_from, args.rcpt)
    except NoRecipient as exc:
        print(f"relay preview: {exc}", file=sys.stderr)
        return 2
    try:
        text = render(policy, submission, as_json=args.json, listener=args.listener)
    except Refused as refused:
        reply = refused.reply
        print(f"relay preview: the relay would refuse this message: {reply.line}", file=sys.stderr)
        if reply.note is not None:
            print(f"relay preview: why: {reply.note}", file=sys.stderr)
        if args.json:  # a script reads why, not only that, as with a message taken
            print(refusal_json(refused))
        return EX_DATAERR
    print(text)
    return 0


def _load_or_report(path: Path) -> Policy | None:
    from relay.errors import PolicyError
    from relay.policy.load import load

    try:
        return load(path)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return None


def _tool_state(path: Path) -> StateSettings | None:
    """Where the queue and the audit log are. While the file does not load (an
    edit the relay refused at its reload, say), the tools go by the policy the
    relay runs, whose text its supervisor keeps in the state directory: that
    is when an operator needs them most. Of that text they read only the
    state settings, so a listener key or CA file the relay has refused since
    (keeping what it had) does not stop them as well. A relay in one process
    keeps no such copy: then the file's own state settings, if they load."""
    from relay.errors import PolicyError
    from relay.policy.load import StateSettings, load
    from relay.policy.running import as_running

    same = as_running(path)
    if same is not None:
        return same
    try:
        policy = load(path)
    except PolicyError as exc:
        return _state_while_broken(path, exc.problems)
    return StateSettings.of(policy)


def _state_while_broken(path: Path, problems: list[str]) -> StateSettings | None:
    """``_tool_state``'s, for a file that does not load (``problems``)."""
    from relay.errors import PolicyError
    from relay.policy.load import load_state
    from relay.policy.running import running_state

    running = running_state(path)
    if running is not None:
        state, kept = running
        print(f"{problems[0]}\nrelay: {path} does not load, so this goes by the policy"
              f" the relay runs or last ran ({kept})", file=sys.stderr)  # fmt: skip
        return state
    try:
        state = load_state(path)
    except PolicyError:
        print("\n".join(problems), file=sys.stderr)
        return None
    print(f"{problems[0]}\nrelay: {path} does not load, but its state settings do,"
          " so this goes by them", file=sys.stderr)  # fmt: skip
    return state


def _upstream_test(args: argparse.Namespace) -> int:
    import asyncio

    from relay.findings import render
    from relay.upstream.probe import probe

    policy = _load_or_report(args.config)
    if policy is None:
        return EX_CONFIG
    unknown = [name for name in args.names if name not in policy.upstreams]
    if unknown:
        known = ", ".join(policy.upstreams)
        print(f"relay upstream test: no upstream {unknown[0]!r} (the policy has {known})",
              file=sys.stderr)  # fmt: skip
        return 2
    refused = None if args.rcpt is None else _rcpt_refusal(args.rcpt)
    if refused:
        print(f"relay upstream test: --rcpt {args.rcpt!r}: {refused}", file=sys.stderr)
        return 2
    chosen = [policy.upstreams[name] for name in args.names or policy.upstreams]

    async def tried() -> list:
        return list(await asyncio.gather(*(probe(policy, u, args.rcpt) for u in chosen)))

    outcomes = asyncio.run(tried())
    print(render(outcomes))
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def _rcpt_refusal(address: str) -> str:
    """Why the relay's own SMTP side would not take ``address`` as a recipient, or "":
    an address no ERP could give would test nothing (and a CR or LF in it would
    be a second command)."""
    from relay.headers import fits_smtp
    from relay.ingress.address import RECIPIENT, mailbox_refusal

    if not fits_smtp(address):
        return "longer than SMTP allows: 64 characters before the @, 254 in all"
    if mailbox_refusal(address, RECIPIENT) is not None:
        return "not an address the relay takes (local@domain, ASCII, without <>)"
    return ""


def _queue(args: argparse.Namespace) -> int:
    from relay.spool import Spool, SpoolError, tools

    state = _tool_state(args.config)
    if state is None:
        return EX_CONFIG
    try:
        spool = Spool(state.queue.directory, create=False)
        if args.verb == "list":
            return tools.list_queue(spool, sys.stdout, as_json=args.json)
        if args.verb == "show":
            return tools.show(spool, args.queue_id, sys.stdout, sys.stderr)
        if args.verb in ("delete", "hold", "release"):
            return _recorded(state, spool, args.verb, args.targets)
        from relay.record import operator

        retry = tools.retry(spool, args.targets, sys.stdout, sys.stderr, by=operator())
        _if_not_running(state, "retry", retry)
        return retry.code
    except SpoolError as exc:  # no queue, or one this user may not read
        print(f"relay queue: {exc}", file=sys.stderr)
        return EX_NOINPUT
    except ListInputError as exc:  # IDs piped in as -
        print(f"relay queue {args.verb}: {exc}", file=sys.stderr)
        return 2


def _recorded(state: StateSettings, spool: Spool, verb: str, targets: list[str]) -> int:
    """Each deletion, hold and release is on record, with who acted, and none
    that was not done (``tools.delete``, ``tools.hold``): a message gone or
    delivered late must have its reason in the audit log."""
    from relay.audit import AuditError, events
    from relay.record import Recorder, audit_log, operator
    from relay.spool import tools

    try:
        recorder = Recorder(audit_log(state.audit))
    except AuditError as exc:
        nothing = "nothing deleted" if verb == "delete" else "nothing changed"
        print(f"relay queue {verb}: {nothing}: {exc}", file=sys.stderr)
        return 1
    who = operator()

    def record(queue_id: str, entry: QueueEntry | None) -> None:
        if verb == "delete":
            recorder.deleted(queue_id, entry, who)
        else:
            build = events.held if verb == "hold" else events.released
            message_id = None if entry is None else entry.message_id
            recorder.add(build(queue_id=queue_id, message_id=message_id, by=who))
        recorder.flush_sync(queue_id)

    command = getattr(tools, verb)
    outcome = command(spool, targets, sys.stdout, sys.stderr, record=record, by=who)
    if verb == "release":
        _if_not_running(state, verb, outcome)
    return outcome.code


def _if_not_running(state: StateSettings, verb: str, outcome: Outcome) -> None:
    """ "Scheduled for retry" read as "tried now" where no relay runs to try: said,
    as ``postqueue -f`` says the mail system is down. The entries stay changed,
    for the relay's start."""
    from relay.status import not_running

    directory = state.queue.directory.parent
    if outcome.entries and not_running(directory):
        print(f"relay queue {verb}: no relay is running on the state directory {directory}:"
              " nothing is delivered until it starts", file=sys.stderr)  # fmt: skip


def _policy_and_state(path: Path) -> tuple[Policy | None, StateSettings | None]:
    """The policy with its state settings; while it does not load, none, and the
    state settings the tools go by (``_tool_state``, which says why)."""
    from relay.errors import PolicyError
    from relay.policy.load import StateSettings, load

    try:
        policy = load(path)
    except PolicyError:
        return None, _tool_state(path)
    return policy, StateSettings.of(policy)


def _audit(args: argparse.Namespace) -> int:
    """A search gets the policy, to say of a tenant, user or type it does not
    name; while the policy does not load, it goes by the state settings."""
    from relay.audit import commands

    if args.verb == "search":
        policy, state = _policy_and_state(args.config)
    else:
        policy, state = None, _tool_state(args.config)
    if state is None:
        return EX_CONFIG
    directory, out, err = state.audit.directory, sys.stdout, sys.stderr
    if args.verb == "search":
        return commands.search_main(
            directory,
            since=args.since,
            until=args.until,
            tenant=args.tenant,
            user=args.user,
            recipient=args.recipient,
            doc_type=args.doc_type,
            status=args.status,
            message_id=args.message_id,
            queue_id=args.queue_id,
            output=args.format,
            out=out,
            err=err,
            policy=policy,
        )
    if args.verb == "show":
        return commands.show_main(directory, args.ident, output=args.format, out=out, err=err)
    if args.verb == "report":
        return commands.report_main(
            directory, since=args.since, until=args.until, output=args.format, out=out, err=err
        )
    return commands.verify_main(
        directory, args.since, out, err, hmac_key=state.audit.hmac_key, anchor=args.anchor
    )


def _suppression(args: argparse.Namespace) -> int:
    """A tenant ``add`` names must be the policy's; while the policy does not
    load, its state settings say where the list is, and any tenant is taken."""
    import logging

    from relay.record import operator
    from relay.suppression import SuppressionFile, tools

    state = _tool_state(args.config)
    if state is None:
        return EX_CONFIG
    tenants = state.tenants
    # the list's reader logs the lines it skips for the daemon's log; here the
    # command says them itself, and Python's last-resort handler would repeat them
    relay_log = logging.getLogger("relay")
    if not relay_log.handlers:
        relay_log.addHandler(logging.NullHandler())
    file, out, err = SuppressionFile(state.suppression.file), sys.stdout, sys.stderr
    try:
        named, args.addresses = args.addresses, _with_stdin(args.addresses)
    except ListInputError as exc:
        print(f"relay suppression {args.verb}: {exc}", file=sys.stderr)
        return 2
    if named and not args.addresses:  # read as "every entry" or as "done"
        print(f"relay suppression {args.verb}: no address on stdin", file=sys.stderr)
        return 2
    if args.verb == "list":
        if args.tenant is not None and tenants is not None and args.tenant not in tenants:
            said = f"the policy has no tenant {args.tenant!r}: these are the entries for all"
            print(f"relay suppression list: {said} tenants, and any left for it", file=sys.stderr)
        return tools.list_main(
            file, args.addresses, args.tenant, as_json=args.json, tenants=tenants, out=out, err=err
        )
    if args.verb == "add":
        return tools.add_main(
            file, args.addresses, args.tenant, reason=args.reason, note=args.note,
            by=operator(), tenants=tenants, out=out, err=err,
        )  # fmt: skip
    return tools.remove_main(file, args.addresses, args.tenant, by=operator(), out=out, err=err)


def _with_stdin(addresses: list[str]) -> list[str]:
    """``-`` is the addresses on stdin, a line each: a list brought over from
    elsewhere goes in as one call, all or nothing, where ``xargs`` split it
    into several and stopped at an apostrophe."""
    if "-" not in addresses:
        return addresses
    lines = read_lines(sys.stdin)
    return [a for address in addresses for a in (lines if address == "-" else [address])]


def _bounce(args: argparse.Namespace) -> int:
    from relay.feedback.command import main

    source = io.BytesIO() if sys.stdin is None else sys.stdin.buffer  # None: closed, <&-
    return main(args.config, source, sys.stdout, sys.stderr, args.syslog)


def _keygen(args: argparse.Namespace) -> int:
    from relay.keygen import existing_record, generate
    from relay.policy.model import DkimAlgorithm

    made = not args.directory.exists()  # a typo in the path would go unseen
    try:
        path, record = generate(
            args.domain, args.selector, DkimAlgorithm(args.algorithm), args.directory, args.bits
        )
    except FileExistsError as exc:
        print(f"relay dkim keygen: {exc}", file=sys.stderr)
        record = existing_record(args.domain, args.selector, args.directory)
        if record is not None:
            print("; the existing key's DNS record, printed again:", file=sys.stderr)
            print(record)
        return 73
    except (OSError, ValueError) as exc:
        print(f"relay dkim keygen: {exc}", file=sys.stderr)
        return 1
    if made:
        print(f"; {args.directory} did not exist: made it (mode 0700)", file=sys.stderr)
    print(f"; private key written to {path} (mode 0600)", file=sys.stderr)
    try:
        print(record)
        sys.stdout.flush()
    except OSError:
        # a second run refuses to replace the key, so this is the only time
        # its record is printed
        print(f"; its DNS record, which the output did not take:\n{record}", file=sys.stderr)
        raise
    return 0


def _dkim_check(args: argparse.Namespace) -> int:
    from relay.dkimdns import NoResolver, checked_all, resolver, unanswered
    from relay.findings import render

    policy = _load_or_report(args.config)
    if policy is None:
        return EX_CONFIG
    try:
        answers = resolver(args.nameserver)
    except NoResolver as exc:
        print(f"relay dkim check: {exc}", file=sys.stderr)
        return EX_CONFIG
    checks = checked_all(policy.dkim_keys, answers)
    print(render(checks))
    failed = [each for each in checks if not each.ok]
    if failed and all(unanswered(each) for each in failed):
        return EX_UNAVAILABLE  # DNS said nothing: no verdict on any record
    return 1 if failed else 0


def _passwd(args: argparse.Namespace) -> int:
    import getpass

    from relay.passwd import hash_password

    if sys.stdin is None:  # closed, <&-
        print("relay passwd: no password given (standard input is closed)", file=sys.stderr)
        return 1
    if sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except EOFError:  # Ctrl-D at the prompt
            print("\nrelay passwd: no password given", file=sys.stderr)
            return 1
        if again != password:
            print("relay passwd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.buffer.readline().decode("utf-8", "surrogateescape")
        password = password.removeprefix("\ufeff").rstrip("\r\n")  # as a password file's
    if not password:
        print("relay passwd: empty password", file=sys.stderr)
        return 1
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # bytes a client could not send as an AUTH password's text
        print("relay passwd: the password is not UTF-8 text", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
