"""``relay preview`` against a real relay on one suppression list: what it says
of the sender's failure notice and automatic copy is what the relay does."""

from __future__ import annotations

import json
from pathlib import Path

from relay.policy.load import load
from relay.suppression import BOUNCE, Suppression, SuppressionFile
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Received, Sink, SinkServer, free_port
from tests.test_preview_relay import preview
from tests.test_queue_e2e import configure, relay_cli, send

INVOICE = b"From: jan@acme.example\r\nTo: buyer@example.org\r\nSubject: Invoice 4711\r\n\r\nhi\r\n"
SINCE = "2026-01-02T03:04:05.000Z"


def _list(policy: Path, address: str) -> None:
    settings = load(policy).suppression
    assert settings is not None
    settings.file.parent.mkdir(parents=True, exist_ok=True)
    SuppressionFile(settings.file).add([Suppression(address, None, BOUNCE, SINCE)])


def _sent(port: int, rcpts: tuple[str, ...], relay: RelayProcess, policy: Path) -> str:
    """The relay's log line on the message's notice, once the queue is empty."""
    queue_id = send(port, INVOICE, rcpts)
    wait_for(lambda: f"{queue_id}: failure notice" in relay.log() or (
        f"{queue_id}: no failure notice" in relay.log()
    ))  # fmt: skip
    wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
    lines = relay.log().splitlines()
    return next(line for line in lines if f"{queue_id}: " in line and "failure notice" in line)


def _preview(policy: Path, eml: Path, rcpts: tuple[str, ...]) -> tuple[str, dict]:
    options = ["--mail-from", "jan@acme.example", *(a for r in rcpts for a in ("--rcpt", r))]
    code, text, err = preview(policy, eml, *options)
    assert code == 0, err
    code, out, err = preview(policy, eml, "--json", *options)
    assert code == 0, err
    return text, json.loads(out)


def _document(sink: Sink) -> Received:
    (sent,) = [m for m in sink.messages if m.mail_from != "<>"]
    sink.messages.clear()
    return sent


def test_preview_says_of_the_failure_notice_and_the_copy_what_the_relay_does(
    policy_file: Path, tmp_path: Path
) -> None:
    """Preview said nothing of the notice the relay queues for a suppressed
    recipient, nor that none goes to a sender on the list; and it showed that
    sender's automatic copy as added, and "already a recipient" of one who got
    no copy by either route."""
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(INVOICE)
    rcpts = ("buyer@example.org", "gone@example.org")
    with SinkServer(Sink()) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        _list(policy, "gone@example.org")
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            told = _sent(port, rcpts, relay, policy)
            text, report = _preview(policy, eml, rcpts)
            assert "failure notice to=<jan@acme.example> queued as" in told
            assert "\n  - failure notice to <jan@acme.example>: 1 recipient suppressed\n" in text
            assert report["failure_notice"] == {
                "to": "jan@acme.example",
                "recipients": ["gone@example.org"],
                "withheld": None,
            }
            sink.sink.messages.clear()

            _list(policy, "jan@acme.example")  # the running workers see it
            told = _sent(port, rcpts, relay, policy)
            copied = _document(sink.sink)
            text, report = _preview(policy, eml, rcpts)
            ownself = _sent(port, ("buyer@example.org", "jan@acme.example"), relay, policy)
            alone = _document(sink.sink)
            own_text, _ = _preview(policy, eml, ("buyer@example.org", "jan@acme.example"))

    assert f"no failure notice: <jan@acme.example> is on the suppression list since {SINCE}" in told
    said = (
        f"no failure notice: the sender <jan@acme.example> is on the suppression list since {SINCE}"
    )
    assert f"\n  - {said}\n" in text
    assert report["failure_notice"] == {  # the relay's own copy is not the sender's to hear of
        "to": "jan@acme.example",
        "recipients": ["gone@example.org"],
        "withheld": {"reason": BOUNCE, "since": SINCE},
    }
    assert copied.rcpt_tos == report["envelope"]["recipients"] == ["buyer@example.org"]
    assert "\nBCC added:   jan@acme.example (suppressed)\n" in text
    assert (
        "automatic BCC to the sender jan@acme.example ('invoice'), added, then suppressed:"
        " the sender is on the suppression list"
    ) in text
    assert report["bcc_added"] == ["jan@acme.example"]  # as the audit record has it

    assert "no failure notice: <jan@acme.example>" in ownself
    assert alone.rcpt_tos == ["buyer@example.org"]
    assert "\nRecipients:  buyer@example.org\n" in own_text
    assert (
        "no automatic BCC: jan@acme.example is already a recipient, and on the"
        " suppression list: the sender gets no copy"
    ) in own_text


def test_preview_goes_on_without_a_suppression_list_it_cannot_read(
    policy_file: Path, tmp_path: Path
) -> None:
    """A list the preview cannot read (here a directory where its file should
    be, which root cannot read either) is said among the reasons; the rest of
    the report is still given."""
    settings = load(policy_file).suppression
    assert settings is not None
    settings.file.mkdir(parents=True)
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(INVOICE)
    text, report = _preview(policy_file, eml, ("buyer@example.org",))
    said = (
        "recipients not checked against the suppression list: cannot read the suppression"
        f" list {settings.file}: a directory, not a regular file"
    )
    assert f"\n  - {said}\n" in text
    assert said in report["reasons"]
    assert "\nRecipients:  buyer@example.org, jan@acme.example\n" in text
    assert "\n  - automatic BCC to the sender jan@acme.example ('invoice')\n" in text
    assert "\nFrom: Jan Janssens via Acme AS <noreply@platform.example>\n" in text
    assert report["envelope"]["recipients"] == ["buyer@example.org", "jan@acme.example"]
