"""The ``relay`` command line as a sysadmin runs it: a real process, real files."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ROOT = Path(__file__).parent.parent


def relay(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True, text=True, input=stdin, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


INVOICE = (
    "From: Kari <kari@acme.example>\n"
    "To: customer@example.org\n"
    "Bcc: archive@example.org\n"
    "Subject: Faktura 4711\n"
    "X-ERP-User: kari\n"
    "\n"
    "Hei!\n"
)


def test_check_accepts_the_example_policy(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    done = relay("dkim", "keygen", "--domain", "platform.example", "--selector", "dev",
                 "--directory", str(tmp_path / "dkim"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = relay("check", "-c", str(tmp_path / "config" / "relay.example.yaml"))
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
    assert "warning" not in done.stderr


def test_check_reports_located_problems_and_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "relay.yaml"
    bad.write_text("version: 1\nplatform:\n  from_adress: x@y.example\n")
    done = relay("check", "-c", str(bad))
    assert done.returncode == 78
    assert f"{bad}:3:3: platform.from_adress: unknown key" in done.stderr


def test_preview_of_a_policy_that_does_not_load_says_where_and_exits_78(tmp_path: Path) -> None:
    """As its help says, and as check does: a script tells a broken policy from
    a refused message or a message file it could not read by the status."""
    bad = tmp_path / "relay.yaml"
    bad.write_text("version: 1\nplatform:\n  from_adress: x@y.example\n")
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = relay("preview", "-c", str(bad), str(eml), "--auth-login", "erp-acme")
    assert (done.returncode, done.stdout) == (78, "")
    assert f"{bad}:3:3: platform.from_adress: unknown key" in done.stderr


def test_preview_explains_and_sends_nothing(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = relay("preview", "-c", str(policy_file), str(eml), "--auth-login", "erp-acme")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "User:        Kåre Ødegård <kari@acme.example> (kari, found by envelope_sender)" in out
    assert "Document:    invoice (rule invoice-subject)" in out
    assert "BCC added:   kari@acme.example" in out
    assert "Removed:     Bcc, X-ERP-User" in out
    assert "Recipients:  customer@example.org, archive@example.org, kari@acme.example" in out
    assert "DKIM:        d=platform.example s=s1 (rsa), d=platform.example s=e1 (ed25519)" in out
    assert "DKIM-Signature:" in out
    assert "\nReply-To:    -  ->  " in out  # it had none
    assert (
        "\nListener:    local (up to 26214400 bytes, 100 recipients, auth optional;"
        " clients from 127.0.0.0/8, ::1/128 only, not checked here)\n"
    ) in out  # the policy's only one
    assert not (tmp_path / "outbox").exists()


def test_preview_names_a_field_removed_whatever_its_case(policy_file: Path, tmp_path: Path) -> None:
    """Field names match in any case (RFC 5322 1.2.2): a ``BCC:`` the relay removes
    is removed all the same, and the report says so."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE.replace("Bcc:", "BCC:").replace("X-ERP-User:", "x-erp-user:"))
    done = relay("preview", "-c", str(policy_file), str(eml), "--auth-login", "erp-acme")
    assert done.returncode == 0, done.stderr
    assert "Removed:     BCC, x-erp-user\n" in done.stdout


def test_preview_says_a_limit_of_one_recipient_in_the_singular(
    policy_file: Path, tmp_path: Path
) -> None:
    """``1 recipients`` and ``at most 1 recipients an hour``."""
    text = policy_file.read_text().replace(
        "    auth: optional\n", "    auth: optional\n    max_recipients: 1\n", 1
    )
    policy_file.write_text(text.replace(
        "    default_user: jan\n", "    default_user: jan\n    recipients_per_hour: 1\n", 1
    ))  # fmt: skip
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE.replace("Bcc: archive@example.org\n", ""))
    done = relay("preview", "-c", str(policy_file), str(eml), "--rcpt", "customer@example.org")
    assert done.returncode == 0, done.stderr
    assert "\nListener:    local (up to 26214400 bytes, 1 recipient, auth optional;" in done.stdout
    assert (
        "\nTenant:      Acme AS (acme), at most 1 recipient an hour (the hour's count is not"
        " checked here)\n"
    ) in done.stdout, done.stdout + done.stderr


def test_preview_takes_recipients_as_written_not_from_encoded_names(
    policy_file: Path, tmp_path: Path
) -> None:
    """An address spelled inside an encoded display name is part of the name."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(
        INVOICE.replace(
            "To: customer@example.org\n",
            "To: =?utf-8?q?Ola=2C_extra=40example=2Eorg?= <customer@example.org>\n",
        )
    )
    done = relay("preview", "-c", str(policy_file), str(eml), "--json")
    assert done.returncode == 0, done.stderr
    recipients = json.loads(done.stdout)["envelope"]["recipients"]
    assert recipients == ["customer@example.org", "archive@example.org", "kari@acme.example"]


def test_preview_json(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = relay(
        "preview",
        "-c",
        os.path.relpath(policy_file, ROOT),
        str(eml),
        "--json",
        "--mail-from",
        "erp@erp.example",
        "--rcpt",
        "c@example.org",
        "--rcpt",
        "C@Example.org",
    )  # fmt: skip  (the SMTP side takes it once)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["policy"]["file"] == str(policy_file)  # whatever the directory it ran in
    assert report["user"]["id"] == "kari"
    assert report["document"] == {"type": "invoice", "rule": "invoice-subject"}
    assert report["envelope"]["recipients"] == ["c@example.org", "kari@acme.example"]
    assert report["reply_to"]["after"] == "=?utf-8?b?S8OlcmUgw5hkZWfDpXJk?= <kari@acme.example>"


def test_preview_shows_utf8_header_text_as_the_relay_reads_it(
    policy_file: Path, tmp_path: Path
) -> None:
    """Not as U+FFFD: the headers shown are the ones sent, read as the policy reads them."""
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(INVOICE.replace("Subject: ", "Subject: Grüße, ").encode())
    done = relay("preview", "-c", str(policy_file), str(eml), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "\nSubject: Grüße, " in report["headers"]
    assert not any("not UTF-8" in reason for reason in report["reasons"])
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert "Subject: Grüße, " in done.stdout


def test_preview_shows_a_field_in_latin1_bytes_escaped(policy_file: Path, tmp_path: Path) -> None:
    """It showed ``Rechnung für März`` as clean text, the policy's reading, where
    the bytes sent are not UTF-8 and receivers may show them garbled. The
    Subject is sent in encoded words (decide), a field kept as it came is not."""
    eml = tmp_path / "invoice.eml"
    text = INVOICE.replace("Faktura 4711", "Rechnung für März")
    eml.write_bytes(
        text.replace("X-ERP-User:", "X-Project: Ausbau Süd\nX-ERP-User:").encode("latin-1")
    )
    reason = (
        "X-Project is not UTF-8 on the wire (its 8-bit bytes shown escaped below): the policy"
        " reads it as Windows-1252 (Ausbau Süd); receivers may show it garbled"
    )
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 0, done.stderr
    assert "\nX-Project: Ausbau S\\xfcd\n" in done.stdout
    assert f"\n  - {reason}\n" in done.stdout
    assert "\nSubject: =?utf-8?" in done.stdout
    report = json.loads(relay("preview", "-c", str(policy_file), str(eml), "--json").stdout)
    assert "\r\nX-Project: Ausbau S\\xfcd\r\n" in report["headers"]
    assert reason in report["reasons"]
    assert report["document"]["rule"] == "invoice-subject"  # read as the policy reads it


def test_preview_keeps_the_terminal_codes_of_a_message_off_the_terminal(
    policy_file: Path, tmp_path: Path
) -> None:
    """A Subject with ESC [31m reached the terminal as itself; queue show escapes it."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE.replace("Subject: Faktura", "Subject: Faktura \x1b[31mred\x1b[0m"))
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "\nSubject: Faktura \\x1b[31mred\\x1b[0m 4711\n" in done.stdout
    done = relay("preview", "-c", str(policy_file), str(eml), "--json")
    assert "\nSubject: Faktura \x1b[31mred" in json.loads(done.stdout)["headers"]


def test_preview_of_a_refused_message(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "x.eml"
    eml.write_text("From: who@nowhere.example\nTo: a@example.org\n\nx\n")
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 65
    assert "would refuse this message: 550 5.7.1 Sender not known" in done.stderr
    assert "why:" not in done.stderr  # an address of no tenant's: nothing more to say


def test_preview_of_a_message_from_two_users(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "x.eml"
    eml.write_text(
        "From: Kari <kari@acme.example>\nFrom: jan@acme.example\nTo: a@example.org\n\nx\n"
    )
    envelope = ("--mail-from", "erp-bounces@erp.acme.example")  # no user: found by the From
    done = relay("preview", "-c", str(policy_file), *envelope, str(eml))
    assert done.returncode == 65
    said = (
        "would refuse this message: 550 5.7.1 Sender ambiguous: From names more than one"
        " user (kari@acme.example is user kari, jan@acme.example is user jan)"
    )
    assert said in done.stderr


def test_preview_says_why_a_tenant_that_needs_a_login_does_not_take_the_message(
    policy_file: Path, tmp_path: Path
) -> None:
    """The client is told only that the sender is not known; the sysadmin
    previewing it learnt nothing more."""
    text = policy_file.read_text()
    required = text.replace("    name: Acme AS\n", "    name: Acme AS\n    auth: required\n")
    policy_file.write_text(required)
    eml = tmp_path / "x.eml"
    eml.write_text("From: jan@acme.example\nTo: a@example.org\n\nx\n")
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 65
    assert "would refuse this message: 550 5.7.1 Sender not known" in done.stderr
    said = (
        "relay preview: why: envelope sender <jan@acme.example> is user 'jan', of tenant"
        " 'acme', which takes mail only with one of its logins, and this session has none\n"
    )
    assert said in done.stderr, done.stderr
    with_login = relay("preview", "-c", str(policy_file), str(eml), "--auth-login", "erp-acme")
    assert with_login.returncode == 0, with_login.stderr


@pytest.mark.parametrize(
    ("option", "reply"),
    [
        (["--auth-login", "nobody"], "535 5.7.8 Authentication credentials invalid\n"),
        (["--rcpt", "bad address"], "553 5.1.3 Bad address syntax: 'bad address'"),
        (["--rcpt", '"root@"'], "553 5.1.3 Quoted local parts are not supported"),
        (["--mail-from", "kari@"], "553 5.1.7 Bad address syntax: 'kari@'"),
    ],
    ids=["login", "rcpt-syntax", "rcpt-quoted", "sender"],
)
def test_preview_refuses_what_the_smtp_side_refuses(
    policy_file: Path, tmp_path: Path, option: list[str], reply: str
) -> None:
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = relay("preview", "-c", str(policy_file), str(eml), *option)
    assert done.returncode == 65, done.stdout
    assert f"relay preview: the relay would refuse this message: {reply}" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("option", "stage", "code", "status", "text"),
    [
        (["--mail-from", "kari@"], "MAIL FROM", 553, "5.1.7", "Bad address syntax: 'kari@'"),
        (["--rcpt", "bad address"], "RCPT TO", 553, "5.1.3", "Bad address syntax: 'bad address'"),
    ],
    ids=["sender", "rcpt"],
)
def test_preview_json_of_a_refused_message_says_why_and_where(
    policy_file: Path, tmp_path: Path, option: list[str], stage: str, code: int, status: str,
    text: str,
) -> None:  # fmt: skip
    """``--json`` printed nothing when the relay would refuse the message: a
    script had the exit status and a line on stderr meant for a person."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = relay("preview", "-c", str(policy_file), str(eml), "--json", *option)
    assert done.returncode == 65, done.stdout
    refused = {"stage": stage, "code": code, "status": status, "text": text, "why": None}
    assert json.loads(done.stdout) == {"refused": refused}
    said = f"relay preview: the relay would refuse this message: {code} {status} {text}\n"
    assert done.stderr == said


def test_preview_refuses_an_unknown_login_before_a_bad_recipient(
    policy_file: Path, tmp_path: Path
) -> None:
    """A client whose login is refused at AUTH never gets to RCPT TO: the
    preview answered the recipient's 553, which no ERP would see."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    faults = ["--auth-login", "nobody", "--rcpt", "bad address", "--mail-from", "kari@"]
    done = relay("preview", "-c", str(policy_file), str(eml), *faults)
    assert done.returncode == 65, done.stdout
    said = "535 5.7.8 Authentication credentials invalid"
    why = "no login 'nobody' in the policy"
    assert done.stderr == (
        f"relay preview: the relay would refuse this message: {said}\nrelay preview: why: {why}\n"
    )
    done = relay("preview", "-c", str(policy_file), str(eml), "--json", *faults)
    assert done.returncode == 65, done.stdout
    refused = json.loads(done.stdout)["refused"]
    assert (refused["stage"], refused["code"], refused["status"]) == ("AUTH", 535, "5.7.8")
    assert (refused["text"], refused["why"]) == ("Authentication credentials invalid", why)


def test_preview_json_of_a_refused_message_has_what_the_sysadmin_is_told(
    policy_file: Path, tmp_path: Path
) -> None:
    """The why the client is not told, and a refusal by the listener at MAIL."""
    text = policy_file.read_text()
    policy_file.write_text(
        text.replace("    name: Acme AS\n", "    name: Acme AS\n    auth: required\n")
    )
    eml = tmp_path / "x.eml"
    eml.write_text("From: jan@acme.example\nTo: a@example.org\n\nx\n")
    done = relay("preview", "-c", str(policy_file), str(eml), "--json")
    assert done.returncode == 65, done.stdout
    refused = json.loads(done.stdout)["refused"]
    assert (refused["stage"], refused["code"], refused["status"]) == ("end of data", 550, "5.7.1")
    why = (
        "envelope sender <jan@acme.example> is user 'jan', of tenant 'acme', which takes mail"
        " only with one of its logins, and this session has none"
    )
    assert refused["why"] == why
    assert f"relay preview: why: {why}\n" in done.stderr
    policy_file.write_text(policy_file.read_text().replace("auth: optional", "auth: required"))
    done = relay("preview", "-c", str(policy_file), str(eml), "--json")
    assert done.returncode == 65, done.stdout
    refused = {"stage": "MAIL FROM", "code": 530, "status": "5.7.0",
               "text": "Authentication required", "why": None}  # fmt: skip
    assert json.loads(done.stdout) == {"refused": refused}


def test_preview_of_more_recipients_than_a_listener_takes_shows_those_it_takes(
    policy_file: Path, tmp_path: Path
) -> None:
    """It said the whole message was refused; the SMTP side answers the 101st
    RCPT 452 and the message goes to the first 100, signed."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    rcpts = [arg for n in range(101) for arg in ("--rcpt", f"r{n}@example.org")]
    done = relay("preview", "-c", str(policy_file), str(eml), "--json", *rcpts)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["envelope"]["recipients"][:100] == [f"r{n}@example.org" for n in range(100)]
    assert "r100@example.org" not in report["envelope"]["recipients"]
    assert any(
        "1 recipient past the 100 listener local takes would be answered 452 4.5.3" in reason
        and reason.endswith(": r100@example.org")
        for reason in report["reasons"]
    ), report["reasons"]


NO_RECIPIENT = (
    "relay preview: no recipient to preview (give one with --rcpt ADDRESS, or a To, Cc or Bcc"
    " address in the message)\n"
)


@pytest.mark.parametrize(
    "text",
    ["", INVOICE.replace("To: customer@example.org\nBcc: archive@example.org\n", "")],
    ids=["empty", "no-to-cc-bcc"],
)
@pytest.mark.parametrize("json_option", [[], ["--json"]], ids=["text", "json"])
def test_preview_of_a_message_with_no_recipient_says_how_to_give_one(
    policy_file: Path, tmp_path: Path, text: str, json_option: list[str]
) -> None:
    """It said the relay would refuse it with ``503 5.5.1 Error: need RCPT
    command`` (exit 65): the SMTP side's answer to a DATA no one sent, where
    the preview had nothing to show. It was the automatic BCC copy as the one
    delivery before that."""
    eml = tmp_path / "x.eml"
    eml.write_text(text)
    done = relay("preview", "-c", str(policy_file), str(eml), *json_option)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", NO_RECIPIENT)
    done = relay("preview", "-c", str(policy_file), str(eml), "--rcpt", "a@example.org")
    assert done.returncode != 2, done.stderr
    assert "no recipient" not in done.stderr


def test_preview_refuses_a_message_no_login_would_get_through(
    policy_file: Path, tmp_path: Path
) -> None:
    """With every listener asking for a login, a message without one was shown
    as sent by the default user (MAIL gets 530)."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    policy_file.write_text(policy_file.read_text().replace("auth: optional", "auth: required"))
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 65, done.stdout
    assert "would refuse this message: 530 5.7.0 Authentication required" in done.stderr
    done = relay("preview", "-c", str(policy_file), str(eml), "--auth-login", "erp-acme")
    assert done.returncode == 0, done.stderr


def test_preview_takes_the_null_sender_as_smtp_writes_it(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = relay("preview", "-c", str(policy_file), str(eml), "--json", "--mail-from", "<>")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["envelope"]["mail_from"] == ""  # goes with it upstream


def test_preview_names_an_ipv6_upstream_with_its_address_in_brackets(
    policy_file: Path, tmp_path: Path
) -> None:
    smtp = "  default:\n    type: smtp\n    host: '::1'\n    port: 2526\n    tls: none\n"
    directory = "  default:\n    type: directory\n    path: outbox\n"
    policy_file.write_text(policy_file.read_text().replace(directory, smtp))
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = relay("preview", "-c", str(policy_file), str(eml), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["upstream"] == "default (smtp [::1]:2526, tls none)"


@pytest.mark.parametrize(
    ("body", "reply"),
    [("x" * 1500 + "\n", "554 5.6.0"), ("a\0b\n", "554 5.6.0")],
    ids=["long-line", "nul"],
)
def test_preview_refuses_content_the_smtp_side_refuses(
    policy_file: Path, tmp_path: Path, body: str, reply: str
) -> None:
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE + body)
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 65, done.stdout
    assert f"relay preview: the relay would refuse this message: {reply}" in done.stderr


def test_keygen_writes_private_key_0600_and_prints_record(tmp_path: Path) -> None:
    done = relay("dkim", "keygen", "--domain", "example.com", "--selector", "ed",
                 "--algorithm", "ed25519", "--directory", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    key = tmp_path / "example.com.ed.private"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert done.stdout.startswith("ed._domainkey.example.com. IN TXT")
    assert "k=ed25519" in done.stdout


def test_keygen_refuses_a_size_for_an_ed25519_key(tmp_path: Path) -> None:
    """``--bits 4096 --algorithm ed25519`` wrote an Ed25519 key without a word:
    whoever asked for a size believed they had it."""
    done = relay("dkim", "keygen", "--domain", "example.com", "--selector", "ed", "--bits",
                 "4096", "--algorithm", "ed25519", "--directory", str(tmp_path))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "an ed25519 key has no size to choose: --bits is for RSA keys" in done.stderr
    assert list(tmp_path.iterdir()) == [] and done.stdout == ""


def test_keygen_again_says_to_choose_a_new_selector_not_to_remove_the_key(tmp_path: Path) -> None:
    """It advised removing the file: the key made then under the same selector
    replaced the record, and the mail queued signed with the old one failed DKIM."""
    args = ("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
            "--algorithm", "ed25519", "--directory", str(tmp_path))  # fmt: skip
    relay(*args)
    again = relay(*args)
    assert again.returncode == 73, again.stderr
    assert "remove" not in again.stderr
    assert (
        "not overwriting a DKIM key: choose a new selector (mail signed with this key may"
        " still wait in the queue, and its record must stay published until it has gone)"
    ) in again.stderr


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_again_prints_the_existing_keys_record(tmp_path: Path, algorithm: str) -> None:
    """The README's recipe sends the record to a file; run again, the shell emptied
    that file before keygen refused, and nothing printed the record again."""
    args = ("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
            "--algorithm", algorithm, "--directory", str(tmp_path))  # fmt: skip
    first = relay(*args)
    again = relay(*args[:-4], "--algorithm", "rsa" if algorithm == "ed25519" else "ed25519",
                  "--directory", str(tmp_path))  # fmt: skip
    assert again.returncode == 73, again.stderr
    assert "already exists; not overwriting" in again.stderr
    assert again.stdout == first.stdout and f"k={algorithm};" in again.stdout


@pytest.mark.parametrize(
    "before",
    [
        b"\xef\xbb\xbf",
        b"Bag Attributes\n    localKeyID: 01 00 00 00\nKey Attributes: <No Attributes>\n",
    ],
    ids=["byte-order-mark", "pkcs12-export"],
)
def test_keygen_again_prints_the_record_of_a_key_with_text_before_its_pem(
    tmp_path: Path, before: bytes
) -> None:
    """A key the relay signs with, brought over with a byte-order mark or the
    attribute lines of a PKCS#12 export before its PEM: run again, the recipe
    left its record file empty."""
    args = ("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
            "--directory", str(tmp_path))  # fmt: skip
    first = relay(*args)
    key = tmp_path / "example.com.s1.private"
    key.write_bytes(before + key.read_bytes())
    again = relay(*args)
    assert again.returncode == 73, again.stderr
    assert again.stdout == first.stdout and "k=rsa;" in again.stdout


def test_keygen_again_prints_the_record_of_an_ed25519_key_in_pem(tmp_path: Path) -> None:
    """An Ed25519 key as OpenDKIM or ``openssl genpkey`` writes it, which the
    policy takes: it was read as RSA, and no record was printed again."""
    private = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "example.com.s1.private").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = base64.b64encode(private.public_key().public_bytes_raw()).decode("ascii")
    again = relay("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
                  "--algorithm", "ed25519", "--directory", str(tmp_path))  # fmt: skip
    assert again.returncode == 73, again.stderr
    assert "; the existing key's DNS record, printed again:" in again.stderr
    assert f'"v=DKIM1; k=ed25519; " "p={public}" )' in again.stdout


def test_keygen_into_a_file_is_not_the_key_existing(tmp_path: Path) -> None:
    """Exit 73 and "File exists" said the key was there, for a --directory that is a file."""
    (tmp_path / "afile").write_text("")
    done = relay("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
                 "--directory", str(tmp_path / "afile"))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"relay dkim keygen: {tmp_path / 'afile'} is not a directory\n"


def test_keygen_says_it_made_a_directory_that_did_not_exist(tmp_path: Path) -> None:
    """A typo in --directory put the key in a new directory, without a word."""
    done = relay("dkim", "keygen", "--domain", "example.com", "--selector", "e1",
                 "--algorithm", "ed25519", "--directory", str(tmp_path / "dikm"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    made = f"; {tmp_path / 'dikm'} did not exist: made it (mode 0700)"
    assert done.stderr.splitlines()[0] == made
    again = relay("dkim", "keygen", "--domain", "example.com", "--selector", "e2",
                  "--algorithm", "ed25519", "--directory", str(tmp_path / "dikm"))  # fmt: skip
    assert "did not exist" not in again.stderr


def test_passwd_hash_verifies(tmp_path: Path) -> None:
    done = relay("passwd", stdin="s3cret\n")
    assert done.returncode == 0, done.stderr
    from relay.passwd import verify_password

    encoded = done.stdout.strip()
    assert encoded.startswith("scrypt$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)


def test_preview_refuses_a_message_bigger_than_its_listener_takes(
    policy_file: Path, tmp_path: Path
) -> None:
    text = policy_file.read_text()
    policy_file.write_text(
        text.replace("    auth: optional\n", "    auth: optional\n    max_message_size: 200\n", 1)
    )
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE + "x" * 200 + "\n")
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 65, done.stdout
    reply = "552 5.3.4 Message size exceeds the maximum of 200 bytes"  # as the listener says
    assert f"would refuse this message: {reply}" in done.stderr
    eml.write_text(INVOICE)
    assert relay("preview", "-c", str(policy_file), str(eml)).returncode == 0
    exact = INVOICE.replace("\n", "\r\n").encode()
    exact += b"x" * (198 - len(exact)) + b"\r\n"  # the limit itself is taken
    eml.write_bytes(exact)
    assert len(exact) == 200
    done = relay("preview", "-c", str(policy_file), str(eml))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "line",
    [
        "state_directory: ../run\n",
        "state_directory: ../run   # where the relay keeps its queue\n",
        "state_directory: '../run'\n",
        'state_directory: "../run"  # quoted\n',
    ],
)
def test_the_tools_find_the_running_policy_from_the_state_directory_line(
    tmp_path: Path, line: str
) -> None:
    """Read as text: the YAML around it may be what broke; named without the
    ``..`` of the line, as the policy's own paths are."""
    from relay.policy.running import running_policy_file

    checked = tmp_path / "run" / "policy.checked.yaml"
    checked.parent.mkdir()
    checked.write_text("version: 1\n")
    policy = tmp_path / "etc" / "relay.yaml"
    policy.parent.mkdir()
    policy.write_text("version: [\n" + line)
    assert running_policy_file(policy) == tmp_path / "run" / "policy.checked.yaml"


def into_dev_full(*args: str) -> subprocess.CompletedProcess[str]:
    with open("/dev/full", "w") as full:
        return subprocess.run(
            [sys.executable, "-m", "relay", *args],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize(
    "command",
    [["audit", "search"], ["audit", "verify"], ["audit", "report"], ["audit", "show", "Q1"],
     ["queue", "list"], ["queue", "list", "--json"], ["check"]],
)  # fmt: skip
def test_an_output_that_cannot_be_written_is_exit_74_not_the_commands_1(
    policy_file: Path, command: list[str]
) -> None:
    """``> /dev/full`` was a traceback with exit 1 (TAMPERED for verify, "nothing
    matched" for search), or for search an error naming the audit log's directory."""
    from relay.audit import AuditLog, events
    from relay.spool import Spool
    from tests import spoolkit

    state = policy_file.parent / "state"
    with AuditLog(state / "audit") as log:
        log.append(events.failed(queue_id="Q1", message_id=None, recipient="a@b", reply="550 no"))
    Spool(state / "queue").put(spoolkit.make_entry(), b"Subject: x\r\n\r\nx\r\n")
    done = into_dev_full(*command, "-c", str(policy_file))
    said = "".join(line for line in done.stderr.splitlines(True) if not line.startswith("note: "))
    assert (done.returncode, said) == (
        74,
        "relay: cannot write the output: No space left on device\n",
    )


def into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``relay ARGS | true``: the reader is gone before the first line."""
    reading, writing = os.pipe()
    os.close(reading)
    try:
        return subprocess.run(
            [sys.executable, "-m", "relay", *args],
            stdout=writing, stderr=subprocess.PIPE, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    finally:
        os.close(writing)


@pytest.mark.parametrize("command", [["audit", "verify"], ["status"]])
def test_a_reader_gone_is_exit_141_for_a_command_whose_1_is_a_finding(
    policy_file: Path, command: list[str]
) -> None:
    """``relay audit verify | true`` on an intact log was exit 1, which is
    "tampered" (for status, "its workers still hold the state directory")."""
    from relay.audit import AuditLog, events

    with AuditLog(policy_file.parent / "state" / "audit") as log:
        log.append(events.failed(queue_id="Q1", message_id=None, recipient="a@b", reply="550 no"))
    done = into_closed_pipe(*command, "-c", str(policy_file))
    said = [line for line in done.stderr.splitlines() if not line.startswith("note: ")]
    assert (done.returncode, said) == (141, [])  # verify's notes are on stderr
    assert into_closed_pipe("audit", "search", "-c", str(policy_file)).returncode == 1


@pytest.mark.parametrize("command", [["queue", "list"], ["queue", "show", "Q1"]])
def test_a_reader_gone_from_the_queue_tools_is_exit_141(
    policy_file: Path, command: list[str]
) -> None:
    """``relay queue show ID | head -1`` was exit 1, which is "no such entry"."""
    from relay.spool import Spool
    from tests import spoolkit

    entry = spoolkit.make_entry()
    Spool(policy_file.parent / "state" / "queue").put(entry, b"Subject: x\r\n\r\nx\r\n")
    command = [entry.queue_id if arg == "Q1" else arg for arg in command]
    done = into_closed_pipe(*command, "-c", str(policy_file))
    assert (done.returncode, done.stderr) == (141, "")


def test_a_reader_gone_from_preview_is_exit_141_and_a_missing_message_66(
    policy_file: Path, tmp_path: Path
) -> None:
    """``relay preview ... | head -1`` was exit 1, where every other tool says
    141; a message file that is not there is 66, as the other tools' input."""
    eml = tmp_path / "invoice.eml"
    eml.write_text(INVOICE)
    done = into_closed_pipe("preview", "-c", str(policy_file), str(eml))
    assert (done.returncode, done.stderr) == (141, "")
    done = into_closed_pipe("preview", "-c", str(policy_file), str(eml), "--json")
    assert (done.returncode, done.stderr) == (141, "")
    done = relay("preview", "-c", str(policy_file), str(tmp_path / "gone.eml"))
    assert done.returncode == 66
    assert done.stderr == f"relay preview: {tmp_path / 'gone.eml'}: No such file or directory\n"


def test_verify_of_a_tampered_log_with_many_notes_piped_into_head_is_exit_1(
    policy_file: Path, tmp_path: Path
) -> None:
    """``relay audit verify | head -1`` on a log logrotate rotated, many times:
    the notes went to stdout before the verdict, head went away after the
    first, and the exit was 141, not tampered. They go to stderr, as search's."""
    from relay.audit import AuditLog, events

    directory = policy_file.parent / "state" / "audit"
    with AuditLog(directory) as log:
        log.append(events.failed(queue_id="Q1", message_id=None, recipient="a@b", reply="550 no"))
    (day,) = directory.glob("audit-*.jsonl")
    for n in range(1, 2001):  # their notes more than a pipe holds
        (directory / f"{day.name}.{n}.gz").write_bytes(b"")
    day.write_bytes(b"")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(tmp_path / "stderr", "w+b") as errors:
        verify = subprocess.Popen(
            [sys.executable, "-m", "relay", "audit", "verify", "-c", str(policy_file)],
            stdout=subprocess.PIPE, stderr=errors, env=buffered, cwd=ROOT,
        )  # fmt: skip
        assert verify.stdout is not None
        head = subprocess.run(["head", "-1"], stdin=verify.stdout, capture_output=True, timeout=60)
        verify.stdout.close()
        status = verify.wait(60)
        errors.seek(0)
        said = errors.read().decode()
    assert (status, head.stdout) == (1, b"")
    assert said.count(" is not read: not a day file's name") == 2000
    assert "relay audit verify: TAMPERED: " in said


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_keygen_into_a_full_output_still_gives_the_record(tmp_path: Path) -> None:
    """A second run refuses to replace the key, so a record the output lost was lost for good."""
    done = into_dev_full("dkim", "keygen", "--domain", "example.com", "--selector", "ed",
                         "--algorithm", "ed25519", "--directory", str(tmp_path))  # fmt: skip
    assert done.returncode == 74
    lines = done.stderr.splitlines()
    assert lines[1:] == [
        "; its DNS record, which the output did not take:",
        lines[2],
        "relay: cannot write the output: No space left on device",
    ]
    assert lines[2].startswith("ed._domainkey.example.com. IN TXT") and "k=ed25519" in lines[2]


def test_passwd_reads_a_file_notepad_wrote_as_a_password_file_is_read() -> None:
    """``relay passwd < password.txt`` hashed its byte-order mark with the password."""
    from relay.passwd import verify_password

    done = subprocess.run(
        [sys.executable, "-m", "relay", "passwd"],
        input=b"\xef\xbb\xbfs3cret\r\n", capture_output=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert verify_password("s3cret", done.stdout.decode().strip())


def test_passwd_refuses_a_password_that_is_not_utf8() -> None:
    """It was a UnicodeEncodeError traceback; AUTH takes a password as UTF-8 text."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "passwd"],
        input=b"\xff\xfe\n", capture_output=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        b"",
        b"relay passwd: the password is not UTF-8 text\n",
    )


@contextlib.contextmanager
def _passwd_prompting() -> Iterator[tuple[subprocess.Popen[bytes], int, bytes]]:
    """``relay passwd`` on a terminal once it has asked for the password: the
    process, the terminal's side to type on, and its stderr so far."""
    primary, secondary = os.openpty()
    try:
        command = subprocess.Popen(
            [sys.executable, "-m", "relay", "passwd"], stdin=secondary, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        os.close(secondary)
        assert command.stderr is not None
        err = b""  # with no controlling terminal, getpass prompts on stderr
        while b"Password: " not in err:  # turning echo off drops what was typed before
            assert select.select([command.stderr], [], [], 30)[0], err
            err += os.read(command.stderr.fileno(), 100)
        yield command, primary, err
    finally:
        os.close(primary)


def test_passwd_ctrl_d_at_the_prompt_is_no_password_not_a_traceback() -> None:
    with _passwd_prompting() as (command, primary, err):
        os.write(primary, b"\x04")  # Ctrl-D
        out, rest = command.communicate(timeout=60)
    err += rest
    assert command.returncode == 1 and out == b""
    assert err.endswith(b"relay passwd: no password given\n") and b"Traceback" not in err, err


@pytest.mark.parametrize("verb", [["list"], ["show", "Q0000000000000A1"], ["hold", "ALL"]])
def test_a_queue_this_user_may_not_read_is_an_error_naming_it(
    policy_file: Path,
    verb: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The spool is the relay user's, mode 0700: run by another user, every queue
    command was a PermissionError traceback. (Simulated: the tests may run as root.)"""
    from relay.cli import main
    from relay.spool import Spool

    queue = policy_file.parent / "state" / "queue"
    Spool(queue)
    is_dir, listdir = Path.is_dir, os.listdir

    def denied(path: object) -> None:
        if Path(str(path)).is_relative_to(queue) and Path(str(path)) != queue:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "is_dir", lambda self: denied(self) or is_dir(self))
    monkeypatch.setattr(os, "listdir", lambda path=".": denied(path) or listdir(path))
    assert main(["queue", *verb, "-c", str(policy_file)]) == 66
    assert capsys.readouterr().err == f"relay queue: {queue}: Permission denied\n"


def test_ctrl_c_ends_a_tool_quietly_with_130() -> None:
    """It printed a KeyboardInterrupt traceback (the daemon has its own handling)."""
    with _passwd_prompting() as (command, _, _):
        command.send_signal(signal.SIGINT)
        out, rest = command.communicate(timeout=60)
    assert (command.returncode, out, rest) == (130, b"", b"")


def test_ctrl_c_in_an_audit_command(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.audit import commands
    from relay.cli import main

    def interrupted(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "search_main", interrupted)
    try:
        code = main(["audit", "search", "-c", str(policy_file)])
    except KeyboardInterrupt:  # not to end the test run
        pytest.fail("the KeyboardInterrupt went through")
    assert code == 130
    assert capsys.readouterr() == ("", "")


def _policy_with_files(directory: Path) -> Path:
    """A listener with TLS and an upstream with its own CA file, and the copy of
    the policy a running relay keeps in its state directory."""
    from certs import make_certs

    certs = make_certs(directory / "tls")
    shutil.copytree(ROOT / "tests" / "policies" / "keys", directory / "keys")
    text = (ROOT / "tests" / "policies" / "minimal.yaml").read_text()
    text = text.replace(
        "    port: 2525\n", f"    port: 2525\n    tls: {{cert: {certs.cert}, key: {certs.key}}}\n"
    )
    text = text.replace(
        "upstreams:\n",
        "upstreams:\n  smarthost:\n    type: smtp\n    host: localhost\n"
        f"    tls: starttls\n    ca_file: {certs.ca}\n",
    )
    policy = directory / "relay.yaml"
    policy.write_text(text)
    (directory / "state").mkdir()
    (directory / "state" / "policy.checked.yaml").write_text(text)
    return policy


@pytest.mark.parametrize("copy", [True, False], ids=["workers", "one-process"])
@pytest.mark.parametrize(
    "broken", ["tls/server.key", "tls/ca.pem"], ids=["listener-key", "ca-file"]
)
def test_the_tools_work_while_a_file_the_relay_refused_does_not_load(
    tmp_path: Path, broken: str, copy: bool
) -> None:
    """A key cut short, or an emptied CA file: the relay refuses it at the reload
    and keeps what it had. The tools checked those files in the running policy
    too, and so stopped with exit 78, when the operator wants to see the queue."""
    from relay.audit import AuditLog
    from relay.spool import Spool

    policy = _policy_with_files(tmp_path)
    if not copy:  # a relay in one process keeps none; the file's own state settings do
        (tmp_path / "state" / "policy.checked.yaml").unlink()
    Spool(tmp_path / "state" / "queue")
    AuditLog(tmp_path / "state" / "audit").close()
    target = tmp_path / broken
    target.write_bytes(target.read_bytes()[:60] if target.name == "server.key" else b"")
    assert relay("check", "-c", str(policy)).returncode == 78
    for args in (("queue", "list"), ("audit", "verify")):
        done = relay(*args, "-c", str(policy))
        assert done.returncode == 0, done.stderr
        assert str(target) in done.stderr.splitlines()[0]
        assert (
            "does not load, so this goes by the policy the relay runs or last ran"
            if copy
            else "does not load, but its state settings do, so this goes by them"
        ) in done.stderr
    assert relay("queue", "list", "-c", str(policy)).stdout == "Mail queue is empty\n"


@pytest.mark.parametrize("verb", ["retry", "delete", "hold", "release"])
def test_queue_commands_say_how_to_name_messages(verb: str) -> None:
    """Each takes ALL and - (IDs on stdin), as postsuper does; --help said only ID."""
    done = relay("queue", verb, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "ALL every queued message, - the IDs on stdin" in text
    assert "78 the policy does not load" in text


@pytest.mark.parametrize(
    ("group", "verbs"),
    [("queue", "list show retry delete hold release"), ("audit", "search show report verify"),
     ("dkim", "keygen check"), ("upstream", "test"), ("suppression", "list add remove")],
)  # fmt: skip
def test_a_command_without_its_verb_shows_its_own_usage(group: str, verbs: str) -> None:
    """``relay queue`` printed the whole program's usage, which names no verb of it."""
    done = relay(group)
    assert done.returncode == 64
    assert done.stdout.startswith(f"usage: relay {group} [-h] COMMAND ...\n")
    assert " ".join(re.findall(r"^ {4}(\w+)", done.stdout, re.MULTILINE)) == verbs


@pytest.mark.parametrize(
    ("command", "usage"),
    [(["check"], "relay check [-h] -c FILE"),
     (["queue", "list"], "relay queue list [-h] -c FILE [--json]"),
     (["audit", "verify"], "relay audit verify [-h] -c FILE [--since WHEN] [--anchor HEAD]")],
)  # fmt: skip
def test_an_unknown_option_is_told_with_the_usage_of_its_command(
    command: list[str], usage: str
) -> None:
    """``relay check -c FILE --verbose`` printed the whole program's usage, which
    names no option of ``check``, where a missing option had the command's own."""
    done = relay(*command, "-c", "config/relay.example.yaml", "--verbose")
    assert done.returncode == 2
    name = usage.split(" [")[0]
    assert done.stderr == f"usage: {usage}\n{name}: error: unrecognized arguments: --verbose\n"


def test_audit_verify_with_its_key_gone_exits_78_as_its_help_says(policy_file: Path) -> None:
    """Its help named no exit status but 'exit 1 if tampered': an auditor's cron
    job checking for 1 and 2 took 78 for neither."""
    policy_file.write_text(policy_file.read_text() + "audit: {hmac_key_file: gone.key}\n")
    done = relay("audit", "verify", "-c", str(policy_file))
    assert done.returncode == 78, done
    assert "hmac_key_file" in done.stderr
    for verb in ("search", "show", "report", "verify"):
        said = " ".join(relay("audit", verb, "--help").stdout.split())
        assert "78 the policy does not load (its hmac_key_file unreadable included)" in said


@pytest.mark.parametrize(
    ("args", "said", "code"),
    [
        (["passwd"], "relay passwd: no password given (standard input is closed)\n", 1),
        (
            ["bounce", "-c", str(ROOT / "tests" / "policies" / "minimal.yaml"), "--syslog", "off"],
            "relay bounce: neither a bounce nor a complaint: ignored\n",
            0,
        ),
    ],
    ids=["passwd", "bounce"],
)
def test_a_closed_stdin_reads_as_empty_not_a_traceback(
    args: list[str], said: str, code: int
) -> None:
    """``<&-``: Python's stdin is None, and each ended in an AttributeError."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60,
        check=False, cwd=ROOT, preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (code, said)


def with_closed(fd: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``relay ARGS >&-`` (1) or ``2>&-`` (2): Python has None for that stream."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60,
        check=False, cwd=ROOT, preexec_fn=lambda: os.close(fd),
    )  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [["queue", "list", "--json"], ["status"], ["check"], ["suppression", "list"]],
)
def test_a_closed_stdout_is_exit_74_not_a_traceback(policy_file: Path, command: list[str]) -> None:
    """``>&-``: each ended in an AttributeError traceback, exit 1, where ``> /dev/full`` was 74."""
    from relay.audit import AuditLog
    from relay.spool import Spool
    from relay.suppression import BOUNCE, Suppression, SuppressionFile
    from tests import spoolkit

    state = policy_file.parent / "state"
    AuditLog(state / "audit").close()
    Spool(state / "queue").put(spoolkit.make_entry(), b"Subject: x\r\n\r\nx\r\n")
    gone = Suppression("gone@example.org", None, BOUNCE, "2026-12-01T10:00:00.000Z")
    SuppressionFile(state / "suppression.jsonl").add([gone])
    done = with_closed(1, *command, "-c", str(policy_file))
    assert (done.returncode, done.stderr) == (
        74,
        "relay: cannot write the output: Bad file descriptor\n",
    )


def test_a_closed_stdout_with_nothing_to_write_keeps_the_commands_status(
    policy_file: Path,
) -> None:
    done = with_closed(1, "queue", "list", "-c", str(policy_file))
    assert done.returncode == 66, done.stderr
    assert done.stderr.endswith("no queue here (has the relay run with this policy?)\n")


@pytest.mark.parametrize(
    ("command", "code"), [(["queue", "list"], 78), (["check"], 74)], ids=["queue", "check"]
)
def test_a_closed_stderr_keeps_errors_out_of_stdout(command: list[str], code: int) -> None:
    """``2>&-``: print() to Python's None wrote the errors into stdout, a file
    a script reads as the command's output; check, whose problems are its
    output, exited 1 where ``2> /dev/full`` is 74."""
    bad = ROOT / "tests" / "policies" / "bad-syntax.yaml"
    done = with_closed(2, *command, "-c", str(bad))
    assert (done.returncode, done.stdout) == (code, "")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize(
    ("command", "code"),
    [(["queue", "list"], 78), (["suppression", "list"], 78), (["check"], 74)],
    ids=["queue", "suppression", "check"],
)
def test_errors_that_cannot_be_written_leave_the_commands_status(
    command: list[str], code: int
) -> None:
    """``2> /dev/full``: the error message's write ended in a traceback and exit
    1, read as "nothing found"; only check, whose report it is, says 74."""
    bad = ROOT / "tests" / "policies" / "bad-syntax.yaml"
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "relay", *command, "-c", str(bad)],
            stdout=subprocess.PIPE, stderr=full, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    assert (done.returncode, done.stdout) == (code, "")


def test_check_with_stderr_closed_still_says_ok(policy_file: Path) -> None:
    done = with_closed(2, "check", "-c", str(policy_file))
    assert done.returncode == 0
    assert done.stdout.startswith(f"{policy_file}: ok (policy ")


def test_version_is_the_installed_packages() -> None:
    """The upgrade steps ask a new environment its version: it was exit 2, an unknown option."""
    from importlib.metadata import version

    done = relay("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"relay {version('erp-relay')}\n", "")


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["serve"], "73 the state directory cannot be opened or locked, 75 another relay runs"),
        (["check"], "Exit status: 0 the policy loads (warnings aside), 78 it does not"),
        (["preview"], "65 the relay would refuse the message (its reply is said; with --json"),
        (
            ["preview"],
            "2 an option it cannot read, a --listener the policy has not, or no recipient",
        ),
        (["preview"], "141 the reader went away before all was written"),
        (["passwd"], "otherwise the first line of stdin is the password"),
        (["dkim", "keygen"], "73 the key file exists already"),
        (["dkim", "keygen"], "--selector SELECTOR the key's name (s=): its record is"),
        (["queue", "list"], "66 no queue there or one this user may not read"),
        (["queue", "show"], "Exit status: 0 shown, 1 no such entry, 66 no queue there"),
        (["audit", "search"], "--since WHEN from then on: a day (2024-05-01), a time"),
        (["audit", "report"], "--until WHEN up to then, a day given to its end: a day"),
    ],
)
def test_help_says_what_a_command_does_and_its_exit_statuses(command: list[str], said: str) -> None:
    """These had a usage line and options only, where their neighbours say what
    they do and each exit status; the time options' forms were in their error alone."""
    done = relay(*command, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert said in text
    if command[0] != "audit":  # a description after the usage
        assert not done.stdout.split("\n\n")[1].startswith(("options:", "positional"))


def test_an_empty_policy_path_is_said_to_be_one() -> None:
    """``-c "$POLICY"`` with the variable unset read as ``.``: "the policy file is a directory"."""
    done = relay("queue", "list", "-c", "")
    assert done.returncode == 2
    assert done.stderr.endswith("argument -c/--config: an empty path: name the policy file\n")
