"""An ERP header the relay decides by, given twice: through a real relay, as
an ERP sends it, and ``relay preview`` on the same message."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from relay import message
from relay.errors import Rejected
from tests.relayproc import RelayProcess
from tests.sink import SinkServer, free_port
from tests.test_cli import relay as relay_command
from tests.test_decisions import msg, run
from tests.test_queue_e2e import configure

HEAD = "From: ERP <erp@erp.acme.example>\r\nTo: one@example.org\r\n"


def _refusal(name: str, read_for: str) -> str:
    return (
        f"550 5.6.0 Header field {name} appears 2 times with different values;"
        f" the relay reads it {read_for} and cannot tell which one is meant"
    )


def _send(port: int, *fields: str, login: bool = False) -> str:
    data = HEAD + "".join(f"{field}\r\n" for field in fields) + "\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo()
        if login:
            client.login("erp-acme", "demo-password")
        client.mail("erp@erp.acme.example")
        client.rcpt("one@example.org")
        code, text = client.data(data.encode())
    return f"{code} {text.decode()}"


def test_an_erp_header_with_two_values_is_refused_where_it_decides(
    policy_file: Path, tmp_path: Path
) -> None:
    """Two X-ERP-User fields, kari then jan, sent the message as Kari, the
    first read; two X-Document-Type or X-Responsible fields decided the type
    or the Reply-To the same way, while a second Subject was refused."""
    port = free_port()
    with SinkServer() as sink:
        path = configure(policy_file, port, sink.port)
        with RelayProcess(path, port, tmp_path / "relay.log"):
            users = ("Subject: Hello", "X-ERP-User: kari")
            user = _send(port, *users, "X-ERP-User: jan", login=True)
            same_user = _send(port, *users, "X-ERP-User:  kari", login=True)
            doc_type = ("Subject: Hello", "X-Document-Type: quote", "X-Document-Type: invoice")
            doc_type = (*doc_type, "X-ERP-User: jan")
            typed = _send(port, *doc_type, login=True)
            responsible = ("X-Responsible: per@acme.example", "X-Responsible: eva@acme.example")
            invoice = ("Subject: Invoice 7", "X-ERP-User: jan")
            reply_to = _send(port, *invoice, *responsible, login=True)
            same = ("X-Responsible: per@acme.example",) * 2
            same_reply_to = _send(port, *invoice, *same, login=True)
            got = sink.sink.wait(2)
    assert user == _refusal("X-ERP-User", "to find the sending user")
    assert typed == _refusal("X-Document-Type", "for the document type")
    assert reply_to == _refusal("X-Responsible", "for the Reply-To")
    assert same_user.startswith("250 ") and same_reply_to.startswith("250 ")
    reply_tos = {message.read(each.data).get("Reply-To") for each in got}
    assert reply_tos == {"Kåre Ødegård <kari@acme.example>", "per@acme.example"}
    eml = tmp_path / "two-users.eml"
    eml.write_text(HEAD + "Subject: Hello\r\nX-ERP-User: kari\r\nX-ERP-User: jan\r\n\r\nhi\r\n")
    done = relay_command("preview", "-c", str(path), str(eml))
    assert done.returncode == 65, done.stdout
    assert f"would refuse this message: {user}\n" in done.stderr


def _head(*fields: str) -> tuple[str, ...]:
    return ("From: ERP <erp@erp.acme.example>", "To: one@example.org", *fields)


@pytest.mark.parametrize(
    "values",
    [
        ("kari", "Kari"),
        ("kari@acme.example", "SALG@acme.example"),
        ("Kari <kari@acme.example>", "kari"),
    ],
    ids=["case", "alias", "mailbox-and-id"],
)
def test_an_erp_user_header_twice_naming_one_user_is_that_user(
    policy_file: Path, values: tuple[str, str]
) -> None:
    """Compared as written, an id in two cases, or an address and its alias,
    were refused as two users, though each names Kari alone."""
    fields = [f"X-ERP-User: {value}" for value in values]
    p = run(policy_file, msg(*_head("Subject: Hello", *fields)), login="erp-acme")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header")


def test_an_erp_header_twice_in_two_cases_of_its_name_is_refused(policy_file: Path) -> None:
    """A field name is the same in any case (RFC 5322 1.2.2): ``x-erp-user``
    is a second X-ERP-User, and its value decides as much as the first's."""
    fields = ("X-ERP-User: kari", "x-erp-user: jan")
    with pytest.raises(Rejected) as caught:
        run(policy_file, msg(*_head("Subject: Hello", *fields)), login="erp-acme")
    assert caught.value.line == _refusal("X-ERP-User", "to find the sending user")


def test_a_reply_to_header_twice_with_one_address_is_that_address(policy_file: Path) -> None:
    fields = ("X-Responsible: Per <per@acme.example>", "X-Responsible: per@ACME.example")
    data = msg(*_head("Subject: Invoice 7", "X-ERP-User: jan", *fields))
    p = run(policy_file, data, login="erp-acme")
    assert p.decision.reply_to_after == "Per <per@acme.example>"


def test_the_messages_own_reply_to_as_a_source_twice_is_refused(policy_file: Path) -> None:
    """A field of the message itself is exempt where a classify rule reads it,
    as any value may match; a Reply-To source takes one, and took the first."""
    text = policy_file.read_text()
    policy_file.write_text(
        text.replace('"header:X-Responsible", sender', '"header:Reply-To", sender')
    )
    fields = ("Reply-To: per@acme.example", "Reply-To: eva@acme.example")
    data = msg(*_head("Subject: Invoice 7", "X-ERP-User: jan", *fields))
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, login="erp-acme")
    assert caught.value.line == _refusal("Reply-To", "for the Reply-To")


def test_an_encoded_word_in_the_erp_users_name_is_never_the_user(policy_file: Path) -> None:
    """Read decoded, the comma and ``@`` in the name's encoded word made
    ``jan@acme.example`` a mailbox, and the message went out as Jan's."""
    field = "X-ERP-User: =?utf-8?q?jan@acme.example,?= <kari@acme.example>"
    p = run(policy_file, msg(*_head("Subject: Hello", field)), login="erp-acme")
    assert (p.decision.identity.user.id, p.decision.identity.source) == ("kari", "header")
    p = run(policy_file, msg(*_head("Subject: Hello", field, "X-ERP-User: kari")), login="erp-acme")
    assert p.decision.identity.user.id == "kari"


@pytest.mark.parametrize(
    ("first", "second", "refused"),
    [
        (
            "=?utf-8?q?eva@acme.example,?= <per@acme.example>",
            "=?utf-8?q?per@acme.example,?= <eva@acme.example>",
            True,
        ),
        ("=?utf-8?q?x@y.example,?= <per@acme.example>", "per@acme.example", False),
        ("per@acme.example, eva@acme.example", "eva@acme.example, per@acme.example", True),
        # the first address SMTP can deliver to is the one taken, and the same in both
        ("Per <per@-acme.example>, per@acme.example", "Per <per@acme.example>", False),
    ],
    ids=[
        "encoded-names-crossed",
        "encoded-name-same-address",
        "same-addresses-other-order",
        "undeliverable-first",
    ],
)
def test_a_reply_to_source_twice_is_judged_by_the_address_it_gives(
    policy_file: Path, first: str, second: str, refused: bool
) -> None:
    """Decoded, the names' encoded words were read as addresses: per's and
    eva's fields passed as one; and two fields with the same addresses in
    another order passed, though the first address of the first is taken."""
    fields = (f"X-Responsible: {first}", f"X-Responsible: {second}")
    data = msg(*_head("Subject: Invoice 7", "X-ERP-User: jan", *fields))
    if not refused:
        assert run(policy_file, data, login="erp-acme").decision.reply_to_after is not None
        return
    with pytest.raises(Rejected) as caught:
        run(policy_file, data, login="erp-acme")
    assert caught.value.line == _refusal("X-Responsible", "for the Reply-To")


def test_a_document_type_twice_in_two_cases_is_one_type(policy_file: Path) -> None:
    """An ERP that writes its header twice, once as typed and once in capitals,
    means one type: refused, its invoices were not sent at all."""
    fields = ("X-Document-Type: invoice", "X-Document-Type:  INVOICE ")
    p = run(
        policy_file, msg(*_head("Subject: Hello", "X-ERP-User: jan", *fields)), login="erp-acme"
    )
    assert p.decision.classification.doc_type == "invoice"
