"""The policy loader on real files: what a valid policy becomes, and what a sysadmin
is told, line and column, about an invalid one."""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import os
import re
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID

from relay import classify, message
from relay.errors import PolicyError
from relay.keygen import public_record_value
from relay.policy import yamlsource
from relay.policy.indentation import indent_of
from relay.policy.load import check_main, load, policy_version
from relay.policy.model import (
    AuthMode,
    ConditionKind,
    DirectoryUpstream,
    DkimAlgorithm,
    IdentitySource,
    ReplyToKind,
    ReplyToSource,
    SmtpUpstream,
    TlsMode,
    UnknownSender,
    UserRef,
)
from relay.sign import sign
from relay.upstream import helo
from tests.certs import make_certs
from tests.policyfiles import POLICIES, variant

ROOT = Path(__file__).parent.parent
SENDER, COMPANY = ReplyToSource(ReplyToKind.SENDER), ReplyToSource(ReplyToKind.COMPANY)

# Every bad fixture, with exactly the problems it must report (after "FILE:").
BAD = {
    "bad-unknown-key.yaml": [
        "28:9: tenants.acme.users.jan.alises: unknown key (did you mean 'aliases'?)",
    ],
    "bad-duplicate-key.yaml": [
        "10:5: listeners[0].port: duplicate key (first at 9:5)",
    ],
    "bad-syntax.yaml": [
        "23:5: YAML syntax error: a key without ':' after it (could not find expected ':' at 24:5)",
    ],
    "bad-key-file.yaml": [
        "14:17: dkim.keys[0].key_file: cannot read @DIR@/keys/missing.private:"
        " No such file or directory",
    ],
    "bad-cidr.yaml": [
        "10:25: listeners[0].allow[1]: invalid CIDR:"
        " '10.1.2.300/16' does not appear to be an IPv4 or IPv6 network",
    ],
    "bad-regex.yaml": [
        "13:14: classify[0].subject: invalid regular expression:"
        " missing ), unterminated subpattern at position 4",
    ],
    "bad-injection.yaml": [
        "5:17: platform.display_name: must not contain CR, LF or NUL (header injection)",
    ],
    "bad-placeholder.yaml": [
        "5:17: platform.display_name: unknown placeholder {tenant.company}"
        " (did you mean 'tenant.name'?); use {user.name}, {user.address}, {tenant.name}",
    ],
    "bad-quote-me.yaml": [
        "22:11: tenants.acme.name: expected a company name, but YAML reads the unquoted 1:30"
        ' as the number 90; put it in quotes: "1:30"',
        "27:15: tenants.acme.users.jan.name: expected a person's name, but YAML reads the"
        ' unquoted no as the boolean false; put it in quotes: "no"',
    ],
    "bad-types.yaml": [
        "4:17: platform.from_address: expected an address like name@example.com",
        "9:11: listeners[0].port: expected a port number (1..65535)",
        "10:11: listeners[0].auth: expected one of: required, optional, off",
        "11:12: listeners[0].allow: expected a list of CIDRs, one network per list item,"
        " in CIDR form like 10.0.0.0/8: write [10.0.0.0/8]",
        "12:21: listeners[0].max_recipients: 0 is out of range:"
        " expected a positive integer (1..100000)",
        "13:19: listeners[0].idle_timeout: YAML 1.1 reads 5:00 as 300 (base 60); write 300",
        "16:11: listeners[1].port: YAML 1.1 reads 0587 as a string;"
        " write it without the leading zero: 587",
        "18:10: identify.order: expected a list of:"
        " auth_login, envelope_sender, header_from, header",
        "23:18: dkim.keys[0].algorithm: expected one of: rsa, ed25519 (did you mean 'rsa'?)",
        "27:11: upstreams.outbox.type: expected one of: smtp, directory",
        "29:9: tenants.acme: expected a mapping",
    ],
    "bad-references.yaml": [
        "10:19: identify.default_tenant: no tenant 'acne' (did you mean 'acme'?)",
        "20:110: logins.erp-acme.users[1]: no user 'jon' in tenant 'acme' (did you mean 'jan'?)",
        "21:93: logins.erp-globex.tenant: no tenant 'globex'",
        "27:19: tenants.acme.default_user: no user 'jane' in this tenant (did you mean 'jan'?)",
        "29:7: tenants.acme.reply_to.invoices: no document type 'invoices' in classify"
        " (did you mean 'invoice'?)",
        "31:27: tenants.acme.bcc_sender[1]: no document type 'qoute' in classify"
        " (did you mean 'quote'?)",
        "37:15: tenants.beta.upstream: no upstream 'outbx' (did you mean 'outbox'?)",
    ],
    "bad-shared-address.yaml": [
        "20:73: tenants.acme.users.kari.aliases[0]: Sales@Acme.Example is already used by"
        " tenants.acme.users.jan.aliases[0]",
        "26:43: tenants.globex.users.hank.address: JAN@acme.example is already used by"
        " tenants.acme.users.jan.address",
    ],
    "bad-reply-to.yaml": [
        "19:17: tenants.acme.reply_to.default[0]: keep ends the chain,"
        " so it can only be the last item",
        "20:15: tenants.acme.reply_to.other[0]: expected sender, company, keep, header:NAME"
        " or an address, not 'sendr' (did you mean 'sender'?)",
        "20:22: tenants.acme.reply_to.other[1]: 'X Responsible' is not a header name"
        " like X-Responsible",
        "20:46: tenants.acme.reply_to.other[2]: 'billing@' is not an address like name@example.com",
    ],
    "bad-password.yaml": [
        "16:5: upstreams.smarthost.password: do not put passwords in the policy;"
        " use password_file or password_env",
        "19:5: logins.erp-acme.password: do not put passwords in the policy;"
        " put a `relay passwd` hash in password_hash",
    ],
    "bad-missing.yaml": [
        "2:1: listeners: required key is missing",
        "2:10: version: unsupported policy version 2: this relay reads version 1",
        "4:3: platform.from_address: required key is missing",
        "6:11: upstreams.outbox.path: required key is missing",
        "9:5: tenants.acme.address: required key is missing",
        "12:12: tenants.acme.users.jan.name: required key is missing",
    ],
}


def problems(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def expected(path: Path, lines: list[str]) -> list[str]:
    return [f"{path}:{line}".replace("@DIR@", str(path.absolute().parent)) for line in lines]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_policy_reports_every_problem_located(name: str) -> None:
    path = POLICIES / name
    assert problems(path) == expected(path, BAD[name])


def test_every_bad_fixture_is_pinned() -> None:
    assert {p.name for p in POLICIES.glob("bad-*.yaml")} == set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_pure_python_loader_reports_the_same(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machines without libyaml fall back to yaml.SafeLoader; the report must not change."""
    monkeypatch.setattr(yamlsource, "_Loader", yaml.SafeLoader)
    path = POLICIES / name
    assert problems(path) == expected(path, BAD[name])


def test_the_c_loader_is_used_when_there_is_one() -> None:
    assert yamlsource._Loader is getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _example(tmp_path: Path) -> tuple[Path, bytes]:
    """The example policy beside a key of its own, as ``make run`` sets it up."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    (tmp_path / "dkim").mkdir()
    key = (POLICIES / "keys" / "platform.example.s1.private").read_bytes()
    (tmp_path / "dkim" / "platform.example.dev.private").write_bytes(key)
    return tmp_path / "config" / "relay.example.yaml", key


@pytest.mark.parametrize(
    ("subject", "pdf", "doc_type"),
    [
        ("Salgsfaktura 1234", False, "invoice"),  # an invoice word ending a compound
        ("Rechnungsnr. 1234", False, "invoice"),  # or before a number word
        ("Invoices for March", False, "invoice"),
        ("Ihre Rechnungen M\u00e4rz 2024", False, "invoice"),
        ("Rechnung_2024_001", False, "invoice"),
        ("Invoice 1234 for quotation Q-55", False, "invoice"),
        ("Gutschrift zu Rechnungsnr. 1234", False, "credit_note"),
        ("Credit note 4711 for invoice 1234", False, "credit_note"),
        ("Kreditfaktura 55", False, "credit_note"),
        ("Angebot 1001 - Rechnungsadresse bitte pr\u00fcfen", False, "quote"),
        ("Lohnabrechnung M\u00e4rz 2024", False, "other"),  # a payslip, no invoice
        ("Angebot 55 inkl. Preisberechnung", False, "quote"),
        ("Rechnungs-Nr. 4711", False, "invoice"),
        ("Fatturato mensile", False, "other"),  # one beginning a compound
        ("Invoiced orders report", False, "other"),
        ("Invoice for order 5001", True, "invoice"),
        ("Order 5001 confirmed", True, "order_confirmation"),
        ("Ordrebekr\u00e6ftelse 5001", True, "order_confirmation"),
        # compounds, as Dynamics NAV names its documents: a credit note, quote or
        # order confirmation was "other" (no copy), or an invoice
        ("Teilgutschrift zu Rechnung 4711", False, "credit_note"),
        ("Salgskreditnota 104001 til salgsfaktura 103001", False, "credit_note"),
        ("Salgstilbud 1001", False, "quote"),
        ("Verkaufsangebot 12", False, "quote"),
        ("Salgsordrebekr\u00e6ftelse 101005", True, "order_confirmation"),
        ("Kundenauftrag 77", True, "order_confirmation"),
        ("Vorabrechnung 4711", False, "invoice"),
        ("Werberechnung 12", False, "invoice"),
        ("Nebenkostenabrechnung 2025", False, "other"),
        # words that end other words stay whole words
        ("Savoir-faire: our newsletter", False, "other"),
        ("Lettre recommand\u00e9e", True, "other"),
        ("Border crossing papers", True, "other"),
        # nor does any compound: a job offer, a sale, a standing order
        ("Stellenangebot Buchhalter", False, "other"),
        ("Sommertilbud i butikken", False, "other"),
        ("Vi har tilbudt deg", False, "other"),
        ("Ihr Dauerauftrag wurde ge\u00e4ndert", True, "other"),
        ("D\u00e9sordre dans l'entrep\u00f4t", True, "other"),
        ("Spese sofferte per il danno", False, "other"),
        ("Angebotsnr. 12", False, "quote"),
        ("Auftragsbest\u00e4tigung 55", True, "order_confirmation"),
        ("Preisangebot Nr. 4711", False, "quote"),
        ("Pristilbud nr. 332", False, "quote"),
        ("Tilbuddet p\u00e5 varer 12", False, "quote"),
        ("Offertenummer 2231", False, "quote"),
        ("K\u00f8bsordre 4410", True, "order_confirmation"),
    ],
)
def test_the_example_policy_tells_documents_apart(
    tmp_path: Path, subject: str, pdf: bool, doc_type: str
) -> None:
    """Its invoice rule missed invoice numbers and plurals in several languages, or,
    matching the invoice words anywhere, took a credit note for an invoice, or a
    quote naming the billing address, for one."""
    policy = load(_example(tmp_path)[0])
    raw = f"From: jan@acme.example\r\nSubject: {subject}\r\n".encode()
    if pdf:
        raw += b"Content-Type: application/pdf\r\n"
        raw += b'Content-Disposition: attachment; filename="a.pdf"\r\n'
    found = classify.classify(policy.classify, message.read(raw + b"\r\nx\r\n"))
    assert found.doc_type == doc_type


def test_the_example_policy_loads_as_written(tmp_path: Path) -> None:
    path, key = _example(tmp_path)
    policy = load(path)

    assert policy.source == path
    assert policy.digest == policy_version(path.read_bytes(), policy.sources.files)
    assert policy.platform.from_address == "noreply@platform.example"
    assert policy.platform.return_path == "bounces@platform.example"
    assert policy.platform.hostname == "relay.platform.example"
    (listener,) = policy.listeners
    assert (listener.name, listener.address, listener.port) == ("local", "127.0.0.1", 2525)
    assert listener.auth is AuthMode.OPTIONAL and listener.tls is None
    assert listener.allow == (ip_network("127.0.0.0/8"),)
    assert policy.identify.order == tuple(IdentitySource)
    assert policy.control_headers == ("X-ERP-User", "X-Document-Type", "X-Responsible")
    assert [(r.id, r.doc_type) for r in policy.classify] == [
        ("invoice-header", "invoice"),
        ("credit-note-subject", "credit_note"),
        ("invoice-subject", "invoice"),
        ("quote-subject", "quote"),
        ("order-confirmation-pdf", "order_confirmation"),
    ]
    assert policy.classify[2].conditions[0].pattern.search("Re: Faktura 2024-17")
    assert [c.kind for c in policy.classify[-1].conditions] == [
        ConditionKind.SUBJECT,
        ConditionKind.ATTACHMENT,
    ]
    (dkim,) = policy.keys_for("Platform.Example")
    assert dkim.key_file == tmp_path / "dkim" / "platform.example.dev.private"
    assert dkim.private_key == key and dkim.algorithm is DkimAlgorithm.RSA
    assert policy.upstreams["default"] == DirectoryUpstream("default", tmp_path / "outbox")
    assert policy.logins["erp-acme"].tenant == "acme" and policy.logins["erp-acme"].users == ()
    acme = policy.tenants["acme"]
    assert acme.reply_to["default"] == (SENDER, COMPANY)
    assert acme.reply_to["invoice"][0] == ReplyToSource(ReplyToKind.HEADER, "X-Responsible")
    assert acme.bcc_sender == {"invoice", "quote", "credit_note", "order_confirmation"}
    assert policy.addresses == {
        "jan@acme.example": UserRef("acme", "jan"),
        "kari@acme.example": UserRef("acme", "kari"),
        "salg@acme.example": UserRef("acme", "kari"),
    }
    for mapping in (policy.tenants, policy.upstreams, policy.logins, policy.addresses):
        assert isinstance(mapping, MappingProxyType)
    assert isinstance(acme.users, MappingProxyType)
    assert isinstance(acme.reply_to, MappingProxyType)


def test_the_example_policy_without_its_key_has_only_that_problem(tmp_path: Path) -> None:
    path = tmp_path / "relay.example.yaml"
    shutil.copy(ROOT / "config" / "relay.example.yaml", path)
    missing = tmp_path.parent / "dkim" / "platform.example.dev.private"
    (line,) = [
        n
        for n, text in enumerate(path.read_text().splitlines(), 1)
        if text.strip().startswith("key_file:")
    ]
    assert problems(path) == [
        f"{path}:{line}:17: dkim.keys[0].key_file: cannot read {missing}: No such file or directory"
    ]


def test_omitted_keys_take_their_defaults() -> None:
    policy = load(POLICIES / "minimal.yaml")
    platform = policy.platform
    assert platform.return_path == platform.from_address == "NoReply@Platform.example"
    assert platform.hostname == "platform.example"
    (listener,) = policy.listeners
    assert listener.auth is AuthMode.OPTIONAL and listener.tls is None
    assert listener.allow == (ip_network("127.0.0.0/8"), ip_network("::1/128"))
    assert (listener.max_message_size, listener.max_recipients) == (26214400, 100)
    assert listener.idle_timeout == 300
    identify = policy.identify
    assert identify.order == (
        IdentitySource.AUTH_LOGIN,
        IdentitySource.ENVELOPE_SENDER,
        IdentitySource.HEADER_FROM,
        IdentitySource.HEADER,
    )
    assert identify.header == "X-ERP-User" and identify.default_tenant is None
    assert identify.unknown_sender is UnknownSender.REJECT
    assert policy.control_headers == ("X-ERP-User", "X-Document-Type", "X-Responsible")
    assert policy.classify == () and dict(policy.logins) == {}
    assert policy.dkim_keys[0].algorithm is DkimAlgorithm.RSA
    acme = policy.tenants["acme"]
    assert dict(acme.reply_to) == {"default": (SENDER, COMPANY)}
    assert acme.bcc_sender == frozenset() and acme.verified_domains == ()
    assert acme.default_user is None and acme.users["jan"].aliases == ()


def test_every_key_set() -> None:
    path = POLICIES / "full.yaml"
    here = path.absolute().parent
    policy = load(path)
    assert policy.platform.display_name == "{user.name} ({user.address}) for {tenant.name}"
    assert policy.platform.hostname == "relay.platform.example"
    local, submission = policy.listeners
    assert local.auth is AuthMode.OFF
    assert submission.auth is AuthMode.REQUIRED and submission.address == "::"
    assert submission.tls is not None and submission.tls.cert == here / "tls" / "relay.crt"
    assert submission.allow[2] == ip_network("fd12:3456::/48")
    assert (submission.max_message_size, submission.max_recipients) == (10485760, 20)
    assert submission.idle_timeout == 12.5
    assert (local.max_connections_per_client, submission.max_connections_per_client) == (None, 25)
    assert (local.max_connections, submission.max_connections) == (None, 200)
    assert policy.identify.order == (IdentitySource.HEADER, IdentitySource.AUTH_LOGIN)
    assert policy.identify.unknown_sender is UnknownSender.DEFAULT
    assert policy.identify.default_tenant == "acme"
    # the identify header is a control header already, whatever its case
    assert policy.control_headers == ("X-Document-Type", "x-sender-id", "X-Responsible")
    (header,) = policy.classify[0].conditions
    assert (header.kind, header.header) == (ConditionKind.HEADER, "X-Document-Type")
    assert [k.domain for k in policy.dkim_keys] == ["platform.example", "acme.example"]
    assert policy.dkim_keys[1].algorithm is DkimAlgorithm.ED25519
    upstreams = policy.upstreams
    assert upstreams["smarthost"] == SmtpUpstream(
        "smarthost", "smtp.platform.example", 2587, TlsMode.STARTTLS, "relay",
        here / "secrets" / "smarthost.password", None, 30, "relay.platform.example",
        here / "tls" / "ca.crt", data_timeout=900, ca_pem=(here / "tls" / "ca.crt").read_text(),
    )  # fmt: skip
    assert upstreams["tunnel"] == SmtpUpstream(
        "tunnel", "smtp.example", 465, TlsMode.IMPLICIT, "relay", None, "RELAY_SMTP_PASSWORD", 60
    )
    assert upstreams["plain"] == SmtpUpstream(
        "plain", "127.0.0.1", 587, TlsMode.AUTO, None, None, None, 60
    )
    assert upstreams["plain"].data_timeout == 600  # RFC 5321 4.5.3.2.6
    assert upstreams["outbox"] == DirectoryUpstream("outbox", Path("/var/spool/relay/outbox"))
    assert policy.logins["erp-acme"].users == ("jan",)
    acme = policy.tenants["acme"]
    assert acme.verified_domains == ("acme.example",)
    assert acme.reply_to["invoice"][2] == ReplyToSource(
        ReplyToKind.ADDRESS, "accounts@acme.example"
    )
    assert acme.reply_to["other"] == (ReplyToSource(ReplyToKind.KEEP),)
    assert acme.reply_to["default"] == (COMPANY,)
    assert acme.bcc_sender == {"invoice", "other"}
    assert acme.recipients_per_hour == 500
    assert policy.tenants["globex"].recipients_per_hour is None  # no limit
    jan = acme.users["jan"]
    assert jan.address == "Jan@Acme.example"
    assert jan.aliases == ("salg@acme.example", "j.janssens@acme.example")
    assert set(policy.addresses) == {
        "jan@acme.example", "salg@acme.example", "j.janssens@acme.example", "hank@globex.example",
    }  # fmt: skip
    assert policy.user(policy.addresses["hank@globex.example"]).name == "Hank Scorpio"


def test_check_warns_about_a_verified_domain_without_a_dkim_key(tmp_path: Path) -> None:
    """Its users keep their own From, so their mail went out unsigned and only
    ``relay preview`` said so; a domain with a key (any case) passes."""
    tenant = "    upstream: outbox\n"
    path = variant(
        tmp_path, tenant, tenant + "    verified_domains: [Platform.Example, acme.example]\n"
    )
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    line = path.read_text().splitlines().index(tenant.rstrip("\n")) + 2
    assert err.getvalue() == (
        f"{path}:{line}:42: warning: tenants.acme.verified_domains[1]: no DKIM key for"
        " acme.example in dkim.keys: its users' mail keeps their From and goes out"
        " unsigned, which DMARC at many receivers refuses\n"
    )


def test_auth_off_is_an_enum_not_a_boolean(tmp_path: Path) -> None:
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n    auth: off\n")
    assert load(path).listeners[0].auth is AuthMode.OFF


def test_a_user_name_yaml_reads_as_a_boolean_must_be_quoted(tmp_path: Path) -> None:
    path = variant(tmp_path, "name: Jan Janssens", "name: no")
    assert problems(path) == [
        f"{path}:26:15: tenants.acme.users.jan.name: expected a person's name,"
        ' but YAML reads the unquoted no as the boolean false; put it in quotes: "no"'
    ]
    path.write_text(path.read_text().replace("name: no", 'name: "no"'))
    assert load(path).tenants["acme"].users["jan"].name == "no"


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("name: Acme AS", "name: !!bool x", "21:11: tenants.acme.name: expected a company name,"
         " but the tag !!bool cannot read 'x' as a boolean; write it without the tag, in quotes:"
         ' "x"'),
        ("name: Acme AS", "name: !!timestamp x", "21:11: tenants.acme.name: expected a company"
         " name, but the tag !!timestamp cannot read 'x' as a date; write it without the tag,"
         ' in quotes: "x"'),
        ("name: Acme AS", "name: !!float x", "21:11: tenants.acme.name: expected a company name,"
         " but the tag !!float cannot read 'x' as a number; write it without the tag, in quotes:"
         ' "x"'),
        ("name: Acme AS", 'name: !!bool "yes"', "21:11: tenants.acme.name: expected a company"
         " name, but the tag !!bool makes yes the boolean true; write it without the tag,"
         ' in quotes: "yes"'),
        ("port: 2525", "port: !!int x", "9:11: listeners[0].port: expected a port number"
         " (1..65535), but the tag !!int cannot read 'x' as a number"),
        ("port: 2525", 'port: !!int "x"', "9:11: listeners[0].port: expected a port number"
         " (1..65535), but the tag !!int cannot read 'x' as a number"),
        ("port: 2525", "port: !!int 0o9", "9:11: listeners[0].port: expected a port number"
         " (1..65535), but the tag !!int cannot read '0o9' as a number"),
        ("port: 2525", "port: !!int 09", "9:11: listeners[0].port: YAML 1.1 reads 09 as octal;"
         " write it without the leading zero: 9"),
        ("port: 2525", "port: " + "1" * 5000, "9:11: listeners[0].port: expected a port number"
         " (1..65535)"),
        ("    port: 2525\n", "    port: 2525\nqueue: {first_retry: !!float x}\n",
         "10:22: queue.first_retry: expected a positive number of seconds, at most 315360000"
         " (10 years), but the tag !!float cannot read 'x' as a number"),
    ],
)  # fmt: skip
def test_a_value_its_explicit_tag_does_not_fit_is_a_located_problem(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    """PyYAML fails to make such a value as each of its constructors happens to
    (a KeyError, an AttributeError, a ValueError): check, status and a reload
    ended in a traceback that named no line of the file."""
    path = variant(tmp_path, old, new)
    assert problems(path) == [f"{path}:{problem}"]


def test_the_state_settings_refuse_a_value_its_tag_does_not_fit_with_its_place(
    tmp_path: Path,
) -> None:
    """What ``relay status`` and the queue and audit tools read: they ended in
    PyYAML's ValueError."""
    from relay.policy.load import load_state

    path = variant(tmp_path, "upstreams:\n", "queue: {lifetime: !!int x}\nupstreams:\n")
    with pytest.raises(PolicyError) as raised:
        load_state(path)
    assert raised.value.problems == [
        f"{path}:15:19: queue.lifetime: expected a positive number of seconds, at most"
        " 315360000 (10 years), but the tag !!int cannot read 'x' as a number"
    ]


def test_no_tagged_value_in_the_example_policy_ends_the_load(tmp_path: Path) -> None:
    """Each value of the example in turn, given a tag its text does not fit."""
    path, _ = _example(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    value = re.compile(r"(\s*(?:- )?[\w-]+: )[^\s#]")
    tried = 0
    for n, line in enumerate(lines):
        found = value.match(line)
        if not found:
            continue
        for tagged in ("!!bool x", "!!timestamp x", "!!int x", "!!float x", '!!int ""'):
            path.write_text("".join([*lines[:n], f"{found.group(1)}{tagged}\n", *lines[n + 1 :]]))
            with pytest.raises(PolicyError):
                load(path)
            tried += 1
    assert tried > 100  # the pattern still finds the values


def test_the_state_settings_of_a_loaded_text_name_its_tenants_as_the_build_does(
    tmp_path: Path,
) -> None:
    """The tools check a tenant they are given against these: read as the raw
    mapping's keys, a tenant brought in by a merge key was none, and ``<<`` one."""
    from relay.policy.load import load_state

    globex = (
        "  <<: {globex: {name: Globex, address: info@globex.example, upstream: outbox,"
        " users: {hank: {name: Hank, address: hank@globex.example}}}}\n  acme:\n"
    )
    path = variant(tmp_path, "tenants:\n  acme:\n", f"tenants:\n{globex}")
    assert set(load(path).tenants) == {"acme", "globex"}
    assert load_state(path, loaded=True).tenants == {"acme", "globex"}
    assert load_state(path).tenants is None  # a text not known to load: not known


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('name: Acme AS', 'name: "Acme\\0AS"', "21:11: tenants.acme.name"),
        ("name: Jan Janssens", 'name: "Jan\\nBcc: x@example.org"',
         "26:15: tenants.acme.users.jan.name"),
        ("address: jan@acme.example", 'address: "jan@acme.example\\r"',
         "27:18: tenants.acme.users.jan.address"),
    ],
)  # fmt: skip
def test_cr_lf_and_nul_are_refused_wherever_they_could_reach_a_header(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    path = variant(tmp_path, old, new)
    assert problems(path) == [
        f"{path}:{problem}: must not contain CR, LF or NUL (header injection)"
    ]


def test_a_missing_tls_certificate_is_a_problem(tmp_path: Path) -> None:
    path = variant(
        tmp_path,
        "    port: 2525\n",
        "    port: 2525\n    tls: {cert: tls/nope.crt, key: tls/relay.key}\n",
    )
    assert problems(path) == [
        f"{path}:10:17: listeners[0].tls.cert: no such file: {tmp_path}/tls/nope.crt"
    ]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ("tls: starttls\nca_file: tls/relay.key", "ca_file: cannot load CA certificates (PEM)"),
        ("tls: starttls\nca_file: tls/nope.crt", "ca_file: no such file:"),
        ("tls: none\nca_file: tls/ca.crt", "ca_file: needs tls: starttls or implicit"),
        ("tls: auto\nca_file: tls/ca.crt", "ca_file: needs tls: starttls or implicit"),
        ("tls: none\ntls_name: mail.example", "tls_name: needs tls: starttls or implicit"),
        ("tls: auto\ntls_name: mail.example", "tls_name: needs tls: starttls or implicit"),
        ("tls: starttls\ntls_name: mail.example:587", "tls_name: expected the host name the"
         " upstream's certificate is issued for, like mail.example.com, not 'mail.example:587'"),
        ("helo_name: relay host", "helo_name: 'relay host' is not a host name"),
        ("helo_name: '[192.0.2.300]'", "helo_name: '[192.0.2.300]' is not a host name"),
        ("helo_name: '[IPv6:192.0.2.1]'", "helo_name: '[IPv6:192.0.2.1]' is not a host name"),
        ("helo_name: 192.0.2.1", "helo_name: '192.0.2.1' is not a host name like"
         " relay.example.com, or an address literal like [192.0.2.1]: an IPv4 address is"
         " written as an address literal (RFC 5321 4.1.3); write [192.0.2.1]"),
        ("helo_name: '[IPv6:fe80::1%eth0]'", "helo_name: '[IPv6:fe80::1%eth0]' is not an address"
         " literal: %eth0 names an interface, which an address literal cannot (RFC 5321 4.1.3);"
         " write [IPv6:fe80::1]"),
        ("helo_name: '[::1]'", "helo_name: '[::1]' is not a host name like relay.example.com, or"
         " an address literal like [192.0.2.1]: an IPv6 address is written [IPv6:::1]"),
        ("helo_name: rélay.example", "helo_name: 'rélay.example' is not ASCII: write it as"),
        ("helo_name: 192.0.2.01", "helo_name: '192.0.2.01' is not a host name like"),
        ("helo_name: 0300.0.2.1", "helo_name: '0300.0.2.1' is not a host name like"),
        ("data_timeout: 0", "data_timeout: expected a positive number of seconds"),
        ("data_timeout: 10:00", "data_timeout: YAML 1.1 reads 10:00 as 600 (base 60); write 600"),
    ],
)  # fmt: skip
def test_a_smtp_upstreams_settings_are_checked(tmp_path: Path, settings: str, problem: str) -> None:
    lines = ["type: smtp", "host: smtp.example", *settings.splitlines()]
    smtp = "".join(f"    {line}\n" for line in lines)
    path = variant(tmp_path, "    type: directory\n    path: outbox\n", smtp)
    (found,) = problems(path)
    where = rf"{re.escape(str(path))}:\d+:\d+: upstreams\.outbox\."
    assert re.match(where + re.escape(problem), found)


_SMTP_MISTAKES = (
    "port: 0587\ntls: startls\ntimeout: -1\nhelo_name: relay host\n"
    "password_file: nope.password\nca_file: tls/nope.crt\npath: [outbox]\n"
)


@pytest.mark.parametrize(
    ("type_line", "type_problem"),
    [
        ("type: smpt\n", "17:11: upstreams.outbox.type: expected one of: smtp, directory"
         " (did you mean 'smtp'?)"),
        ("type: [smtp]\n", "17:11: upstreams.outbox.type: expected one of: smtp, directory"),
        ("", "17:5: upstreams.outbox.type: required key is missing"),
    ],
    ids=["misspelt", "not-a-string", "missing"],
)  # fmt: skip
def test_an_upstream_of_no_known_type_still_has_its_values_checked(
    tmp_path: Path, type_line: str, type_problem: str
) -> None:
    """A misspelt type hid every other problem of the upstream, to be found
    one relay check later, once the type was right."""
    settings = "".join(f"    {line}\n" for line in (type_line + _SMTP_MISTAKES).splitlines())
    path = variant(tmp_path, "    type: directory\n    path: outbox\n", settings)
    line = 18 if type_line else 17
    assert problems(path) == expected(
        path,
        [
            type_problem,
            f"{line}:11: upstreams.outbox.port: YAML 1.1 reads 0587 as a string;"
            " write it without the leading zero: 587",
            f"{line + 1}:10: upstreams.outbox.tls: expected one of: none, starttls, implicit,"
            " auto (did you mean 'starttls'?)",
            f"{line + 2}:14: upstreams.outbox.timeout: expected a positive number of seconds,"
            " at most 315360000 (10 years)",
            f"{line + 3}:16: upstreams.outbox.helo_name: 'relay host' is not a host name"
            " like relay.example.com, or an address literal like [192.0.2.1]",
            f"{line + 4}:20: upstreams.outbox.password_file: cannot read"
            f" {tmp_path / 'nope.password'}: No such file or directory",
            f"{line + 5}:14: upstreams.outbox.ca_file: no such file: {tmp_path / 'tls/nope.crt'}",
            f"{line + 6}:11: upstreams.outbox.path: expected a file path",
        ],
    )


@pytest.mark.parametrize(
    "settings",
    [
        "type: smpt\nport: 587\ntls: none\nca_file: tls/ca.crt\npassword_env: PW\n",
        "type: directroy\npath: outbox\n",
    ],
    ids=["smtp-keys", "directory-keys"],
)
def test_an_upstream_of_no_known_type_has_no_problem_its_type_would_decide(
    tmp_path: Path, settings: str
) -> None:
    """No required key is missing, and no settings clash, before the type says
    which apply: here a host, a username and tls: starttls would be needed."""
    lines = "".join(f"    {line}\n" for line in settings.splitlines())
    path = variant(tmp_path, "    type: directory\n    path: outbox\n", lines)
    (found,) = problems(path)
    assert found.startswith(f"{path}:17:11: upstreams.outbox.type: expected one of: smtp,")


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("Relay.Example.com", "relay.example.com"),
        ("'[192.0.2.1]'", "[192.0.2.1]"),
        ("'[IPv6:2001:db8::1]'", "[IPv6:2001:db8::1]"),
    ],
)
def test_a_helo_name_is_a_host_name_or_an_address_literal(
    tmp_path: Path, written: str, read: str
) -> None:
    smtp = f"    type: smtp\n    host: smtp.example\n    helo_name: {written}\n"
    policy = load(variant(tmp_path, "    type: directory\n    path: outbox\n", smtp))
    upstream = policy.upstreams["outbox"]
    assert isinstance(upstream, SmtpUpstream) and upstream.helo_name == read


@pytest.mark.parametrize(
    ("host_name", "helo_name", "upstream", "warned"),
    [
        ("erp01", None, "smtp.example", True),
        ("localhost.localdomain", None, "smtp.example", True),
        ("erp01.acme.example", None, "smtp.example", False),
        ("erp01", "relay.acme.example", "smtp.example", False),
        ("erp01", None, "localhost", False),
        ("erp01", None, "'::1'", False),
    ],
)
def test_check_warns_when_ehlo_would_give_an_unqualified_name(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    host_name: str,
    helo_name: str | None,
    upstream: str,
    warned: bool,
) -> None:
    """Smarthosts refuse ``EHLO localhost`` or a bare ``erp01``; a host without a
    better name needs helo_name, and only the sysadmin can tell which. A server
    on this host takes any name."""
    monkeypatch.setattr(helo, "local_hostname", lambda: host_name)
    smtp = f"    type: smtp\n    host: {upstream}\n"
    if helo_name is not None:
        smtp += f"    helo_name: {helo_name}\n"
    path = variant(tmp_path, "    type: directory\n    path: outbox\n", smtp)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    line = path.read_text().splitlines().index("    type: smtp") + 1
    assert err.getvalue() == (
        f"{path}:{line}:5: warning: upstreams.outbox.helo_name: not set, and this host's"
        f" name {host_name!r} is not a fully qualified domain name, which upstream servers"
        " may refuse in EHLO: set helo_name to this host's name in DNS\n"
        if warned
        else ""
    )


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ("host: smtp.example\n    tls: none\n    username: relay", True),
        ("host: smtp.example\n    tls: none", False),
        ("host: smtp.example\n    tls: auto\n    username: relay", False),
        ("host: smtp.example\n    username: relay", False),
        ("host: smtp.example\n    tls: starttls\n    username: relay", False),
        ("host: localhost\n    tls: none\n    username: relay", False),
        ("host: '::ffff:127.0.0.1'\n    tls: none\n    username: relay", False),
        ("host: '::ffff:192.0.2.1'\n    tls: none\n    username: relay", True),
    ],
)
def test_check_warns_about_a_password_sent_in_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: str, warned: bool
) -> None:
    """``tls: none`` with a login is allowed, as the sysadmin asked; check says
    what it costs. ``auto`` never logs in without TLS, so it is not warned of."""
    monkeypatch.setattr(helo, "local_hostname", lambda: "relay.acme.example")
    monkeypatch.setenv("PW", "secret")
    smtp = f"    type: smtp\n    {settings}\n    password_env: PW\n"
    if "username" not in settings:
        smtp = smtp.replace("    password_env: PW\n", "")
    path = variant(tmp_path, "    type: directory\n    path: outbox\n", smtp)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    line = path.read_text().splitlines().index("    tls: none") + 1 if warned else 0
    assert err.getvalue() == (
        f"{path}:{line}:10: warning: upstreams.outbox.tls: none with a username: the password"
        " is sent to the upstream in plain text, which anyone on the path can read;"
        " set tls: starttls or implicit\n"
        if warned
        else ""
    )


def test_a_tls_key_that_is_not_the_certificates_is_a_problem(tmp_path: Path) -> None:
    """What a renewal that replaced one file of the two leaves: ``relay check``, and
    so a reload through the unit, refuses it before a worker would."""
    other = make_certs(tmp_path / "other")
    path = variant(
        tmp_path,
        "    port: 2525\n",
        f"    port: 2525\n    tls: {{cert: tls/relay.crt, key: {other.key}}}\n",
    )
    cert = tmp_path / "tls" / "relay.crt"
    assert problems(path) == [
        f"{path}:10:37: listeners[0].tls.key: {other.key} is not the key of the certificate"
        f" in {cert}"
    ]
    # an EC certificate given an RSA key
    other.key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert problems(path) == [
        f"{path}:10:37: listeners[0].tls.key: {other.key} is not the key of the certificate"
        f" in {cert} (an RSA key; the certificate's is EC)"
    ]


def test_a_chain_with_the_servers_certificate_not_first_names_the_order(tmp_path: Path) -> None:
    """The intermediate first, then the server's certificate, with the right key:
    OpenSSL matches the key with the first only, and check said the key was not
    the certificate's."""
    certs = make_certs(tmp_path / "chain")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(certs.ca.read_bytes() + certs.cert.read_bytes())
    path = variant(
        tmp_path,
        "    port: 2525\n",
        f"    port: 2525\n    tls: {{cert: {chain}, key: {certs.key}}}\n",
    )
    assert problems(path) == [
        f"{path}:10:17: listeners[0].tls.cert: {chain} has the certificate of {certs.key}"
        " in place 2, not first: write the server's certificate first, then the intermediates"
    ]


def test_a_tls_key_with_a_passphrase_is_a_problem_not_a_prompt(tmp_path: Path) -> None:
    """OpenSSL prompted on the terminal for it, blocking check, serve and a
    reload; without a terminal it said ``cannot use CERT with KEY: Invalid argument``."""
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n" + _TLS)
    key = tmp_path / "tls" / "relay.key"
    plain = serialization.load_pem_private_key(key.read_bytes(), None)
    encryption = serialization.BestAvailableEncryption(b"x")
    key.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
    )
    assert problems(path) == [
        f"{path}:10:37: listeners[0].tls.key: {key} is encrypted (has a passphrase), which the"
        f" relay cannot use; write the key without one (openssl pkey -in {key} -out NEW_FILE)"
        " in a file only the relay's user can read"
    ]


_TLS = "    tls: {cert: tls/relay.crt, key: tls/relay.key}\n"


@pytest.mark.parametrize(
    ("address", "tls", "refused"),
    [
        ("192.0.2.10", "", True),
        ("0.0.0.0", "", True),
        ("'::'", "", True),
        ("192.0.2.10", _TLS, False),
        ("127.0.0.1", "", False),
        ("'::1'", "", False),
        ("localhost", "", False),
    ],
)
def test_auth_required_where_no_client_could_log_in_is_a_problem(
    tmp_path: Path, address: str, tls: str, refused: bool
) -> None:
    """Off loopback AUTH is refused before STARTTLS, for every client of the
    listener, those of a wildcard's 127.0.0.1 too: check said ok and serve
    started, taking no mail."""
    listener = f"    address: {address}\n    port: 2525\n    auth: required\n{tls}"
    path = variant(tmp_path, "    address: 127.0.0.1\n    port: 2525\n", listener)
    if not refused:
        assert load(path).listeners[0].auth is AuthMode.REQUIRED
        return
    written = address.strip("'")
    assert problems(path) == [
        f"{path}:10:11: listeners[0].auth: required, but no client can log in: AUTH is refused"
        f" before STARTTLS on {written} (not loopback) and this listener has no tls;"
        " configure tls or bind to loopback"
    ]


@pytest.mark.parametrize(
    ("address", "auth", "warned"),
    [
        ("192.0.2.10", "    auth: optional\n", True),
        ("0.0.0.0", "", True),  # optional is the default
        ("192.0.2.10", "    auth: off\n", False),
        ("127.0.0.1", "    auth: optional\n", False),
    ],
)
def test_check_warns_that_auth_is_not_offered_off_loopback_without_tls(
    tmp_path: Path, address: str, auth: str, warned: bool
) -> None:
    """Serve logged it at each start; check said ok, and an ERP set up with a
    login was refused at AUTH."""
    listener = f"    address: {address}\n    port: 2525\n{auth}"
    path = variant(tmp_path, "    address: 127.0.0.1\n    port: 2525\n", listener)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    warning = (
        f"warning: listeners[0].auth: optional, but AUTH is not offered on {address} (not"
        " loopback) without tls: a client set up to log in is refused; configure tls, or"
        " say auth: off"
    )
    assert (warning in err.getvalue()) is warned, err.getvalue()


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("change", "which", "column", "holds"),
    [
        ({"relay.crt": _der}, "cert", 17, "holds no PEM certificate: it looks binary (DER)"),
        (
            {"relay.crt": "relay.key", "relay.key": "relay.crt"},
            "cert",
            17,
            "holds a private key, not a certificate: are cert and key swapped?",
        ),
        ({"relay.crt": lambda pem: b""}, "cert", 17, "is empty"),
        ({"relay.key": lambda pem: b"\n"}, "key", 37, "is empty"),
        ({"relay.crt": lambda pem: pem[:200]}, "cert", 17, "holds a damaged certificate"),
        ({"relay.key": lambda pem: pem[:100]}, "key", 37, "holds a damaged private key"),
        ({"relay.key": lambda pem: b"secret"}, "key", 37, "holds no PEM private key"),
    ],
    ids=["der", "swapped", "empty-cert", "empty-key", "cut-cert", "cut-key", "no-key"],
)
def test_a_tls_file_that_is_not_what_it_should_be_is_named(
    tmp_path: Path,
    change: dict[str, Callable[[bytes], bytes] | str],
    which: str,
    column: int,
    holds: str,
) -> None:
    """OpenSSL said ``cannot use A with B: [SSL] PEM lib``, naming neither file."""
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n" + _TLS)
    tls = tmp_path / "tls"
    before = {name: (tls / name).read_bytes() for name in ("relay.crt", "relay.key")}
    for name, how in change.items():
        data = before[how] if isinstance(how, str) else how(before[name])
        (tls / name).write_bytes(data)
    wrong = tls / ("relay.crt" if which == "cert" else "relay.key")
    (found,) = problems(path)
    assert found.startswith(f"{path}:10:{column}: listeners[0].tls.{which}: {wrong} {holds}")


def _self_signed(key_file: Path, start: datetime.datetime, end: datetime.datetime) -> bytes:
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("start", "end", "warning"),
    [
        (-30, -1, "expired on {end}: clients refuse it; renew it"),
        (2, 30, "is not valid before {start}: clients refuse it until then"),
        (-1, 30, None),
        (-30, 3, "ends on {end}, within 14 days: renew it, then reload"),
    ],
    ids=["expired", "not-yet-valid", "valid", "ending"],
)
def test_check_warns_about_a_listener_certificate_out_of_its_validity(
    tmp_path: Path, start: int, end: int, warning: str | None
) -> None:
    """OpenSSL loads it without a word, and clients then refuse every STARTTLS."""
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n" + _TLS)
    now = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
    dates = {
        "start": now + datetime.timedelta(days=start),
        "end": now + datetime.timedelta(days=end),
    }
    cert = tmp_path / "tls" / "relay.crt"
    cert.write_bytes(_self_signed(tmp_path / "tls" / "relay.key", dates["start"], dates["end"]))
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    shown = {k: f"{v:%Y-%m-%d %H:%M} UTC" for k, v in dates.items()}
    assert err.getvalue() == (
        ""
        if warning is None
        else f"{path}:10:17: warning: listeners[0].tls.cert: {cert} {warning.format(**shown)}\n"
    )


def test_a_certificate_only_openssl_reads_passes_check(tmp_path: Path) -> None:
    """An X.509 v2 certificate: OpenSSL serves it, ``cryptography`` raised
    InvalidVersion (no ValueError), and relay check ended in a traceback."""
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n" + _TLS)
    cert = tmp_path / "tls" / "relay.crt"
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert der.count(b"\xa0\x03\x02\x01\x02") == 1  # version: v3
    cert.write_text(
        ssl.DER_cert_to_PEM_cert(der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x01"))
    )
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0, err.getvalue()
    assert err.getvalue() == ""


def _pkcs8_ed25519() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pkcs8_x25519() -> bytes:
    return x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pkcs8_ec() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


RSA_KEY = POLICIES / "keys" / "platform.example.s1.private"
ED25519_KEY = POLICIES / "keys" / "acme.example.a1.private"


@pytest.mark.parametrize(
    ("algorithm", "content", "problem"),
    [
        ("rsa", lambda: b"garbage\n", "not an RSA private key in PEM form"),
        (
            "rsa",
            ED25519_KEY.read_bytes,
            "an Ed25519 key, but algorithm says rsa: set algorithm: ed25519, or name the RSA key",
        ),
        (
            "ed25519",
            RSA_KEY.read_bytes,
            "an RSA key, but algorithm says ed25519: set algorithm: rsa, or name the Ed25519 key",
        ),
        ("ed25519", lambda: b"c2hvcnQ=\n", "not an Ed25519 private key: the base64 of its"),
        ("rsa", _pkcs8_ed25519, "an Ed25519 key, but algorithm says rsa: set algorithm: ed25519"),
        (
            "ed25519",
            _pkcs8_x25519,
            "an X25519 key, which DKIM does not sign with (it takes RSA and Ed25519):"
            " name the Ed25519 key",
        ),
        (
            "rsa",
            _pkcs8_ec,
            "an EC key, which DKIM does not sign with (it takes RSA and Ed25519):"
            " name the RSA key",
        ),
    ],
    ids=[
        "garbage", "ed25519-as-rsa", "rsa-as-ed25519", "short-seed", "ed25519-pem-as-rsa",
        "x25519-pem", "ec-pem",
    ],
)  # fmt: skip
def test_a_dkim_key_the_relay_cannot_sign_with_is_a_located_problem(
    tmp_path: Path, algorithm: str, content: Callable[[], bytes], problem: str
) -> None:
    """Reading the file was not enough: such a key passed, and then every
    message got 451 at signing. The key signs once at load, as it would then."""
    path = variant(
        tmp_path, "      selector: s1\n", f"      selector: s1\n      algorithm: {algorithm}\n"
    )
    key = tmp_path / "keys" / "platform.example.s1.private"
    key.write_bytes(content())
    (found,) = problems(path)
    assert found.startswith(
        f"{path}:15:17: dkim.keys[0].key_file: cannot sign with {key}: {problem}"
    )


def test_an_ed25519_key_in_pem_form_signs_as_its_seed_does(tmp_path: Path) -> None:
    """``openssl genpkey -algorithm ed25519`` (an OpenDKIM key) was refused, with
    no conversion given. Its seed is its raw private bytes: the same signatures."""
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    seed = private.private_bytes_raw()
    path = variant(
        tmp_path, "      selector: s1\n", "      selector: s1\n      algorithm: ed25519\n"
    )
    key_file = tmp_path / "keys" / "platform.example.s1.private"
    signed = []
    for data in (pem.replace(b"\n", b"\r\n"), base64.b64encode(seed) + b"\n"):
        key_file.write_bytes(data)
        signed.append(
            sign(b"From: <a@platform.example>\r\n\r\nHi\r\n", load(path).dkim_keys, now=0)
        )
    assert b"a=ed25519-sha256" in signed[0] and signed[0] == signed[1]


def test_a_dkim_key_of_either_algorithm_loads_when_it_signs(tmp_path: Path) -> None:
    path = variant(
        tmp_path, "      selector: s1\n", "      selector: s1\n      algorithm: ed25519\n"
    )
    shutil.copy(ED25519_KEY, tmp_path / "keys" / "platform.example.s1.private")
    (key,) = load(path).dkim_keys
    assert key.algorithm is DkimAlgorithm.ED25519 and key.private_key == ED25519_KEY.read_bytes()


def test_the_platform_domain_needs_a_dkim_key(tmp_path: Path) -> None:
    path = variant(tmp_path, "    - domain: platform.example", "    - domain: other.example")
    assert problems(path) == [
        f"{path}:4:17: platform.from_address: no DKIM key for platform.example in dkim.keys:"
        " the relay could not sign its own From"
    ]


def test_a_default_tenant_for_unknown_senders_needs_a_default_user(tmp_path: Path) -> None:
    identify = "identify:\n  unknown_sender: default\n  default_tenant: acme\ndkim:\n"
    path = variant(tmp_path, "dkim:\n", identify)
    assert problems(path) == [
        f"{path}:12:19: identify.default_tenant: tenant 'acme' has no default_user,"
        " so unknown senders are still refused"
    ]


def test_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    users = (
        "      jan: &person\n        name: Jan Janssens\n        address: jan@acme.example\n"
        "      per:\n        <<: *person\n        address: per@acme.example\n"
    )
    path = variant(
        tmp_path,
        "      jan:\n        name: Jan Janssens\n        address: jan@acme.example\n",
        users,
    )
    per = load(path).tenants["acme"].users["per"]
    assert (per.name, per.address) == ("Jan Janssens", "per@acme.example")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "1:1: the policy file is empty"),
        (b"- version: 1\n", "1:1: expected a mapping"),
        (b"version: 1\nplatform: caf\xe9\n",
         "2:14: the file is not UTF-8 text (invalid continuation byte)"),
        (b'version: 1\nplatform: "x\n',
         '2:11: YAML syntax error: the value quoted with " here is not closed on its line:'
         " it runs on to the end of the file, where the parser stopped (found unexpected end"
         " of stream)"),
        (b'version: 1\nplatform: "x',
         '2:11: YAML syntax error: the value quoted with " here is not closed on its line:'
         " it runs on to the end of the file, where the parser stopped (found unexpected end"
         " of stream)"),
        # run on into a pattern, whose backslash is no escape in double quotes
        (b'version: 1\nplatform:\n  display_name: "{user.name}\nclassify:\n'
         b"  - subject: '(?i)\\.pdf$'\n",
         '3:17: YAML syntax error: the value quoted with " here is not closed on its line:'
         " it runs on to 5:19, where the parser stopped (found unknown escape character)"),
        (b'version: 1\nplatform:\n  display_name: "{user.name}\n  hostname: "relay.example"\n',
         '3:17: YAML syntax error: the value quoted with " here is not closed on its line:'
         " it runs on to 4:14, where the parser stopped (did not find expected key)"),
        (b"version: 1\nclassify:\n  - subject: '(?i)invoice\n    type: invoice\n"
         b"  - subject: '(?i)order'\n",
         "3:14: YAML syntax error: the value quoted with ' here is not closed on its line:"
         " it runs on to 5:15, where the parser stopped (did not find expected key)"),
        (b'version: 1\nclassify:\n  - subject: "^Invoice \\d+"\n',
         "3:24: YAML syntax error: found unknown escape character"
         " (while parsing a quoted scalar at 3:14)"),
        # a key whose ':' is missing, noticed only on a later line
        (b"version: 1\nlisteners:\n  - name local\n    port: 25\n",
         "3:5: YAML syntax error: a key without ':' after it"
         " (mapping values are not allowed in this context at 4:9)"),
        (b"version: 1\nplatform:\n  from_address x@y\n  # c\n  hostname: x\n",
         "3:3: YAML syntax error: a key without ':' after it (did not find expected key at 5:3)"),
        # ... but a line whose own ':' is the slip is named itself
        (b"version: 1\nallow:\n  - 127.0.0.0/8\n  - foo: bar: baz\n",
         "4:13: YAML syntax error: mapping values are not allowed in this context"),
        (b'version: 1\nplatform: {display_name: "a\rb"}\n',
         "2:28: a carriage return alone (U+000D), as pasted from a web page or a word"
         " processor: YAML reads it as a line break, so every line number after it would be"
         " off and the text around it may mean something else; delete it"),
        ("# pasted\u2028 from a page\nversion: 1\nplatfrom: x\n".encode(),
         "1:9: an invisible line separator (U+2028), as pasted from a web page or a word"
         " processor: YAML reads it as a line break, so every line number after it would be"
         " off and the text around it may mean something else; delete it"),
        # Notepad's "Unicode", with its byte-order mark and without
        ("version: 1\n".encode("utf-16"),
         "1:1: the file is UTF-16 text (Notepad's \"Unicode\"): save it as UTF-8"),
        ("version: 1\n".encode("utf-16-be"),
         "1:1: the file is UTF-16 text (Notepad's \"Unicode\"): save it as UTF-8"),
    ],
)  # fmt: skip
def test_unparsable_files_are_one_located_problem(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_bytes(content)
    assert problems(path) == [f"{path}:{problem}"]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (b"version: 1\nlisteners: [", "2:13: YAML syntax error: the file ends here, unfinished"),
        (
            b"version: 1\nlisteners: [\n\n",
            "2:13: YAML syntax error: the file ends here, unfinished",
        ),
        (
            b"version: 1\nlisteners: [ \n  \n",
            "2:13: YAML syntax error: the file ends here, unfinished",
        ),
        (
            b"version: 1\nlisteners: {a: 1",
            "2:17: YAML syntax error: the file ends here, unfinished (did not find expected"
            " ',' or '}', while parsing a flow mapping at 2:12)",
        ),
    ],
)
def test_a_file_cut_short_is_one_problem_at_its_end(tmp_path: Path, text: bytes, said: str) -> None:
    """The parser stops past the last line of a file cut short: the indentation
    check looked that line up, and check ended in a traceback. The place was
    said as 3:1 of a file of two lines, a line no editor shows."""
    path = tmp_path / "relay.yaml"
    path.write_bytes(text)
    (found,) = problems(path)
    assert found.startswith(f"{path}:{said}")


def test_a_line_indented_with_a_tab_is_said_to_be(tmp_path: Path) -> None:
    """The parser named it only as a character that cannot start any token."""
    path = tmp_path / "relay.yaml"
    path.write_bytes(b"version: 1\nplatform:\n\tfrom_address: x@y\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:3:1: YAML syntax error: found character ")
    assert problem.endswith(": a tab indents this line; YAML takes only spaces")


def checked(path: Path) -> list[str]:
    """What ``relay check`` says of a policy it refuses, line by line."""
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 78
    return err.getvalue().splitlines()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        # a key dedented one space in a list item
        (b"version: 1\nlisteners:\n  - name: local\n    address: 127.0.0.1\n   port: 2525\n",
         "5:4: YAML syntax error: the indentation of this line (3 spaces) does not match any"
         " block it could belong to: the keys of listeners[0], from line 3, are indented"
         " 4 spaces, the items ('-') of listeners, from line 3, are indented 2 spaces;"
         " indent it as the ones it belongs with (did not find expected '-' indicator at 5:4)"),
        # indented two spaces more than its block, after a plain value it is read as more of
        (b"version: 1\nlisteners:\n  - name: local\n    port: 2525\n      auth: optional\n",
         "5:7: YAML syntax error: the indentation of this line (6 spaces) does not match the"
         " block it is in: the keys of listeners[0], from line 3, are indented 4 spaces;"
         " indent it as they are, or check the indentation of the lines above it"
         " (mapping values are not allowed in this context at 5:11)"),
        # dedented one space in a nested mapping, after a quoted value
        (b'version: 1\nlogins:\n  erp-acme:\n    password_hash: "x"\n   tenant: acme\n',
         "5:4: YAML syntax error: the indentation of this line (3 spaces) does not match any"
         " block it could belong to: the keys of logins.erp-acme, from line 4, are indented"
         " 4 spaces, the keys of logins, from line 3, are indented 2 spaces; indent it as the"
         " ones it belongs with (did not find expected key at 5:4)"),
        # a block's first key out of line, or the line after it: both are named
        (b"version: 1\nplatform:\n   from_address: x@y\n  hostname: relay\n",
         "4:3: YAML syntax error: the indentation of this line (2 spaces) does not match any"
         " block it could belong to: the keys of platform, from line 3, are indented 3 spaces,"
         " the top-level keys, from line 1, are not indented; indent it as the ones it belongs"
         " with, or the first key of platform, on line 3, is indented wrongly"
         " (did not find expected key at 4:3)"),
        (b"version: 1\nlisteners:\n  - name: local\n  port: 2525\n",
         "4:3: YAML syntax error: the indentation of this line (2 spaces) is that of the items"
         " ('-') of listeners, from line 3, but it is no item: indent it as the keys of"
         " listeners[0], from line 3 (4 spaces), or start a new item with '- '"
         " (did not find expected '-' indicator at 4:3)"),
        (b"version: 1\nallow:\n  - 127.0.0.0/8\n  port: 25\n",
         "4:3: YAML syntax error: the indentation of this line (2 spaces) is that of the items"
         " ('-') of allow, from line 3, but it is no item: start it with '- ', or indent it"
         " as the block it belongs to (did not find expected '-' indicator at 4:3)"),
        (b"version: 1\nclassify:\n  - id: a\n    type: invoice\n- id: b\n",
         "5:1: YAML syntax error: the indentation of this line (none) is that of the top-level"
         " keys, from line 1, but it is an item ('-'): indent it as the items ('-') of"
         " classify, from line 3 (2 spaces) (did not find expected key at 5:1)"),
    ],
)  # fmt: skip
def test_an_indentation_slip_is_said_to_be_one(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    """PyYAML named the place, but not indentation, nor the block the line was out of."""
    path = tmp_path / "relay.yaml"
    path.write_bytes(content)
    assert checked(path) == [f"{path}:{problem}", f"{path}: 1 problem"]


def _line_starting(lines: list[str], start: str) -> int:
    (number,) = [n for n, line in enumerate(lines, 1) if line.startswith(start)]
    return number


@pytest.mark.parametrize(
    ("key", "indent", "block"),
    [
        ("port: ", 3, "the keys of listeners[0], from line {item}, are indented 4 spaces"),
        ("auth: ", 6, "the keys of listeners[0], from line {item}, are indented 4 spaces"),
        ("tenant: ", 3, "the keys of logins.erp-acme, from line {hash}, are indented 4 spaces"),
    ],
)
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_indentation_slips_in_the_example_policy_are_said_to_be_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, indent: int, block: str, loader: type
) -> None:
    """A key of the example moved a space or two, as a hand edit does; PyYAML's
    own parser words the error otherwise, but the lines are the same."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = _line_starting(lines, f"    {key}")
    lines[number - 1] = " " * indent + lines[number - 1].lstrip()
    path = tmp_path / "relay.yaml"
    path.write_text("\n".join(lines))
    problem, count = checked(path)
    assert problem.startswith(
        f"{path}:{number}:{indent + 1}: YAML syntax error: the indentation of this line"
        f" ({indent} spaces) does not match "
    )
    item, hash_line = _line_starting(lines, "  - name: "), _line_starting(lines, "    password_")
    assert block.format(item=item, hash=hash_line) in problem
    assert count == f"{path}: 1 problem"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        # an item alone may as well be a key that lost its ':', this line its next key
        (b"version: 1\nlisteners:\n  - name: submission\n    allow:\n      - 127.0.0.0/8\n"
         b"        port: 25\n",
         "6:9: YAML syntax error: the indentation of this line (8 spaces) is deeper than the"
         " items ('-') of listeners[0].allow, from line 5 (6 spaces), so it reads as more of"
         " the item above it, but it is a key: the keys of listeners[0], from line 3, are"
         " indented 4 spaces; indent it as they are, or the item on line 5 is a key that lost"
         " its ':' (mapping values are not allowed {here} at 6:13)"),
        # ... but not among other items of one value, above it or below
        (b"version: 1\nlisteners:\n  - name: submission\n    allow:\n      - 10.0.0.0/8\n"
         b"      - 127.0.0.0/8\n        port: 25\n",
         "7:9: YAML syntax error: the indentation of this line (8 spaces) is deeper than the"
         " items ('-') of listeners[0].allow, from line 5 (6 spaces), so it reads as more of"
         " the item above it, but it is a key: the keys of listeners[0], from line 3, are"
         " indented 4 spaces; indent it as they are, or check the indentation of the lines"
         " above it (mapping values are not allowed {here} at 7:13)"),
        (b"version: 1\nlisteners:\n  - name: submission\n    allow:\n      - 127.0.0.0/8\n"
         b"        port: 25\n      # more\n\n      - 10.0.0.0/8\n",
         "6:9: YAML syntax error: the indentation of this line (8 spaces) is deeper than the"
         " items ('-') of listeners[0].allow, from line 5 (6 spaces), so it reads as more of"
         " the item above it, but it is a key: the keys of listeners[0], from line 3, are"
         " indented 4 spaces; indent it as they are, or check the indentation of the lines"
         " above it (mapping values are not allowed {here} at 6:13)"),
        (b"version: 1\nlisteners:\n  - name: submission\n    allow:\n      - 127.0.0.1\n"
         b"       port: 25\n",
         "6:8: YAML syntax error: the indentation of this line (7 spaces) is deeper than the"
         " items ('-') of listeners[0].allow, from line 5 (6 spaces), so it reads as more of"
         " the item above it, but it is a key: the keys of listeners[0], from line 3, are"
         " indented 4 spaces; indent it as they are, or check the indentation of the lines"
         " above it (mapping values are not allowed {here} at 6:12)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_key_indented_too_far_under_a_list_item_is_said_to_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, problem: str, loader: type
) -> None:
    """A one-word item with a key under it was said to be a key without ':', and
    the key's own line, the one to fix, was not named."""
    _one_problem(tmp_path, monkeypatch, loader, content, problem)


@pytest.mark.parametrize(
    ("item", "lost", "said"),
    [
        # the only listener: a value on its own, or a key that lost its ':'
        ("  - name: local", "  - local",
         "{next}:5: YAML syntax error: the indentation of this line (4 spaces) is deeper than"
         " the items ('-') of listeners, from line {number} (2 spaces), so it reads as more"
         " of the item above it, but it is a key: the top-level keys, from line {top}, are not"
         " indented; indent it as they are, or the item on line {number} is a key that lost"
         " its ':' ({values} at {next}:12)"),
        # the first of classify's rules, the others mappings: a key that lost its ':'
        ("  - id: invoice-header", "  - invoice-header",
         "{number}:5: YAML syntax error: a key without ':' after it ({values} at {next}:9)"),
        ("    - domain: platform.example", "    - platform.example",
         "{next}:7: YAML syntax error: the indentation of this line (6 spaces) is deeper than"
         " the items ('-') of dkim.keys, from line {number} (4 spaces), so it reads as more"
         " of the item above it, but it is a key: the keys of dkim, from line {dkim}, are"
         " indented 2 spaces; indent it as they are, or the item on line {number} is a key"
         " that lost its ':' ({values} at {next}:15)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_list_item_that_lost_its_key_s_colon_is_said_to_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, item: str, lost: str, said: str, loader: type
) -> None:
    """An item of one word with a key under it was said to be a whole value
    with the key indented too far: the key told to move to the top level, or
    to dkim's. The list's other items tell which it is; an item alone may be
    either, and both are said."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    here = "here" if loader is yaml.SafeLoader else "in this context"  # libyaml's words
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = _line_starting(lines, item)
    lines[number - 1] = lost
    path = tmp_path / "relay.yaml"
    path.write_text("\n".join(lines))
    where = {
        "number": number,
        "next": number + 1,
        "top": _line_starting(lines, "version: "),
        "dkim": _line_starting(lines, "  keys:"),
        "values": f"mapping values are not allowed {here}",
    }
    assert checked(path) == [f"{path}:{said.format(**where)}", f"{path}: 1 problem"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"version: 1\nlisteners:\n  - name: a\n    port: 25\n  - b\n    port: 26\n",
         "5:5: YAML syntax error: a key without ':' after it ({values} at 6:9)"),
        (b"version: 1\nlisteners:\n  -\n    name: a\n  - b\n    port: 26\n",
         "5:5: YAML syntax error: a key without ':' after it ({values} at 6:9)"),
        (b"version: 1\nclassify:\n- invoice\n  type: invoice\n- {id: b, type: quote}\n",
         "3:3: YAML syntax error: a key without ':' after it ({values} at 4:7)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_an_item_among_mappings_with_a_key_under_it_lost_its_colon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, problem: str, loader: type
) -> None:
    """The item's siblings, above or below, in block or flow style, are mappings."""
    _one_problem(tmp_path, monkeypatch, loader, content, problem)


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_an_item_among_mappings_with_a_line_not_under_it_is_not_said_to_have_lost_its_colon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """The line under the item is shallower than the item's keys would be: given
    the ':' it was said to lack, the file failed on that line all the same."""
    _one_problem(
        tmp_path, monkeypatch, loader,
        b"version: 1\nlisteners:\n  - name: a\n    port: 25\n  - b\n   port: 26\n",
        "6:4: YAML syntax error: the indentation of this line (3 spaces) is deeper than the"
        " items ('-') of listeners, from line 3 (2 spaces), so it reads as more of the item"
        " above it, but it is a key: the top-level keys, from line 1, are not indented;"
        " indent it as they are, or check the indentation of the lines above it ({values}"
        " at 6:8)",
    )  # fmt: skip


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_an_item_next_to_one_too_deep_to_read_is_still_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """PyYAML's own parser recurses once a level: reading the next item, 5,000
    brackets deep, raised RecursionError out of ``relay check``."""
    deep = b"[" * 5000 + b"]" * 5000
    _one_problem(
        tmp_path, monkeypatch, loader,
        b"version: 1\nlisteners:\n  - b\n    port: 26\n  - " + deep + b"\n",
        "4:5: YAML syntax error: the indentation of this line (4 spaces) is deeper than the"
        " items ('-') of listeners, from line 3 (2 spaces), so it reads as more of the item"
        " above it, but it is a key: the top-level keys, from line 1, are not indented;"
        " indent it as they are, or the item on line 3 is a key that lost its ':' ({values}"
        " at 4:9)",
    )  # fmt: skip


def test_long_blank_lines_after_a_slip_are_read_in_linear_time(tmp_path: Path) -> None:
    """The comment pattern took time in the square of a run of spaces: a line of
    300,000 in the next item held ``relay check`` for about a minute."""
    path = tmp_path / "relay.yaml"
    blank = b" " * 300_000
    path.write_bytes(
        b"version: 1\nlisteners:\n  - b\n    port: 26\n  - name: x\n" + blank + b"\n    port: 27\n"
    )
    start = time.monotonic()
    said = checked(path)
    assert time.monotonic() - start < 5, "read in quadratic time"
    assert said[0].endswith(":3:5: YAML syntax error: a key without ':' after it (mapping"
                            " values are not allowed in this context at 4:9)")  # fmt: skip


def test_a_slip_far_from_any_block_value_is_told_without_reading_the_file_s_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the line above a slip is text of a ``|`` or ``>`` value was found
    by reading every token of the file before it: at the end of a 1.8 MB policy,
    a fifth of a second more for ``relay check``, in a look that is for the
    lines near the slip. The tokens are read now only where such a value may be."""
    path, _ = _example(tmp_path)
    tenant = (
        "  t{0}:\n    name: Tenant {0}\n    address: post@t{0}.example\n"
        "    upstream: default\n    users:\n      u:\n        address: u@t{0}.example\n"
    )
    text = path.read_text() + "".join(tenant.format(n) for n in range(600))
    text += "  last:\n    name Last\n    address: post@last.example\n"
    keyless = text.count("\n") - 2  # 0-based, as the look counts
    scans: list[int] = []
    scan = yaml.scan

    def counted(*args: Any, **kwargs: Any) -> Any:
        scans.append(1)
        return scan(*args, **kwargs)

    monkeypatch.setattr(yaml, "scan", counted)
    assert yamlsource._in_block_scalar(text, keyless) is False
    assert scans == []
    near = text.replace("  last:\n", "  last:\n    notes: |\n      a note\n", 1)
    assert yamlsource._in_block_scalar(near, keyless + 2) is False  # a maybe, read
    assert scans == [1]
    assert yamlsource._in_block_scalar(near, keyless + 1) is True
    monkeypatch.undo()
    path.write_text(text)
    assert checked(path)[0].endswith(
        f":{keyless + 1}:5: YAML syntax error: a key without ':' after it (mapping values"
        f" are not allowed in this context at {keyless + 2}:12)"
    )


#: what each parser says where a line matches no block, or a key is read as
#: more of the value above it: libyaml, then PyYAML's own
_PARSER_WORDS = {
    "c": {
        "here": "in this context",
        "key": "did not find expected key",
        "values": "mapping values are not allowed in this context",
    },
    "python": {
        "here": "here",
        "key": "expected <block end>, but found '<block mapping start>'",
        "values": "mapping values are not allowed here",
    },
}


def _one_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type, content: bytes, problem: str
) -> None:
    """``content`` read with ``loader`` is said to have ``problem`` alone, in that
    parser's words (``{here}``, ``{key}``, ``{values}`` in it)."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    path = tmp_path / "relay.yaml"
    path.write_bytes(content)
    words = _PARSER_WORDS["python" if loader is yaml.SafeLoader else "c"]
    assert checked(path) == [f"{path}:{problem.format(**words)}", f"{path}: 1 problem"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"version: 1\nlisteners:\n- name: local\n  address: 127.0.0.1\n- name: b\n   port: 2525\n",
         "6:4: YAML syntax error: the indentation of this line (3 spaces) does not match the"
         " block it is in: the keys of listeners[1], from line 5, are indented 2 spaces;"
         " indent it as they are, or check the indentation of the lines above it"
         " ({values} at 6:8)"),
        (b"version: 1\nlisteners:\n- name: local\n  address: 127.0.0.1\n   port: 2525\n",
         "5:4: YAML syntax error: the indentation of this line (3 spaces) does not match the"
         " block it is in: the keys of listeners[0], from line 3, are indented 2 spaces;"
         " indent it as they are, or check the indentation of the lines above it"
         " ({values} at 5:8)"),
        (b"listeners:\n- name: a\n  port: 25\n oops: 1\n",
         "4:2: YAML syntax error: the indentation of this line (1 space) does not match any"
         " block it could belong to: the keys of listeners[0], from line 2, are indented"
         " 2 spaces, the items ('-') of listeners, from line 2, are not indented; indent it"
         " as the ones it belongs with ({key} at 4:2)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_slip_in_a_list_not_indented_under_its_key_names_the_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, problem: str, loader: type
) -> None:
    """Items ('-') at their key's indentation have no list start in the parser's
    tokens: the item's keys were named as the key above's, or the list's."""
    _one_problem(tmp_path, monkeypatch, loader, content, problem)


@pytest.mark.parametrize("prop", ["&k ", "!!str "])
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_slip_under_a_key_with_an_anchor_or_tag_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prop: str, loader: type
) -> None:
    """The anchor or tag between the key and its text left the key unnamed: ``top.``."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    words = _PARSER_WORDS["python" if loader is yaml.SafeLoader else "c"]
    path = tmp_path / "relay.yaml"
    path.write_text(f"top:\n  {prop}key:\n    sub: 1\n   odd: 2\n")
    assert checked(path) == [
        f"{path}:4:4: YAML syntax error: the indentation of this line (3 spaces) does not"
        " match any block it could belong to: the keys of top.key, from line 3, are indented"
        " 4 spaces, the keys of top, from line 2, are indented 2 spaces; indent it as the"
        f" ones it belongs with ({words['key']} at 4:4)",
        f"{path}: 1 problem",
    ]


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_key_moved_left_out_of_its_block_is_said_not_the_line_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """Not indented, the listener's port became a top-level key, and the parser
    stopped at the next key, which is right: the line after it was told to
    leave its block."""
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = _line_starting(lines, "    port: ")
    assert lines[number].startswith("    auth: ")
    lines[number - 1] = lines[number - 1].lstrip()
    item = _line_starting(lines, "  - name: ")
    _one_problem(
        tmp_path, monkeypatch, loader, "\n".join(lines).encode(),
        f"{number}:1: YAML syntax error: the indentation of this line (none) ends the keys of"
        f" listeners[0], from line {item} (4 spaces), but line {number + 1} below it is"
        f" indented as they are: indent this line as they are, or line {number + 1} as the"
        f" block it belongs to ({{values}} at {number + 1}:9)",
    )  # fmt: skip


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_key_too_deep_after_a_block_is_said_to_be_not_the_line_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """The tenant's limit 6 spaces deep, as deep as the reply_to block two keys
    above it: the key above was told it ended that block early, and moving it
    in broke the file. The lines after go back to the tenant's keys, where the
    key above is: either may be the slip, the too deep line named first."""
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = _line_starting(lines, "    recipients_per_hour: ")
    lines[number - 1] = "  " + lines[number - 1]
    acme = _line_starting(lines, "    name: Acme")
    bcc = _line_starting(lines, "    bcc_sender:")
    reply_to = _line_starting(lines, "      default:")
    _one_problem(
        tmp_path, monkeypatch, loader, "\n".join(lines).encode(),
        f"{number}:7: YAML syntax error: the indentation of this line (6 spaces) does not"
        f" match the block it is in: the keys of tenants.acme, from line {acme}, are indented"
        f" 4 spaces; indent it as they are, or line {bcc} above it, which ends the keys of"
        f" tenants.acme.reply_to, from line {reply_to} (6 spaces), belongs in that block"
        f" ({{key}} at {number}:7)",
    )  # fmt: skip


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_block_s_last_keys_after_a_key_moved_left_still_name_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """The listener's last key but one moved left: the line after the stopped one
    goes back out, and only the stopped line, which is right, was named, told to
    move to the top level. The rest of the list after it names the moved line;
    a top-level key after it leaves both ways open, and says both."""
    content = (
        b"version: 1\nlisteners:\n  - name: a\n    address: 127.0.0.1\nport: 25\n"
        b"    auth: optional\n  - name: b\n    port: 26\n"
    )
    _one_problem(
        tmp_path, monkeypatch, loader, content,
        "5:1: YAML syntax error: the indentation of this line (none) ends the keys of"
        " listeners[0], from line 3 (4 spaces), but line 6 below it is indented as they are:"
        " indent this line as they are, or line 6 as the block it belongs to ({values} at"
        " 6:9)",
    )  # fmt: skip
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = _line_starting(lines, "    max_connections_per_client: ")
    lines[number - 1] = lines[number - 1].lstrip()
    stopped = _line_starting(lines, "    max_connections: ")
    top, listener = _line_starting(lines, "version: "), _line_starting(lines, "  - name: local")
    _one_problem(
        tmp_path, monkeypatch, loader, "\n".join(lines).encode(),
        f"{stopped}:5: YAML syntax error: the indentation of this line (4 spaces) does not"
        f" match the block it is in: the top-level keys, from line {top}, are not indented;"
        f" indent it as they are, or line {number} above it, which ends the keys of"
        f" listeners[0], from line {listener} (4 spaces), belongs in that block ({{key}} at"
        f" {stopped}:5)",
    )  # fmt: skip


@pytest.mark.parametrize("after", ["    upstream: default\n", ""])
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_key_too_deep_after_a_nested_block_is_said_to_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str, loader: type
) -> None:
    """The tenant's name, rightly placed after its users, was said to end the
    user's block early, for the line under it being as deep as the user's keys:
    the too deep line is named first, the name as the other way."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    words = _PARSER_WORDS["python" if loader is yaml.SafeLoader else "c"]
    path = tmp_path / "relay.yaml"
    path.write_text(
        "version: 1\ntenants:\n  acme:\n    users:\n      jan:\n"
        "        address: jan@acme.example\n    name: A\n        address: post@acme.example\n"
        + after
    )
    assert checked(path) == [
        f"{path}:8:9: YAML syntax error: the indentation of this line (8 spaces) does not"
        " match the block it is in: the keys of tenants.acme, from line 4, are indented"
        " 4 spaces; indent it as they are, or line 7 above it, which ends the keys of"
        " tenants.acme.users.jan, from line 6 (8 spaces), belongs in that block"
        f" ({words['values']} at 8:16)",
        f"{path}: 1 problem",
    ]


@pytest.mark.parametrize(
    ("first", "said"),
    [
        (3, "does not match any block it could belong to: the keys of platform, from line 3,"
            " are indented 3 spaces, the top-level keys, from line 1, are not indented; indent"
            " it as the ones it belongs with, or the first key of platform, on line 3, is"
            " indented wrongly ({key} at 4:3)"),
        (1, "does not match the block it is in: the keys of platform, from line 3, are"
            " indented 1 space; indent it as they are, or the block's first key, on line 3, is"
            " indented wrongly ({values} at 4:11)"),
        (4, "does not match any block it could belong to: the keys of platform, from line 3,"
            " are indented 4 spaces, the top-level keys, from line 1, are not indented; indent"
            " it as the ones it belongs with, or the first key of platform, on line 3, is"
            " indented wrongly ({key} at 4:3)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_block_s_first_key_out_of_line_is_named_with_the_line_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: int, said: str, loader: type
) -> None:
    """The block's indentation is its first key's: when that key is the slip, the
    parser stops at the next key, which is right, and it alone was named."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    words = _PARSER_WORDS["python" if loader is yaml.SafeLoader else "c"]
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"version: 1\nplatform:\n{' ' * first}from_address: noreply@platform.example\n"
        "  hostname: relay.platform.example\n  return_path: bounces@platform.example\n"
    )
    assert checked(path) == [
        f"{path}:4:3: YAML syntax error: the indentation of this line (2 spaces)"
        f" {said.format(**words)}",
        f"{path}: 1 problem",
    ]


@pytest.mark.parametrize(
    ("shift", "c", "python"),
    [
        (-2, _PARSER_WORDS["c"]["values"], _PARSER_WORDS["python"]["values"]),
        (-1, _PARSER_WORDS["c"]["values"], _PARSER_WORDS["python"]["values"]),
        (1, "did not find expected '-' indicator", _PARSER_WORDS["python"]["key"]),
        (2, "did not find expected '-' indicator", "expected <block end>, but found '?'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_list_s_first_item_moved_is_named_not_the_line_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int, c: str, python: str, loader: type
) -> None:
    """The list's indentation is its first item's alone: moved, the parser stopped
    at the item's next key, which is right, and that key was named, told to
    check the lines above it or to be an item of its own."""
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = _line_starting(lines, "    - domain: ")
    lines[number - 1] = " " * (4 + shift) + lines[number - 1].lstrip()
    stop = python if loader is yaml.SafeLoader else c
    _one_problem(
        tmp_path, monkeypatch, loader, "\n".join(lines).encode(),
        f"{number}:{5 + shift}: YAML syntax error: the indentation of this line"
        f" ({4 + shift} spaces), the first item of dkim.keys, puts its key {6 + shift} spaces"
        f" in, but the item's other keys, from line {number + 1}, are indented 6 spaces:"
        " indent this line 4 spaces, so that its key is where they are, or indent them as its"
        f" key ({stop} at {number + 1}:{7 if shift > 0 else 15})",
    )  # fmt: skip


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_first_item_whose_next_item_agrees_is_not_said_to_be_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """classify's first item keeps its place, its other keys one space too deep:
    its '-' is where the next item's is, so they are the slip. The first item
    was named, and moved as told, the next item's line was then said wrong."""
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    item = _line_starting(lines, "  - id: invoice-header")
    for number in (item + 1, item + 2):
        lines[number - 1] = " " + lines[number - 1]
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    path = tmp_path / "relay.yaml"
    path.write_text("\n".join(lines))
    (said, count) = checked(path)
    assert said.startswith(
        f"{path}:{item + 1}:6: YAML syntax error: the indentation of this line (5 spaces)"
        f" does not match the block it is in: the keys of classify[0], from line {item}, are"
        " indented 4 spaces"
    ), said
    assert count == f"{path}: 1 problem"


@pytest.mark.parametrize(
    ("start", "item"),
    [
        ("    - domain: ", "the first item of dkim.keys"),
        ("  - name: local", "the first item of listeners"),
        ("  - id: invoice-header", "the first item of classify"),
        ("  - id: quote-subject", "item classify[3]"),
    ],
)
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_an_item_s_key_two_spaces_after_its_dash_is_told_to_lose_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: str, item: str, loader: type
) -> None:
    """``-  id: x``, the item's other keys under where ``- id`` puts its key: told
    to move the '-' or the item's other keys, when deleting the space is the fix.
    Either way the words say, followed, makes a policy check takes."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    path, _ = _example(tmp_path)
    lines = path.read_text().split("\n")
    number = _line_starting(lines, start)
    right = lines[number - 1]
    dash = indent_of(right)
    lines[number - 1] = right.replace("- ", "-  ", 1)
    path.write_text("\n".join(lines))
    (said, count) = checked(path)
    assert said.startswith(
        f"{path}:{number}:{dash + 2}: YAML syntax error: the key of this line, {item}, is"
        f" 2 spaces after its '-' ({dash + 3} spaces in), but the item's other keys, from line"
        f" {number + 1}, are indented {dash + 2} spaces: delete 1 space after the '-', so that"
        " its key is where they are, or indent them as its key ("
    ), said
    assert count == f"{path}: 1 problem"
    path.write_text("\n".join([*lines[: number - 1], right, *lines[number:]]))
    load(path)
    after = number
    while indent_of(lines[after]) > dash:
        lines[after] = " " + lines[after]
        after += 1
    path.write_text("\n".join(lines))
    load(path)


@pytest.mark.parametrize("style", ["|", ">-"])
def test_a_line_too_deep_after_a_block_value_is_named_not_the_value_s_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, style: str
) -> None:
    """libyaml stops where PyYAML's own parser does, but the text of the literal
    or folded value above was said to be a key that lost its ':'."""
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = _line_starting(lines, "  display_name: ")
    lines[number - 1 : number] = [f"  display_name: {style}", "    Acme billing"]
    stopped = _line_starting(lines, "  return_path: ")
    lines[stopped - 1] = " " + lines[stopped - 1]
    keys = _line_starting(lines, "  from_address: ")
    path = tmp_path / "relay.yaml"
    path.write_text("\n".join(lines))
    for loader in (yamlsource._Loader, yaml.SafeLoader):
        monkeypatch.setattr(yamlsource, "_Loader", loader)
        words = _PARSER_WORDS["python" if loader is yaml.SafeLoader else "c"]
        assert checked(path) == [
            f"{path}:{stopped}:4: YAML syntax error: the indentation of this line (3 spaces)"
            f" does not match the block it is in: the keys of platform, from line {keys}, are"
            " indented 2 spaces; indent it as they are, or check the indentation of the lines"
            f" above it ({words['key']} at {stopped}:4)",
            f"{path}: 1 problem",
        ], loader


_OLD_MAC = (
    "; the file's lines end in a carriage return alone (U+000D), as an old Mac saved"
    " them: YAML and the line number here count them as lines, grep and most editors"
    " see one long line; save the file with line feeds"
)


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_slip_is_said_alike_whatever_the_line_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """YAML reads a carriage return alone as a line end: a file saved with an old
    Mac's got the parser's bare words, the explainer seeing one long line, and
    no word of why grep -n finds no such line."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    python = loader is yaml.SafeLoader
    stop = _PARSER_WORDS["python"]["key"] if python else "did not find expected '-' indicator"
    content = "version: 1\nlisteners:\n  - name: local\n    address: 127.0.0.1\n   port: 2525\n"
    said = (
        "5:4: YAML syntax error: the indentation of this line (3 spaces) does not match any"
        " block it could belong to: the keys of listeners[0], from line 3, are indented"
        " 4 spaces, the items ('-') of listeners, from line 3, are indented 2 spaces;"
        f" indent it as the ones it belongs with ({stop} at 5:4)"
    )
    path = tmp_path / "relay.yaml"
    for end, note in (("\n", ""), ("\r\n", ""), ("\r", _OLD_MAC)):
        path.write_bytes(content.replace("\n", end).encode())
        assert checked(path) == [f"{path}:{said}{note}", f"{path}: 1 problem"], repr(end)


def test_a_line_fed_line_in_an_old_mac_file_is_said_where_yaml_counts_it(
    tmp_path: Path,
) -> None:
    """A line added with ``echo >>`` to a file of carriage returns alone was said
    to be a carriage return to delete at 1:11, the first line's end: deleted,
    the first two lines were one."""
    path = tmp_path / "relay.yaml"
    path.write_bytes(b"version: 1\rplatform:\r  hostname: relay\rcontrol_headers: [X-A]\n")
    assert problems(path) == [
        f"{path}:4:23: a line feed (U+000A) where the file's other lines end in a carriage"
        " return alone (U+000D), as an old Mac saved them: YAML reads both as line breaks,"
        " grep and most editors only the line feed, so their line numbers are not the ones"
        " here; save the file with line feeds alone"
    ]


def test_a_line_fed_cr_in_an_old_mac_file_is_said_at_the_line_it_ends(tmp_path: Path) -> None:
    """``echo >>`` after a file whose last line ends in a carriage return: the CR
    LF is one line end, YAML's third, and was said to be a fourth line's."""
    path = tmp_path / "relay.yaml"
    path.write_bytes(b"version: 1\rplatform:\r  hostname: relay\r\n")
    (said,) = problems(path)
    assert said.startswith(f"{path}:3:18: a line feed (U+000A) where the file's other lines")


@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
@pytest.mark.parametrize("end", ["\n", "\r"], ids=["lf", "cr"])
def test_an_unacceptable_character_is_placed_by_yaml_s_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type, end: str
) -> None:
    """libyaml's position counts bytes: after the example's non-ASCII letters a
    BEL was said a line or more off. In a file of carriage returns alone, it was
    said at line 1, column thousands."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    lines = (ROOT / "config" / "relay.example.yaml").read_text().split("\n")
    number = 1 + next(n for n, line in enumerate(lines, 1) if not line.isascii())
    column = len(lines[number - 1]) + 1
    lines[number - 1] += "\x07"
    path = tmp_path / "relay.yaml"
    path.write_bytes(end.join(lines).encode())
    (said,) = problems(path)
    assert said.startswith(f"{path}:{number}:{column}: YAML syntax error: unacceptable character")
    assert ("old Mac" in said) == (end == "\r")


def test_the_policy_version_covers_the_files_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new DKIM key (or password) under the same text was the same version: the
    log said ``policy reloaded: X (was X)`` and the audit log could not tell them apart."""
    monkeypatch.setattr(helo, "local_hostname", lambda: "relay.platform.example")
    shutil.copytree(POLICIES, tmp_path / "policies")
    path = tmp_path / "policies" / "full.yaml"
    before = load(path)
    assert load(path).digest == before.digest
    key = tmp_path / "policies" / "keys" / "acme.example.a1.private"
    assert before.sources is not None and before.sources.files[str(key)] == key.read_bytes()
    key.write_bytes(base64.b64encode(bytes(range(32))) + b"\n")
    rotated = load(path)
    assert rotated.digest != before.digest
    password = tmp_path / "policies" / "secrets" / "smarthost.password"
    password.write_text("another secret\n")
    assert load(path).digest not in (before.digest, rotated.digest)


def test_a_policy_built_from_the_bytes_given_reads_no_file(tmp_path: Path) -> None:
    """What a worker loads at a reload: the text and files its supervisor checked,
    though the key on disk has changed (to no key at all) since."""
    shutil.copytree(POLICIES, tmp_path / "policies")
    path = tmp_path / "policies" / "minimal.yaml"
    checked = load(path)
    assert checked.sources is not None
    (tmp_path / "policies" / "keys" / "platform.example.s1.private").write_text("no key\n")
    again = load(path, checked.sources.text, checked.sources.files)
    assert again.digest == checked.digest and again.dkim_keys == checked.dkim_keys


def test_problems_come_in_file_order_across_sections() -> None:
    """Sections are checked in dependency order (tenants before logins), not file order."""
    path = POLICIES / "bad-references.yaml"
    found = problems(path)
    where = [tuple(int(n) for n in re.match(r".*?:(\d+):(\d+): ", p).groups()) for p in found]
    assert where == sorted(where) and len(found) == 7


def test_check_main_ok_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(helo, "local_hostname", lambda: "relay.platform.example")
    monkeypatch.setenv("RELAY_SMTP_PASSWORD", "s3cret")  # the service's environment has it
    shutil.copytree(POLICIES, tmp_path / "policies")
    for secret in (
        *(tmp_path / "policies" / "keys").iterdir(),
        *(tmp_path / "policies" / "secrets").iterdir(),
        *(tmp_path / "policies" / "tls").glob("*.key"),
    ):
        secret.chmod(0o600)  # as checked out, others may read them, which check warns of
    path = tmp_path / "policies" / "full.yaml"
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    digest = load(path).digest[:12]
    assert out.getvalue() == f"{path}: ok (policy {digest}, 2 tenants, 2 users, 2 document rules)\n"
    # the one warning: the template puts {user.address} in the From's name
    assert err.getvalue().startswith(
        f"{path}:5:17: warning: platform.display_name: {{user.address}}"
    )
    assert err.getvalue().count("\n") == 1


def test_check_main_prints_every_problem_and_a_count() -> None:
    path = POLICIES / "bad-references.yaml"
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 78
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == [*expected(path, BAD[path.name]), f"{path}: 7 problems"]


def test_check_main_on_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 78
    assert err.getvalue() == (
        f"{path}: cannot read the policy file: No such file or directory\n{path}: 1 problem\n"
    )


def test_state_queue_and_audit_defaults(tmp_path: Path) -> None:
    policy = load(variant(tmp_path, "    port: 2525\n", "    port: 2525\n"))
    assert policy.queue.directory == tmp_path / "state" / "queue"
    assert (policy.queue.first_retry, policy.queue.max_retry) == (60, 3600)
    assert (policy.queue.lifetime, policy.queue.concurrency) == (432000, 10)
    assert policy.audit.directory == tmp_path / "state" / "audit"
    assert policy.audit.hmac_key is None and policy.audit.record_subject is False
    assert policy.listeners[0].immediate == 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", None),
        ("0.0", None),
        ("-1", "expected a positive number of seconds, or 0 for off, at most 315360000"
         " (10 years)"),
    ],
)  # fmt: skip
def test_immediate_0_is_off_as_left_out(tmp_path: Path, value: str, problem: str | None) -> None:
    """0 was refused ("expected a positive number of seconds"), though it is how
    a sysadmin writes off."""
    path = variant(tmp_path, "    port: 2525\n", f"    port: 2525\n    immediate: {value}\n")
    if problem is None:
        assert load(path).listeners[0].immediate == 0
        return
    assert problems(path) == [f"{path}:10:16: listeners[0].immediate: {problem}"]


def test_state_queue_and_audit_set(tmp_path: Path) -> None:
    (tmp_path / "audit.key").write_text("k3y\n")
    settings = (
        "version: 1\nstate_directory: /var/lib/erp-relay\n"
        "queue: {first_retry: 30, max_retry: 600, lifetime: 86400, concurrency: 4}\n"
        "audit: {hmac_key_file: audit.key, record_subject: yes, retention_days: 400}\n"
    )
    policy = load(variant(tmp_path, "version: 1\n", settings))
    assert policy.queue.directory == Path("/var/lib/erp-relay/queue")
    assert (policy.queue.first_retry, policy.queue.max_retry) == (30, 600)
    assert (policy.queue.lifetime, policy.queue.concurrency) == (86400, 4)
    assert policy.audit.hmac_key == b"k3y"
    assert policy.audit.record_subject is True and policy.audit.retention_days == 400


def test_retry_ceiling_below_first_retry_is_located(tmp_path: Path) -> None:
    path = variant(
        tmp_path, "version: 1\n", "version: 1\nqueue:\n  first_retry: 60\n  max_retry: 5\n"
    )
    assert problems(path) == [f"{path}:5:14: queue.max_retry: must not be less than first_retry"]


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            "address: jan@acme.example",
            f"address: {'j' * 65}@acme.example",
            f"tenants.acme.users.jan.address: '{'j' * 65}@acme.example' is longer than SMTP"
            " allows: 64 characters before the @, 254 in all",
        ),
        (
            "address: jan@acme.example",
            "address: jan@ødegård.example",
            "tenants.acme.users.jan.address: 'jan@ødegård.example' is not ASCII:"
            " write it with its domain's A-labels: jan@xn--degrd-ora3k.example",
        ),
        (
            "address: jan@acme.example",
            "address: jørn@acme.example",
            "tenants.acme.users.jan.address: 'jørn@acme.example' is not ASCII:"
            " the relay sends no SMTPUTF8",
        ),
        (  # no address even with its domain's A-labels: nothing to suggest
            "address: jan@acme.example",
            "address: 'j n@ødegård.example'",
            "tenants.acme.users.jan.address: 'j n@ødegård.example' is not ASCII:"
            " the relay sends no SMTPUTF8",
        ),
        (
            "address: post@acme.example",
            "address: post@acme.example\n    verified_domains: [ødegård.example]",
            "tenants.acme.verified_domains[0]: 'ødegård.example' is not ASCII:"
            " write it as 'xn--degrd-ora3k.example'",
        ),
    ],
)
def test_addresses_and_domains_the_relay_could_not_send_are_refused(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    """An address or domain SMTP cannot carry without SMTPUTF8, or a header line
    cannot hold, would refuse every message at the rewrite or the signature."""
    path = variant(tmp_path, old, new)
    assert [p.split(": ", 1)[1] for p in problems(path)] == [problem]


#: IDNA2008's forms, which registries and browsers resolve; Python's codec
#: (IDNA2003) wrote fass.example, xn--4xa.example and xn--mgba3gch31f.example.
_IDNA2008_FORMS = [
    ("faß.example", "xn--fa-hia.example"),
    ("ς.example", "xn--3xa.example"),
    # Persian, a ZWNJ between its two parts
    ("\u0646\u0627\u0645\u0647\u200c\u0627\u06cc.example", "xn--mgba3gch31f060k.example"),
]


@pytest.mark.parametrize(("written", "form"), _IDNA2008_FORMS)
def test_a_unicode_domain_is_told_in_its_idna2008_form(
    tmp_path: Path, written: str, form: str
) -> None:
    """The form said to write named another domain (fass.example for
    faß.example), or the name, its label needing a joiner, was no domain."""
    path = variant(
        tmp_path,
        "address: post@acme.example",
        f"address: post@acme.example\n    verified_domains: [{written}]",
    )
    shown = repr(written)
    assert [p.split(": ", 1)[1] for p in problems(path)] == [
        f"tenants.acme.verified_domains[0]: {shown} is not ASCII: write it as {form!r}"
    ]
    smtp = "    type: smtp\n    host: smtp.example\n    helo_name: " + written + "\n"
    path = variant(tmp_path / "helo", "    type: directory\n    path: outbox\n", smtp)
    assert [p.split(": ", 1)[1] for p in problems(path)] == [
        f"upstreams.outbox.helo_name: {shown} is not ASCII: write it as {form!r}"
    ]


@pytest.mark.parametrize(("written", "form"), _IDNA2008_FORMS)
def test_an_upstream_host_in_unicode_is_resolved_in_its_idna2008_form(
    tmp_path: Path, written: str, form: str
) -> None:
    """Python's resolver and TLS name check convert a Unicode name as IDNA2003
    does: ``host: faß.example`` connected to fass.example, another domain."""
    smtp = f"    type: smtp\n    host: {written}\n    tls: none\n"
    policy = load(variant(tmp_path, "    type: directory\n    path: outbox\n", smtp))
    assert policy.upstreams["outbox"].host == form


def test_a_unicode_domain_idna2008_refuses_is_refused_with_its_reason(tmp_path: Path) -> None:
    """A joiner between two Latin letters has no meaning: IDNA2003 dropped it,
    and the name was taken as ab.example, another domain."""
    path = variant(
        tmp_path,
        "address: post@acme.example",
        "address: post@acme.example\n    verified_domains: [a\u200cb.example]",
    )
    assert [p.split(": ", 1)[1] for p in problems(path)] == [
        "tenants.acme.verified_domains[0]: 'a\\u200cb.example' is not a domain name like"
        " example.com: IDNA2008, which registries and browsers use, refuses it (Joiner U+200C"
        " not allowed at position 2 in 'a\\u200cb'); IDNA2003 tools still convert it, to"
        " 'ab.example': not a form to use"
    ]


def test_a_dkim_selector_in_unicode_is_told_in_its_a_label_form(tmp_path: Path) -> None:
    """It passed as a selector, and the key's signature at load then failed
    on its s= tag, blamed on the key file; the record's name needs A-labels."""
    path = variant(tmp_path, "      selector: s1\n", "      selector: sél\n")
    assert problems(path) == [
        f"{path}:13:17: dkim.keys[0].selector: 'sél' is not ASCII: write it as 'xn--sl-bja'"
    ]


def test_a_dkim_key_saved_with_cr_lf_line_ends_signs(tmp_path: Path) -> None:
    """A key file edited on Windows is the same key: it signs as the LF one does."""
    path = variant(tmp_path, "      selector: s1\n", "      selector: s1\n")
    key = tmp_path / "keys" / "platform.example.s1.private"
    key.write_bytes(RSA_KEY.read_bytes().replace(b"\n", b"\r\n"))
    (loaded,) = load(path).dkim_keys
    assert loaded.private_key == RSA_KEY.read_bytes()


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_a_dkim_key_saved_with_a_byte_order_mark_reads_as_without(
    tmp_path: Path, algorithm: str
) -> None:
    """An Ed25519 seed with the mark signed (its decoder passes over it), while
    ``relay dkim check`` and keygen, which decode strictly, could not read it."""
    path = variant(
        tmp_path,
        "      key_file: keys/platform.example.s1.private\n",
        f"      key_file: keys/saved.private\n      algorithm: {algorithm}\n",
    )
    original = (RSA_KEY if algorithm == "rsa" else ED25519_KEY).read_bytes()
    saved = tmp_path / "keys" / "saved.private"
    saved.write_bytes(b"\xef\xbb\xbf" + original.replace(b"\n", b"\r\n"))
    saved.chmod(0o600)
    (loaded,) = load(path).dkim_keys
    assert loaded.private_key.strip() == original.strip()
    assert public_record_value(loaded).startswith(f"v=DKIM1; k={algorithm}; p=")


def test_ipv4_mapped_addresses_are_read_as_the_ipv4_ones_they_name(tmp_path: Path) -> None:
    """Clients of a dual-stack socket are matched by their IPv4 address, so a
    mapped network in ``allow`` never matched; a mapped listen address cannot be bound."""
    shutil.copytree(POLICIES / "keys", tmp_path / "keys")
    path = tmp_path / "relay.yaml"
    text = (POLICIES / "minimal.yaml").read_text()
    allow = "    port: 2525\n    allow: ['::ffff:127.0.0.0/104', '::ffff:192.0.2.7', '::1']\n"
    path.write_text(text.replace("    port: 2525\n", allow))
    (listener,) = load(path).listeners
    assert listener.allow == (
        ip_network("127.0.0.0/8"),
        ip_network("192.0.2.7/32"),
        ip_network("::1/128"),
    )
    path.write_text(text.replace("address: 127.0.0.1", "address: '::ffff:127.0.0.1'"))
    assert problems(path) == [
        f"{path}:8:14: listeners[0].address: an IPv4-mapped address cannot be listened on"
        " (IPv6 sockets are IPv6 only): write 127.0.0.1"
    ]


DEMO_SALT = "cmVsYXktZGVtby1zYWx0IQ=="
DEMO_KEY = "x0qG+cibjmfhHeWXcJAwGW27gNPyIus2vhexTU+5xXk="


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        (
            f"scrypt$16384$8$1${DEMO_SALT}${DEMO_KEY[:-1]}",
            "the hash is not base64 (Incorrect padding)",
        ),
        (f"scrypt$abc$8$1${DEMO_SALT}${DEMO_KEY}", "N, r and p must be decimal numbers"),
        (
            f"scrypt$1073741824$8$1${DEMO_SALT}${DEMO_KEY}",
            "N=1073741824, r=8 needs 1,048,576 MiB of memory; the relay allows 256 MiB",
        ),
        (f"scrypt$16383$8$1${DEMO_SALT}${DEMO_KEY}", "N=16383 is not a power of two above 1"),
        ("demo-password", "not an scrypt hash: it must start with scrypt$"),
    ],
    ids=["no-padding", "letters-for-n", "huge-n", "n-not-power-of-two", "plain-text"],
)
def test_a_password_hash_the_verifier_cannot_read_is_a_located_problem(
    tmp_path: Path, written: str, problem: str
) -> None:
    """Such a hash passed, and then every AUTH of the login failed as if the
    password were wrong; it is read now by the verifier's own parser."""
    login = f"logins:\n  erp:\n    password_hash: '{written}'\n    tenant: acme\ntenants:\n"
    path = variant(tmp_path, "tenants:\n", login)
    assert problems(path) == [
        f"{path}:21:20: logins.erp.password_hash: expected a hash made with `relay passwd`;"
        f" no password can match this one: {problem}"
    ]


@pytest.mark.parametrize(
    ("written", "warning"),
    [
        (
            f"scrypt$2$1$1${DEMO_SALT}${DEMO_KEY}",
            "N=2, r=1 costs 65,536 times less to guess than N=16384, r=8",
        ),
        (f"scrypt$16384$8$1$c2FsdA==${DEMO_KEY}", "its salt is 4 bytes, under 16"),
        (f"scrypt$16384$8$1${DEMO_SALT}${DEMO_KEY}", None),
    ],
    ids=["cheap", "short-salt", "as-relay-passwd-makes-it"],
)
def test_a_password_hash_weaker_than_relay_passwds_is_warned_of(
    tmp_path: Path, written: str, warning: str | None
) -> None:
    """A hash made by hand with N=2 loaded without a word, and protects next to
    nothing should the policy file leak."""
    login = f"logins:\n  erp:\n    password_hash: '{written}'\n    tenant: acme\ntenants:\n"
    path = variant(tmp_path, "tenants:\n", login)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    assert err.getvalue() == (
        f"{path}:21:20: warning: logins.erp.password_hash: a weak hash: {warning};"
        " make it again with `relay passwd`\n"
        if warning
        else ""
    )


def test_a_user_listed_twice_in_a_login_is_a_located_problem(tmp_path: Path) -> None:
    """``users: [jan, jan]`` loaded, and the login was no longer Jan for
    ``auth_login``: a From no user has, sent as Jan with ``[jan]``, was refused
    550 5.7.1 Sender not known."""
    hashed = f"scrypt$16384$8$1${DEMO_SALT}${DEMO_KEY}"
    login = f"logins:\n  erp:\n    password_hash: '{hashed}'\n    tenant: acme\n"
    path = variant(tmp_path, "tenants:\n", login + "    users: [jan, jan]\ntenants:\n")
    assert problems(path) == [f"{path}:23:18: logins.erp.users[1]: 'jan' is listed twice"]
    path.write_text(path.read_text().replace("[jan, jan]", "[jan]"))
    assert load(path).logins["erp"].users == ("jan",)


def test_a_domain_verified_for_two_tenants_is_warned_of(tmp_path: Path) -> None:
    """A tenant block copied for a new company, its verified domain left in:
    the new company's login could send signed, DMARC-aligned mail as the
    first company's domain, and check said "ok"."""
    second = (
        "  beta:\n    name: Beta Ltd\n    address: post@beta.example\n    upstream: outbox\n"
        "    verified_domains: [beta.example, Acme.example]\n"
        "    users:\n      bob:\n        name: Bob\n        address: bob@beta.example\n"
    )
    path = variant(
        tmp_path,
        "    upstream: outbox\n",
        "    upstream: outbox\n    verified_domains: [acme.example]\n",
    )
    path.write_text(path.read_text() + second)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    warned = [line for line in err.getvalue().splitlines() if "verified for tenant" in line]
    assert warned == [
        f"{path}:33:38: warning: tenants.beta.verified_domains[1]: acme.example is verified for"
        " tenant acme too: the users of either send from it, signed with its key"
    ]


def _smtp_upstream_with(tmp_path: Path, settings: str) -> Path:
    """minimal.yaml whose upstream is an smtp one with ``settings`` (lines)."""
    lines = ["type: smtp", "host: smtp.example", "tls: starttls", *settings.splitlines()]
    smtp = "".join(f"    {line}\n" for line in lines)
    return variant(tmp_path, "    type: directory\n    path: outbox\n", smtp)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read {file}: No such file or directory"),
        (b"", "{file} is empty"),
        (b"\xef\xbb\xbf\r\n", "{file} is empty"),
        (b"\xef\xbb\xbf  \r\n", "{file} is empty"),
        (b"caf\xe9\n", "{file} is not UTF-8 text (invalid continuation byte)"),
    ],
    ids=["missing", "empty", "byte-order-mark-only", "byte-order-mark-and-spaces", "not-utf-8"],
)
def test_an_upstream_password_file_the_relay_could_not_read_is_a_problem(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    """It passed, and every message to the upstream was then deferred with 451."""
    path = _smtp_upstream_with(tmp_path, "username: relay\npassword_file: smarthost.password")
    file = tmp_path / "smarthost.password"
    if content is not None:
        file.write_bytes(content)
    assert problems(path) == [
        f"{path}:21:20: upstreams.outbox.password_file: " + problem.format(file=file)
    ]
    file.write_bytes(b"s3cret\n")
    upstream = load(path).upstreams["outbox"]
    assert isinstance(upstream, SmtpUpstream) and upstream.password_file == file


def test_a_retry_ceiling_below_first_retry_hides_no_audit_problem(tmp_path: Path) -> None:
    """The queue's check returned early: the audit section was not read at all,
    and its problems came one ``relay check`` later."""
    settings = (
        "version: 1\nqueue: {first_retry: 60, max_retry: 5}\n"
        "audit: {hmac_key_file: nope.key, retention_days: -5, record_subjct: yes}\n"
    )
    path = variant(tmp_path, "version: 1\n", settings)
    assert problems(path) == [
        f"{path}:3:37: queue.max_retry: must not be less than first_retry",
        f"{path}:4:24: audit.hmac_key_file: cannot read {tmp_path / 'nope.key'}:"
        " No such file or directory",
        f"{path}:4:50: audit.retention_days: -5 is out of range:"
        " expected a number of days (1..36500)",
        f"{path}:4:54: audit.record_subjct: unknown key (did you mean 'record_subject'?)",
    ]


@pytest.mark.parametrize(
    ("placeholder", "plain"),
    [
        ("{user.name:>5000000000}", "{user.name}"),
        ("{user.name:.20}", "{user.name}"),
        ("{tenant.name!r}", "{tenant.name}"),
    ],
)
def test_a_display_name_placeholder_takes_no_format_spec(
    tmp_path: Path, placeholder: str, plain: str
) -> None:
    """A huge width made check itself die of a MemoryError traceback; a sane one
    would pad every From header. A name is put in as it is."""
    path = variant(tmp_path, '"{user.name} via {tenant.name}"', f'"{placeholder} via Acme"')
    assert problems(path) == [
        f"{path}:5:17: platform.display_name: expected a plain placeholder, {plain},"
        f" not {placeholder}: names are put in as they are, with no format spec or conversion"
    ]


FILE_SETTINGS = {
    "dkim.keys[0].key_file": ("key_file: keys/platform.example.s1.private", "a key file"),
    "listeners[0].tls.cert": ("cert: tls/relay.crt", "a certificate file"),
    "listeners[0].tls.key": ("key: tls/relay.key", "a key file"),
    "upstreams.outbox.ca_file": ("ca_file: tls/ca.crt", "a CA file"),
    "upstreams.outbox.password_file": ("password_file: smarthost.password", "a password file"),
    "audit.hmac_key_file": ("hmac_key_file: audit.key", "a key file"),
}


def _every_file_setting(tmp_path: Path) -> Path:
    """minimal.yaml naming a file in every setting that names one, each valid."""
    (tmp_path / "smarthost.password").write_text("s3cret\n")
    (tmp_path / "audit.key").write_text("k3y\n")
    smtp = (
        "    type: smtp\n    host: smtp.example\n    tls: starttls\n    username: relay\n"
        "    password_file: smarthost.password\n    ca_file: tls/ca.crt\n"
    )
    path = variant(tmp_path, "    type: directory\n    path: outbox\n", smtp)
    text = path.read_text().replace(
        "    port: 2525\n", "    port: 2525\n    tls: {cert: tls/relay.crt, key: tls/relay.key}\n"
    )
    path.write_text(text + "audit: {hmac_key_file: audit.key}\n")
    return path


def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return fifo


def _oversized(tmp_path: Path, limit: int) -> Path:
    big = tmp_path / "big"
    big.write_bytes(b"A" * (limit + 1))
    return big


@pytest.mark.timeout(20)
@pytest.mark.parametrize("setting", sorted(FILE_SETTINGS))
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_fifo, "{file} is a FIFO, not a regular file"),
        (lambda _: Path("/dev/null"), "{file} is a character device, not a regular file"),
        (lambda tmp_path: tmp_path, "{file} is a directory, not a regular file"),
        (
            lambda tmp_path: _oversized(tmp_path, 64 * 1024),
            "{file} is larger than 64 KiB, too large for {what}",
        ),
    ],
    ids=["fifo", "device", "directory", "over-64-KiB"],
)
def test_every_file_the_policy_names_must_be_a_regular_file_of_sane_size(
    tmp_path: Path, setting: str, make: Callable[[Path], Path], problem: str
) -> None:
    """key_file: /dev/zero was read until memory ran out (a MemoryError traceback),
    and a FIFO made check, and a reload, wait forever for a writer."""
    path = _every_file_setting(tmp_path)
    assert load(path).audit.hmac_key == b"k3y"
    written, what = FILE_SETTINGS[setting]
    file = make(tmp_path)
    text = path.read_text()
    path.write_text(text.replace(written, f"{written.split(': ')[0]}: {file}"))
    oversized = file.name == "big"
    if oversized and what in ("a certificate file", "a CA file"):
        _oversized(tmp_path, 4 * 1024 * 1024)
        problem = "{file} is larger than 4 MiB, too large for {what}"
    (found,) = problems(path)
    location = rf"{re.escape(str(path))}:\d+:\d+: {re.escape(setting)}: "
    assert re.fullmatch(location + re.escape(problem.format(file=file, what=what)), found)


def _sparse(tmp_path: Path, size: int) -> Path:
    big = tmp_path / "big.yaml"
    with big.open("wb") as file:
        file.truncate(size)
    return big


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_fifo, "the policy file is a FIFO, not a regular file"),
        (lambda _: Path("/dev/zero"), "the policy file is a character device, not a regular file"),
        (lambda tmp_path: tmp_path, "the policy file is a directory, not a regular file"),
        (
            lambda tmp_path: _sparse(tmp_path, yamlsource.MAX_POLICY_SIZE + 1),
            "the policy file is larger than 64 MiB",
        ),
    ],
    ids=["fifo", "dev-zero", "directory", "over-64-MiB"],
)
def test_the_policy_file_must_be_a_regular_file_of_sane_size(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    """It was read whole, unlike every file it names: a FIFO made check (and a
    reload) wait for a writer forever, /dev/zero or a huge file ended in a MemoryError."""
    path = make(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 78
    assert err.getvalue() == f"{path}: {problem}\n{path}: 1 problem\n"


def test_a_policy_file_of_the_size_limit_is_read(tmp_path: Path) -> None:
    path = _sparse(tmp_path, yamlsource.MAX_POLICY_SIZE)
    assert problems(path) == [f"{path}:1:1: YAML syntax error: unacceptable character #x0000"]


@pytest.mark.parametrize(
    ("settings", "where", "name"),
    [
        ("identify:\n  header: Subject\n", "11:11: identify.header", "Subject"),
        ("control_headers: [X-ERP-User, to]\n", "10:31: control_headers[1]", "to"),
        ("control_headers: [Content-Type]\n", "10:19: control_headers[0]", "Content-Type"),
        ("control_headers: [DKIM-Signature]\n", "10:19: control_headers[0]", "DKIM-Signature"),
        ("control_headers: [List-Unsubscribe]\n", "10:19: control_headers[0]", "List-Unsubscribe"),
        ("control_headers: [Resent-From]\n", "10:19: control_headers[0]", "Resent-From"),
        ("control_headers: [Keywords]\n", "10:19: control_headers[0]", "Keywords"),
    ],
    ids=[
        *("identify-subject", "control-to", "control-content-type", "control-dkim-signature"),
        *("control-list-unsubscribe", "control-resent-from", "control-keywords"),
    ],
)
def test_a_header_of_the_message_cannot_be_a_control_header(
    tmp_path: Path, settings: str, where: str, name: str
) -> None:
    """Control headers are removed before sending: ``identify.header: Subject``
    passed, and every message then went out without its Subject."""
    path = variant(tmp_path, "dkim:\n", settings + "dkim:\n")
    assert problems(path) == [
        f"{path}:{where}: {name} is a header of the message itself, but control headers"
        " (the identify header is one) are removed before sending; expected a header meant"
        " for the relay only, like X-ERP-User"
    ]


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        (
            r'"(?i)\b(invoice)\b"',
            r"contains a backspace: YAML reads \b in double quotes as a backspace, not a word"
            r" boundary; write the pattern in single quotes: '(?i)\b(invoice)\b'",
        ),
        (
            r'"\finvoice"',
            r"contains U+000C: YAML reads \f in double quotes as that character;"
            r" write the pattern in single quotes: '\finvoice'",
        ),
        (
            r'"invoice\x01"',
            r"contains the control character U+0001; if meant, write \x01 in single quotes",
        ),
    ],
    ids=["backspace", "form-feed", "x01"],
)
def test_a_regex_with_a_control_character_from_yaml_escapes_is_refused(
    tmp_path: Path, written: str, problem: str
) -> None:
    """In YAML double quotes "\\b" is a backspace: the rule was accepted and
    silently never matched, so no invoice got its BCC."""
    rule = f"classify:\n  - id: invoice\n    type: invoice\n    subject: {written}\ndkim:\n"
    path = variant(tmp_path, "dkim:\n", rule)
    assert problems(path) == [f"{path}:13:14: classify[0].subject: {problem}"]


@pytest.mark.parametrize(
    ("written", "suggested"),
    [
        (r'"in\Lvoice"', r"'in\u2028voice'"),
        (r'"in\Nvoice"', r"'in\x85voice'"),
        (r'"in\evoice"', r"'in\x1bvoice'"),
        (r'"\ainvoice"', r"'\ainvoice'"),
    ],
    ids=["line-separator", "next-line", "escape", "bell"],
)
def test_the_single_quoted_pattern_suggested_for_a_yaml_escape_loads(
    tmp_path: Path, written: str, suggested: str
) -> None:
    """\\L, \\N, \\P and \\e were suggested as typed, and the regex refuses them
    ("bad escape \\L"): the sysadmin took the advice and got another error."""
    rule = "classify:\n  - id: invoice\n    type: invoice\n    subject: {}\ndkim:\n"
    path = variant(tmp_path, "dkim:\n", rule.format(written))
    (problem,) = problems(path)
    assert problem.endswith(f"write the pattern in single quotes: {suggested}"), problem
    path.write_text(path.read_text().replace(written, suggested))
    (condition,) = load(path).classify[0].conditions
    assert condition.pattern.fullmatch(yaml.safe_load(written))  # the character meant


def test_a_verbose_regex_over_several_lines_still_loads(tmp_path: Path) -> None:
    rule = (
        "classify:\n  - id: invoice\n    type: invoice\n    subject: |\n"
        "      (?x) \\b invoice\n      \t\\b\ndkim:\n"
    )
    (found,) = load(variant(tmp_path, "dkim:\n", rule)).classify[0].conditions
    assert found.pattern.search("Your invoice 17")


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("999.1.1.1", "'999.1.1.1' is not an IP address like 127.0.0.1 or ::1"),
        ("127.000.000.001", "'127.000.000.001' is not an IP address like 127.0.0.1 or ::1"),
        ("'[::1]'", "expected an IP address without brackets: write ::1"),
        (
            "127.0.0.1:2525",
            "'127.0.0.1:2525' is not an IP address like 127.0.0.1 or ::1;"
            " the port goes in port: 2525",
        ),
        ("'*'", "'*' is not an IP address like 127.0.0.1 or ::1, or a host name"),
        (
            "'[::1]:2525'",
            "expected an IP address without brackets: write ::1; the port goes in port: 2525",
        ),
    ],
)
def test_a_listen_address_serve_could_not_bind_is_refused(
    tmp_path: Path, written: str, problem: str
) -> None:
    """999.1.1.1 and [::1] passed, and relay serve then exited 71 at its start."""
    path = variant(tmp_path, "address: 127.0.0.1", f"address: {written}")
    assert problems(path) == [f"{path}:8:14: listeners[0].address: {problem}"]


@pytest.mark.parametrize(
    ("first", "second", "problem"),
    [
        ("127.0.0.1", "127.0.0.1", "127.0.0.1:2525 is also listeners[0]"),
        (
            "127.0.0.1",
            "0.0.0.0",
            "0.0.0.0:2525 overlaps 127.0.0.1:2525 of listeners[0]:"
            " 0.0.0.0 takes port 2525 on every IPv4 address",
        ),
        (
            "'::'",
            "'::1'",
            "[::1]:2525 overlaps [::]:2525 of listeners[0]:"
            " :: takes port 2525 on every IPv6 address",
        ),
        ("'::1'", "'0:0::1'", "[0:0::1]:2525 is also listeners[0] (both are [::1]:2525)"),
        ("127.0.0.1", "localhost", "localhost:2525 is also listeners[0] (both are 127.0.0.1:2525)"),
    ],
    ids=["same", "wildcard-v4", "wildcard-v6", "same-ipv6-written-apart", "host-name"],
)
def test_two_listeners_on_one_port_of_one_address_are_refused(
    tmp_path: Path, first: str, second: str, problem: str
) -> None:
    """Only listeners written alike were found; a wildcard and a specific address,
    or a host name and its address, passed and serve failed: Address already in use."""
    two = f"    address: {first}\n    port: 2525\n  - name: other\n    address: {second}\n"
    path = variant(tmp_path, "    address: 127.0.0.1\n", two)
    assert problems(path) == [f"{path}:12:11: listeners[1].port: {problem}"]


@pytest.mark.parametrize(
    ("first", "second"), [("0.0.0.0", "'::'"), ("127.0.0.1", "127.0.0.2"), ("'::1'", "127.0.0.1")]
)
def test_listeners_on_one_port_of_different_addresses_load(
    tmp_path: Path, first: str, second: str
) -> None:
    """IPv6 sockets are IPv6 only, so 0.0.0.0 and :: share a port."""
    two = f"    address: {first}\n    port: 2525\n  - name: other\n    address: {second}\n"
    assert len(load(variant(tmp_path, "    address: 127.0.0.1\n", two)).listeners) == 2


def test_a_listen_host_name_this_host_cannot_resolve_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host names stay allowed (serve resolves them when it binds); one that does
    not resolve here is no mistake in the file, but serve would fail to start."""
    path = variant(tmp_path, "address: 127.0.0.1", "address: relay.example")

    def unknown(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    assert err.getvalue() == (
        f"{path}:8:14: warning: listeners[0].address: cannot resolve relay.example"
        " (Name or service not known): relay serve could not listen on it\n"
    )


@pytest.mark.parametrize(
    ("written", "hint"),
    [
        ("'::1:2525'", "; if 2525 is the port, write address: ::1 and port: 2525"),
        ("'::1%lo'", ""),  # a scope only a link-local address has
        ("192.0.2.1", ""),  # no address of this host
    ],
)
def test_a_listen_address_this_host_cannot_bind_is_a_warning(
    tmp_path: Path, written: str, hint: str
) -> None:
    """Each passed the check, and relay serve then failed at its start (exit 71);
    ``::1:2525`` is the IPv6 address ::0.1.37.37, not ::1 with a port."""
    path = variant(tmp_path, "address: 127.0.0.1", f"address: {written}")
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    address = written.strip("'")
    said = [line for line in err.getvalue().splitlines() if "listeners[0].address" in line]
    assert len(said) == 1, err.getvalue()
    assert said[0].startswith(
        f"{path}:8:14: warning: listeners[0].address: relay serve could not listen on"
        f" {address} here ("
    ), said
    assert said[0].endswith(f"){hint}"), said


def _link_local() -> tuple[str, str] | None:
    """A link-local address of this host and its interface, from the kernel's list."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hexed, _, _, scope, _, name = line.split()
        if scope == "20":
            return str(ipaddress.ip_address(int(hexed, 16))), name
    return None


def test_a_link_local_listen_address_is_checked_with_its_zone(tmp_path: Path) -> None:
    """With its zone it was warned of, while serve listened on it; without, the
    port hint read its last group as a port."""
    found = _link_local()
    if found is None:
        pytest.skip("no link-local address here")
    address, interface = found
    for written, said in ((f"'{address}%{interface}'", None), (f"'{address}'", "here (")):
        path = variant(
            tmp_path / interface / str(said is None), "address: 127.0.0.1", f"address: {written}"
        )
        err = io.StringIO()
        assert check_main(path, io.StringIO(), err) == 0
        lines = [line for line in err.getvalue().splitlines() if "listeners[0].address" in line]
        if said is None:
            assert lines == []
        else:
            assert len(lines) == 1 and said in lines[0] and "is the port" not in lines[0], lines


def test_a_link_local_address_zoned_by_name_and_by_index_is_one_address(tmp_path: Path) -> None:
    """Written %eth0 once and %4 once, two listeners on one port passed the
    check, and serve then failed: Address already in use."""
    found = _link_local()
    if found is None:
        pytest.skip("no link-local address here")
    address, interface = found
    index = socket.if_nametoindex(interface)
    two = (
        f"    address: '{address}%{interface}'\n    port: 2525\n"
        f"  - name: other\n    address: '{address}%{index}'\n    port: 2525\n"
    )
    path = variant(tmp_path, "    address: 127.0.0.1\n    port: 2525\n", two)
    err = io.StringIO()
    assert check_main(path, io.StringIO(), err) == 78
    assert f"(both are [{address}%{index}]:2525)" in err.getvalue(), err.getvalue()


def test_a_port_after_a_zone_is_no_interface_alias(tmp_path: Path) -> None:
    """``%eth0:2525`` binds, as an alias of eth0, and serve listened on the port
    of ``port:``, not on the one written there, without a word."""
    found = _link_local()
    if found is None:
        pytest.skip("no link-local address here")
    address, interface = found
    path = variant(tmp_path, "address: 127.0.0.1", f"address: '{address}%{interface}:2525'")
    err = io.StringIO()
    assert check_main(path, io.StringIO(), err) == 0
    said = [line for line in err.getvalue().splitlines() if "listeners[0].address" in line]
    assert len(said) == 1 and said[0].endswith(
        f"reads as an interface alias; if 2525 is the port, write address:"
        f" {address}%{interface} and port: 2525"
    ), said


@pytest.mark.timeout(20)
def test_a_merge_key_bomb_loads_at_once(tmp_path: Path) -> None:
    """Each anchor merging the one before ten times: 6 KB that expand to 10^9
    merges. Check and a reload walked them all, for about an hour; each merge
    source is now expanded once."""
    anchors = ["&m0 {first_retry: 60}"]
    anchors += [f"&m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}" for i in range(1, 10)]
    path = variant(tmp_path, "version: 1\n", f"version: 1\nqueue:\n  <<: [{', '.join(anchors)}]\n")
    assert load(path).queue.first_retry == 60


def test_merge_keys_nested_too_deep_are_a_problem(tmp_path: Path) -> None:
    """Some 300 merges within merges ended check in a RecursionError traceback."""
    nested = "{<<: " * 400 + "{first_retry: 60}" + "}" * 400
    path = variant(tmp_path, "version: 1\n", f"version: 1\nqueue: {nested}\n")
    column = len("queue: ") + len("{<<: ") * 100 + 2  # the << of the 101st mapping
    assert problems(path) == [f"{path}:3:{column}: queue: merge keys (<<) nest more than 100 deep"]


def test_merge_keys_that_expand_too_far_are_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One anchor of many keys, merged in many places, is as slow as a bomb."""
    monkeypatch.setattr(yamlsource, "MAX_MERGED", 5)
    merges = "version: 1\nqueue:\n  <<: [&d {first_retry: 60, max_retry: 600}, *d, *d]\n"
    path = variant(tmp_path, "version: 1\n", merges)
    assert problems(path) == [
        f"{path}:4:3: queue: the file expands (through merge keys, <<) to more than 5 values;"
        " merge each anchor in fewer places"
    ]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("loader", [yamlsource._Loader, yaml.SafeLoader], ids=["c", "python"])
def test_a_billion_laughs_is_one_located_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type
) -> None:
    """Each anchor a list of ten aliases to the one before: 1 KB that stands
    for 10^9 values. Refused before any of it is walked, at the alias that
    takes the file past the bound."""
    monkeypatch.setattr(yamlsource, "_Loader", loader)
    lines = ["x-l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x-l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = variant(tmp_path, "version: 1\n", "version: 1\n" + "".join(f"{x}\n" for x in lines))
    assert problems(path) == [
        f"{path}:8:47: the file expands (through aliases, here *l4) to more than 1,000,000"
        " values; refer to each anchor in fewer places"
    ]


@pytest.mark.timeout(20)
def test_aliases_the_loader_walks_are_bounded(tmp_path: Path) -> None:
    """100 tenants aliasing one of 100 users, each aliasing one list of 100
    addresses: 4 KB, and check walked 10^6 addresses (and reported each as
    used twice) for 37 seconds and 630 MB."""
    aliases = ", ".join(f"a{i}@acme.example" for i in range(100))
    users = ", ".join(f"u{i}: *U" for i in range(100))
    tenants = ", ".join(f"t{i}: *T" for i in range(100))
    settings = (
        f"x-aliases: &A [{aliases}]\n"
        "x-user: &U {name: Jan, address: jan@acme.example, aliases: *A}\n"
        f"x-users: &US {{{users}}}\n"
        "x-tenant: &T {name: Acme, address: post@acme.example, upstream: outbox, users: *US}\n"
        f"tenants: {{{tenants}}}\n"
    )
    text = (POLICIES / "minimal.yaml").read_text().split("tenants:")[0] + settings
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    path.write_text(text)
    (found,) = problems(path)
    assert found.startswith(f"{path}:23:")
    assert found.endswith(": the file expands (through aliases, here *T) to more than 1,000,000"
                          " values; refer to each anchor in fewer places")  # fmt: skip


def test_the_bound_on_aliases_counts_what_each_alias_stands_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list of two is three values (with the list itself): the second alias
    to it goes past 5. A merge source counts once per mapping, as merge keys
    expand it once there."""
    monkeypatch.setattr(yamlsource, "MAX_ALIASED", 5)
    merges = "version: 1\nqueue:\n  <<: [&d {first_retry: 60, max_retry: 600}, *d, *d, *d]\n"
    assert load(variant(tmp_path, "version: 1\n", merges)).queue.max_retry == 600
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    aliases = "version: 1\nx-d: &d [a, b]\nx-e: [*d, *d, *d]\n"
    path = variant(tmp_path, "version: 1\n", aliases)
    assert problems(path) == [
        f"{path}:4:11: the file expands (through aliases, here *d) to more than 5 values;"
        " refer to each anchor in fewer places"
    ]


def test_an_anchor_used_in_many_places_loads(tmp_path: Path) -> None:
    """Forty tenants sharing an upstream and a list of domains, each with a user."""
    tenants = "".join(
        f"  t{i}:\n    name: Tenant {i}\n    address: post@t{i}.example\n"
        f"    upstream: {'&up outbox' if i == 0 else '*up'}\n"
        f"    verified_domains: {'&d [shared.example, other.example]' if i == 0 else '*d'}\n"
        f"    users:\n      u:\n        name: User {i}\n        address: u@t{i}.example\n"
        for i in range(40)
    )
    text = (POLICIES / "minimal.yaml").read_text().split("tenants:")[0] + "tenants:\n" + tenants
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    path.write_text(text)
    policy = load(path)
    assert len(policy.tenants) == 40
    assert {t.upstream for t in policy.tenants.values()} == {"outbox"}


@pytest.mark.parametrize(
    ("listener", "warned"), [("", True), ("    auth: off\n", True), ("    auth: required\n", False)]
)
def test_unknown_sender_default_without_a_tenant_for_sessions_without_login_is_a_warning(
    tmp_path: Path, listener: str, warned: bool
) -> None:
    """Without a login the default user's tenant is default_tenant: without one
    such mail was refused although relay check had said nothing."""
    path = variant(
        tmp_path,
        "    port: 2525\n",
        f"    port: 2525\n{listener}identify:\n  unknown_sender: default\n",
    )
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    line = 12 if listener else 11
    expected = (
        f"{path}:{line}:19: warning: identify.unknown_sender: default takes the default_user"
        " of the login's tenant; sessions without a login have none unless default_tenant"
        " is set, and their unknown senders are refused\n"
    )
    assert err.getvalue() == (expected if warned else "")


@pytest.mark.parametrize(
    ("pattern", "warned"),
    [(r"(\w+\s?)+$", True), (r"^(\s*\w+)*$", True), (r"\d+(,\d+)*", False), (r"(\w+\s+)+", False)],
)
def test_a_pattern_that_can_backtrack_for_ever_is_a_warning(
    tmp_path: Path, pattern: str, warned: bool
) -> None:
    """``re`` cannot be stopped: ``(\\w+\\s?)+$`` took 1.5 s on a Subject of 22
    letters and an exclamation mark, twice as long for each letter more, on the
    event loop every session of the worker shares."""
    rule = f"classify:\n  - id: r\n    type: invoice\n    subject: '{pattern}'\nupstreams:"
    path = variant(tmp_path, "upstreams:", rule)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    expected = (
        f"{path}:18:14: warning: classify[0].subject: a repeated group holds a repeat of its"
        r" own, as in (\w+\s?)+: on some subjects or file names such a pattern takes"
        " exponential time, and every session of that worker waits; repeat one of the two"
        " only\n"
    )
    assert err.getvalue() == (expected if warned else "")


@pytest.mark.parametrize(
    ("before", "depth"),
    [("", 101), ("", 350), ("", 2000), ("(?#[)", 350), ("(?#\\)[)", 200)],
)
def test_a_pattern_nested_too_deeply_is_a_problem_not_a_traceback(
    tmp_path: Path, before: str, depth: int
) -> None:
    """350 groups: re compiled it and the backtracking check recursed out of the
    stack; 2,000: re's own parser did (RecursionError is no re.error). Where the
    stack ran out moved with the Python version and the caller, so ``relay
    check`` passed patterns ``relay serve`` refused: the limit is a number now.
    A ``[`` in a comment opens no character class that hides the groups."""
    pattern = before + "(" * depth + "a" + ")" * depth + "+"
    rule = f"classify:\n  - id: r\n    type: invoice\n    subject: '{pattern}'\nupstreams:"
    path = variant(tmp_path, "upstreams:", rule)
    assert problems(path) == [
        f"{path}:18:14: classify[0].subject: the regular expression nests its groups"
        f" {depth} deep; the relay reads 100 at most"
    ]


def test_a_verbose_patterns_comment_hides_no_group_from_the_count() -> None:
    """A ``[`` in a ``#`` comment of a verbose pattern began a character class
    for the count, which then saw none of the groups on the lines after it; a
    ``#`` where the x flag is not on is a character, and hides nothing."""
    from relay.policy.values import _group_depth

    deep = "(" * 200 + "a" + ")" * 200
    assert _group_depth("(?x) # [ note\n" + deep) == 200
    assert _group_depth("a#((b))") == 2  # not verbose: "#" is a character
    # the x flag of a group ends with it, (?-x: turns it off, \(?x is no flag
    assert _group_depth("(?x:a)\n" + "(a#)\n" * 150) == 1
    assert _group_depth("(?x)\n" + "(?-x:a#)\n" * 150) == 1
    assert _group_depth("\\(?x#" + deep) == 200
    assert _group_depth("(?x:a)#" + deep) == 200
    assert _group_depth("(?i)(?x)#[\n" + deep) == 200  # global flags after others
    assert _group_depth("(?#n)(?x)# (((\na") == 0


@pytest.mark.parametrize("innermost", ["(a)", "(?(1)a|b)", "(?(name)a)", "(?P=name)"])
def test_a_pattern_nested_as_deep_as_the_limit_loads(tmp_path: Path, innermost: str) -> None:
    """A conditional group's condition, ``(1)`` in ``(?(1)a|b)``, and a
    backreference by name were counted as one group deeper, which refused
    such a pattern nested 100 deep."""
    from relay.policy.values import _group_depth

    pattern = "(?P<name>x)?" + r"[(\]](" * 99 + innermost + ")" * 99
    rule = f"classify:\n  - id: r\n    type: invoice\n    subject: '{pattern}'\nupstreams:"
    path = variant(tmp_path, "upstreams:", rule)
    (condition,) = load(path).classify[0].conditions
    assert condition.pattern.groups == 1 + 99 + (innermost == "(a)")
    assert _group_depth(pattern) == 99 + (innermost != "(?P=name)")


def test_the_state_settings_load_without_the_files_they_do_not_name(tmp_path: Path) -> None:
    """What the queue and audit tools read: a signing key that is gone does not
    stop them, a mistake in their own sections does, with its place."""
    from relay.policy.load import load_state

    path = variant(tmp_path, "upstreams:\n", "queue: {lifetime: 60}\nupstreams:\n")
    (tmp_path / "keys" / "platform.example.s1.private").unlink()
    with pytest.raises(PolicyError):
        load(path)
    state = load_state(path)
    assert state.queue.directory == tmp_path / "state" / "queue"
    assert state.queue.lifetime == 60
    assert state.audit.directory == tmp_path / "state" / "audit"
    path.write_text(path.read_text().replace("{lifetime: 60}", "{lifetme: 60}"))
    with pytest.raises(PolicyError) as raised:
        load_state(path)
    assert raised.value.problems == [
        f"{path}:15:9: queue.lifetme: unknown key (did you mean 'lifetime'?)"
    ]


def test_two_listeners_of_one_name_are_a_located_problem(tmp_path: Path) -> None:
    """The name is how the log, the metrics and ``relay preview --listener`` tell
    them apart."""
    second = "  - name: local\n    address: 127.0.0.1\n    port: 2526\n"
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n" + second)
    assert problems(path) == [
        f"{path}:10:11: listeners[1].name: listener name already used by listeners[0]"
    ]


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            "    upstream: outbox\n",
            "    upstream: outbox\n    recipients_per_hour: 0\n",
            "24:26: tenants.acme.recipients_per_hour: 0 is out of range:"
            " expected a number of recipients (1..10000000)",
        ),
        (
            "    port: 2525\n",
            "    port: 2525\n    max_connections_per_client: 0\n",
            "10:33: listeners[0].max_connections_per_client: 0 is out of range:"
            " expected a number of connections (1..1000000)",
        ),
        (
            "    port: 2525\n",
            "    port: 2525\n    max_connections: -3\n",
            "10:22: listeners[0].max_connections: -3 is out of range:"
            " expected a number of connections (1..1000000)",
        ),
    ],
    ids=["recipients_per_hour", "max_connections_per_client", "max_connections"],
)
def test_the_limits_are_checked_with_their_line(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    path = variant(tmp_path, old, new)
    assert problems(path) == [f"{path}:{problem}"]


def test_a_policy_written_with_windows_line_ends_loads(policy_file: Path) -> None:
    """Carriage returns before line feeds are line ends, not the lone ones refused."""
    policy_file.write_bytes(policy_file.read_bytes().replace(b"\n", b"\r\n"))
    assert load(policy_file).tenants.keys() == {"acme", "globex"}


def test_the_version_is_the_same_however_the_path_is_written(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``relay status -c ../relay.yaml`` said the file, unchanged, read as
    another version than the one the relay had loaded as ``relay.yaml``: the
    key files' names carried the ``..``."""
    (policy_file.parent / "sub").mkdir()
    monkeypatch.chdir(policy_file.parent / "sub")
    written = load(Path("../relay.yaml")).digest
    monkeypatch.chdir(policy_file.parent)
    assert load(Path("relay.yaml")).digest == written == load(policy_file).digest
    linked = policy_file.parent.parent / f"{policy_file.parent.name}-current"
    linked.symlink_to(policy_file.parent)
    assert load(linked / "relay.yaml").digest == written


def test_a_linked_directory_then_dot_dot_reads_the_files_where_the_system_finds_them(
    policy_file: Path, tmp_path: Path
) -> None:
    """``current/../relay.yaml`` with ``current`` a link: the system takes ``..``
    after the link, and so must the names the policy reads relative to it."""
    release = tmp_path / "releases" / "r1"
    release.mkdir(parents=True)
    (tmp_path / "current").symlink_to(release)
    # current/.. is releases/, where the policy is not: taken as text, it would be
    (tmp_path / "releases" / "relay.yaml").write_bytes(policy_file.read_bytes())
    shutil.copytree(policy_file.parent / "keys", tmp_path / "releases" / "keys")
    policy = load(tmp_path / "current" / ".." / "relay.yaml")
    assert policy.digest == load(tmp_path / "releases" / "relay.yaml").digest


def test_a_dot_dot_is_taken_out_of_the_paths_unless_a_link_comes_before_it(
    policy_file: Path, tmp_path: Path
) -> None:
    """``../outbox`` beside ``config/`` named ``config/../outbox`` in every log line
    and notice; through a linked directory the text names another directory."""
    site = tmp_path / "site"
    shutil.copytree(policy_file.parent / "keys", site / "real" / "config" / "keys")
    config = site / "real" / "config" / "relay.yaml"
    config.write_text(policy_file.read_text().replace("path: outbox", "path: ../outbox"))
    assert load(config).upstreams["default"].path == site / "real" / "outbox"
    (site / "linked").mkdir()
    (site / "linked" / "config").symlink_to(site / "real" / "config")
    linked = load(site / "linked" / "config" / "relay.yaml").upstreams["default"].path
    assert linked == site / "linked" / "config" / ".." / "outbox"
    assert os.path.realpath(linked) == str(site / "real" / "outbox")


@pytest.mark.parametrize("helo_name", ["localhost", "erp01", "relay.example"])
def test_check_warns_of_a_helo_name_smarthosts_refuse(tmp_path: Path, helo_name: str) -> None:
    """The default name was warned of, a bare one given in the policy not."""
    smtp = f"    type: smtp\n    host: smtp.example\n    helo_name: {helo_name}\n"
    path = variant(tmp_path, "    type: directory\n    path: outbox\n", smtp)
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    line = path.read_text().splitlines().index(f"    helo_name: {helo_name}") + 1
    assert err.getvalue() == (
        f"{path}:{line}:16: warning: upstreams.outbox.helo_name: {helo_name!r} is not a fully"
        " qualified domain name, which upstream servers may refuse in EHLO: give this host's"
        " name in DNS\n"
        if "." not in helo_name
        else ""
    )


@pytest.mark.parametrize(
    ("old", "key", "low", "high", "read"),
    [
        ("    port: 2525\n", "    port: {}\n", 1, 65535, lambda p: p.listeners[0].port),
        ("    port: 2525\n", "    port: 2525\n    max_recipients: {}\n", 1, 100000,
         lambda p: p.listeners[0].max_recipients),
        ("    port: 2525\n", "    port: 2525\nqueue:\n  concurrency: {}\n", 1, 1000,
         lambda p: p.queue.concurrency),
        ("    port: 2525\n", "    port: 2525\naudit:\n  retention_days: {}\n", 1, 36500,
         lambda p: p.audit.retention_days),
        ("    upstream: outbox\n", "    upstream: outbox\n    recipients_per_hour: {}\n", 1,
         10_000_000, lambda p: p.tenants["acme"].recipients_per_hour),
    ],
    ids=["port", "max_recipients", "concurrency", "retention_days", "recipients_per_hour"],
)  # fmt: skip
def test_each_limit_takes_its_bounds_and_refuses_one_past_them(
    tmp_path: Path, old: str, key: str, low: int, high: int, read: Callable[[Any], int]
) -> None:
    """The bounds a problem names are the values that load: one past either is
    refused, and the bound itself is not."""
    for value in (low, high):
        assert read(load(variant(tmp_path / str(value), old, key.format(value)))) == value
    for value in (low - 1, high + 1):
        (found,) = problems(variant(tmp_path / str(value), old, key.format(value)))
        assert f": {value} is out of range: expected " in found


@pytest.mark.parametrize("key", ["idle_timeout", "immediate"])
def test_a_time_of_ten_years_loads_and_a_second_more_is_refused(tmp_path: Path, key: str) -> None:
    at_most = 10 * 365 * 86400
    setting = "    port: 2525\n    {}: {}\n"
    loaded = load(variant(tmp_path / "most", "    port: 2525\n", setting.format(key, at_most)))
    assert getattr(loaded.listeners[0], key) == at_most
    path = variant(tmp_path / "past", "    port: 2525\n", setting.format(key, at_most + 1))
    (found,) = problems(path)
    assert found.startswith(f"{path}:10:") and f"listeners[0].{key}: expected a" in found
    assert f"at most {at_most} (10 years)" in found


def test_a_required_key_left_empty_is_a_located_problem(tmp_path: Path) -> None:
    """An empty value counts as absent: ``name:`` with nothing after it is no name."""
    path = variant(tmp_path, "    name: Acme AS\n", "    name:\n")
    assert problems(path) == [f"{path}:21:5: tenants.acme.name: required key has no value"]


@pytest.mark.parametrize("section", ["version", "platform", "listeners", "upstreams", "tenants"])
def test_each_required_section_left_out_is_said_to_be_missing(tmp_path: Path, section: str) -> None:
    """Without ``tenants`` a policy loaded that sent no one's mail."""
    text = (POLICIES / "minimal.yaml").read_text()
    block = re.search(rf"^{section}:.*\n(?:[ #].*\n)*", text, re.MULTILINE)
    assert block is not None
    path = variant(tmp_path, block.group(), "")
    assert f"{path}:2:1: {section}: required key is missing" in problems(path)


def test_a_key_of_the_other_upstream_type_is_a_located_problem(tmp_path: Path) -> None:
    """``host`` under a directory upstream does nothing: the mail is written to
    ``path`` whatever it says, so it is refused rather than left to mislead."""
    path = variant(tmp_path, "    path: outbox\n", "    path: outbox\n    host: smtp.example\n")
    assert problems(path) == [
        f"{path}:19:5: upstreams.outbox.host: unknown key for a directory upstream"
        " (expected one of: type, path)"
    ]


def test_a_string_of_spaces_alone_is_no_value(tmp_path: Path) -> None:
    path = variant(tmp_path, "    name: Acme AS\n", '    name: "   "\n')
    assert problems(path) == [
        f"{path}:21:11: tenants.acme.name: expected a company name, not an empty string"
    ]


@pytest.mark.parametrize("version", [0, 2])
def test_a_version_other_than_the_one_this_relay_reads_is_refused(
    tmp_path: Path, version: int
) -> None:
    path = variant(tmp_path, "version: 1\n", f"version: {version}\n")
    assert problems(path) == [
        f"{path}:2:10: version: unsupported policy version {version}: this relay reads version 1"
    ]


def test_a_domain_of_253_characters_loads_and_one_of_254_is_refused(tmp_path: Path) -> None:
    """DNS holds no longer name: every delivery to one bounced as if the address were wrong."""
    labels = f"{'a' * 63}.{'b' * 63}.{'c' * 63}."
    old = "address: post@acme.example"
    longest = labels + "d" * 61
    path = variant(tmp_path / "253", old, f"{old}\n    verified_domains: [{longest}]")
    assert load(path).tenants["acme"].verified_domains == (longest,)
    too_long = labels + "d" * 62
    path = variant(tmp_path / "254", old, f"{old}\n    verified_domains: [{too_long}]")
    assert [p.split(": ", 1)[1] for p in problems(path)] == [
        f"tenants.acme.verified_domains[0]: '{too_long}' is not a domain name like example.com"
    ]


@pytest.mark.parametrize("content", [b"", b"\n", b"  \r\n"])
def test_an_audit_key_file_of_no_key_is_refused(tmp_path: Path, content: bytes) -> None:
    """A line end alone loaded as the key b"", and the audit chain was keyed with nothing."""
    key = tmp_path / "audit.key"
    key.write_bytes(content)
    path = variant(tmp_path, "version: 1\n", "version: 1\naudit: {hmac_key_file: audit.key}\n")
    assert problems(path) == [f"{path}:3:24: audit.hmac_key_file: {key} is empty"]


def test_a_file_named_twice_is_held_to_the_smaller_limit_the_second_time(tmp_path: Path) -> None:
    """Read once per load, a file is judged again where another setting names it:
    a CA bundle taken as the audit key passed, the first read having been within
    a CA file's 4 MiB."""
    path = _every_file_setting(tmp_path)
    bundle = tmp_path / "tls" / "ca.crt"
    bundle.write_bytes(b"# padding\n" * 7000 + bundle.read_bytes())
    assert load(path).upstreams["outbox"].ca_file == bundle
    path.write_text(
        path.read_text().replace("hmac_key_file: audit.key", f"hmac_key_file: {bundle}")
    )
    (found,) = problems(path)
    assert found.endswith(
        f": audit.hmac_key_file: {bundle} is larger than 64 KiB, too large for a key file"
    )


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ("username: relay\npassword_file: smarthost.password\npassword_env: RELAY_PASSWORD",
         "22:19: upstreams.outbox.password_env: set password_file or password_env, not both"),
        ("password_env: RELAY_PASSWORD",
         "17:5: upstreams.outbox.username: a password needs a username"),
    ],
    ids=["both", "no-username"],
)  # fmt: skip
def test_an_upstream_password_is_given_one_way_with_a_username(
    tmp_path: Path, settings: str, problem: str
) -> None:
    """Which of two passwords the relay would log in with is not for it to guess."""
    (tmp_path / "smarthost.password").write_text("s3cret\n")
    path = _smtp_upstream_with(tmp_path, settings)
    assert problems(path) == [f"{path}:{problem}"]
