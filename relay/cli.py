"""The ``relay`` command line: serve, check, preview, dkim keygen, passwd.

Heavy imports stay inside the subcommands so ``relay --help`` and
``relay check`` start quickly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_CONFIG = 78


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EX_USAGE
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="SMTP relay for legacy business systems."
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the relay daemon")
    _policy_option(serve)
    serve.set_defaults(run=_serve)

    check = sub.add_parser("check", help="validate a policy file")
    _policy_option(check)
    check.set_defaults(run=_check)

    preview = sub.add_parser(
        "preview", help="show what the policy does to a message, without sending it"
    )
    _policy_option(preview)
    preview.add_argument("message", type=Path, help="the message as an .eml file")
    preview.add_argument("--auth-login", help="act as if the client logged in as this")
    preview.add_argument("--mail-from", help="envelope sender (default: the From address)")
    preview.add_argument(
        "--rcpt", action="append", default=[], help="envelope recipient (default: To, Cc, Bcc)"
    )
    preview.add_argument("--json", action="store_true", help="print one JSON object")
    preview.set_defaults(run=_preview)

    dkim = sub.add_parser("dkim", help="DKIM key tools").add_subparsers(metavar="COMMAND")
    keygen = dkim.add_parser("keygen", help="create a signing key and print its DNS record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--directory", type=Path, default=Path("."), help="where to write it")
    keygen.set_defaults(run=_keygen)

    passwd = sub.add_parser("passwd", help="hash an AUTH password for the policy's logins")
    passwd.set_defaults(run=_passwd)
    return parser


def _policy_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="the policy YAML"
    )


def _serve(args: argparse.Namespace) -> int:
    from relay.server import run

    return run(args.config)


def _check(args: argparse.Namespace) -> int:
    from relay.policy.load import check_main

    return check_main(args.config, sys.stdout, sys.stderr)


def _preview(args: argparse.Namespace) -> int:
    from relay.errors import PolicyError, SmtpReply
    from relay.policy.load import load
    from relay.preview import render, submission_from_file

    try:
        policy = load(args.config)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EX_CONFIG
    try:
        raw = args.message.read_bytes()
    except OSError as exc:
        print(f"relay preview: {args.message}: {exc.strerror}", file=sys.stderr)
        return EX_NOINPUT
    submission = submission_from_file(raw, args.auth_login, args.mail_from, args.rcpt)
    try:
        text = render(policy, submission, as_json=args.json)
    except SmtpReply as reply:
        print(f"relay preview: the relay would refuse this message: {reply.line}", file=sys.stderr)
        return EX_DATAERR
    print(text)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from relay.keygen import generate
    from relay.policy.model import DkimAlgorithm

    try:
        path, record = generate(
            args.domain, args.selector, DkimAlgorithm(args.algorithm), args.directory, args.bits
        )
    except (OSError, ValueError) as exc:
        print(f"relay dkim keygen: {exc}", file=sys.stderr)
        return 73 if isinstance(exc, FileExistsError) else 1
    print(f"; private key written to {path} (mode 0600)", file=sys.stderr)
    print(record)
    return 0


def _passwd(args: argparse.Namespace) -> int:
    import getpass

    from relay.passwd import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("relay passwd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay passwd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
