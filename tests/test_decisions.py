"""Identify, classify and decide, run through the same ``prepare`` the daemon uses."""

from __future__ import annotations

from datetime import UTC, datetime
from email.header import decode_header, make_header
from pathlib import Path

import pytest

from relay import headers, message
from relay.classify import classify
from relay.errors import PolicyError, Rejected
from relay.pipeline import MAX_HEADER, Prepared, prepare
from relay.policy.load import load
from relay.submission import Submission

NOW = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)
BODY = b"Dear customer,\r\n\r\nplease find attached.\r\n.dot line\r\n"


def msg(*fields: str, body: bytes = BODY) -> bytes:
    return "".join(f"{f}\r\n" for f in fields).encode() + b"\r\n" + body


BASE = (
    "From: Jan <jan@acme.example>",
    "To: customer@example.org",
    "Subject: Hello",
    "Date: Mon, 23 Nov 2026 09:00:00 +0000",
    "Message-ID: <m1@erp.acme.example>",
)


def run(
    policy_file: Path,
    data: bytes,
    *,
    login: str | None = None,
    mail_from: str = "erp@erp.acme.example",
    rcpts: tuple[str, ...] = ("customer@example.org",),
) -> Prepared:
    sub = Submission("local", "127.0.0.1", login, mail_from, rcpts, data)
    return prepare(load(policy_file), sub, NOW)


def header(prepared: Prepared, name: str) -> str | None:
    return message.read(prepared.message).get(name)


def decoded(value: str | None) -> str:
    assert value is not None
    return str(make_header(decode_header(value)))


# identify


def test_user_from_envelope_sender(policy_file: Path) -> None:
    p = run(policy_file, msg(*BASE), mail_from="kari@acme.example")
    assert p.decision.identity.user.id == "kari"
    assert p.decision.identity.source == "envelope_sender"
    assert any("envelope sender <kari@acme.example>" in r for r in p.decision.reasons)


def test_user_from_alias_in_from_header(policy_file: Path) -> None:
    data = msg("From: Sales <SALG@acme.example>", *BASE[1:])
    p = run(policy_file, data)
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header_from")


@pytest.mark.parametrize("alias", ["ordre@erp_host.acme.example", "kari..n@acme.example"])
def test_user_from_an_alias_the_policy_takes_though_smtp_would_not(
    policy_file: Path, alias: str
) -> None:
    """An address is looked up among the policy's as written; only a Reply-To
    taken from a header must be one SMTP can deliver to."""
    text = policy_file.read_text().replace(
        "aliases: [salg@acme.example]", f'aliases: [salg@acme.example, "{alias}"]'
    )
    policy_file.write_text(text)
    p = run(policy_file, msg(f"From: Kari <{alias}>", *BASE[1:]), mail_from="erp@erp.example")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header_from")


TWO_USERS = (
    "550 5.7.1 Sender ambiguous: From names more than one user"
    " (kari@acme.example is user kari, jan@acme.example is user jan)"
)


@pytest.mark.parametrize(
    "head",
    [
        ("From: Kari <kari@acme.example>", "From: Jan Janssens <jan@acme.example>"),
        ("From: kari@acme.example, Jan <jan@acme.example>",),
        ("From: Kari <kari@acme.example>, Salg <salg@acme.example>", "From: jan@acme.example"),
    ],
)
def test_a_from_naming_two_users_is_refused(policy_file: Path, head: tuple[str, ...]) -> None:
    """The first was taken: its Reply-To, its copy and its audit record went
    with a message the other may have sent."""
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*head, *BASE[1:]), mail_from="erp-bounces@erp.acme.example")
    assert caught.value.line == TWO_USERS


@pytest.mark.parametrize(
    "head",
    [
        ("From: Kari <kari@acme.example>", "From: Salg <SALG@acme.example>"),
        ("From: Who <who@nowhere.example>, Kari <kari@acme.example>",),
    ],
)
def test_a_from_naming_one_user_is_that_users(policy_file: Path, head: tuple[str, ...]) -> None:
    """An alias is the same user, and an address that is no user's leaves no
    doubt."""
    p = run(policy_file, msg(*head, *BASE[1:]), mail_from="erp-bounces@erp.acme.example")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header_from")


@pytest.mark.parametrize(
    "head",
    [
        ("From: Kari <kari@acme.example>", "From: Hank <hank@globex.example>"),
        ("From: Hank <hank@globex.example>", "From: Kari <kari@acme.example>"),
    ],
)
def test_a_from_naming_a_user_the_session_may_not_be_is_refused_wherever_it_stands(
    policy_file: Path, head: tuple[str, ...]
) -> None:
    """A user of a tenant that takes mail only with a login, in a session
    without one, passed over for the other user: Globex's invoice went out
    as Acme's user, with a copy to her; a login of another tenant too."""
    _globex_needs_a_login(policy_file)
    data = msg(*head, *BASE[1:])
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, mail_from="erp-bounces@erp.acme.example")
    assert caught.value.line.startswith("550 5.7.1 Sender not known to this relay")
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, login="erp-acme", mail_from="erp-bounces@erp.acme.example")
    assert "may not send as a user of another tenant" in caught.value.line


def test_a_from_naming_two_users_is_no_doubt_where_a_login_or_the_envelope_names_one(
    policy_file: Path,
) -> None:
    data = msg("From: kari@acme.example, jan@acme.example", *BASE[1:])
    assert run(policy_file, data, login="erp-acme-jan").decision.identity.user.id == "jan"
    assert run(policy_file, data, mail_from="kari@acme.example").decision.identity.user.id == "kari"
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, login="erp-acme")  # a login of the tenant, bound to no user
    assert caught.value.line == TWO_USERS


def test_user_from_erp_header_by_id(policy_file: Path) -> None:
    data = msg("From: ERP <erp@erp.acme.example>", "X-ERP-User: kari", *BASE[1:])
    p = run(policy_file, data, login="erp-acme")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header")


@pytest.mark.parametrize("value", ["Kari", "KARI", "Kari Nordmann <Kari@Acme.Example>"])
def test_user_from_erp_header_in_any_case_or_as_a_mailbox(policy_file: Path, value: str) -> None:
    """Otherwise the default user's name went on the invoice, and the copy to him."""
    text = policy_file.read_text().replace("unknown_sender: reject", "unknown_sender: default")
    policy_file.write_text(text)
    data = msg("From: ERP <erp@erp.acme.example>", f"X-ERP-User: {value}", *BASE[1:])
    p = run(policy_file, data, login="erp-acme")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header")


def test_an_erp_header_value_two_user_ids_differ_from_in_case_only_is_neither(
    policy_file: Path,
) -> None:
    """``PER`` with users ``per`` and ``Per``: the first in the policy sent the
    invoice, one of two people the ERP may have meant. The default user
    sends, as for a value that is no user's; one written exactly is that one."""
    text = policy_file.read_text().replace("unknown_sender: reject", "unknown_sender: default")
    policy_file.write_text(text)
    _with_users(policy_file, "per", "Per")
    for value, user, source in (("PER", "jan", "default"), ("Per", "Per", "header")):
        data = msg("From: ERP <erp@erp.acme.example>", f"X-ERP-User: {value}", *BASE[1:])
        p = run(policy_file, data, login="erp-acme")
        assert (p.decision.identity.user.id, p.decision.identity.source) == (user, source)


def test_an_unknown_erp_header_value_is_named_in_the_refusal(policy_file: Path) -> None:
    data = msg("From: ERP <erp@erp.acme.example>", "X-ERP-User: karin", *BASE[1:])
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, login="erp-acme", mail_from="erp@erp.acme.example")
    assert caught.value.line == (
        "550 5.7.1 Sender not known to this relay (envelope sender erp@erp.acme.example,"
        " From erp@erp.acme.example, X-ERP-User 'karin')"
    )


def test_login_bound_to_one_user_wins(policy_file: Path) -> None:
    p = run(policy_file, msg(*BASE), login="erp-acme-jan", mail_from="x@erp.example")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("jan", "auth_login")


def test_a_login_a_reload_removed_or_gave_a_new_password_sends_no_more(
    policy_file: Path,
) -> None:
    """Its session outlives the reload: read as no login at all, it could send
    as any tenant's user, and a new password is the first thing done about a
    leaked one. The client is told to log in again."""
    policy = load(policy_file)

    def sent(login: str, auth_hash: str | None) -> Prepared:
        sub = Submission(
            "local",
            "127.0.0.1",
            login,
            "erp@erp.acme.example",
            ("customer@example.org",),
            msg(*BASE),
            auth_hash=auth_hash,
        )
        return prepare(policy, sub, NOW)

    with pytest.raises(Rejected) as caught:
        sent("erp-removed", None)
    assert caught.value.line == (
        "454 4.7.0 Temporary authentication failure: no login 'erp-removed' in the policy"
        " since this session logged in; log in again"
    )
    with pytest.raises(Rejected) as caught:
        sent("erp-acme", "scrypt$16384$8$1$b2xk$b2xk")
    assert caught.value.line.startswith(
        "454 4.7.0 Temporary authentication failure: the password of login 'erp-acme' changed"
    )
    current = policy.logins["erp-acme"].password_hash
    assert sent("erp-acme", current).decision.identity.login == "erp-acme"


def _with_users(policy_file: Path, *ids: str) -> None:
    """Acme with more users after Kari, ``per`` at per@acme.example; a second
    id alike in all but case (``Per``) at per2@acme.example."""
    added = "".join(
        f"      {user}:\n        name: {user} Persen\n"
        f"        address: {user.lower()}{n + 1 if n else ''}@acme.example\n"
        for n, user in enumerate(ids)
    )
    kari = "        aliases: [salg@acme.example]\n"
    policy_file.write_text(policy_file.read_text().replace(kari, kari + added))


def _with_login(policy_file: Path, login: str, users: str) -> None:
    """A login of Acme's, as erp-acme-jan is, bound to ``users`` (``[jan, kari]``)."""
    text = policy_file.read_text()
    jan = text[text.index("  erp-acme-jan:\n") : text.index("  erp-globex:\n")]
    bound = jan.replace("erp-acme-jan", login).replace("users: [jan]", f"users: {users}")
    policy_file.write_text(text.replace(jan, jan + bound))


def test_a_login_of_two_users_is_the_one_a_later_source_names(policy_file: Path) -> None:
    """A login bound to more than one user names none of them: taken for the
    first it lists, Kari's invoice went out under Jan's name, with his
    Reply-To."""
    _with_login(policy_file, "erp-acme-two", "[jan, kari]")
    p = run(policy_file, msg("From: Kari <kari@acme.example>", *BASE[1:]), login="erp-acme-two")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header_from")
    assert header(p, "Reply-To") == "Kåre Ødegård <kari@acme.example>"


def _globex_needs_a_login(policy_file: Path, unknown_sender: str = "reject") -> None:
    text = policy_file.read_text().replace(
        "    name: Globex GmbH\n", "    name: Globex GmbH\n    auth: required\n"
    )
    if unknown_sender != "reject":
        text = text.replace("  unknown_sender: reject\n", unknown_sender)
    policy_file.write_text(text)


def test_a_session_without_a_login_is_no_user_of_a_tenant_that_requires_one(
    policy_file: Path,
) -> None:
    """Any client a listener let in without a login sent as any tenant's users,
    with their DKIM keys and upstream accounts: a hosting platform could not
    bind a tenant to its logins. The refusal is an unknown sender's, naming
    no tenant."""
    _globex_needs_a_login(policy_file)
    data = msg("From: Hank <hank@globex.example>", *BASE[1:])
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, mail_from="hank@globex.example")
    assert caught.value.line == (
        "550 5.7.1 Sender not known to this relay (envelope sender hank@globex.example,"
        " From hank@globex.example)"
    )
    p = run(policy_file, data, login="erp-globex", mail_from="hank@globex.example")
    assert (p.decision.identity.tenant.id, p.decision.identity.user.id) == ("globex", "hank")
    acme = run(policy_file, msg(*BASE), mail_from="jan@acme.example")  # the other tenant's
    assert acme.decision.identity.user.id == "jan"


def test_nor_its_default_user(policy_file: Path) -> None:
    default = "  unknown_sender: default\n  default_tenant: globex\n"
    _globex_needs_a_login(policy_file, default)
    policy_file.write_text(
        policy_file.read_text().replace(
            "    bcc_sender: []\n    users:\n      hank:",
            "    bcc_sender: []\n    default_user: hank\n    users:\n      hank:",
        )
    )
    data = msg("From: Someone <someone@elsewhere.example>", *BASE[1:])
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, mail_from="someone@elsewhere.example")
    assert caught.value.line.startswith("550 5.7.1 Sender not known to this relay")
    assert caught.value.note == (  # the sysadmin's, in the log and relay preview
        "the default user is 'hank', of tenant 'globex', which takes mail only with one of"
        " its logins, and this session has none"
    )
    p = run(policy_file, data, login="erp-globex", mail_from="someone@elsewhere.example")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("hank", "default")


def test_nor_a_user_a_later_source_names(policy_file: Path) -> None:
    """The first source that names a user decides, as with another tenant's
    login: Globex's envelope sender, passed over, left Acme's From to send
    Globex's message as Jan."""
    _globex_needs_a_login(policy_file)
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*BASE), mail_from="hank@globex.example")
    assert caught.value.line.startswith("550 5.7.1 Sender not known to this relay")
    assert caught.value.note == (
        "envelope sender <hank@globex.example> is user 'hank', of tenant 'globex', which takes"
        " mail only with one of its logins, and this session has none"
    )


def test_a_tenants_auth_is_required_or_optional(policy_file: Path) -> None:
    policy_file.write_text(
        policy_file.read_text().replace(
            "    name: Globex GmbH\n", "    name: Globex GmbH\n    auth: yes\n"
        )
    )
    with pytest.raises(PolicyError) as caught:
        load(policy_file)
    assert "tenants.globex.auth: expected one of: required, optional" in str(caught.value)


def test_login_of_one_tenant_cannot_send_as_another(policy_file: Path) -> None:
    data = msg("From: Hank <hank@globex.example>", *BASE[1:])
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, login="erp-acme")
    # the other tenant's user is not named to this tenant's ERP
    assert caught.value.line == "550 5.7.1 Login erp-acme may not send as a user of another tenant"


def test_login_restricted_to_users(policy_file: Path) -> None:
    text = policy_file.read_text().replace(
        "order: [auth_login, envelope_sender, header_from, header]", "order: [envelope_sender]"
    )
    policy_file.write_text(text)
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*BASE), login="erp-acme-jan", mail_from="kari@acme.example")
    assert caught.value.line == "550 5.7.1 Login erp-acme-jan may not send as user kari"


def test_unknown_sender_rejected_with_what_was_tried(policy_file: Path) -> None:
    data = msg("From: Who <who@nowhere.example>", *BASE[1:])
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, mail_from="who@nowhere.example")
    assert caught.value.line == (
        "550 5.7.1 Sender not known to this relay "
        "(envelope sender who@nowhere.example, From who@nowhere.example)"
    )


def test_unknown_sender_default_user(policy_file: Path) -> None:
    text = policy_file.read_text().replace("unknown_sender: reject", "unknown_sender: default")
    policy_file.write_text(text)
    data = msg("From: Who <who@nowhere.example>", *BASE[1:])
    p = run(policy_file, data, login="erp-acme", mail_from="who@nowhere.example")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("jan", "default")


def test_an_unknown_sender_of_a_login_the_default_user_is_not_on_is_refused(
    policy_file: Path,
) -> None:
    """The tenant's default user is one this login may not be: the mail of a
    login bound to Kari and Per went out as Jan."""
    text = policy_file.read_text().replace("unknown_sender: reject", "unknown_sender: default")
    policy_file.write_text(text)
    _with_users(policy_file, "per")
    _with_login(policy_file, "erp-acme-kp", "[kari, per]")
    data = msg("From: Who <who@nowhere.example>", *BASE[1:])
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, login="erp-acme-kp", mail_from="who@nowhere.example")
    assert caught.value.line == "550 5.7.1 Login erp-acme-kp may not send as user jan"


# classify


@pytest.mark.parametrize(
    ("fields", "doc_type", "rule"),
    [
        (("X-Document-Type: invoice", "Subject: Your documents"), "invoice", "invoice-header"),
        (("Subject: Rechnung 4711",), "invoice", "invoice-subject"),
        (("Subject: =?utf-8?q?Faktura_nr=2E_12?=",), "invoice", "invoice-subject"),
        (("Subject: Tilbud på arbeid",), "quote", "quote-subject"),
        (("Subject: Order 77",), "other", None),
        (("Subject: Hello",), "other", None),
        # white space around the value, as a fixed-width field pads it or a fold after
        # the colon leaves it, is no part of it: '^invoice$' still matches
        (("X-Document-Type: invoice   ", "Subject: Your documents"), "invoice", "invoice-header"),
        (("X-Document-Type:\r\n invoice", "Subject: Your documents"), "invoice", "invoice-header"),
    ],
)
def test_classify(
    policy_file: Path, fields: tuple[str, ...], doc_type: str, rule: str | None
) -> None:
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(policy_file, msg(*base, *fields), mail_from="jan@acme.example")
    assert (p.decision.classification.doc_type, p.decision.classification.rule) == (doc_type, rule)


def test_an_anchored_subject_rule_matches_a_subject_folded_after_its_colon(
    policy_file: Path,
) -> None:
    text = policy_file.read_text()
    anchored = text.replace(
        "subject: '(?i)\\b(invoice|faktura|facture|fattura|rechnung)\\b'",
        "subject: '^Invoice [0-9]+$'",
    )
    assert anchored != text
    policy_file.write_text(anchored)
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(policy_file, msg(*base, "Subject:\r\n Invoice 5 "), mail_from="jan@acme.example")
    assert p.decision.classification.rule == "invoice-subject"


def test_classify_conditions_combine_with_and(policy_file: Path) -> None:
    mixed = (
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="b1"',
    )
    body = (
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--b1\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="ORD-77.PDF"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
    )
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(policy_file, msg(*base, "Subject: Order 77", *mixed, body=body))
    assert p.decision.classification.doc_type == "order_confirmation"
    assert "attachment 'ORD-77.PDF' matches '.PDF'" in p.decision.classification.reason


def test_classify_names_the_attachment_that_matched(policy_file: Path) -> None:
    """With several attachments, the pattern alone (``'.pdf'``) did not say
    which file made the type."""
    mixed = (
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="b1"',
    )
    parts = b"".join(
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + name + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"
        for name in (b"terms.txt", b"o18.pdf", b"o19.pdf")
    )
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(policy_file, msg(*base, "Subject: Order 18", *mixed, body=parts + b"--b1--\r\n"))
    assert "attachment 'o18.pdf' matches '.pdf'" in p.decision.classification.reason


def test_a_header_rule_matches_any_of_the_fields_values(policy_file: Path) -> None:
    """``Keywords`` may come more than once, each meant (RFC 5322 3.6.5): read
    as its first alone, an invoice tagged ``urgent`` first went out as
    "other", with no copy to the sender; the value in the middle is read too."""
    rule = (
        "  - id: invoice-keyword\n    type: invoice\n"
        "    header: {name: Keywords, pattern: '^invoice$'}\n"
    )
    policy_file.write_text(policy_file.read_text().replace("classify:\n", f"classify:\n{rule}"))
    p = run(policy_file, msg(*BASE, "Keywords: urgent", "Keywords: invoice", "Keywords: q4"))
    assert (p.decision.classification.doc_type, p.decision.classification.rule) == (
        "invoice",
        "invoice-keyword",
    )
    assert p.decision.bcc_added == ("jan@acme.example",)


# decide and rewrite


def test_platform_from_with_display_name_and_reply_to_sender(policy_file: Path) -> None:
    p = run(policy_file, msg(*BASE))
    assert header(p, "From") == "Jan Janssens via Acme AS <noreply@platform.example>"
    assert header(p, "Reply-To") == "Jan Janssens <jan@acme.example>"
    assert p.decision.signing_domain == "platform.example"
    assert [k.selector for k in p.decision.signing] == ["s1", "e1"]


def test_non_ascii_display_name_is_encoded(policy_file: Path) -> None:
    p = run(policy_file, msg(*BASE), mail_from="kari@acme.example")
    fields, _ = headers.split(p.message)
    from_raw = next(f.raw for f in fields if f.name.lower() == "from").decode("ascii")
    assert from_raw.startswith("From: =?utf-8?b?")
    assert from_raw.endswith(" <noreply@platform.example>\r\n")
    assert "Kåre Ødegård via Acme AS" in decoded(from_raw.split(":", 1)[1].strip())


def test_verified_domain_keeps_users_own_from(policy_file: Path) -> None:
    data = msg("From: Hank <hank@globex.example>", *BASE[1:])
    p = run(policy_file, data, login="erp-globex")
    assert header(p, "From") == "Hank Scorpio <hank@globex.example>"
    assert header(p, "Reply-To") == "Globex GmbH <info@globex.example>"
    assert [k.domain for k in p.decision.signing] == ["globex.example"]


def test_invoice_reply_to_from_erp_header_and_fallback(policy_file: Path) -> None:
    base = [f for f in BASE if not f.startswith("Subject")]
    with_header = msg(*base, "Subject: Invoice 1", "X-Responsible: Per <per@acme.example>")
    p = run(policy_file, with_header)
    assert header(p, "Reply-To") == "Per <per@acme.example>"
    assert header(p, "X-Responsible") is None

    p = run(policy_file, msg(*base, "Subject: Invoice 1", "X-Responsible:"))
    assert header(p, "Reply-To") == "Jan Janssens <jan@acme.example>"
    assert any("before it: header X-Responsible is empty" in r for r in p.decision.reasons)


def test_reply_to_keep(policy_file: Path) -> None:
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(policy_file, msg(*base, "Subject: Quote 5", "Reply-To: desk@acme.example"))
    assert header(p, "Reply-To") == "desk@acme.example"


def test_bcc_to_sender_for_invoice_only_in_envelope(policy_file: Path) -> None:
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(policy_file, msg(*base, "Subject: Invoice 9"))
    assert p.decision.bcc_added == ("jan@acme.example",)
    assert p.decision.recipients == ("customer@example.org", "jan@acme.example")
    fields = headers.split(p.message)[0]
    visible = [f.raw for f in fields if f.name.lower() in ("to", "cc", "bcc")]
    assert visible == [b"To: customer@example.org\r\n"]

    p = run(policy_file, msg(*BASE))
    assert p.decision.bcc_added == ()


def test_bcc_never_duplicates_a_recipient(policy_file: Path) -> None:
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(
        policy_file, msg(*base, "Subject: Invoice 9"), rcpts=("c@example.org", "JAN@acme.example")
    )
    assert p.decision.bcc_added == ()
    assert p.decision.recipients == ("c@example.org", "JAN@acme.example")


def test_bcc_header_and_control_headers_removed_body_untouched(policy_file: Path) -> None:
    data = msg(
        *BASE,
        "Cc: a@example.org, b@example.org",
        "Bcc: secret@example.org",
        "X-ERP-User: jan",
        "X-Document-Type: invoice",
    )
    p = run(policy_file, data, rcpts=("customer@example.org", "secret@example.org"))
    view = message.read(p.message)
    assert view.get("Bcc") is None and view.get("X-ERP-User") is None
    assert view.get("X-Document-Type") is None
    assert view.get("Cc") == "a@example.org, b@example.org"
    assert "secret@example.org" in p.decision.recipients
    assert p.message.endswith(b"\r\n\r\n" + BODY)
    assert p.message.split(b"\r\n\r\n", 1)[1] == BODY


def test_missing_date_and_message_id_are_added(policy_file: Path) -> None:
    data = msg("From: Jan <jan@acme.example>", "To: customer@example.org", "Subject: Hi")
    p = run(policy_file, data)
    assert header(p, "Date") == "Mon, 23 Nov 2026 09:30:00 +0000"
    assert header(p, "Message-ID") == f"<{p.queue_id}@relay.platform.example>"


@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_date_and_message_id_are_filled_in(policy_file: Path, blank: str) -> None:
    """An empty field is missing to a reader (RFC 5322): it is replaced, not kept."""
    data = msg(
        "From: Jan <jan@acme.example>", "To: customer@example.org", "Subject: Hi",
        f"Date:{blank}", f"Message-ID:{blank}",
    )  # fmt: skip
    p = run(policy_file, data)
    view = message.read(p.message)
    assert view.get_all("Date") == ("Mon, 23 Nov 2026 09:30:00 +0000",)
    assert view.get_all("Message-ID") == (f"<{p.queue_id}@relay.platform.example>",)


@pytest.mark.parametrize(
    "given", ["12345", "<12345>", "<>", "<a b@erp.example>", "<a..b@erp.example>", "a b@erp"]
)
def test_a_message_id_that_is_not_one_is_replaced_and_said(policy_file: Path, given: str) -> None:
    """Gmail refuses mail without a valid Message-ID, after the ERP had its 250."""
    data = msg("From: Jan <jan@acme.example>", "To: c@example.org", f"Message-ID: {given}")
    p = run(policy_file, data)
    ours = f"<{p.queue_id}@relay.platform.example>"
    assert message.read(p.message).get_all("Message-ID") == (ours,)
    assert f"Message-ID {given!r} is not one (RFC 5322 3.6.4: <left@right>): replaced" in (
        p.decision.reasons
    )


@pytest.mark.parametrize(
    "given",
    [
        "<m1@erp.acme.example>",
        "<m1@[192.0.2.1]>",
        '<"m 1"@erp.acme.example>',
        "<m1@erp.acme.example> (ERP 5.2)",
        "(ERP) <m1@erp.acme.example>",
    ],
)
def test_a_message_id_is_kept_as_written(policy_file: Path, given: str) -> None:
    data = msg("From: Jan <jan@acme.example>", "To: c@example.org", f"Message-ID:  {given}")
    p = run(policy_file, data)
    assert f"Message-ID:  {given}\r\n".encode() in p.message  # byte for byte
    assert not any("Message-ID" in reason for reason in p.decision.reasons)


def test_a_second_from_or_reply_to_is_dropped_and_said(policy_file: Path) -> None:
    data = msg(
        *BASE, "From: CEO <ceo@bank.example>", "Reply-To: a@x.example", "Reply-To: b@y.example"
    )
    p = run(policy_file, data)
    view = message.read(p.message)
    assert len(view.get_all("From")) == 1 and len(view.get_all("Reply-To")) == 1
    assert "From appeared 2 times: one is written" in p.decision.reasons
    assert "Reply-To appeared 2 times: one is written" in p.decision.reasons


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("To: other@example.org",), "To (2 times)"),
        (("Subject: Hello", "Subject: Hello"), "Subject (3 times)"),
        (("Message-Id: <m2@erp.acme.example>",), "Message-ID (2 times)"),
        (("Date: Mon, 23 Nov 2026 09:00:00 +0000", "Cc: a@example.org", "cc: b@example.org"),
         "Date (2 times), Cc (2 times)"),
    ],
)  # fmt: skip
def test_a_field_allowed_once_given_twice_is_refused(
    policy_file: Path, extra: tuple[str, ...], named: str
) -> None:
    """Gmail refuses such a message ("not RFC 5322 compliant: duplicate
    headers"): the ERP is told now, not by a failure notice later."""
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*BASE, *extra))
    assert caught.value.line == (
        f"550 5.6.0 Header fields allowed once appear more often: {named};"
        " receivers such as Gmail refuse such a message (RFC 5322 3.6)"
    )


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (("Message-ID: INV-1@erp.acme.example", "Message-ID: <INV-2@erp.acme.example>"),
         "Message-ID (2 times)"),
        (("Date:", "Date: Mon, 23 Nov 2026 09:00:00 +0000"), "Date (2 times)"),
        # one empty among others with an address: no empty field to repair
        (("To:",), "To (2 times)"),
        (("Cc:", "Cc: a@example.org"), "Cc (2 times)"),
    ],
)  # fmt: skip
def test_a_repaired_first_field_does_not_hide_a_second(
    policy_file: Path, fields: tuple[str, ...], named: str
) -> None:
    """Repairing the first (brackets added, an empty Date filled in) wrote one
    and dropped the other: the ERP's real Message-ID or Date, silently."""
    base = [f for f in BASE if not f.startswith(("Date", "Message-ID"))]
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*base, *fields))
    assert f"appear more often: {named};" in caught.value.line


def test_fields_the_policy_writes_or_removes_may_come_twice(policy_file: Path) -> None:
    data = msg(*BASE, "Bcc: a@example.org", "Bcc: b@example.org", "Comments: 1", "Comments: 2")
    view = message.read(run(policy_file, data).message)
    assert view.get_all("Bcc") == () and len(view.get_all("Comments")) == 2


def test_signature_is_prepended(policy_file: Path) -> None:
    p = run(policy_file, msg(*BASE))
    names = [f.name for f in headers.split(p.message)[0]]
    assert names[:2] == ["DKIM-Signature", "DKIM-Signature"]


@pytest.mark.parametrize(
    "first",
    [
        "From jan@acme.example Mon Nov 23 09:00:00 2026",
        "Bcc : hidden@example.org",
    ],
)
def test_header_lines_readers_disagree_on_are_refused(policy_file: Path, first: str) -> None:
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*BASE, first, "Subject: x"))
    assert caught.value.code == 550
    assert caught.value.line.startswith("550 5.6.0 Malformed header line:")


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_a_message_beginning_with_an_empty_line_is_refused(policy_file: Path, eol: bytes) -> None:
    """Otherwise its whole header, Bcc included, reaches the recipients as body
    text. An empty line of LF alone is one too, and said so,
    not a malformed header line."""
    with pytest.raises(Rejected) as caught:
        run(policy_file, eol + msg(*BASE, "Bcc: hidden@example.org").replace(b"\r\n", eol))
    assert caught.value.line == (
        "550 5.6.0 Message begins with an empty line: its header would be sent as body text"
    )


@pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\n\r\n"])
def test_an_empty_message_is_refused(policy_file: Path, data: bytes) -> None:
    """Taken, the customer got a blank message bearing only the relay's fields."""
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, mail_from="jan@acme.example")
    assert caught.value.line == "550 5.6.0 Message is empty: no header field and no body"


def test_a_message_of_header_fields_alone_passes(policy_file: Path) -> None:
    data = msg(*BASE).split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"\r\nSubject: Hello\r\n" in run(policy_file, data, mail_from="jan@acme.example").message


def _header_of(size: int) -> tuple[str, ...]:
    """BASE and ``Comments`` fields making a header block of exactly ``size`` bytes."""
    used = len(msg(*BASE, body=b"")) - 2  # less the empty line
    line = "Comments: " + "x" * 984
    count, rest = divmod(size - used, len(line) + 2)
    return (*BASE, *[line] * count, "Comments: " + "x" * (rest - 12))


def test_a_header_block_over_the_limit_is_refused(policy_file: Path) -> None:
    """The email package's address parser costs ~5 µs a byte on the event loop:
    a 25 MB ``From`` held every session of its worker for minutes."""
    at_limit = msg(*_header_of(MAX_HEADER))
    assert headers.split_at(at_limit)[1] == MAX_HEADER
    run(policy_file, at_limit, mail_from="kari@acme.example")
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*_header_of(MAX_HEADER + 1)), mail_from="kari@acme.example")
    assert caught.value.line == (
        f"552 5.3.4 Message header too large: {MAX_HEADER + 1} bytes before the first"
        f" empty line, at most {MAX_HEADER}"
    )


@pytest.mark.parametrize(
    ("lines", "refusal"),
    [
        (("Subject: Faktura\x0c42",), "A form feed in header field Subject"),
        (("Subject: Faktura", " \x0b42"), "A vertical tab in header field Subject"),
        (("X-Print-Layout: \x0c",), "A form feed in header field X-Print-Layout"),
    ],
)
def test_a_page_break_in_a_header_field_is_refused(
    policy_file: Path, lines: tuple[str, ...], refusal: str
) -> None:
    """OpenDKIM reads VT and FF in a field as white space, dkimpy (and RFC 6376)
    does not: signed, the message would fail DKIM at OpenDKIM's receivers."""
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*BASE, *lines))
    assert caught.value.line == f"550 5.6.0 {refusal}: not signable for every receiver, remove it"


def test_a_page_break_in_the_body_passes(policy_file: Path) -> None:
    p = run(policy_file, msg(*BASE, body=b"page one\x0cpage two\r\n"))
    assert p.message.endswith(b"page one\x0cpage two\r\n")


def test_unfolded_values_read_as_written(policy_file: Path) -> None:
    view = message.read(msg("From: Jan <jan@acme.example>", "To: a@example.org,", " b@example.org"))
    assert view.get("To") == "a@example.org, b@example.org"


def test_verified_domain_without_key_is_sent_unsigned_and_says_so(policy_file: Path) -> None:
    text = policy_file.read_text()
    start = text.index("    - domain: globex.example")
    end = text.index("upstreams:")
    policy_file.write_text(text[:start] + text[end:])
    data = msg("From: Hank <hank@globex.example>", *BASE[1:])
    p = run(policy_file, data, login="erp-globex")
    assert p.decision.signing == ()
    assert "no DKIM key for globex.example: the message is not signed" in p.decision.reasons
    assert not any(f.name == "DKIM-Signature" for f in headers.split(p.message)[0])


# header values an ERP passes on from its users


def test_user_from_from_header_is_the_address_not_text_in_its_name(policy_file: Path) -> None:
    data = msg("From: =?utf-8?q?Kari=2C_jan=40acme.example?= <kari@acme.example>", *BASE[1:])
    p = run(policy_file, data, mail_from="erp@erp.acme.example")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header_from")


INVOICE = (*(f for f in BASE if not f.startswith("Subject")), "Subject: Invoice 1")


def test_encoded_words_in_the_reply_to_source_stay_in_the_name(policy_file: Path) -> None:
    responsible = "=?utf-8?q?=C3=85se_=3Cevil=40attacker.example=3E=2C?= <per@acme.example>"
    p = run(policy_file, msg(*INVOICE, f"X-Responsible: {responsible}"))
    assert message.read(p.message).addresses("Reply-To") == (
        ("Åse <evil@attacker.example>,", "per@acme.example"),
    )
    (field,) = [f for f in headers.split(p.message)[0] if f.name == "Reply-To"]
    assert b"evil@attacker.example" not in field.raw


def test_a_line_break_encoded_in_the_reply_to_source_skips_it(policy_file: Path) -> None:
    responsible = "=?utf-8?q?Evil=0D=0ABcc=3A_x=40y.example?= <per@acme.example>"
    p = run(policy_file, msg(*INVOICE, f"X-Responsible: {responsible}"))
    assert header(p, "Reply-To") == "Jan Janssens <jan@acme.example>"
    assert b"x@y.example" not in p.message
    said = "before it: header X-Responsible holds no usable address"
    assert any(said in r for r in p.decision.reasons)


def test_raw_utf8_names_and_subjects_are_read_as_utf8(policy_file: Path) -> None:
    text = policy_file.read_text().replace("|rechnung)", "|rechnung|rückerstattung)")
    policy_file.write_text(text)
    base = [f for f in BASE if not f.startswith("Subject")]
    data = msg(
        *base, "Subject: Rückerstattung für März", "X-Responsible: Jörg Müller <j@acme.example>"
    )
    p = run(policy_file, data)
    assert p.decision.classification.rule == "invoice-subject"
    assert p.view.subject == "Rückerstattung für März"
    assert message.read(p.message).addresses("Reply-To") == (("Jörg Müller", "j@acme.example"),)

    p = run(policy_file, msg(*INVOICE, 'X-Responsible: "Müller, Hans" <hans@acme.example>'))
    assert message.read(p.message).addresses("Reply-To") == (("Müller, Hans", "hans@acme.example"),)


def test_8bit_names_and_subjects_that_are_not_utf8_are_read_as_windows_1252(
    policy_file: Path,
) -> None:
    """A legacy ERP on Windows writes Latin-1 / Windows-1252 bytes: the name went
    into the signed Reply-To as ``J\ufffdrg M\ufffdller``, the rule missed the subject."""
    text = policy_file.read_text().replace("|rechnung)", "|rechnung|rückerstattung)")
    policy_file.write_text(text)
    base = msg(*[f for f in BASE if not f.startswith("Subject")])
    data = (
        b"Subject: R\xfcckerstattung f\xfcr M\xe4rz \x80 12\r\n"
        b"X-Responsible: J\xf6rg M\xfcller <j@acme.example>\r\n" + base
    )
    p = run(policy_file, data)
    assert p.decision.classification.rule == "invoice-subject"
    assert p.view.subject == "Rückerstattung für März € 12"
    assert message.read(p.message).addresses("Reply-To") == (("Jörg Müller", "j@acme.example"),)


def test_an_address_longer_than_smtp_allows_is_no_reply_to_source(policy_file: Path) -> None:
    long_local = f'Per <"{"a" * 600}\r\n {"a" * 600}"@acme.example>'
    p = run(policy_file, msg(*INVOICE, f"X-Responsible: {long_local}"))
    assert header(p, "Reply-To") == "Jan Janssens <jan@acme.example>"
    said = "before it: header X-Responsible holds no usable address"
    assert any(said in r for r in p.decision.reasons)
    assert max(map(len, p.message.split(b"\r\n"))) <= 998


def test_a_reply_to_name_without_fold_points_is_encoded(policy_file: Path) -> None:
    name = "a." * 600
    p = run(policy_file, msg(*INVOICE, f'X-Responsible: "{name}" <per@acme.example>'))
    assert message.read(p.message).addresses("Reply-To") == ((name, "per@acme.example"),)
    assert max(map(len, p.message.split(b"\r\n"))) <= 78


def test_resent_bcc_is_removed_like_bcc(policy_file: Path) -> None:
    data = msg(
        *BASE,
        "Resent-Bcc: hidden@example.org",
        "RESENT-BCC: other@example.org,",
        " more@example.org",
    )
    head = run(policy_file, data).message.split(b"\r\n\r\n", 1)[0]
    for hidden in (b"Resent-Bcc", b"hidden@", b"other@", b"more@"):
        assert hidden.lower() not in head.lower()


def test_return_path_and_content_length_are_removed(policy_file: Path) -> None:
    """The envelope sender upstream is the platform's, and a byte count is stale
    once the relay has added its fields."""
    data = msg(*BASE, "Return-Path: <erp-bounce@acme.example>", "Content-Length: 3")
    view = message.read(run(policy_file, data, mail_from="kari@acme.example").message)
    assert view.get_all("Return-Path") == () and view.get_all("Content-Length") == ()


def test_sender_is_removed_when_the_relay_sets_from(policy_file: Path) -> None:
    data = msg(*BASE, "Sender: ceo@bank.example", "sender: Other\r\n <other@bank.example>")
    p = run(policy_file, data, mail_from="kari@acme.example")
    assert message.read(p.message).get_all("Sender") == ()
    assert b"bank.example" not in p.message
    assert "Sender removed" in " ".join(p.decision.reasons)

    p = run(policy_file, msg(*BASE))
    assert not any("Sender" in r for r in p.decision.reasons)


@pytest.mark.parametrize(
    "written",
    ["Kari <kari@bücher.example>", "Kari <KARI@BÜCHER.example>", "kari@xn--bcher-kva.example"],
)
def test_an_address_whose_domain_is_written_in_unicode_is_its_users(
    policy_file: Path, written: str
) -> None:
    """The policy holds the A-label form only; the same mailbox in Unicode was an
    unknown sender, or went out under the default user's name."""
    text = policy_file.read_text().replace(
        "aliases: [salg@acme.example]", "aliases: [kari@xn--bcher-kva.example]"
    )
    policy_file.write_text(text)
    p = run(policy_file, msg(f"From: {written}", "To: customer@example.org", "Subject: x"))
    identity = p.decision.identity
    assert (identity.tenant.id, identity.user.id, identity.source) == (
        "acme",
        "kari",
        "header_from",
    )


@pytest.mark.parametrize(("subject", "parsed"), [("Hello", False), ("Order 77", True)])
def test_attachment_names_are_read_only_when_the_rules_other_conditions_match(
    policy_file: Path, subject: str, parsed: bool
) -> None:
    """Every condition of every rule was evaluated, so any message no earlier rule
    took had its MIME structure parsed for the order rule's attachment: some 250
    MB for 25 MB, against under 110 without."""
    base = [f for f in BASE if not f.startswith("Subject")]
    view = message.read(msg(*base, f"Subject: {subject}"))
    classification = classify(load(policy_file).classify, view)
    assert ("attachments" in view.__dict__) is parsed
    assert classification.doc_type == "other"
