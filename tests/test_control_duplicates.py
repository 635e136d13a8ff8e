"""An ERP header the relay decides by, given twice: through a real relay, as
an ERP sends it, and ``relay preview`` on the same message."""

from __future__ import annotations

import smtplib
from pathlib import Path

from relay import message
from tests.relayproc import RelayProcess
from tests.sink import SinkServer, free_port
from tests.test_cli import relay as relay_command
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
