"""The ``relay`` tools under a Latin-1 locale, as on an older ERP host: text for a
person in its encoding, what it lacks escaped; JSON and CSV in UTF-8 for the
programs that read them. A real process, a locale built with localedef."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from relay.audit import AuditLog, events
from relay.policy.load import StateSettings, load
from relay.spool import Spool
from relay.suppression import MANUAL, Suppression, SuppressionFile
from tests import spoolkit
from tests.policyfiles import variant
from tests.relayproc import RelayProcess, wait_for
from tests.sink import free_port
from tests.test_cli import INVOICE

ROOT = Path(__file__).resolve().parent.parent
LOCALE = "de_DE.ISO-8859-1"
JAN = "From: jan@acme.example\nTo: customer@example.org\nSubject: Faktura 4711\n\nHei!\n"
REPLY = "550 Konto gesperrt: 100 € offen, Łódź, Müller"


@pytest.fixture(scope="session")
def latin1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a shell whose locale is Latin-1, no UTF-8 mode."""
    if shutil.which("localedef") is None:
        pytest.skip("no localedef")
    directory = tmp_path_factory.mktemp("locale")
    made = subprocess.run(
        ["localedef", "-i", "de_DE", "-f", "ISO-8859-1", str(directory / LOCALE)],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    if made.returncode not in (0, 1) or not (directory / LOCALE).exists():  # 1: warnings
        pytest.skip(f"localedef failed: {made.stderr.decode(errors='replace')}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIO"))}
    env.pop("PYTHONUTF8", None)
    return {**env, "LOCPATH": str(directory), "LC_ALL": LOCALE}


def relay(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True, env=env, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_the_locale_is_latin1(latin1: dict[str, str]) -> None:
    """Otherwise the tests below would pass for want of the locale."""
    code = "import sys; print(sys.stdout.encoding)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=latin1, check=True)
    assert done.stdout.strip().lower() in (b"iso8859-1", b"iso-8859-1", b"latin-1")


@pytest.fixture
def audited(policy_file: Path) -> Path:
    """An audit log holding an upstream's reply with characters Latin-1 lacks (€, Ł)."""
    with AuditLog(policy_file.parent / "state" / "audit") as log:
        log.append(events.failed(queue_id="Q1", message_id=None, recipient="a@b", reply=REPLY))
    return policy_file


def test_audit_show_escapes_what_the_locale_lacks(audited: Path, latin1: dict[str, str]) -> None:
    """It was a UnicodeEncodeError traceback."""
    done = relay(latin1, "audit", "show", "Q1", "-c", str(audited))
    assert (done.returncode, done.stderr) == (0, b"")
    assert "100 \\u20ac offen, \\u0141\xf3d\\u017a, Müller".encode("latin-1") in done.stdout


@pytest.mark.parametrize("command", [["search"], ["show", "Q1"]])
def test_audit_json_is_utf8_whatever_the_locale(
    audited: Path, latin1: dict[str, str], command: list[str]
) -> None:
    """It stopped mid-output with exit 2 ("unreadable log"), and a reply that fit
    Latin-1 came out in Latin-1 bytes, which jq and json.loads do not read."""
    done = relay(latin1, "audit", *command, "--format", "json", "-c", str(audited))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line.decode("utf-8")) for line in done.stdout.splitlines()]
    assert [row["reply"] for row in rows] == [REPLY]


def test_audit_json_of_text_latin1_has_is_the_stored_lines(
    policy_file: Path, latin1: dict[str, str]
) -> None:
    """Output that fit Latin-1 came out in it: mojibake in jq, an error in json.loads."""
    audit = policy_file.parent / "state" / "audit"
    with AuditLog(audit) as log:
        log.append(
            events.failed(queue_id="Q1", message_id=None, recipient="a@b", reply="550 Müller")
        )
    done = relay(latin1, "audit", "search", "--format", "json", "-c", str(policy_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout in b"".join(p.read_bytes() for p in sorted(audit.glob("audit-*")))


def test_audit_csv_is_utf8_whatever_the_locale(audited: Path, latin1: dict[str, str]) -> None:
    done = relay(latin1, "audit", "search", "--format", "csv", "-c", str(audited))
    assert done.returncode == 0, done.stderr
    assert REPLY in done.stdout.decode("utf-8")


def test_audit_table_escapes_what_the_locale_lacks(audited: Path, latin1: dict[str, str]) -> None:
    done = relay(latin1, "audit", "search", "-c", str(audited))
    assert (done.returncode, done.stderr) == (0, b"")
    assert b"100 \\u20ac offen" in done.stdout


def test_suppression_list_escapes_text_and_writes_json_in_utf8(
    policy_file: Path, latin1: dict[str, str]
) -> None:
    """The list printed its first row, then a traceback with exit 1, "nothing matched"."""
    path = StateSettings.of(load(policy_file)).suppression.file
    path.parent.mkdir(exist_ok=True)
    file = SuppressionFile(path)
    since = "2026-12-01T10:00:00.000Z"
    file.add([Suppression(f"{n}@example.org", None, MANUAL, since, "Łódź €") for n in "ab"])
    done = relay(latin1, "suppression", "list", "-c", str(policy_file))
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.count(b"\\u0141\xf3d\\u017a \\u20ac") == 2
    done = relay(latin1, "suppression", "list", "--json", "-c", str(policy_file))
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["detail"] for line in done.stdout.splitlines()] == ["Łódź €"] * 2


def test_preview_escapes_text_and_writes_json_in_utf8(
    policy_file: Path, tmp_path: Path, latin1: dict[str, str]
) -> None:
    """The text preview was a traceback and no output; the JSON one Latin-1 bytes."""
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(INVOICE.replace("Faktura 4711", "Rechnung über 100 €").encode())
    done = relay(latin1, "preview", "-c", str(policy_file), str(eml))
    assert (done.returncode, done.stderr) == (0, b"")
    assert "Subject: Rechnung über 100 \\u20ac\n".encode("latin-1") in done.stdout
    done = relay(latin1, "preview", "-c", str(policy_file), str(eml), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.decode("utf-8"))
    assert "\nSubject: Rechnung über 100 €" in report["headers"]
    assert report["user"]["name"] == "Kåre Ødegård"


def test_a_policy_in_a_directory_named_in_latin1_bytes_checks_previews_and_serves(
    tmp_path: Path,
) -> None:
    """Its version hashed the file names as UTF-8 text, and a name read from
    Latin-1 bytes (``pl\\xfc``, surrogates in Python) ended check, preview and
    serve in a UnicodeEncodeError."""
    directory = tmp_path / os.fsdecode(b"pl\xfc")
    directory.mkdir()
    port = free_port()
    policy = variant(directory, "    port: 2525\n", f"    port: {port}\n")
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", str(policy)],
        capture_output=True, env=env, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"%s/pl\\udcfc/relay.yaml: ok" % os.fsencode(tmp_path))
    eml = tmp_path / "invoice.eml"
    eml.write_text(JAN)
    done = subprocess.run(
        [sys.executable, "-m", "relay", "preview", "-c", str(policy), str(eml), "--json"],
        capture_output=True, env=env, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["policy"]["file"] == str(policy)
    with RelayProcess(policy, port, tmp_path / "relay.log", env=env) as served:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("jan@acme.example", ["customer@example.org"], JAN)
        wait_for(lambda: any((directory / "outbox").glob("*.eml")), timeout=30)
    assert "Traceback" not in served.log()


def test_a_list_on_stdin_with_a_byte_order_mark_goes_in_under_latin1(
    policy_file: Path, latin1: dict[str, str]
) -> None:
    """Read in the locale's encoding, the mark was the first address's ``ï»¿``;
    dropped, the rest was still read as Latin-1, and a domain garbled went in."""
    path = StateSettings.of(load(policy_file)).suppression.file
    path.parent.mkdir(exist_ok=True)
    listed = b"\xef\xbb\xbfkunde7@example.org\r\nkunde8@b\xc3\xbccher.example\r\n"
    done = subprocess.run(
        [sys.executable, "-m", "relay", "suppression", "add", "-c", str(policy_file), "-"],
        input=listed, capture_output=True, env=latin1, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.splitlines() == [
        b"kunde7@example.org: added (manual, all tenants)",
        b"kunde8@xn--bcher-kva.example: added (manual, all tenants)",
    ]


def _piped(policy: Path, env: dict[str, str], stdin: bytes | None, *args: str):
    return subprocess.run(
        [sys.executable, "-m", "relay", *args[:2], "-c", str(policy), *args[2:]],
        input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True, env=env, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


UTF8 = {**os.environ, "LC_ALL": "C.UTF-8"}


def test_queue_ids_on_stdin_take_the_same_reading(policy_file: Path) -> None:
    """``queue hold -`` read the mark as part of the first ID, and a closed stdin
    or bytes that are not UTF-8 were a traceback."""
    entry, state = spoolkit.make_entry(), policy_file.parent / "state"
    Spool(state / "queue").put(entry, b"Subject: x\r\n\r\nx\r\n")
    AuditLog(state / "audit").append(events.policy_loaded(policy_file="p", policy_sha256="0" * 64))
    marked = b"\xef\xbb\xbf" + entry.queue_id.encode() + b"\r\n"
    done = _piped(policy_file, UTF8, marked, "queue", "hold", "-")
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == b"Placed on hold: 1 message\n"
    done = _piped(policy_file, UTF8, b"caf\xe9\n", "queue", "release", "-")
    assert done.returncode == 2
    assert done.stderr == (
        b"relay queue release: standard input is not utf-8 text: byte 0xe9 at offset 3\n"
    )
    named = _piped(policy_file, UTF8, b"caf\xe9\n", "queue", "delete", entry.queue_id, "-")
    assert named.returncode == 2  # read before the named one is deleted
    assert entry.queue_id in _piped(policy_file, UTF8, None, "queue", "list").stdout.decode()
    closed = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "delete", "-c", str(policy_file), "-"],
        stdin=subprocess.DEVNULL, capture_output=True, env=UTF8, timeout=60, check=False,
        cwd=ROOT, preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert b"Traceback" not in closed.stderr, closed.stderr


def test_an_address_list_not_in_the_locale_s_encoding_is_refused(policy_file: Path) -> None:
    path = StateSettings.of(load(policy_file)).suppression.file
    path.parent.mkdir(exist_ok=True)
    done = _piped(policy_file, UTF8, b"k@m\xfcller.example\n", "suppression", "add", "-")
    assert done.returncode == 2
    assert done.stderr == (
        b"relay suppression add: standard input is not utf-8 text: byte 0xfc at offset 3\n"
    )
    marked = _piped(
        policy_file, UTF8, b"\xef\xbb\xbfk@m\xfcller.example\n", "suppression", "add", "-"
    )
    assert marked.stderr.endswith(b"byte 0xfc at offset 6\n")  # counted with the mark
    assert not path.exists() or path.read_bytes() == b""


def test_queue_show_is_json_jq_reads_under_latin1(
    policy_file: Path, latin1: dict[str, str]
) -> None:
    """It ended in a traceback at the first character Latin-1 lacks; then
    Python's escape of one past U+FFFF (``\\U0001f600``) was none of JSON's,
    and a ``ü`` in Latin-1 was a byte jq garbled."""
    entry = spoolkit.make_entry(subject="Konto \U0001f600 100 € Łódź für")
    Spool(policy_file.parent / "state" / "queue").put(entry, b"Subject: x\r\n\r\nx\r\n")
    done = relay(latin1, "queue", "show", entry.queue_id, "-c", str(policy_file))
    assert (done.returncode, done.stderr) == (0, b"")
    record = json.loads(done.stdout.split(b"\n\n", 1)[0])  # as jq reads it: UTF-8
    assert record["subject"] == "Konto \U0001f600 100 € Łódź für"
    assert b'"Konto \\ud83d\\ude00 100 \\u20ac \\u0141\\u00f3d\\u017a f\\u00fcr"' in done.stdout
