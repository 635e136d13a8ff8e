"""``relay preview`` against a real relay on the same policy: it must refuse
what the listener a message comes in on refuses, and say when the relay runs
another version of the policy than the file the preview read."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path

from tests.relayproc import RelayProcess, wait_for
from tests.sink import free_port
from tests.test_cli import relay
from tests.test_queue_e2e import ROOT, relay_cli

STRICT = (
    "  - name: strict\n    address: 127.0.0.1\n    port: {port}\n    auth: required\n"
    "    max_message_size: 3000\n    max_recipients: 3\n"
)
RCPTS = ("one@example.org", "two@example.org", "three@example.org", "four@example.org")


def message(body: str = "hi\n") -> bytes:
    head = "From: jan@acme.example\nTo: one@example.org\nSubject: Hello\n\n"
    return (head + body).encode()


def two_listeners(policy_file: Path, local: int, strict: int) -> Path:
    """``local`` takes no login, ``strict`` wants one and takes little."""
    text = policy_file.read_text().replace("port: 2525\n    auth: optional", f"port: {local}")
    text = text.replace("identify:\n", STRICT.format(port=strict) + "identify:\n", 1)
    policy_file.write_text(text.replace(f"port: {local}\n", f"port: {local}\n    auth: off\n"))
    return policy_file


def over_smtp(port: int, data: bytes, rcpts: tuple[str, ...], login: bool) -> list[str]:
    """The relay's replies that were no 2xx, in order; AUTH sent even where it is
    not offered, as an ERP told to log in does."""
    refused = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        if login:
            plain = base64.b64encode(b"\0erp-acme\0demo-password").decode()
            code, text = client.docmd("AUTH", f"PLAIN {plain}")
            if code != 235:
                return [f"{code} {text.decode()}"]
        code, text = client.mail("jan@acme.example")
        if code != 250:
            return [f"{code} {text.decode()}"]
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                refused.append(f"{code} {text.decode()}")
        code, text = client.data(data.replace(b"\n", b"\r\n"))
        if code != 250:
            refused.append(f"{code} {text.decode()}")
    return refused


def preview(policy: Path, eml: Path, *options: str) -> tuple[int, str, str]:
    done = relay("preview", "-c", str(policy), str(eml), *options)
    prefix = "relay preview: the relay would refuse this message: "
    return done.returncode, done.stdout, done.stderr.removeprefix(prefix).strip()


@contextlib.contextmanager
def _running(policy_file: Path, tmp_path: Path) -> Iterator[tuple[RelayProcess, Path, int]]:
    """A relay on the policy, a message to preview, and the relay's PID."""
    port = free_port()
    policy_file.write_text(policy_file.read_text().replace("port: 2525", f"port: {port}"))
    eml = tmp_path / "hello.eml"
    eml.write_bytes(message())
    with RelayProcess(policy_file, port, tmp_path / "relay.log") as running:
        assert running.proc is not None
        yield running, eml, running.proc.pid


def test_preview_of_a_listener_refuses_what_that_listener_refuses(
    policy_file: Path, tmp_path: Path
) -> None:
    """With a strict listener beside a loose one, preview took the largest size
    and recipient limits of any and asked for a login only if every listener
    did: it passed what the strict listener refused with 552, 452 and 530."""
    local, strict = free_port(), free_port()
    policy = two_listeners(policy_file, local, strict)
    eml = tmp_path / "big.eml"
    eml.write_bytes(message(("x" * 70 + "\n") * 60))
    small = tmp_path / "small.eml"
    small.write_bytes(message())
    rcpts = [arg for rcpt in RCPTS for arg in ("--rcpt", rcpt)]
    with RelayProcess(policy, local, tmp_path / "relay.log"):
        big_there = over_smtp(strict, eml.read_bytes(), RCPTS[:1], login=True)
        no_login = over_smtp(strict, small.read_bytes(), RCPTS[:1], login=False)
        fourth = over_smtp(strict, small.read_bytes(), RCPTS, login=True)
        login_here = over_smtp(local, small.read_bytes(), RCPTS[:1], login=True)
        assert over_smtp(local, eml.read_bytes(), RCPTS[:1], login=False) == []
    assert big_there == ["552 5.3.4 Message size exceeds the maximum of 3000 bytes"]
    assert no_login == ["530 5.7.0 Authentication required"]
    assert fourth == ["452 4.5.3 Too many recipients"]
    assert login_here == ["504 5.5.4 Unrecognized authentication type"]

    login = ("--auth-login", "erp-acme")
    assert preview(policy, eml, "--listener", "strict", *login) == (65, "", big_there[0])
    assert preview(policy, small, "--listener", "strict") == (65, "", no_login[0])
    assert preview(policy, small, "--listener", "local", *login) == (65, "", login_here[0])
    code, out, _ = preview(policy, small, "--listener", "strict", "--json", *login, *rcpts)
    assert code == 0
    report = json.loads(out)
    assert report["envelope"]["recipients"] == list(RCPTS[:3])
    assert any(
        reason.startswith(
            f"1 recipient past the 3 listener strict takes would be answered {fourth[0]} "
        )
        and reason.endswith(": four@example.org")
        for reason in report["reasons"]
    ), report["reasons"]
    assert report["listener"] == {
        "name": "strict",
        "assumed": "strict",
        "max_message_size": 3000,
        "max_recipients": 3,
        "auth": "required",
        "allow": ["127.0.0.0/8", "::1/128"],
    }


def test_preview_says_which_listeners_limits_it_assumed(policy_file: Path, tmp_path: Path) -> None:
    """Without ``--listener`` a policy of several takes the most permissive, and says so."""
    policy = two_listeners(policy_file, free_port(), free_port())
    eml = tmp_path / "big.eml"
    eml.write_bytes(message(("x" * 70 + "\n") * 60))
    code, out, err = preview(policy, eml)
    assert code == 0, err
    assert (
        "\nListener:    the most permissive of local, strict (up to 26214400 bytes,"
        " 100 recipients, auth optional); --listener NAME takes one's\n"
    ) in out
    code, out, err = preview(policy, eml, "--json")
    assert json.loads(out)["listener"]["name"] is None
    assert json.loads(out)["listener"]["assumed"] == "the most permissive of local, strict"

    done = relay("preview", "-c", str(policy), str(eml), "--listener", "submission")
    assert done.returncode == 2, done.stdout
    assert done.stderr == "relay preview: no listener 'submission' (the policy has local, strict)\n"


def test_preview_says_the_running_relay_uses_another_version(
    policy_file: Path, tmp_path: Path
) -> None:
    """It named the file's version alone: of a file edited and not reloaded,
    the preview is not what the relay does."""
    with _running(policy_file, tmp_path) as (running, eml, pid):
        first = json.loads(preview(policy_file, eml, "--json")[1])["policy"]
        assert first["running"] == {
            "pid": pid,
            "version": first["version"],
            "file": str(policy_file),
        }
        assert first["note"] is None
        assert first["file"] == str(policy_file)

        policy_file.write_text(policy_file.read_text().replace("name: Acme AS", "name: Acme ASA"))
        code, out, err = preview(policy_file, eml)
        assert code == 0, err
        second = json.loads(preview(policy_file, eml, "--json")[1])["policy"]
        note = (
            f"the running relay uses version {first['version']}; this preview is of the file:"
            f" a reload puts it in use (systemctl reload erp-relay, or kill -HUP {pid})"
        )
        assert second["note"] == note
        assert second["running"] == first["running"]
        assert out.startswith(
            f"Policy:      {policy_file} (version {second['version']})\n             {note}\n"
        )

        running.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "policy reloaded" in running.log())
        assert json.loads(preview(policy_file, eml, "--json")[1])["policy"]["note"] is None


def test_a_copy_of_the_policy_is_not_said_to_come_into_use_at_a_reload(
    policy_file: Path, tmp_path: Path
) -> None:
    """A copy edited beside the running file, on its state directory, was said
    to come into use at a reload, which never reads it. The file itself, named
    relative, through a symbolic link or by another name of the same file,
    still is."""
    edit = tmp_path / "policy-edit.yaml"
    with _running(policy_file, tmp_path) as (_, eml, pid):
        edit.write_text(policy_file.read_text().replace("name: Acme AS", "name: Acme ASA"))
        copy = json.loads(preview(edit, eml, "--json")[1])["policy"]
        status = relay_cli(edit, "status").stdout.splitlines()
        policy_file.write_text(edit.read_text())
        link = tmp_path / "link.yaml"
        link.symlink_to(policy_file)
        hard = policy_file.with_name("same-file.yaml")  # as a bind mount shows it elsewhere
        os.link(policy_file, hard)
        through = {
            str(link): json.loads(preview(link, eml, "--json")[1])["policy"]["note"],
            str(hard): json.loads(preview(hard, eml, "--json")[1])["policy"]["note"],
            "relative": relay("preview", "-c", os.path.relpath(policy_file, ROOT), str(eml)).stdout,
        }
    elsewhere = f"the running relay reads {policy_file}, not this file"
    assert copy["note"].endswith(f"this preview is of the file: {elsewhere}"), copy["note"]
    assert copy["running"]["file"] == str(policy_file)
    assert status[1].endswith(f"now reads {copy['version']}: {elsewhere}"), status
    reload = f"a reload puts it in use (systemctl reload erp-relay, or kill -HUP {pid})"
    assert through[str(link)].endswith(reload), through
    assert through[str(hard)].endswith(reload), through
    assert reload in through["relative"], through["relative"]


def test_preview_json_of_a_kept_reply_to_reads_as_the_audit_record(
    policy_file: Path, tmp_path: Path
) -> None:
    """``reply_to.after`` repeated the kept value where the audit record of the
    same message has null: left as it was."""
    port = free_port()
    policy_file.write_text(policy_file.read_text().replace("port: 2525", f"port: {port}"))
    data = message().replace(b"Subject: Hello", b"Subject: Quote 5\nReply-To: desk@acme.example")
    eml = tmp_path / "quote.eml"
    eml.write_bytes(data)
    with RelayProcess(policy_file, port, tmp_path / "relay.log"):
        assert over_smtp(port, data, RCPTS[:1], login=False) == []
    found = relay_cli(policy_file, "audit", "search", "--format", "json")
    assert found.returncode == 0, found.stderr
    received = [r for r in map(json.loads, found.stdout.splitlines()) if r["event"] == "received"]
    assert [(r["reply_to_before"], r["reply_to_after"]) for r in received] == [
        ("desk@acme.example", None)
    ]
    code, out, err = preview(policy_file, eml, "--json")
    assert code == 0, err
    assert json.loads(out)["reply_to"] == {"before": "desk@acme.example", "after": None}
    assert (
        "\nReply-To:    desk@acme.example  ->  desk@acme.example\n" in preview(policy_file, eml)[1]
    )
