"""``{user.address}`` in a display name template: a documented placeholder, so
the policy loads, but the From then reads ``"jan@acme.example via Acme"
<noreply@platform.example>``, a name holding an address, which receivers and
mail clients take for a forged sender; ``relay check`` says so where it stands."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from relay.policy.load import check_main
from tests.policyfiles import variant
from tests.test_cli import relay

PLATFORM = '  display_name: "{user.name} via {tenant.name}"\n'
UPSTREAM = "  outbox:\n    type: directory\n    path: outbox\n"
ACCOUNT = (
    "  outbox:\n    type: smtp\n    host: 127.0.0.1\n    port: 2526\n    tls: none\n"
    "    helo_name: relay.platform.example\n    sender: post@acme.example\n"
    "    sender_name: {name}\n"
)
SAID = (
    "{user.address} puts the user's address in the From's name: mail goes out as"
    ' "{example}" <{sender}>, and receivers and mail clients flag a name that holds'
    " an address as a forged sender; {user.name} is the usual choice"
)


def check(path: Path) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0, err.getvalue()
    assert out.getvalue().startswith(f"{path}: ok ("), out.getvalue()
    return err.getvalue()


def said(example: str, sender: str) -> str:
    return SAID.replace("{example}", example).replace("{sender}", sender)


@pytest.mark.parametrize(
    ("template", "example"),
    [
        ("{user.address} via {tenant.name}", "jan@acme.example via Acme"),
        ("{user.name} ({user.address})", "Jan Janssens (jan@acme.example)"),
        ("{user.address}", "jan@acme.example"),
    ],
)
def test_the_platforms_template_with_the_address_is_warned_of(
    tmp_path: Path, template: str, example: str
) -> None:
    assert check(variant(tmp_path / "without", PLATFORM, PLATFORM)) == ""
    path = variant(tmp_path, PLATFORM, f'  display_name: "{template}"\n')
    line = path.read_text().splitlines().index(f'  display_name: "{template}"') + 1
    assert check(path) == (
        f"{path}:{line}:17: warning: platform.display_name:"
        f" {said(example, 'NoReply@Platform.example')}\n"
    )


def test_an_upstreams_sender_name_with_the_address_is_warned_of(tmp_path: Path) -> None:
    without = ACCOUNT.format(name='"{user.name} via {tenant.name}"')
    assert check(variant(tmp_path / "without", UPSTREAM, without)) == ""
    name = '"{user.address} via {tenant.name}"'
    path = variant(tmp_path, UPSTREAM, ACCOUNT.format(name=name))
    line = path.read_text().splitlines().index(f"    sender_name: {name}") + 1
    assert check(path) == (
        f"{path}:{line}:18: warning: upstreams.outbox.sender_name:"
        f" {said('jan@acme.example via Acme', 'post@acme.example')}\n"
    )


def test_relay_check_says_it_and_exits_0(tmp_path: Path) -> None:
    """As the unit's ExecStartPre runs it: the policy still loads."""
    path = variant(tmp_path, PLATFORM, '  display_name: "{user.address} via {tenant.name}"\n')
    done = relay("check", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"{path}:5:17: warning: platform.display_name:"
        f" {said('jan@acme.example via Acme', 'NoReply@Platform.example')}\n"
    )
