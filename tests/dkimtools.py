"""Independent DKIM verification for tests: dkimpy and Debian's opendkim, offline.

Both verifiers read public keys from a dict of TXT records instead of DNS.
Record names may be given with or without the trailing dot.

With several signatures on a message, ``opendkim -t`` reports only the one it
judges best, so a broken Ed25519 signature hides behind a good RSA one. The
``*_each`` helpers therefore check every signature on a copy of the message
that carries it alone; that is sound because ``relay.sign`` never lets one
signature cover another.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import dkim
from dkim.util import parse_tag_value

from relay.keygen import generate
from relay.policy.model import DkimAlgorithm, DkimKey

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
TIMEOUT = 30.0


def dkimpy_verify(message: bytes, txt_records: dict[str, str]) -> bool:
    """True when the message has signatures and every one of them verifies."""
    results = dkimpy_each(message, txt_records)
    return bool(results) and all(results)


def dkimpy_each(message: bytes, txt_records: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, topmost first."""
    records = {_name(k): v for k, v in txt_records.items()}

    # dkimpy asks for b"<s>._domainkey.<d>." (bytes, trailing dot).
    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        value = records.get(_name(name))
        return None if value is None else value.encode("ascii")

    count = sum(1 for name, _ in dkim.DKIM(message).headers if name.lower() == b"dkim-signature")
    results = []
    for idx in range(count):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            results.append(False)
    return results


def opendkim_verify(message: bytes, txt_records: dict[str, str], tmp_path: Path) -> str:
    """Run ``opendkim -t`` on the message as it is; its combined output.

    opendkim exits 0 whether or not the signature verifies: read the text.
    """
    work = Path(tempfile.mkdtemp(prefix="opendkim-", dir=tmp_path))
    keys = work / "keys"
    keys.write_text("".join(f"{_name(n)} {v}\n" for n, v in txt_records.items()))
    conf = work / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nBackground no\nTestPublicKeys {keys}\n")
    path = work / "message.eml"
    path.write_bytes(message)
    done = subprocess.run(
        [OPENDKIM, "-x", str(conf), "-t", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return done.stdout + done.stderr


def opendkim_each(
    message: bytes, txt_records: dict[str, str], tmp_path: Path
) -> list[tuple[str, str, str]]:
    """(selector, domain, opendkim output) for each signature, checked alone."""
    head, sep, body = _split(message)
    fields = _fields(head)
    signatures = [i for i, f in enumerate(fields) if f.lower().startswith(b"dkim-signature:")]
    results = []
    for keep in signatures:
        alone = b"".join(f for i, f in enumerate(fields) if i == keep or i not in signatures)
        tags = parse_tag_value(fields[keep].split(b":", 1)[1])
        output = opendkim_verify(alone + sep + body, txt_records, tmp_path)
        results.append((tags[b"s"].decode(), tags[b"d"].decode(), output))
    return results


def assert_opendkim_ok(message: bytes, txt_records: dict[str, str], tmp_path: Path) -> str:
    """Assert opendkim verifies every signature on the message; its output."""
    results = opendkim_each(message, txt_records, tmp_path)
    assert results, "the message carries no DKIM-Signature"
    for selector, domain, output in results:
        ok = (
            rf"verification \(s={re.escape(selector)}, d={re.escape(domain)}, "
            r"\d+-bit key\) succeeded"
        )
        assert re.search(ok, output), output
    return "".join(output for _, _, output in results)


def opendkim_failures(message: bytes, txt_records: dict[str, str], tmp_path: Path) -> list[str]:
    """opendkim's reason for each signature, asserting that every one failed."""
    results = opendkim_each(message, txt_records, tmp_path)
    assert results, "the message carries no DKIM-Signature"
    reasons = []
    for selector, domain, output in results:
        failed = (
            rf"verification \(s={re.escape(selector)} d={re.escape(domain)}, "
            r"\d+-bit key, \w+\) failed: (.+)"
        )
        match = re.search(failed, output)
        assert match, output
        reasons.append(match.group(1).strip())
    return reasons


def make_key(
    directory: Path,
    domain: str = "example.com",
    selector: str = "s1",
    algorithm: DkimAlgorithm = DkimAlgorithm.RSA,
    bits: int | None = None,
) -> tuple[DkimKey, dict[str, str]]:
    """A fresh key made by relay.keygen, as policy loading would present it."""
    path, record = generate(domain, selector, algorithm, directory, bits)
    key = DkimKey(domain, selector, algorithm, path, path.read_bytes())
    return key, {f"{selector}._domainkey.{domain}": txt_value(record)}


def txt_value(record: str) -> str:
    """The TXT value of a zone-file record: its quoted strings joined."""
    return "".join(re.findall(r'"([^"]*)"', record))


def _name(name: bytes | str) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.rstrip(".").lower()


def _split(message: bytes) -> tuple[bytes, bytes, bytes]:
    """Header block (with its last line end), the empty line, the body."""
    match = re.search(rb"\r?\n\r?\n", message)
    if match is None:
        return message, b"", b""
    end = match.start() + (2 if message[match.start()] == 0x0D else 1)
    return message[:end], message[end : match.end()], message[match.end() :]


def _fields(head: bytes) -> list[bytes]:
    """Header fields with their folded continuation lines, line ends kept."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields
