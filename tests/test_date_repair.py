"""A Date that is no RFC 5322 date-time, as an ERP in another locale writes
it: replaced by the relay's own and said, as an unusable Message-ID is;
the obsolete forms receivers read are kept. Through a real relay to a sink."""

from __future__ import annotations

import email.utils
import json
from pathlib import Path

import pytest

from relay import dates, message
from tests.dkimtools import assert_opendkim_ok, dkimpy_each, dkimpy_verify
from tests.relayproc import RelayProcess
from tests.sink import SinkServer
from tests.test_decide_account import with_account
from tests.test_decide_reply_to import preview
from tests.test_decisions import BASE, msg, run
from tests.test_odd_headers import erp_signed, without_the_relays_key
from tests.test_queue_e2e import relay_cli, send

NO_DATE = [f for f in BASE if not f.startswith("Date")]
NOT_A_DATE = (
    "Date '06.12.2026 18:00:00' is not a date and time as RFC 5322 3.3 writes one: replaced"
)
NO_ZONE = "Date 'Sun, 6 Dec 2026 18:00:00' has no time zone, which RFC 5322 3.3 requires: replaced"


def _received(policy: Path, queue_id: str) -> dict:
    done = relay_cli(policy, "audit", "search", "--queue-id", queue_id, "--format", "json")
    assert done.returncode == 0, done.stderr
    (record,) = [r for r in map(json.loads, done.stdout.splitlines()) if r["event"] == "received"]
    return record


@pytest.mark.parametrize(
    "given",
    [
        "Sun, 6 Dec 2026 18:00:00 +0100",
        "6 Dec 2026 18:00 +0100",  # no day of the week, no seconds
        "Sun, 06 Dec 26 17:15:33 GMT",  # a two-digit year
        "Sun , 6 dec 2026 18 : 00 : 00 EST",
        "Sun, 6 Dec 2026 18:00:00 UT",
        "Sun, 6 Dec 2026 18:00:00 Z",  # military
        "Wed, 31 Dec 2025 23:59:60 +0000",  # a leap second
        "Tue, 29 Feb 00 12:00:00 +0000",  # 2000, a leap year (RFC 5322 4.3), not 1900
        "Tue, 29 Feb 100 12:00:00 +0000",  # three digits: 1900 added, 2000 again
    ],
)
def test_a_date_time_receivers_read_passes(given: str) -> None:
    assert dates.fault(given) is None


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("06.12.2026 18:00:00", "is not a date and time"),
        ("2026-12-06T18:00:00+01:00", "is not a date and time"),
        ("Sun, 6 Dec 2026 18:00:00 J", "is not a date and time"),
        ("Sun, 6 Dec 2026 18:00:00", "has no time zone"),
        ("6 Dec 2026 18:00", "has no time zone"),
        ("31 Feb 2026 10:00 +0000", "names a day or a time that does not exist"),
        # no leap year, whether read as 1950 or 2050
        ("29 Feb 50 10:00 +0000", "names a day or a time that does not exist"),
        ("6 Dec 2026 24:00 +0000", "names a day or a time that does not exist"),
        ("6 Dec 2026 18:00 +0160", "names a day or a time that does not exist"),
        ("6 Dec 2026 \u0661\u0668:00 +0000", "is not a date and time"),  # Arabic-Indic digits
    ],
)
def test_what_is_no_date_time_is_said(given: str, why: str) -> None:
    assert (dates.fault(given) or "").startswith(why)


@pytest.mark.parametrize(
    ("given", "why"), [("06.12.2026 18:00:00", NOT_A_DATE), ("Sun, 6 Dec 2026 18:00:00", NO_ZONE)]
)
def test_a_date_that_is_not_one_is_replaced_and_said(
    relay_to_sink: tuple[RelayProcess, SinkServer],
    dns_records: dict[str, str],
    tmp_path: Path,
    given: str,
    why: str,
) -> None:
    """It went upstream as it came, under the relay's signature that oversigns
    it, and SpamAssassin scored it (INVALID_DATE); nothing said so."""
    proc, sink = relay_to_sink
    queue_id = send(proc.port, msg(*NO_DATE, f"Date: {given}"), ("one@example.org",))
    (got,) = sink.sink.wait(1)
    (written,) = message.read(got.data).get_all("Date")
    assert dates.fault(written) is None and written.endswith(" +0000")
    assert email.utils.parsedate_to_datetime(written).tzinfo is not None
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    record = _received(proc.policy, queue_id)
    assert why in record["reasons"]


def test_a_date_with_a_comment_is_read_without_it(policy_file: Path) -> None:
    given = "Sun, 6 Dec 2026 18:00:00 +0100 (CET)"
    p = run(policy_file, msg(*NO_DATE, f"Date: {given}"))
    assert message.read(p.message).get_all("Date") == (given,)
    assert not [r for r in p.decision.reasons if r.startswith("Date")]


def test_preview_says_a_date_that_is_not_one_is_replaced(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(msg(*NO_DATE, "Date: 06.12.2026 18:00:00"))
    out = preview(policy_file, eml)
    assert f"  - {NOT_A_DATE}\n" in out
    assert "06.12.2026" not in out.split("Headers as sent:")[1]


@pytest.mark.parametrize(
    ("date", "why"),
    [
        (
            ("Date: 06.12.2026 18:00:00",),
            "Date '06.12.2026 18:00:00' is not a date and time as RFC 5322 3.3 writes one:"
            " kept, as the message's own DKIM signature (d=globex.example) signs it",
        ),
    ],
)
def test_a_date_an_erps_signature_signs_is_kept(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]], date: tuple[str, ...], why: str
) -> None:
    """Written anew, it broke the ERP's own signature where the relay keeps
    its From: with no key of the relay's for that domain, the only one DMARC
    could pass on."""
    without_the_relays_key(policy_file)
    data = msg("From: Hank Scorpio <hank@globex.example>", *NO_DATE[1:], *date)
    signed = erp_signed(data, key_dir, "globex.example.g1", [b"from", b"to", b"date", b"subject"])
    p = run(policy_file, signed, login="erp-globex")
    assert message.read(p.message).get_all("Date") == tuple(d[6:] for d in date)
    assert dkimpy_each(p.message, key_dir[1])[-1]
    assert why in p.decision.reasons


def test_a_date_is_replaced_where_the_erps_signature_is_broken_anyway(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """The relay writes the From anew for a user outside a verified domain."""
    data = msg(*NO_DATE, "Date: 06.12.2026 18:00:00")
    p = run(policy_file, erp_signed(data, key_dir, "globex.example.g1", [b"from", b"date"]))
    assert message.read(p.message).get_all("Date") == ("Mon, 23 Nov 2026 09:30:00 +0000",)
    assert NOT_A_DATE in p.decision.reasons


def test_a_missing_date_is_added_though_an_erps_signature_signs_its_absence(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """RFC 5322 3.6 wants one, and the relay's own signature signs its absence:
    kept missing, a later hop adding one broke every signature."""
    without_the_relays_key(policy_file)
    data = msg("From: Hank Scorpio <hank@globex.example>", *NO_DATE[1:])
    signed = erp_signed(data, key_dir, "globex.example.g1", [b"from", b"to", b"date", b"subject"])
    p = run(policy_file, signed, login="erp-globex")
    assert message.read(p.message).get_all("Date") == ("Mon, 23 Nov 2026 09:30:00 +0000",)
    assert "Date was missing: added" in p.decision.reasons


@pytest.mark.parametrize(
    ("head", "signs"),
    [
        (("From: Hank Scorpio <hank@globex.example>", "X-ERP-User: hank"), b"x-erp-user"),
        (("From: Hank <hank@globex.example>",), b"subject"),  # the From written with his name
    ],
    ids=["control-header-removed", "from-written-anew"],
)
def test_a_bad_date_is_replaced_where_the_relays_edits_break_the_erps_signature(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]], head: tuple[str, ...], signs: bytes
) -> None:
    """A signature over a field the relay removes (a control header) or writes
    anew fails anyway: no reason to keep a Date receivers score as spam."""
    without_the_relays_key(policy_file)
    data = msg(*head, *NO_DATE[1:], "Date: 06.12.2026 18:00")
    signed = erp_signed(data, key_dir, "globex.example.g1", [b"from", b"date", signs])
    p = run(policy_file, signed, login="erp-globex")
    assert message.read(p.message).get_all("Date") == ("Mon, 23 Nov 2026 09:30:00 +0000",)
    assert "Date '06.12.2026 18:00' is not a date and time" in "; ".join(p.decision.reasons)


def test_a_bad_date_is_replaced_where_the_relays_own_signature_aligns(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """With a key of the relay's for the From's domain, DMARC passes on the
    relay's signature: the ERP's kept a Date receivers score as spam for
    nothing."""
    data = msg("From: Hank Scorpio <hank@globex.example>", *NO_DATE[1:], "Date: 06.12.2026 18:00")
    signed = erp_signed(data, key_dir, "globex.example.g1", [b"from", b"to", b"date", b"subject"])
    p = run(policy_file, signed, login="erp-globex")
    assert message.read(p.message).get_all("Date") == ("Mon, 23 Nov 2026 09:30:00 +0000",)
    assert [k.domain for k in p.decision.signing] == ["globex.example"]


@pytest.mark.parametrize("c_tag", [True, False], ids=["c=simple", "no-c="])
def test_a_simple_signature_a_blank_line_left_out_breaks_keeps_nothing(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]], c_tag: bool
) -> None:
    """The line of only white space the relay leaves out of the Subject breaks
    a signature with simple header canonicalisation: the bad Date and the
    missing To were kept for that signature all the same, and went out with
    no valid signature at all. A signature without ``c=`` is simple too
    (RFC 6376 3.5)."""
    without_the_relays_key(policy_file)
    head = ("From: Hank Scorpio <hank@globex.example>", "Subject: Rechnung 1\r\n \r\n more")
    data = msg(*head, "Message-ID: <m2@erp.globex.example>", "Date: 06.12.2026 18:00")
    signed = erp_signed(
        data, key_dir, "globex.example.g1", [b"from", b"to", b"date", b"subject"], b"simple"
    )
    if not c_tag:
        assert signed.count(b" c=simple/relaxed;") == 1
        signed = signed.replace(b" c=simple/relaxed;", b"")
    p = run(policy_file, signed, login="erp-globex")
    sent = message.read(p.message)
    assert sent.get_all("Date") == ("Mon, 23 Nov 2026 09:30:00 +0000",)
    assert sent.get_all("To") == ("undisclosed-recipients:;",)


def test_an_ed25519_key_alone_leaves_the_erps_signature_to_count(
    policy_file: Path, key_dir: tuple[Path, dict[str, str]]
) -> None:
    """Receivers that do not verify RFC 8463 find no signature of the relay's
    they can: the ERP's RSA one, which a repair would break, is then the
    only one DMARC could pass on."""
    text = policy_file.read_text()
    rsa = (
        "      selector: g1\n      algorithm: rsa\n      key_file: keys/globex.example.g1.private\n"
    )
    ed25519 = (
        "      selector: e9\n      algorithm: ed25519\n"
        "      key_file: keys/platform.example.e1.private\n"
    )
    assert rsa in text
    policy_file.write_text(text.replace(rsa, ed25519))
    data = msg("From: Hank Scorpio <hank@globex.example>", *NO_DATE[1:], "Date: 06.12.2026 18:00")
    signed = erp_signed(data, key_dir, "globex.example.g1", [b"from", b"to", b"date", b"subject"])
    p = run(policy_file, signed, login="erp-globex")
    assert [k.algorithm.value for k in p.decision.signing] == ["ed25519"]
    assert message.read(p.message).get_all("Date") == ("06.12.2026 18:00",)


def test_a_key_for_a_domain_that_only_ends_alike_leaves_the_erps_signature_to_count(
    policy_file: Path,
) -> None:
    """myplatform.example is not under platform.example: the relay's signature
    passes no DMARC for a From there (an account that sends as
    post@myplatform.example), and the ERP's, which a Date written anew
    would break, is kept whole. The relay reads its tags alone: this one
    leaves the From, which the account's address replaces, unsigned."""
    path = with_account(policy_file)
    path.write_text(path.read_text().replace("sender: post@sevenoff", "sender: post@myplatform"))
    theirs = (
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sevenoff.example; s=erp;\r\n"
        " h=date:subject; bh=AAAA; b=BBBB"
    )
    data = msg(theirs, "From: Per <per@sevenoff.example>", *NO_DATE[1:], "Date: 06.12.2026 18:00")
    p = run(path, data, mail_from="per@sevenoff.example")
    assert {k.domain for k in p.decision.signing} == {"platform.example"}
    assert message.read(p.message).get_all("Date") == ("06.12.2026 18:00",)
