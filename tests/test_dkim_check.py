"""``relay dkim check`` against a real DNS server on loopback, as a sysadmin runs it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli import _nameserver
from relay.keygen import generate, public_record_value
from relay.policy.load import load
from relay.policy.model import DkimAlgorithm
from tests.dnsserver import DnsServer
from tests.policyfiles import variant

ROOT = Path(__file__).resolve().parent.parent
NAME = "s1._domainkey.platform.example."


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return variant(tmp_path, "version: 1\n", "version: 1\n")


def published(policy: Path) -> str:
    return public_record_value(load(policy).dkim_keys[0])


def strings(value: str) -> list[bytes]:
    """As a zone holds a long record: in several strings (at most 255 characters each)."""
    return [value[i : i + 100].encode() for i in range(0, len(value), 100)]


def dkim_check(policy: Path, server: DnsServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "dkim", "check", "-c", str(policy),
         "--nameserver", f"127.0.0.1:{server.port}"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_the_published_key_is_found_and_a_signed_message_verifies(policy: Path) -> None:
    value = published(policy)
    assert len(strings(value)) > 1  # joined again, as verifiers do
    with DnsServer({NAME: [strings(value)]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 0, done.stdout + done.stderr
    key_file = policy.parent / "keys" / "platform.example.s1.private"
    assert done.stdout.splitlines() == [
        f"s1._domainkey.platform.example (rsa, {key_file}): ok",
        f"  TXT {value[:60]}... ({len(value)} characters)",
        "  a message signed now verifies with it (dkimpy)",
    ]
    assert server.asked == [NAME]  # the server named, not the system's resolver


def test_a_record_not_published_says_what_to_publish(policy: Path) -> None:
    with DnsServer({}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 1
    assert (
        "  failed: s1._domainkey.platform.example does not exist in DNS: publish the record"
        f" `relay dkim keygen` printed, TXT {published(policy)}"
    ) in done.stdout


def test_another_key_published_fails(policy: Path, tmp_path: Path) -> None:
    _, record = generate("platform.example", "s1", DkimAlgorithm.RSA, tmp_path / "other")
    other = "".join(record.split('"')[1::2])
    with DnsServer({NAME: [strings(other)]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 1
    assert "  failed: p= is not the public key of " in done.stdout
    assert "verifies" not in done.stdout  # no test message once a tag is wrong


@pytest.mark.parametrize(
    ("change", "finding"),
    [
        (lambda v: v.split("p=")[0] + "p=", "  failed: p= is empty: the key is revoked"),
        (lambda v: v.replace("k=rsa", "k=ed25519"), "  failed: k=ed25519, but the key in "),
        (lambda v: v.replace("v=DKIM1", "v=DKIM2"), "  failed: v=DKIM2: a DKIM key record"),
        (lambda v: v + "; h=sha1", "  failed: h=sha1 leaves out sha256"),
        (lambda v: v + "; s=tlsrpt", "  failed: s=tlsrpt: the key is not for email"),
        (lambda v: "spf1 -all", "  failed: not a DKIM key record"),
    ],
    ids=["revoked", "other-algorithm", "version", "hash", "service", "not-dkim"],
)
def test_a_wrong_tag_fails(policy: Path, change: object, finding: str) -> None:
    value = change(published(policy))  # type: ignore[operator]
    with DnsServer({NAME: [strings(value)]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 1, done.stdout
    assert finding in done.stdout


def test_testing_mode_is_a_warning_and_still_verifies(policy: Path) -> None:
    with DnsServer({NAME: [strings(published(policy) + "; t=y")]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 0, done.stdout
    assert "  warning: t=y: testing mode" in done.stdout
    assert "  a message signed now verifies with it (dkimpy)" in done.stdout


@pytest.mark.parametrize(
    "change",
    [
        lambda v: v + "; h=SHA256",  # an ABNF string matches in any case (RFC 5234 2.3)
        lambda v: v.replace("k=rsa", 'k=rsa; n="relay key 2026"'),  # notes may hold quotes
        lambda v: v.replace("k=rsa", 'k=rsa; n=rotated "dev" "prod"'),
        lambda v: v.replace("k=rsa", 'k=rsa; n=""'),
        lambda v: v.replace("k=rsa", 'k=rsa; n = "hi"'),  # white space around = (3.2)
        lambda v: v + "; s=email",  # the key is for email only (3.6.1)
    ],
    ids=[
        *("hash-in-capitals", "notes-with-quotes", "notes-quoting-twice"),
        *("empty-quoted-notes", "notes-spaced", "service-email"),
    ],
)
def test_a_record_verifiers_take_passes(policy: Path, change: object) -> None:
    """Both verify at dkimpy and OpenDKIM; the check failed them, as leaving sha256
    out and as pasted from a zone file."""
    value = change(published(policy))  # type: ignore[operator]
    with DnsServer({NAME: [strings(value)]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 0, done.stdout
    assert "  a message signed now verifies with it (dkimpy)" in done.stdout


def test_two_records_at_the_name_fail(policy: Path) -> None:
    value = published(policy)
    with DnsServer({NAME: [strings(value), [b"v=DKIM1; p="]]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 1
    assert "  failed: 2 TXT records for s1._domainkey.platform.example:" in done.stdout


def test_a_name_without_txt_and_a_server_that_does_not_answer(policy: Path) -> None:
    with DnsServer({NAME: []}) as server:
        done = dkim_check(policy, server)
    assert "  failed: s1._domainkey.platform.example has no TXT record: publish" in done.stdout
    silent = DnsServer({})  # bound, never started: the queries go unanswered
    try:
        done = dkim_check(policy, silent)
    finally:
        silent.__exit__()
    assert done.returncode == 69  # no verdict: DNS said nothing
    assert done.stdout.splitlines()[1] == (
        f"  DNS: failed: no answer from the DNS server 127.0.0.1 (port {silent.port})"
        " for s1._domainkey.platform.example within 5 seconds"
    )


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ],
)
def test_nameserver_forms(given: str, parsed: tuple[str, int]) -> None:
    assert _nameserver(given) == parsed


@pytest.mark.parametrize("given", ["ns1.example", "192.0.2.53:0", "192.0.2.53:dns", "[::1"])
def test_a_nameserver_that_is_not_an_address_is_refused(given: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _nameserver(given)


def test_a_cname_to_another_zone_is_followed(policy: Path) -> None:
    """Hosted DKIM: the selector is an alias the domain's own server does not resolve."""
    hosted = "s1.platform-example.dkim.hosted.example."
    with DnsServer({hosted: [strings(published(policy))]}, cnames={NAME: hosted}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 0, done.stdout
    assert server.asked == [NAME, hosted]
    for recursive in (False, True):  # a resolver that followed it says NXDOMAIN
        with DnsServer({}, cnames={NAME: hosted}, recursive=recursive) as server:
            done = dkim_check(policy, server)
        assert done.returncode == 1
        assert (
            "  failed: s1._domainkey.platform.example is a CNAME to"
            " s1.platform-example.dkim.hosted.example, and"
            " s1.platform-example.dkim.hosted.example does not exist in DNS: publish"
        ) in done.stdout, (recursive, done.stdout)


def test_a_server_that_hands_the_name_on_is_no_proof_it_is_missing(policy: Path) -> None:
    referral = {NAME: ["ns1.dkim.example.", "ns2.dkim.example."]}
    with DnsServer({}, referrals=referral) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 69
    assert (
        f"  DNS: failed: the DNS server 127.0.0.1 (port {server.port}) does not answer for"
        " s1._domainkey.platform.example but refers to ns1.dkim.example, ns2.dkim.example:"
        " give one of those as --nameserver, or leave it out"
    ) in done.stdout
    assert "publish" not in done.stdout


CASE = ": tag values are case-sensitive"


def _cut_at_a_multiple_of_four(value: str) -> str:
    """p= cut 16 characters short, at a multiple of 4: what is left still decodes."""
    start = value.index("p=") + 2
    return value[: start + (len(value) - start) // 4 * 4 - 16]


PASTED = "  failed: the record holds a zone file's syntax (quotes, parentheses, the name or TXT)"


@pytest.mark.parametrize(
    ("change", "finding"),
    [
        (lambda v: f'"{v}"', PASTED),
        (lambda v: f'( "{v[:20]}" "{v[20:]}" )', PASTED),
        (lambda v: f'{NAME} IN TXT ( "{v[:20]}" "{v[20:]}" )', PASTED),
        (lambda v: f'{v[:20]}" "{v[20:]}', PASTED),  # the outer quotes left out only
        (lambda v: v[:-3], "  failed: p= is not base64 (cut short, or other text in it)"),
        (_cut_at_a_multiple_of_four, "  failed: p= is this key's beginning only (cut short)"),
        (
            lambda v: v.replace("k=rsa", "k=RSA"),
            f"  failed: k=RSA, but the key in {{key}} is rsa{CASE}",
        ),
        (
            lambda v: v.replace("v=DKIM1", "v=dkim1"),
            f"  failed: v=dkim1: a DKIM key record says v=DKIM1{CASE}",
        ),
        (lambda v: v + "; p=", "  failed: p= appears twice: receivers refuse the record"),
    ],
    ids=[
        "quoted",
        "parenthesised",
        "keygen-line",
        "inner-quotes",
        "cut-short",
        "cut-short-still-base64",
        "upper-case-k",
        "lower-case-v",
        "twice",
    ],
)
def test_a_record_pasted_wrong_says_how(policy: Path, change: object, finding: str) -> None:
    value = change(published(policy))  # type: ignore[operator]
    with DnsServer({NAME: [strings(value)]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 1, done.stdout
    key = policy.parent / "keys" / "platform.example.s1.private"
    wanted = finding.format(key=key)
    assert any(line.startswith(wanted) for line in done.stdout.splitlines()), done.stdout


def test_control_characters_in_a_record_are_shown_not_sent_to_the_terminal(
    policy: Path,
) -> None:
    value = published(policy).replace("k=rsa;", "k=rsa; n=\x1b[31mred\r\nx;")
    with DnsServer({NAME: [strings(value)]}) as server:
        done = dkim_check(policy, server)
    assert done.returncode == 0, done.stdout
    assert "\x1b" not in done.stdout and "\r" not in done.stdout
    assert "  TXT v=DKIM1; k=rsa; n=\\x1b[31mred\\r\\nx; p=" in done.stdout
    assert all(line.startswith("  ") for line in done.stdout.splitlines()[1:])


def test_a_host_without_a_network_is_named_not_the_dns_server(policy: Path) -> None:
    """The server was said to have failed or refused the lookup, where dnspython
    knew the host's network was unreachable."""
    try:
        done = subprocess.run(
            ["unshare", "--net", sys.executable, "-m", "relay", "dkim", "check",
             "-c", str(policy), "--nameserver", "192.0.2.53"],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no unshare")
    if "unshare failed" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"no network namespace here: {done.stderr.strip()}")
    assert done.returncode == 69, (done.stdout, done.stderr)
    assert (
        "  DNS: failed: cannot reach the DNS server 192.0.2.53 (port 53) to look up"
        " s1._domainkey.platform.example: Network is unreachable"
    ) in done.stdout, done.stdout
