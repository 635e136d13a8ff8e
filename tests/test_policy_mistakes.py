"""Mistakes ``relay check`` passed, after which the relay ran and failed (or did
harm) for days: each is now a located problem, or a warning where the file
itself is not wrong."""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from relay.errors import PolicyError
from relay.hostport import host_port
from relay.policy import selfloop
from relay.policy.load import check_main, load
from relay.sign import sign
from tests.dkimtools import dkimpy_each
from tests.policyfiles import variant


def problems(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load(path)
    return caught.value.problems


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user of the host may pass through, as may every one above
    it: pytest's own are closed to others (0700), which ``relay check`` says."""
    base = Path(tempfile.mkdtemp(prefix="relay-open-"))
    try:
        base.chmod(0o755)
        if any(not parent.stat().st_mode & stat.S_IXOTH for parent in base.parents):
            pytest.skip(f"{tempfile.gettempdir()} is closed to other users")
        yield base
    finally:
        shutil.rmtree(base)


def warnings(path: Path) -> list[str]:
    """What ``relay check`` says of a policy that passes."""
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0, err.getvalue()
    return err.getvalue().splitlines()


def line_of(path: Path, text: str) -> int:
    (number,) = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return number


NOBODY = 65534

_LISTENER = "    address: 127.0.0.1\n    port: 2525\n"
_TLS = "tls: {cert: tls/relay.crt, key: tls/relay.key}"
_OPEN = (
    " lets every address reach 0.0.0.0:2525, which takes mail without a login: anyone who"
    " can reach the port can send mail signed as the policy's users; set auth: required,"
    " or allow only the ERP's networks"
)
_BY_DEFAULT = "identify: {order: [auth_login], unknown_sender: default, default_tenant: acme}\n"


@pytest.mark.parametrize(
    ("settings", "identify", "warned"),
    [
        ("auth: off\n    allow: [0.0.0.0/0]", "", "13: listeners[0].allow[0]: 0.0.0.0/0"),
        ("auth: off\n    allow: [10.0.0.0/8, '::/0']", "", None),  # no IPv6 client on 0.0.0.0
        ("auth: off\n    allow: ['::ffff:0:0/96']", "", "13: listeners[0].allow[0]: 0.0.0.0/0"),
        (f"{_TLS}\n    allow: [0.0.0.0/0]", "", "13: listeners[0].allow[0]: 0.0.0.0/0"),
        (f"{_TLS}\n    allow: [0.0.0.0/0]", _BY_DEFAULT, "13: listeners[0].allow[0]: 0.0.0.0/0"),
        ("auth: off\n    allow: [0.0.0.0/1, 128.0.0.0/1]", "",
         "12: listeners[0].allow: together, 0.0.0.0/1, 128.0.0.0/1"),
        ("auth: off\n    allow: [0.0.0.0/0]", "identify: {order: [auth_login]}\n", None),
        (f"auth: required\n    {_TLS}\n    allow: [0.0.0.0/0]", "", None),
        ("auth: off\n    allow: [10.0.0.0/8]", "", None),
        ("auth: off", "", None),
    ],
    ids=["off", "ipv6-on-ipv4", "off-mapped", "optional", "default-user", "halves",
         "login-only", "required", "lan", "default-allow"],
)  # fmt: skip
def test_check_warns_of_a_listener_that_lets_anyone_send_as_a_user(
    tmp_path: Path, settings: str, identify: str, warned: str | None
) -> None:
    """0.0.0.0 with auth off and allow 0.0.0.0/0 passed with ok: whoever reached
    the port sent mail signed as any user whose address they gave, or, with a
    default user, with any address at all."""
    listener = f"    address: 0.0.0.0\n    port: 2525\n    {settings}\n"
    path = variant(tmp_path, _LISTENER, listener)
    text = path.read_text().replace(
        "    upstream: outbox\n", "    upstream: outbox\n    default_user: jan\n"
    )
    path.write_text(text + identify)
    found = [w for w in warnings(path) if "lets every address" in w]
    if warned is None:
        assert found == []
        return
    assert found == [
        f"{path}:{line_of(path, 'allow:')}:{warned.replace(': ', ': warning: ', 1)}{_OPEN}"
    ]


def _smtp(tmp_path: Path, settings: str) -> Path:
    """minimal.yaml whose upstream is an smtp one with ``settings`` (lines)."""
    smtp = "".join(f"    {line}\n" for line in ("type: smtp", *settings.splitlines()))
    return variant(tmp_path, "    type: directory\n    path: outbox\n", smtp)


_NOT_A_HOST = "18:11: upstreams.outbox.host: expected a host name or IP address, not "


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("127.0.0.1:30150", "'127.0.0.1:30150'; write host: 127.0.0.1 and put the port in"
         " port: 30150"),
        ("smtp://smtp.example:587", "'smtp://smtp.example:587'; write host: smtp.example and"
         " put the port in port: 587"),
        ("'[2001:db8::1]:25'", "'[2001:db8::1]:25'; write host: 2001:db8::1 and put the port"
         " in port: 25"),
        ("'[2001:db8::1]'", "'[2001:db8::1]'; write host: 2001:db8::1"),
        ("'[IPv6:::1]'", "'[IPv6:::1]'; write host: ::1"),
        ("'[IPv6:2001:db8::1]:25'", "'[IPv6:2001:db8::1]:25'; write host: 2001:db8::1 and put"
         " the port in port: 25"),
        ("smtp example", "'smtp example'"),
        ('"192.0.2.1 "', "'192.0.2.1 '; write it without the spaces: 192.0.2.1"),
        ("192.0.2.300", "'192.0.2.300'"),
    ],
)  # fmt: skip
def test_an_upstream_host_that_is_no_host_is_a_problem(
    tmp_path: Path, host: str, problem: str
) -> None:
    """Each passed, and every delivery was deferred with host not found for days."""
    path = _smtp(tmp_path, f"host: {host}\ntls: starttls")
    assert problems(path) == [f"{path}:{_NOT_A_HOST}{problem}"]


@pytest.mark.parametrize(
    "host", ["smtp.example", "smtp.example.", "192.0.2.1", "'2001:db8::1'", "localhost"]
)
def test_an_upstream_host_name_or_address_loads(tmp_path: Path, host: str) -> None:
    path = _smtp(tmp_path, f"host: {host}\ntls: starttls\nhelo_name: relay.example")
    assert load(path).upstreams["outbox"].host == host.strip("'")


def test_a_rule_of_type_notice_is_a_located_problem(tmp_path: Path) -> None:
    """ "notice" is the audit log's type of the relay's failure notices: a rule's
    put an ERP's payment notices among them, in the report and in a search."""
    rule = "classify:\n  - id: payment\n    type: notice\n    subject: 'Zahlungsavis'\n"
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n" + rule)
    assert problems(path) == [
        f'{path}:12:11: classify[0].type: "notice" is reserved for the relay\'s failure'
        " notices in the audit log: name the type another way (payment-notice)"
    ]


def test_an_empty_identify_order_is_a_located_problem(tmp_path: Path) -> None:
    """It was reported as ``FILE: invalid policy``, with no line and no reason."""
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\nidentify:\n  order: []\n")
    assert problems(path) == [
        f"{path}:11:10: identify.order: expected at least one of:"
        " auth_login, envelope_sender, header_from, header"
    ]


def test_check_warns_of_a_password_variable_unset_in_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It passed, and every delivery was deferred: environment variable unset."""
    monkeypatch.delenv("RELAY_TEST_PW", raising=False)
    settings = "host: localhost\ntls: starttls\nusername: relay\npassword_env: RELAY_TEST_PW"
    path = _smtp(tmp_path, settings)
    assert warnings(path) == [
        f"{path}:21:19: warning: upstreams.outbox.password_env: RELAY_TEST_PW is not set in"
        " this environment: relay serve run in it would defer every message to this upstream"
        " (environment variable RELAY_TEST_PW unset)"
    ]
    monkeypatch.setenv("RELAY_TEST_PW", "")  # Environment=RELAY_TEST_PW= in a unit
    assert warnings(path) == [
        f"{path}:21:19: warning: upstreams.outbox.password_env: RELAY_TEST_PW is empty in"
        " this environment: relay serve run in it would defer every message to this upstream"
        " (environment variable RELAY_TEST_PW empty)"
    ]
    monkeypatch.setenv("RELAY_TEST_PW", "s3cret")
    assert warnings(path) == []


@pytest.mark.parametrize(
    ("mode", "exposed"),
    [
        (0o644, "readable by every user of this host (mode 0644): the secret it holds is not"
         " safe; chmod o-rwx"),
        (0o604, "readable by every user of this host (mode 0604): the secret it holds is not"
         " safe; chmod o-rwx"),
        (0o620, "writable by users other than its owner (mode 0620): the secret it holds is"
         " not safe; chmod go-w"),
        (0o640, None),
        (0o600, None),
        (0o400, None),
    ],
)  # fmt: skip
def test_check_warns_of_a_dkim_key_or_password_file_others_can_read(
    open_dir: Path, mode: int, exposed: str | None
) -> None:
    """Both passed whatever their mode, where OpenDKIM says "key data is not secure"."""
    settings = "host: localhost\ntls: starttls\nusername: relay\npassword_file: smarthost.password"
    path = _smtp(open_dir, settings)
    key = open_dir / "keys" / "platform.example.s1.private"
    password = open_dir / "smarthost.password"
    password.write_text("s3cret\n")
    key.chmod(mode)
    password.chmod(mode)
    found = warnings(path)
    if exposed is None:
        assert found == []
        return
    assert found == [
        f"{path}:14:17: warning: dkim.keys[0].key_file: {key} is {exposed} {key}",
        f"{path}:21:20: warning: upstreams.outbox.password_file: {password} is {exposed}"
        f" {password}",
    ]


def test_check_says_a_directory_keeps_others_from_a_key_its_mode_lets_them_read(
    open_dir: Path,
) -> None:
    """A key of mode 0644 in a directory of mode 0750 was said to be readable by
    every user of the host, which it was not: only its mode is open."""
    path = _smtp(open_dir, "host: localhost\ntls: starttls")
    keys = open_dir / "keys"
    key = keys / "platform.example.s1.private"
    key.chmod(0o644)
    keys.chmod(0o750)
    assert warnings(path) == [
        f"{path}:14:17: warning: dkim.keys[0].key_file: {key}'s mode lets every user of this"
        f" host read it (mode 0644), though {keys} (mode 0750) keeps them out as long as it"
        f" stays there; chmod o-rwx {key}"
    ]


_ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="root gives a file to another user")


@_ROOT_ONLY
def test_root_checking_a_policy_without_run_as_does_not_judge_a_key_s_owner(
    open_dir: Path,
) -> None:
    """The unit's ``User=`` runs the relay, which root's check cannot know: keys
    of the service user's were said to be another's, and the advice to chown
    them to root locked the relay out of them (its own check, run by the
    unit as that user, judges them)."""
    path = _smtp(open_dir, "host: localhost\ntls: starttls")
    key = open_dir / "keys" / "platform.example.s1.private"
    os.chown(key, NOBODY, NOBODY)
    assert warnings(path) == []


def test_check_judges_a_key_s_owner_by_the_run_as_user(open_dir: Path) -> None:
    """The relay reads its keys as ``run_as``: one of this user's that is neither
    root's nor the service user's is another user's to the relay."""
    path = _smtp(open_dir, "host: localhost\ntls: starttls")
    path.write_text(path.read_text() + "run_as: nobody\n")
    key = open_dir / "keys" / "platform.example.s1.private"
    if os.getuid() == 0:
        assert warnings(path) == []
        os.chown(key, 1, 1)
    owner = pwd.getpwuid(key.stat().st_uid).pw_name
    assert [w for w in warnings(path) if "key_file" in w] == [  # the policy is this user's too
        f"{path}:14:17: warning: dkim.keys[0].key_file: {key} is owned by {owner}, not root or"
        f" nobody (the user the relay runs as), who may read or replace the secret it holds"
        f" whatever its mode; chown nobody {key}"
    ]


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o770], ids=["0777", "0775", "0770"])
def test_check_warns_of_a_dkim_key_in_a_directory_others_can_write(
    open_dir: Path, mode: int
) -> None:
    """A 0600 key in a 0777 directory passed: whoever may write there may put
    their own key in its place, or take this one and leave a copy."""
    path = _smtp(open_dir, "host: localhost\ntls: starttls")
    keys = open_dir / "keys"
    key = keys / "platform.example.s1.private"
    keys.chmod(mode)
    assert warnings(path) == [
        f"{path}:14:17: warning: dkim.keys[0].key_file: {key} is in {keys}, which users other"
        f" than its owner may write (mode {mode:04o}): they may replace it and the secret it"
        f" holds; chmod go-w {keys}"
    ]


def test_check_leaves_a_sticky_directory_alone_while_the_entry_in_it_is_trusted(
    open_dir: Path,
) -> None:
    """Others may not rename nor remove what they do not own in a sticky directory
    (/tmp, 1777): only an entry another user owns there exposes the key."""
    path = _smtp(open_dir, "host: localhost\ntls: starttls")
    keys = open_dir / "keys"
    open_dir.chmod(0o1777)
    assert warnings(path) == []
    if os.getuid() != 0:
        return
    path.write_text(path.read_text() + "run_as: nobody\n")  # root's check judges by it
    os.chown(keys, 1, 1)
    other = pwd.getpwuid(1).pw_name
    assert warnings(path) == [
        f"{path}:14:17: warning: dkim.keys[0].key_file: {keys / 'platform.example.s1.private'}"
        f" is in {keys}, owned by {other} in {open_dir} (mode 1777), who may replace it and"
        f" the secret it holds; chown nobody {keys}"
    ]


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o620], ids=["0666", "0664", "0620"])
def test_check_warns_of_a_policy_others_can_write(open_dir: Path, mode: int) -> None:
    """It passed with ok: whoever may write it may add a login of their own and
    send as any tenant from the next reload."""
    path = variant(open_dir, _LISTENER, _LISTENER)
    path.chmod(mode)
    assert warnings(path) == [
        f"{path}: warning: {path} is writable by users other than its owner (mode"
        f" {mode:04o}): the policy it holds is not safe; chmod go-w {path}"
    ]


def test_check_warns_of_a_policy_every_user_may_read_only_for_its_logins(open_dir: Path) -> None:
    """Reading the policy gives away nothing but its logins' password hashes,
    which may be guessed at offline: without logins, 0644 is the user's choice."""
    path = variant(open_dir, _LISTENER, _LISTENER)
    path.chmod(0o644)
    assert warnings(path) == []
    path.write_text(path.read_text().replace("tenants:\n", _ACME_LOGIN))
    assert warnings(path) == [
        f"{path}: warning: {path} is readable by every user of this host (mode 0644): the"
        f" policy it holds is not safe; chmod o-rwx {path}"
    ]
    open_dir.chmod(0o750)
    assert warnings(path) == []  # they may not reach it


def test_check_warns_of_a_policy_in_a_directory_others_can_write(open_dir: Path) -> None:
    path = variant(open_dir, _LISTENER, _LISTENER)
    open_dir.chmod(0o777)
    key = open_dir / "keys" / "platform.example.s1.private"
    assert warnings(path) == [
        f"{path}: warning: {path} is in {open_dir}, which users other than its owner may"
        f" write (mode 0777): they may replace it and the policy it holds; chmod go-w"
        f" {open_dir}",
        f"{path}:14:17: warning: dkim.keys[0].key_file: {key} is in {open_dir}, which users"
        f" other than its owner may write (mode 0777): they may replace it and the secret it"
        f" holds; chmod go-w {open_dir}",
    ]


def test_check_judges_the_policy_s_owner_by_the_run_as_user(open_dir: Path) -> None:
    """Its owner may change it whatever its mode: one neither root's nor the
    service user's is another user's to the relay."""
    path = variant(open_dir, _LISTENER, _LISTENER)
    path.write_text(path.read_text() + "run_as: nobody\n")
    if os.getuid() == 0:
        assert warnings(path) == []
        os.chown(path, 1, 1)
    owner = pwd.getpwuid(path.stat().st_uid).pw_name
    assert [w for w in warnings(path) if "key_file" not in w] == [
        f"{path}: warning: {path} is owned by {owner}, not root or nobody (the user the relay"
        f" runs as), who may read or replace the policy it holds whatever its mode; chown"
        f" nobody {path}"
    ]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("outbox", "{outbox} is not a directory; the relay writes each message into one"),
        ("outbox/new", "{outbox} is in the way of {outbox}/new: not a directory; the relay"
         " writes each message into one"),
    ],
)  # fmt: skip
def test_a_directory_upstream_whose_path_is_a_file_is_a_problem(
    tmp_path: Path, path: str, problem: str
) -> None:
    """It passed, and every delivery was then deferred with File exists."""
    policy = variant(tmp_path, "    path: outbox\n", f"    path: {path}\n")
    outbox = tmp_path / "outbox"
    outbox.write_text("a file\n")
    assert problems(policy) == [
        f"{policy}:18:11: upstreams.outbox.path: " + problem.format(outbox=outbox)
    ]
    outbox.unlink()
    outbox.mkdir()
    assert load(policy).upstreams["outbox"].path == tmp_path / path


@pytest.mark.parametrize(
    ("old", "new", "where", "written", "named"),
    [
        ("key_file: keys/", "key_file: ~/keys/", "14:17: dkim.keys[0].key_file", "~",
         "~/keys/platform.example.s1.private"),
        ("key_file: keys/", "key_file: ~relay/keys/", "14:17: dkim.keys[0].key_file", "~relay",
         "~relay/keys/platform.example.s1.private"),
        ("    path: outbox\n", "    path: $HOME/outbox\n", "18:11: upstreams.outbox.path",
         "$HOME", "$HOME/outbox"),
        ("    path: outbox\n", "    path: /srv/${SPOOL}/outbox\n", "18:11: upstreams.outbox.path",
         "${SPOOL}", "/srv/${SPOOL}/outbox"),
        ("    path: outbox\n", "    path: outbox\nstate_directory: ~/relay-state\n",
         "19:18: state_directory", "~", "~/relay-state"),
    ],
)  # fmt: skip
def test_a_path_a_shell_would_expand_is_a_problem(
    tmp_path: Path, old: str, new: str, where: str, written: str, named: str
) -> None:
    """``~/dkim/x`` was read as a directory named ``~`` beside the policy, and the
    problem, if any, named the path as written, not where it looked."""
    path = variant(tmp_path, old, new)
    resolved = Path(named) if named.startswith("/") else tmp_path / named
    assert problems(path) == [
        f"{path}:{where}: {written} is not expanded (no shell reads the policy), so this"
        f" names {resolved}; write the path in full"
    ]


def test_a_dollar_sign_that_names_no_variable_is_part_of_the_path(tmp_path: Path) -> None:
    path = variant(tmp_path, "    path: outbox\n", "    path: out$1box\n")
    assert load(path).upstreams["outbox"].path == tmp_path / "out$1box"


@pytest.mark.parametrize(
    ("cidr", "problem"),
    [
        ("10.1.2.3/8", "10.1.2.3/8 has host bits set: it would mean 10.0.0.0/8; write"
         " 10.0.0.0/8, or 10.1.2.3/32 for that one address"),
        ("'2001:db8::1/32'", "2001:db8::1/32 has host bits set: it would mean 2001:db8::/32;"
         " write 2001:db8::/32, or 2001:db8::1/128 for that one address"),
    ],
)  # fmt: skip
def test_a_cidr_with_host_bits_set_is_a_problem_naming_what_it_would_mean(
    tmp_path: Path, cidr: str, problem: str
) -> None:
    """``allow: [10.1.2.3/8]`` was silently taken as 10.0.0.0/8."""
    path = variant(tmp_path, "    port: 2525\n", f"    port: 2525\n    allow: [{cidr}]\n")
    assert problems(path) == [f"{path}:10:13: listeners[0].allow[0]: {problem}"]


@pytest.mark.parametrize(
    ("cidr", "problem"),
    [
        ("'fd00::/129'", "'fd00::/129': the prefix length of an IPv6 network is 0 to 128"),
        ("10.0.0.0/33", "'10.0.0.0/33': the prefix length of an IPv4 network is 0 to 32"),
        ("'[fd00::]/64'", "'[fd00::]/64': write it without brackets, fd00::/64"),
        ("'[::1]'", "'[::1]': write it without brackets, ::1"),
        ("10.1.2.300/16", "'10.1.2.300/16' does not appear to be an IPv4 or IPv6 network"),
        ("'127.0.0.1/32 10.0.0.0/8'", "'127.0.0.1/32 10.0.0.0/8': one network per list item,"
         " in CIDR form like 10.0.0.0/8: write each as its own item"),
        ("'10.0.0.0/8, 192.0.2.0/24,::1'", "'10.0.0.0/8, 192.0.2.0/24,::1': one network per"
         " list item, in CIDR form like 10.0.0.0/8: write each as its own item"),
        ("'10.0.0.0 255.0.0.0'", "'10.0.0.0 255.0.0.0': an address and its netmask: write it"
         " in CIDR form, 10.0.0.0/8"),
        # the network, not the host with its prefix, which is refused for host bits
        ("'192.168.1.10 255.255.255.0'", "'192.168.1.10 255.255.255.0': an address and its"
         " netmask: write it in CIDR form, 192.168.1.0/24"),
        # no hint that opens the listener to everyone
        ("'127.0.0.1 0.0.0.0'", "'127.0.0.1 0.0.0.0': one network per list item, in CIDR form"
         " like 10.0.0.0/8: write each as its own item"),
        ("'10.0.0.0/ 8'", "'10.0.0.0/ 8': one network per list item, in CIDR form like"
         " 10.0.0.0/8"),
        ("'10.0.0.0/8 # office'", "'10.0.0.0/8 # office': one network per list item, in CIDR"
         " form like 10.0.0.0/8"),
    ],
    ids=["ipv6-prefix", "ipv4-prefix", "brackets", "bracketed-address", "no-address",
         "mynetworks-line", "comma-separated", "netmask", "netmask-host", "netmask-zero",
         "space-in-prefix", "comment"],
)  # fmt: skip
def test_an_invalid_cidr_says_what_to_write(tmp_path: Path, cidr: str, problem: str) -> None:
    """Each was said only not to be an IPv4 or IPv6 network, which it plainly is."""
    path = variant(tmp_path, "    port: 2525\n", f"    port: 2525\n    allow: [{cidr}]\n")
    assert problems(path) == [f"{path}:10:13: listeners[0].allow[0]: invalid CIDR: {problem}"]


@pytest.mark.parametrize(
    ("allow", "problem"),
    [
        ('"10.0.0.0/8, 127.0.0.1"', ": write [10.0.0.0/8, 127.0.0.1]"),
        ("10.0.0.0/8", ": write [10.0.0.0/8]"),
        ('"10.0.0.0 255.0.0.0"', ": write [10.0.0.0/8]"),
        ('"10.0.0.0/8 # office"', ""),
    ],
    ids=["networks", "one-network", "netmask", "comment"],
)
def test_an_allow_string_says_to_write_a_list_of_one_network_per_item(
    tmp_path: Path, allow: str, problem: str
) -> None:
    """``allow: "10.0.0.0/8, 127.0.0.1"`` was said only to be no list of CIDRs."""
    path = variant(tmp_path, "    port: 2525\n", f"    port: 2525\n    allow: {allow}\n")
    assert problems(path) == [
        f"{path}:10:12: listeners[0].allow: expected a list of CIDRs, one network per list"
        f" item, in CIDR form like 10.0.0.0/8{problem}"
    ]


def test_a_cidr_without_host_bits_or_a_bare_address_loads(tmp_path: Path) -> None:
    allow = "[10.0.0.0/8, 192.0.2.7, '::1/128', '::ffff:10.0.0.0/104']"
    path = variant(tmp_path, "    port: 2525\n", f"    port: 2525\n    allow: {allow}\n")
    assert [str(n) for n in load(path).listeners[0].allow] == [
        "10.0.0.0/8", "192.0.2.7/32", "::1/128", "10.0.0.0/8",
    ]  # fmt: skip


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "platform.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def _pem(key: rsa.RSAPrivateKey, form: serialization.PrivateFormat) -> bytes:
    encryption = serialization.BestAvailableEncryption(b"secret")
    return key.private_bytes(serialization.Encoding.PEM, form, encryption)


_PASSPHRASE = (
    "encrypted with a passphrase, which the relay cannot use; write the key without one"
    " (openssl pkey -in {file} -out NEW_FILE) in a file only the relay's user can read"
)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda k: _pem(k, serialization.PrivateFormat.TraditionalOpenSSL), _PASSPHRASE),
        (lambda k: _pem(k, serialization.PrivateFormat.PKCS8), _PASSPHRASE),
        (_certificate, "holds a certificate, not a private key: name the key file of the"
         " DKIM key"),
        (lambda k: k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
         "holds a public key, not the private key: name the key file of the DKIM key"),
    ],
    ids=["pkcs1-passphrase", "pkcs8-passphrase", "certificate", "public-key"],
)  # fmt: skip
def test_a_dkim_key_file_that_holds_something_else_says_what(
    tmp_path: Path, content: Callable[[rsa.RSAPrivateKey], bytes], problem: str
) -> None:
    """Each was "not an RSA private key in PEM form (Unparsable private key (are your
    sure it is encoded in PKCS#1 ...", where check says what an Ed25519 PEM is."""
    _key_file_refused(tmp_path, content(_rsa_key()), problem)


def _plain(key: rsa.RSAPrivateKey, form: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


@pytest.mark.parametrize(
    "form", [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8]
)
def test_a_dkim_key_saved_after_its_certificate_signs_as_the_key_alone(
    tmp_path: Path, form: serialization.PrivateFormat
) -> None:
    """The signer's parser read the certificate as the key: check refused the
    file with its words, "are your sure it is encoded in PKCS#1 or PKCS#8"."""
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    file = tmp_path / "keys" / "platform.example.s1.private"
    key = _rsa_key()
    file.write_bytes(_certificate(key) + _plain(key, form))
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0, err.getvalue()
    message = b"From: <jan@platform.example>\r\nSubject: hi\r\n\r\nhi\r\n"
    signed = sign(message, load(path).dkim_keys, now=int(time.time())) + message
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    assert dkimpy_each(signed, {"s1._domainkey.platform.example": record}) == [True]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda k: b"".join(b"    " + line for line in _plain(
            k, serialization.PrivateFormat.TraditionalOpenSSL).splitlines(keepends=True)),
         "its PEM lines are indented (white space before -----BEGIN), which the signer does"
         " not read: write the key plain, each line at its start, as openssl and relay dkim"
         " keygen write it"),
        (lambda k: _certificate(k) + _plain(k, serialization.PrivateFormat.PKCS8)
         + _plain(_rsa_key(), serialization.PrivateFormat.PKCS8),
         "holds 2 private keys, and the signer reads the first only: put the DKIM key alone"
         " in the file"),
        (lambda k: _plain(k, serialization.PrivateFormat.TraditionalOpenSSL)
         + _plain(_rsa_key(), serialization.PrivateFormat.TraditionalOpenSSL),
         "holds 2 private keys, and the signer reads the first only: put the DKIM key alone"
         " in the file"),
        (lambda k: _plain(k, serialization.PrivateFormat.PKCS8)
         + _plain(_rsa_key(), serialization.PrivateFormat.PKCS8),
         "holds 2 private keys, and the signer reads the first only: put the DKIM key alone"
         " in the file"),
        (lambda k: _certificate(k).replace(b"CERTIFICATE", b"X509 CRL")
         + _plain(k, serialization.PrivateFormat.PKCS8),
         "holds a X509 CRL block before the private key, which the signer reads as the key:"
         " put the key alone in the file"),
        (lambda k: _certificate(k) + _pem(k, serialization.PrivateFormat.PKCS8), _PASSPHRASE),
    ],
    ids=[
        "indented",
        "two-keys",
        "two-keys-pkcs1",
        "two-keys-pkcs8",
        "other-block-first",
        "certificate-then-passphrase",
    ],
)  # fmt: skip
def test_a_dkim_key_file_laid_out_as_the_signer_cannot_read_says_how(
    tmp_path: Path, content: Callable[[rsa.RSAPrivateKey], bytes], problem: str
) -> None:
    """Each was refused in the parser's words, "Private key not found" or "are
    your sure it is encoded in PKCS#1", for a key that was sound; two keys
    alone (a rotation's ``cat new.pem old.pem``) passed, and signed with the
    first, whichever DNS publishes."""
    _key_file_refused(tmp_path, content(_rsa_key()), problem)


def _key_file_refused(tmp_path: Path, key_file: bytes, problem: str) -> None:
    """``relay check`` of the example policy with ``key_file`` as its key says ``problem``."""
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    file = tmp_path / "keys" / "platform.example.s1.private"
    file.write_bytes(key_file)
    assert problems(path) == [
        f"{path}:14:17: dkim.keys[0].key_file: cannot sign with {file}: "
        + problem.format(file=file)
    ]


def _ed25519_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ed25519_seed() -> bytes:
    seed = ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    return base64.b64encode(seed) + b"\n"


def test_an_ed25519_key_with_its_public_half_written_beside_it_is_one_key(
    tmp_path: Path,
) -> None:
    """A note of its DNS record, or of the public key, beside the key was taken
    for a second seed."""
    private = ed25519.Ed25519PrivateKey.generate()
    public = base64.b64encode(private.public_key().public_bytes_raw())
    ed = "      selector: s1\n      algorithm: ed25519\n"
    path = variant(tmp_path, "      selector: s1\n", ed)
    file = tmp_path / "keys" / "platform.example.s1.private"
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    notes = b'# DNS: "v=DKIM1; k=ed25519; p=' + public + b'"\npublic key: ' + public + b"\n"
    file.write_bytes(notes + pem)
    message = b"From: <jan@platform.example>\r\nSubject: hi\r\n\r\nhi\r\n"
    signed = sign(message, load(path).dkim_keys, now=int(time.time())) + message
    record = f"v=DKIM1; k=ed25519; p={public.decode()}"
    assert dkimpy_each(signed, {"s1._domainkey.platform.example": record}) == [True]


@pytest.mark.parametrize(
    "content",
    [
        lambda: _ed25519_pem() + _ed25519_pem(),
        lambda: _ed25519_seed() + _ed25519_seed(),
        lambda: _ed25519_seed() + _ed25519_pem(),
        lambda: b"  " + _ed25519_seed() + b"  " + _ed25519_seed(),
        lambda: _ed25519_seed().strip() + b" " + _ed25519_seed(),
    ],
    ids=["two-pem", "two-seeds", "seed-then-pem", "two-seeds-indented", "two-seeds-one-line"],
)
def test_an_ed25519_key_file_of_two_keys_is_refused(
    tmp_path: Path, content: Callable[[], bytes]
) -> None:
    """Read as the first key's seed, the file passed, and signed with that one
    whichever DNS publishes (a rotation's ``cat new.pem old.pem``)."""
    ed = "      selector: s1\n      algorithm: ed25519\n"
    path = variant(tmp_path, "      selector: s1\n", ed)
    file = tmp_path / "keys" / "platform.example.s1.private"
    file.write_bytes(content())
    assert problems(path) == [
        f"{path}:15:17: dkim.keys[0].key_file: cannot sign with {file}: holds 2 private keys,"
        " and the signer reads the first only: put the DKIM key alone in the file"
    ]


_IMPLICIT_PORT = (
    "465 is the port of implicit TLS, whose server greets only after a TLS handshake,"
    " which tls: {tls} never begins: every delivery would time out; set tls: implicit"
)
_PLAIN_PORT = (
    "{port} is a port whose server greets in plain text (and offers STARTTLS), while"
    " tls: implicit waits for a TLS handshake: every delivery would time out;"
    " set tls: starttls, or port: 465"
)


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ("port: 465", _IMPLICIT_PORT.format(tls="auto")),
        ("port: 465\ntls: starttls", _IMPLICIT_PORT.format(tls="starttls")),
        ("port: 465\ntls: none", _IMPLICIT_PORT.format(tls="none")),
        ("port: 587\ntls: implicit", _PLAIN_PORT.format(port=587)),
        ("port: 25\ntls: implicit", _PLAIN_PORT.format(port=25)),
        ("port: 465\ntls: implicit", None),
        ("tls: implicit", None),
        ("port: 587\ntls: starttls", None),
        ("port: 2526\ntls: implicit", None),
    ],
)
def test_check_warns_of_tls_the_port_does_not_speak(
    tmp_path: Path, settings: str, warned: str | None
) -> None:
    """Port 465 with tls: auto passed; the relay waited for a greeting the server
    sends only after a handshake, and deferred every message for days."""
    path = _smtp(tmp_path, f"host: localhost\n{settings}")
    found = warnings(path)
    assert found == (
        [] if warned is None else [f"{path}:19:11: warning: upstreams.outbox.port: {warned}"]
    )


_LOOP = (
    "{upstream} is this relay's own listener listeners[0] ({listener}): mail sent to this"
    " upstream comes back into the relay, which sends it here again, a loop; set host and"
    " port to the server that mail is to leave by"
)


@pytest.mark.parametrize(
    ("listen", "host", "warned"),
    [
        ("127.0.0.1", "127.0.0.1", ("127.0.0.1:2525", "127.0.0.1:2525")),
        ("127.0.0.1", "LocalHost", ("LocalHost:2525", "127.0.0.1:2525")),
        ("0.0.0.0", "127.0.0.1", ("127.0.0.1:2525", "0.0.0.0:2525")),
        ("0.0.0.0", "0.0.0.0", ("0.0.0.0:2525", "0.0.0.0:2525")),
        ("'::'", "localhost", ("localhost:2525", "[::]:2525")),
        ("'::'", "'::1'", ("[::1]:2525", "[::]:2525")),
        ("127.0.0.1", "'::ffff:127.0.0.1'", ("[::ffff:127.0.0.1]:2525", "127.0.0.1:2525")),
        ("0.0.0.0", "'::ffff:127.0.0.1'", ("[::ffff:127.0.0.1]:2525", "0.0.0.0:2525")),
        ("localhost", "127.0.0.1", ("127.0.0.1:2525", "localhost:2525")),
        ("'::'", "127.0.0.1", None),
        ("'::'", "'::ffff:127.0.0.1'", None),
        ("127.0.0.1", "127.0.0.2", None),
        ("127.0.0.1", "smtp.example", None),
    ],
)
def test_check_warns_of_an_upstream_that_is_a_listener_of_the_relay(
    tmp_path: Path, listen: str, host: str, warned: tuple[str, str] | None
) -> None:
    """Such a policy passed with ok, and each message went round from the
    upstream to the listener and back, a new copy at each turn."""
    path = _smtp(tmp_path, f"host: {host}\nport: 2525")
    listener = f"    address: {listen}\n    port: 2525\n    auth: off\n"
    path.write_text(path.read_text().replace(_LISTENER, listener))
    found = [line for line in warnings(path) if "upstreams.outbox.port:" in line]
    if warned is None:
        assert found == []
    else:
        said = _LOOP.format(upstream=warned[0], listener=warned[1])
        assert found == [f"{path}:20:11: warning: upstreams.outbox.port: {said}"]


def _own_address(family: socket.AddressFamily, somewhere: str) -> str:
    """This host's address of ``family`` off loopback, the one it would send
    from; a datagram socket's connect sends nothing."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((somewhere, 9))
        except OSError as exc:
            pytest.skip(f"no route to {somewhere}: {exc.strerror}")
        address = probe.getsockname()[0]
    if ip_address(address).is_loopback:
        pytest.skip("this host's only address is on loopback")
    return address


@pytest.mark.parametrize(
    ("family", "somewhere", "listen", "warned"),
    [
        (socket.AF_INET, "198.51.100.1", "0.0.0.0", True),
        (socket.AF_INET6, "2001:db8::1", "'::'", True),
        (socket.AF_INET, "198.51.100.1", "'::'", False),
        (socket.AF_INET6, "2001:db8::1", "0.0.0.0", False),
    ],
    ids=["ipv4", "ipv6", "ipv4-to-ipv6-only", "ipv6-to-ipv4"],
)
def test_check_warns_of_an_upstream_on_another_address_a_wildcard_listener_takes(
    tmp_path: Path, family: socket.AddressFamily, somewhere: str, listen: str, warned: bool
) -> None:
    """0.0.0.0 takes the port on the host's eth0 address too: an upstream there
    passed check, as only loopback was counted, and the mail went round."""
    address = _own_address(family, somewhere)
    path = _smtp(tmp_path, f"host: '{address}'\nport: 2525")
    listener = f"    address: {listen}\n    port: 2525\n    auth: off\n"
    path.write_text(path.read_text().replace(_LISTENER, listener))
    found = [line for line in warnings(path) if "upstreams.outbox.port:" in line]
    said = _LOOP.format(
        upstream=host_port(address, 2525), listener=host_port(listen.strip("'"), 2525)
    )
    expected = [f"{path}:20:11: warning: upstreams.outbox.port: {said}"]
    assert found == (expected if warned else [])


def test_an_address_is_this_host_s_only_if_it_is_one_of_its_own() -> None:
    assert selfloop.is_this_host(ip_address("127.0.0.1"))
    assert not selfloop.is_this_host(ip_address("203.0.113.254"))
    assert not selfloop.is_this_host(ip_address("224.0.0.1"))


_BOUNCE = (
    "{address} is where bounces go (the platform's return_path; left out, its from_address):"
    " this user's automatic BCC copies and failure notices would go there too, where relay"
    " bounce ignores them as no bounce, and they are lost; give the user an address of"
    " their own"
)


@pytest.mark.parametrize(
    ("return_path", "address", "warned"),
    [
        ("", "noreply@platform.example", True),
        ("bounces@platform.example", "Bounces@Platform.example", True),
        ("bounces@platform.example", "noreply@platform.example", False),
    ],
)
def test_check_warns_of_a_user_whose_address_is_the_bounce_address(
    tmp_path: Path, return_path: str, address: str, warned: bool
) -> None:
    """Such a user passed, and the copies and notices meant for the user went to
    the mailbox ``relay bounce`` reads, which ignored them."""
    path = variant(tmp_path, "address: jan@acme.example", f"address: {address}")
    if return_path:
        text = path.read_text().replace("listeners:", f"  return_path: {return_path}\nlisteners:")
        path.write_text(text)
    line = line_of(path, f"address: {address}")
    said = f"{path}:{line}:18: warning: tenants.acme.users.jan.address: "
    assert warnings(path) == ([said + _BOUNCE.format(address=address)] if warned else [])


_NO_IMPLICIT_TLS = (
    "465 is the port of implicit TLS, and clients set for it begin with a TLS handshake,"
    " but this listener greets in plain text (its tls has no mode: implicit):"
    " every such client fails to connect; set tls: {cert: ..., key: ..., mode: implicit},"
    " or listen on 587 (or 25) and set the ERPs to STARTTLS"
)
_IMPLICIT = "tls: {cert: tls/relay.crt, key: tls/relay.key, mode: implicit}"


@pytest.mark.parametrize(
    ("listener", "warned"),
    [
        (f"    port: 465\n    {_TLS}\n", True),
        ("    port: 465\n", True),
        (f"    port: 587\n    {_TLS}\n", False),
        (f"    port: 465\n    {_IMPLICIT}\n", False),
    ],
    ids=["465-tls", "465-plain", "587-tls", "465-implicit"],
)
def test_check_warns_of_a_listener_on_the_port_of_implicit_tls(
    tmp_path: Path, listener: str, warned: bool
) -> None:
    """A listener on 465 with tls passed; every ERP set the usual way for 465
    (SSL/TLS) then opened with a handshake the plain greeting answered, and
    failed at once: curl with wrong version number, PHPMailer could not connect."""
    path = variant(tmp_path, "    port: 2525\n", listener)
    said = f"{path}:9:11: warning: listeners[0].port: {_NO_IMPLICIT_TLS}"
    assert warnings(path) == ([said] if warned else [])


@pytest.mark.parametrize("port", [25, 587])
def test_check_warns_of_implicit_tls_on_a_port_of_plain_text(tmp_path: Path, port: int) -> None:
    """Clients set for 25 or 587 wait for a greeting the listener sends only after
    a handshake they never begin."""
    path = variant(tmp_path, "    port: 2525\n", f"    port: {port}\n    {_IMPLICIT}\n")
    assert warnings(path) == [
        f"{path}:10:58: warning: listeners[0].tls.mode: {port} is a port whose clients wait"
        " for a greeting in plain text (and then send STARTTLS), while mode: implicit waits"
        " for a TLS handshake: every such client times out; set mode: starttls, or port: 465"
    ]


@pytest.mark.parametrize(
    ("tls", "said"),
    [
        ("{mode: implicit}", [
            "10:10: listeners[0].tls.cert: required key is missing",
            "10:10: listeners[0].tls.key: required key is missing",
        ]),
        ("{cert: tls/relay.crt, key: tls/relay.key, mode: smtps}", [
            "10:58: listeners[0].tls.mode: expected one of: starttls, implicit",
        ]),
    ],
    ids=["no-cert", "unknown-mode"],
)  # fmt: skip
def test_check_refuses_a_tls_mode_it_cannot_serve(
    tmp_path: Path, tls: str, said: list[str]
) -> None:
    path = variant(tmp_path, "    port: 2525\n", f"    port: 2525\n    tls: {tls}\n")
    assert problems(path) == [f"{path}:{line}" for line in said]


@pytest.mark.parametrize(
    ("queue", "warned"),
    [
        ("{first_retry: 600, lifetime: 300}", "19:37: warning: queue.lifetime: 300 seconds"
         " is less than first_retry (600)"),
        ("{first_retry: 500000, max_retry: 500000}", "19:22: warning: queue.lifetime: 432000"
         " seconds is less than first_retry (500000)"),
        ("{first_retry: 60, lifetime: 1}", "19:36: warning: queue.lifetime: 1 second"
         " is less than first_retry (60)"),
        ("{first_retry: 60, lifetime: 59.9999999}", "19:36: warning: queue.lifetime:"
         " 59.9999999 seconds is less than first_retry (60)"),
        ("{first_retry: 300, lifetime: 300}", None),
        ("{lifetime: 3600}", None),
    ],
)  # fmt: skip
def test_check_warns_of_a_lifetime_that_ends_before_the_first_retry(
    tmp_path: Path, queue: str, warned: str | None
) -> None:
    """Such a message was tried once, and expired unretried, without a word."""
    path = variant(tmp_path, "    path: outbox\n", f"    path: outbox\nqueue: {queue}\n")
    found = warnings(path)
    suffix = ": a message deferred at its first attempt expires before it is tried again"
    assert found == ([] if warned is None else [f"{path}:{warned}{suffix}"])


@pytest.mark.parametrize(
    ("header", "controls", "warned"),
    [
        ("X-Partner", "", True),
        ("X-Document-Type", "control_headers: [X-ERP-User]\n", True),
        ("x-document-type", "", False),
        ("X-Partner", "control_headers: [x-partner]\n", False),
        ("X-ERP-User", "control_headers: []\n", False),
        ("Subject", "", False),
        ("Content-Language", "", False),
    ],
)
def test_check_warns_of_a_header_a_rule_reads_that_goes_on_to_the_recipients(
    tmp_path: Path, header: str, controls: str, warned: bool
) -> None:
    """The ERP's internal header a rule classified by (X-Partner) reached the
    customers: it was not in control_headers, which alone are removed."""
    rule = f"classify:\n  - id: r\n    type: invoice\n    header: {{name: {header}, pattern: x}}\n"
    path = variant(tmp_path, "    path: outbox\n", f"    path: outbox\n{rule}{controls}")
    expected = (
        f"{path}:22:20: warning: classify[0].header.name: {header} is not a control header,"
        " so it is sent on to the recipients; add it to control_headers if it is meant for"
        " the relay only"
    )
    assert warnings(path) == ([expected] if warned else [])


@pytest.mark.parametrize(
    ("source", "controls", "warned"),
    [
        ("header:X-Partner", "", True),
        ("header:X-Partner", "control_headers: [x-partner]\n", False),
        ("header:X-Responsible", "", False),  # one of control_headers left out
        ("header:X-Responsible", "control_headers: [X-Document-Type]\n", True),
        ("header:Reply-To", "", False),
    ],
)
def test_check_warns_of_a_header_a_reply_to_chain_reads_that_goes_on_to_the_recipients(
    tmp_path: Path, source: str, controls: str, warned: bool
) -> None:
    """The responsible employee's address the ERP names for the Reply-To is its
    own header; left out of control_headers, it reached the customers too."""
    chain = f"    reply_to:\n      default: ['{source}', company]\n"
    old = "    upstream: outbox\n    users:\n"
    path = variant(tmp_path, old, f"    upstream: outbox\n{chain}    users:\n")
    path.write_text(path.read_text() + controls)
    name = source.removeprefix("header:")
    expected = (
        f"{path}:25:17: warning: tenants.acme.reply_to.default[0]: {name} is not a control"
        " header, so it is sent on to the recipients; add it to control_headers if it is"
        " meant for the relay only"
    )
    assert warnings(path) == ([expected] if warned else [])


@pytest.mark.parametrize(("per_client", "warned"), [(50, True), (49, False)])
def test_check_warns_of_a_client_limit_that_is_the_whole_listener(
    tmp_path: Path, per_client: int, warned: bool
) -> None:
    limits = f"    max_connections_per_client: {per_client}\n    max_connections: 50\n"
    path = variant(tmp_path, "    port: 2525\n", "    port: 2525\n" + limits)
    line = line_of(path, "max_connections_per_client")
    said = (
        f"{path}:{line}:33: warning: listeners[0].max_connections_per_client: {per_client}"
        " is not below max_connections 50: one client could take every place on the listener"
    )
    assert warnings(path) == ([said] if warned else [])


_LONG_LABEL = "a" * 64 + ".example"
_SMART = "    path: outbox\n  smart:\n    type: smtp\n"


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("    path: outbox\n", f"{_SMART}    host: {_LONG_LABEL}\n",
         f"21:11: upstreams.smart.host: expected a host name or IP address, not '{_LONG_LABEL}'"),
        ("    address: 127.0.0.1\n", f"    address: {_LONG_LABEL}\n",
         f"8:14: listeners[0].address: '{_LONG_LABEL}' is not an IP address like 127.0.0.1"
         " or ::1, or a host name"),
        ("    path: outbox\n", "    path: outbox\naudit: {retention_days: 1000000}\n",
         "19:25: audit.retention_days: 1000000 is out of range: expected a number of days"
         " (1..36500)"),
        ("    path: outbox\n", "    path: outbox\nqueue: {max_retry: 10000000000000}\n",
         "19:20: queue.max_retry: expected a positive number of seconds, at most 315360000"
         " (10 years)"),
        ("    path: outbox\n",
         "    path: outbox\nclassify:\n  - {id: r, type: t, subject: 'a{99999999999}'}\n",
         "20:31: classify[0].subject: invalid regular expression: a repeat count is too large"),
    ],
    ids=["upstream-label", "listener-label", "retention", "retry", "regex-count"],
)  # fmt: skip
def test_values_that_passed_check_and_failed_the_relay_are_problems(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    """Each passed relay check, and then: every delivery bounced as if the
    recipient's address were wrong (5.1.3), serve ended in a traceback, the
    audit upkeep or a delivery attempt raised, or check itself did."""
    path = variant(tmp_path, old, new)
    assert problems(path) == [f"{path}:{problem}"]


def test_check_warns_of_a_listener_key_or_audit_key_others_can_read(open_dir: Path) -> None:
    """As secret as a DKIM key, and passed whatever their mode: who reads the
    HMAC key can forge an audit chain that verifies."""
    path = variant(
        open_dir,
        "    port: 2525\n",
        "    port: 2525\n    tls: {cert: tls/relay.crt, key: tls/relay.key}\n",
    )
    hmac_key = open_dir / "audit.key"
    hmac_key.write_bytes(b"k" * 32)
    path.write_text(path.read_text() + "audit: {hmac_key_file: audit.key}\n")
    key = open_dir / "tls" / "relay.key"
    for secret in (key, hmac_key):
        secret.chmod(0o644)
    exposed = "is readable by every user of this host (mode 0644): the secret it holds is not safe"
    assert warnings(path) == [
        f"{path}:10:37: warning: listeners[0].tls.key: {key} {exposed}; chmod o-rwx {key}",
        f"{path}:29:24: warning: audit.hmac_key_file: {hmac_key} {exposed}; chmod o-rwx {hmac_key}",
    ]


@pytest.mark.parametrize(
    ("listener", "said"),
    [
        ("    address: 0.0.0.0\n    port: 2525\n    auth: off\n",
         "7:5: warning: listeners[0].allow: no allow list: only loopback clients"
         " (127.0.0.0/8, ::1) may connect to 0.0.0.0; list the ERPs' networks,"
         " e.g. allow: [192.0.2.0/24]"),
        ("    address: '::1'\n    port: 2525\n    allow: [127.0.0.0/8]\n",
         "10:12: listeners[0].allow: no entry is an IPv6 network, and every client of ::1"
         " is: all refused"),
        ("    address: 127.0.0.1\n    port: 2525\n    allow: ['fe80::1%eth0/128']\n",
         "10:13: listeners[0].allow[0]: %eth0 names an interface, not clients: write"
         " fe80::1/128"),
        ("    address: 127.0.0.1\n    port: 2525\n    allow: ['fe80::%eth0/64']\n",
         "10:13: listeners[0].allow[0]: %eth0 names an interface, not clients: write"
         " fe80::/64"),
    ],
    ids=["no-allow-off-loopback", "other-family", "zone", "zone-of-a-network"],
)  # fmt: skip
def test_an_allow_list_that_lets_in_other_clients_than_meant_is_said(
    tmp_path: Path, listener: str, said: str
) -> None:
    """Each passed check: the default is loopback only, which the README did not
    say, and a listener off loopback refused every ERP; a list of the other
    address family refused every client; a zone matched the address on any
    interface, and went into Received as no address literal may."""
    path = variant(tmp_path, _LISTENER, listener)
    if "warning" in said:
        assert f"{path}:{said}" in warnings(path)
    else:
        assert problems(path) == [f"{path}:{said}"]


_NEVER = (
    "{entry} names IPv{other} clients, and {address} takes IPv{family} clients only:"
    " it never matches; IPv{other} clients need a listener of their own, on {needs}"
)


@pytest.mark.parametrize(
    ("listen", "allow", "warned"),
    [
        ("'::'", "[127.0.0.0/8, '::1/128']", [(0, "127.0.0.0/8")]),
        ("'::1'", "['::ffff:127.0.0.0/104', '::1/128']", [(0, "::ffff:127.0.0.0/104")]),
        ("0.0.0.0", "[10.0.0.0/8, 'fd00::/64', '::1/128']", [(1, "fd00::/64"), (2, "::1/128")]),
        ("'::'", "['fd00::/64', '::1/128']", []),
        ("0.0.0.0", "[10.0.0.0/8, '::ffff:192.0.2.0/120']", []),
        ("localhost", "[127.0.0.0/8, '::1/128']", []),
    ],
    ids=["ipv4-on-ipv6", "mapped-on-ipv6", "ipv6-on-ipv4", "ipv6", "ipv4", "host-name"],
)  # fmt: skip
def test_check_warns_of_an_allow_entry_the_listener_s_clients_never_match(
    tmp_path: Path, listen: str, allow: str, warned: list[tuple[int, str]]
) -> None:
    """A listener on :: takes no IPv4 client, and its 127.0.0.0/8 passed as if
    it were dual stack, as Linux's default is: the IPv4 ERPs were refused."""
    listener = f"    address: {listen}\n    port: 2525\n    allow: {allow}\n"
    path = variant(tmp_path, _LISTENER, listener)
    found = [line for line in warnings(path) if "never matches" in line]
    family = 4 if "." in listen else 6
    other = 6 if family == 4 else 4
    address = listen.strip("'")
    needs = "0.0.0.0 or an IPv4 address" if other == 4 else ":: or an IPv6 address"
    said = [
        f"warning: listeners[0].allow[{i}]: "
        + _NEVER.format(entry=entry, other=other, address=address, family=family, needs=needs)
        for i, entry in warned
    ]
    assert [line.partition(": ")[2] for line in found] == said


def test_a_0000_and_a_colon_colon_listener_on_one_port_may_share_their_list(
    tmp_path: Path,
) -> None:
    """The pair the README suggests for both families, with one list for both:
    each entry of the other family was said to need a listener of its own,
    which the next one is."""
    listener = (
        "    address: 0.0.0.0\n    port: 2525\n    allow: &erps [10.0.0.0/8, 'fd00::/8']\n"
        "  - name: local6\n    address: '::'\n    port: 2525\n    allow: *erps\n"
    )
    path = variant(tmp_path, _LISTENER, listener)
    assert [line for line in warnings(path) if "never matches" in line] == []
    alone = path.read_text().replace(
        "    port: 2525\n    allow: *erps", "    port: 2526\n    allow: *erps"
    )
    path.write_text(alone)
    assert len([line for line in warnings(path) if "never matches" in line]) == 2


@pytest.mark.parametrize(
    "other",
    [
        "    address: 127.0.0.1\n    port: 2525\n",
        "    address: 0.0.0.0\n    port: 2525\n    allow: [10.0.0.0/8]\n",
    ],
    ids=["loopback-only", "another-network"],
)
def test_a_listener_of_the_other_family_that_does_not_allow_the_entry_pairs_nothing(
    tmp_path: Path, other: str
) -> None:
    """Any IPv4 listener on the port dropped the warning, though its own list
    (or loopback, without one) never took the entry's clients."""
    listener = (
        "    address: '::'\n    port: 2525\n    allow: ['fd00::/64', 192.0.2.0/24]\n"
        f"  - name: local4\n{other}"
    )
    path = variant(tmp_path, _LISTENER, listener)
    found = [line for line in warnings(path) if "never matches" in line]
    assert len(found) == 1 and "192.0.2.0/24 names IPv4 clients" in found[0], found


def _link_local() -> str:
    """This host's first link-local IPv6 address, with its interface."""
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as table:
        for line in table:
            hexed, _, _, scope, _, name = line.split()
            if scope == "20":
                return f"{ip_address(int(hexed, 16))}%{name}"
    pytest.skip("no link-local IPv6 address here")


def test_a_link_local_address_of_this_host_with_its_interface_is_this_hosts() -> None:
    """The kernel names the source without the interface, and the comparison
    with the address written with one said no."""
    assert selfloop.is_this_host(ip_address(_link_local()))


def test_an_address_is_this_host_s_only_if_the_kernel_sends_from_it() -> None:
    """A bind test said yes to a broadcast address, and to any address where
    ip_nonlocal_bind is on."""
    assert not selfloop.is_this_host(ip_address("255.255.255.255"))


def test_a_dkim_key_in_a_form_only_the_signer_reads_still_loads(tmp_path: Path) -> None:
    """The size check read keys with cryptography, which refuses labels dkimpy's
    parser, the signer's, takes: a key that signed made check end in a traceback."""
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    file = tmp_path / "keys" / "platform.example.s1.private"
    pem = _rsa_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    file.write_bytes(pem.replace(b"RSA PRIVATE KEY", b"KEY"))
    assert load(path).dkim_keys[0].key_file == file


@pytest.mark.parametrize("bits", [512, 4112])
def test_a_dkim_key_receivers_refuse_is_a_problem(tmp_path: Path, bits: int) -> None:
    """A 512-bit key made elsewhere signed, and every signature failed at every
    receiver (RFC 8301); relay check and a reload took it. Over 4096 bits,
    receivers need not verify it, and at 8192 a reload held every worker 3.5 s."""
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    file = tmp_path / "keys" / "platform.example.s1.private"
    made = subprocess.run(  # cryptography makes none this small; OpenSSL still does
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"],
        capture_output=True, check=True,
    )  # fmt: skip
    file.write_bytes(made.stdout)
    assert problems(path) == [
        f"{path}:14:17: dkim.keys[0].key_file: cannot sign with {file}: an RSA key of {bits}"
        " bits, which receivers refuse (RFC 8301: verifiers take 1024 to 4096); make a new"
        " one with relay dkim keygen"
    ]


@pytest.mark.parametrize(("bits", "warned"), [(1024, True), (1536, True), (2048, False)])
def test_check_warns_of_an_rsa_key_under_2048_bits(tmp_path: Path, bits: int, warned: bool) -> None:
    """RFC 8301 has signers use 2048 bits or more; a 1024-bit key passed unsaid.
    Receivers still verify it, so not a problem."""
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    file = tmp_path / "keys" / "platform.example.s1.private"
    file.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    said = (
        f"{path}:14:17: warning: dkim.keys[0].key_file: {file} is an RSA key of {bits} bits:"
        " RFC 8301 has signers use 2048 bits or more; make one with relay dkim keygen under a"
        ' new selector (README, "Rotating a DKIM key")'
    )
    assert warnings(path) == ([said] if warned else [])


def test_two_keys_whose_selectors_differ_in_case_only_are_one_dns_name(tmp_path: Path) -> None:
    """NEW._domainkey is new._domainkey: one record, so one of the two signatures
    fails everywhere whatever is published; the check compared the case too."""
    second = (
        "    - domain: platform.example\n      selector: S1\n"
        "      key_file: keys/platform.example.s1.private\n"
    )
    path = variant(tmp_path, "upstreams:\n", second + "upstreams:\n")
    assert problems(path) == [
        f"{path}:16:17: dkim.keys[1].selector: S1._domainkey.platform.example is also dkim.keys[0]"
    ]


def test_check_warns_of_a_tenant_that_requires_a_login_it_has_not(tmp_path: Path) -> None:
    """Every message in its name was refused as an unknown sender's, and the
    policy passed with ok."""
    path = variant(tmp_path, "    upstream: outbox\n", "    upstream: outbox\n    auth: required\n")
    said = (
        f"{path}:{line_of(path, 'auth: required')}:11: warning: tenants.acme.auth: no login is"
        " of tenant 'acme', which takes mail only with one of its logins: none of its"
        " users' mail is taken"
    )
    assert warnings(path) == [said]
    login = (
        "logins:\n  erp:\n    password_hash: 'scrypt$16384$8$1$cmVsYXktZGVtby1zYWx0IQ==$"
        "x0qG+cibjmfhHeWXcJAwGW27gNPyIus2vhexTU+5xXk='\n    tenant: acme\ntenants:\n"
    )
    path.write_text(path.read_text().replace("tenants:\n", login))
    assert warnings(path) == []


def test_check_warns_of_a_default_tenant_that_requires_a_login(tmp_path: Path) -> None:
    """The default tenant is for sessions without a login, which such a tenant never takes."""
    identify = "identify:\n  unknown_sender: default\n  default_tenant: acme\ntenants:\n"
    login = (
        "logins:\n  erp:\n    password_hash: 'scrypt$16384$8$1$cmVsYXktZGVtby1zYWx0IQ==$"
        "x0qG+cibjmfhHeWXcJAwGW27gNPyIus2vhexTU+5xXk='\n    tenant: acme\n"
    )
    path = variant(tmp_path, "tenants:\n", login + identify)
    text = path.read_text().replace(
        "    upstream: outbox\n", "    upstream: outbox\n    auth: required\n"
    )
    text = text.replace(
        "        address: jan@acme.example\n",
        "        address: jan@acme.example\n    default_user: jan\n",
    )
    path.write_text(text)
    assert [w.split(": warning: ", 1)[1] for w in warnings(path)] == [
        "identify.default_tenant: tenant 'acme' takes mail only with one of its logins"
        " (auth: required), and default_tenant is for sessions without a login: none of"
        " them is ever one of its users"
    ]


_ACME_LOGIN = (
    "logins:\n  erp:\n    password_hash: 'scrypt$16384$8$1$cmVsYXktZGVtby1zYWx0IQ==$"
    "x0qG+cibjmfhHeWXcJAwGW27gNPyIus2vhexTU+5xXk='\n    tenant: acme\ntenants:\n"
)


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ("auth: off", True),
        ("address: 0.0.0.0\n    port: 2525\n    allow: [10.0.0.0/8]", True),  # no tls
        (f"address: 0.0.0.0\n    port: 2525\n    {_TLS}\n    allow: [10.0.0.0/8]", False),
        ("auth: optional", False),  # loopback
    ],
    ids=["off", "no-tls", "tls", "loopback"],
)
def test_check_warns_of_a_tenant_that_requires_a_login_no_listener_takes(
    tmp_path: Path, settings: str, warned: bool
) -> None:
    listener = _LISTENER if settings.startswith("auth") else ""
    path = variant(tmp_path, "    upstream: outbox\n", "    upstream: outbox\n    auth: required\n")
    text = path.read_text().replace("tenants:\n", _ACME_LOGIN)
    if listener:
        text = text.replace(_LISTENER, _LISTENER + f"    {settings}\n")
    else:
        text = text.replace(_LISTENER, f"    {settings}\n")
    path.write_text(text)
    found = [w for w in warnings(path) if "no listener offers AUTH" in w]
    assert len(found) == (1 if warned else 0), warnings(path)


def test_a_listener_open_to_everyone_lets_no_one_send_as_tenants_that_require_a_login(
    tmp_path: Path,
) -> None:
    listener = f"    address: 0.0.0.0\n    port: 2525\n    {_TLS}\n    allow: [0.0.0.0/0]\n"
    path = variant(tmp_path, _LISTENER, listener)
    text = path.read_text().replace("tenants:\n", _ACME_LOGIN)
    path.write_text(text)
    assert [w for w in warnings(path) if "lets every address" in w]  # acme takes any session
    text = text.replace("    upstream: outbox\n", "    upstream: outbox\n    auth: required\n")
    path.write_text(text)
    assert warnings(path) == []


def test_check_warns_of_a_policy_reached_through_a_link_others_may_replace(
    open_dir: Path, tmp_path: Path
) -> None:
    """Only the real path's directories were judged: a link in a 0777 directory
    passed, and whoever pointed it at a policy of their own had it read at the
    next reload."""
    path = variant(open_dir, _LISTENER, _LISTENER)
    links = tmp_path / "links"
    links.mkdir()
    links.chmod(0o777)
    (links / "conf").symlink_to(open_dir)
    link = links / "conf" / path.name
    assert [w for w in warnings(link) if "key_file" not in w] == [
        f"{link}: warning: {link} is in {links}, which users other than its owner may write"
        f" (mode 0777): they may replace it and the policy it holds; chmod go-w {links}"
    ]
    links.chmod(0o1777)  # sticky, and the link root's: others may not replace it
    assert warnings(link) == []


_TWO = "Økonomi <okonomi@acme.example>, Ops <ops@acme.example>"
_TWO_ASCII = "Office <okonomi@acme.example>; ops@acme.example"
_MORE_THAN_ONE = (
    " holds 2 addresses: expected one, with a name if wanted ('Office Desk <desk@acme.example>');"
    " for replies to reach several, give one address that forwards to them"
)
_ADDRESS_IN_NAME = "holds an address, which recipients would take for the sender's:"


@pytest.mark.parametrize(
    ("reply_to", "problem"),
    [
        (f"'{_TWO}'", f"{_TWO!r}{_MORE_THAN_ONE}"),
        (f"'{_TWO_ASCII}'", f"{_TWO_ASCII!r}{_MORE_THAN_ONE}"),
        (
            "'=?utf-8?q?=C3=98konomi?= <okonomi@acme.example>'",
            "'=?utf-8?q?=C3=98konomi?= <okonomi@acme.example>': its name is an encoded word;"
            " write the name as it reads: 'Økonomi'",
        ),
        (
            """'"help@evil.example" <desk@acme.example>'""",
            """'"help@evil.example" <desk@acme.example>': its name holds an address, which"""
            " recipients would take for the address replies go to: the name is just the name;"
            " that address is the one in <>",
        ),
    ],
    ids=["two-mailboxes", "two-ascii", "encoded-word", "address-in-name"],
)
def test_a_fixed_reply_to_that_is_not_one_mailbox_as_it_reads_is_a_located_problem(
    tmp_path: Path, reply_to: str, problem: str
) -> None:
    """Each passed: two mailboxes went out as one, the first folded into the
    second's name, while preview and the audit log said two; an encoded word
    was encoded again, and recipients read ``=?utf-8?q?...?=``."""
    chain = f"    reply_to:\n      default: [{reply_to}]\n"
    path = variant(tmp_path, "    upstream: outbox\n", "    upstream: outbox\n" + chain)
    assert problems(path) == [f"{path}:25:17: tenants.acme.reply_to.default[0]: {problem}"]


def test_a_fixed_reply_to_named_by_its_own_address_loads(tmp_path: Path) -> None:
    """The address in its name is the one replies go to: nobody is misled."""
    own = """'"desk@acme.example" <Desk@Acme.example>'"""
    chain = f"    reply_to:\n      default: [{own}]\n"
    path = variant(tmp_path, "    upstream: outbox\n", "    upstream: outbox\n" + chain)
    (source,) = load(path).tenants["acme"].reply_to["default"]
    assert (source.name, source.value) == ("desk@acme.example", "Desk@Acme.example")


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("name: Jan Janssens", "name: '=?utf-8?q?J=C3=A5n?='",
         "26:15: tenants.acme.users.jan.name: '=?utf-8?q?J=C3=A5n?=' is an encoded word;"
         " write the name as it reads: 'Jån'"),
        ("name: Acme AS", "name: Acme =?utf-8?b?w5hzdA==?=",
         "21:11: tenants.acme.name: 'Acme =?utf-8?b?w5hzdA==?=' holds an encoded word;"
         " write the name as it reads: 'Acme Øst'"),
        ('"{user.name} via {tenant.name}"', '"{user.name} =?utf-8?q?f=C3=BCr?= {tenant.name}"',
         "5:17: platform.display_name: '{user.name} =?utf-8?q?f=C3=BCr?= {tenant.name}'"
         " holds an encoded word; write the template as it reads:"
         " '{user.name} für {tenant.name}'"),
        ('"{user.name} via {tenant.name}"', '"{user.name} <help@acme.example>"',
         f"5:17: platform.display_name: '{{user.name}} <help@acme.example>' {_ADDRESS_IN_NAME}"
         " the name is just the name ('{user.name}'); the address is the From's own"),
        ("name: Jan Janssens", "name: Help Desk <help@acme.example>",
         f"26:15: tenants.acme.users.jan.name: 'Help Desk <help@acme.example>' {_ADDRESS_IN_NAME}"
         " the name is just the name ('Help Desk'); the address goes in the user's address"
         " or aliases"),
        ("name: Jan Janssens", "name: jan@acme.example",
         f"26:15: tenants.acme.users.jan.name: 'jan@acme.example' {_ADDRESS_IN_NAME}"
         " the name is just the name; the address goes in the user's address or aliases"),
        ("name: Acme AS", "name: Acme AS (post@acme.example)",
         f"21:11: tenants.acme.name: 'Acme AS (post@acme.example)' {_ADDRESS_IN_NAME}"
         " the name is just the name ('Acme AS'); the address goes in the tenant's address"),
    ],
    ids=["user-encoded", "tenant-encoded", "template-encoded", "template-address",
         "user-address", "user-bare-address", "tenant-address"],
)  # fmt: skip
def test_a_name_that_would_not_read_as_written_is_a_located_problem(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    """Each passed: the name went into the From as text, so an encoded word
    was encoded again and read as ``=?utf-8?q?...?=``, and an address read as
    ``Help Desk <help@acme.example> via Acme AS``, the sender's to a recipient."""
    path = variant(tmp_path, old, new)
    assert problems(path) == [f"{path}:{problem}"]
