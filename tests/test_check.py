"""``relay check`` as the unit's ExecStartPre and ``systemctl reload`` run it: a real
process on real files, so that what it passes the daemon can run."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.policyfiles import variant

ROOT = Path(__file__).parent.parent


def check(policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", str(policy)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def line_of(policy: Path, text: str) -> int:
    (number,) = [n for n, line in enumerate(policy.read_text().splitlines(), 1) if text in line]
    return number


@pytest.mark.parametrize(
    ("key", "content", "problem"),
    [
        ("s1", b"garbage\n", "not an RSA private key in PEM form"),
        ("s1", None, "an Ed25519 key, but algorithm says rsa"),
    ],
    ids=["garbage", "ed25519-as-rsa"],
)
def test_check_refuses_a_dkim_key_the_relay_cannot_sign_with(
    policy_file: Path, key: str, content: bytes | None, problem: str
) -> None:
    """Both passed before, and then every message was refused with 451 at signing."""
    keys = policy_file.parent / "keys"
    path = keys / f"platform.example.{key}.private"
    path.write_bytes(
        (keys / "platform.example.e1.private").read_bytes() if content is None else content
    )
    done = check(policy_file)
    assert done.returncode == 78, done.stdout + done.stderr
    line = line_of(policy_file, f"key_file: keys/platform.example.{key}.private")
    where = f"{policy_file}:{line}:17: dkim.keys[0].key_file: cannot sign with {path}: {problem}"
    assert where in done.stderr
    assert f"{policy_file}: 1 problem" in done.stderr


def test_check_is_quiet_about_a_state_directory_it_can_create(policy_file: Path) -> None:
    done = check(policy_file)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"{policy_file}: ok (")


def test_check_warns_of_a_policy_other_users_may_change(policy_file: Path, tmp_path: Path) -> None:
    """A policy of mode 0666 in a 0777 directory passed with ok: a user of the host
    added a login of their own, and sent as a tenant from the next reload."""
    policy_file.chmod(0o666)
    tmp_path.chmod(0o777)
    done = check(policy_file)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[:2] == [
        f"{policy_file}: warning: {policy_file} is writable by users other than its owner"
        f" (mode 0666): the policy it holds is not safe; chmod go-w {policy_file}",
        f"{policy_file}: warning: {policy_file} is in {tmp_path}, which users other than its"
        f" owner may write (mode 0777): they may replace it and the policy it holds; chmod"
        f" go-w {tmp_path}",
    ]


def test_check_warns_when_the_state_directory_cannot_be_made_there(
    policy_file: Path, tmp_path: Path
) -> None:
    """relay serve would fail at its start (73); the file itself is not wrong, so
    the check still passes, and says why the start will not."""
    (tmp_path / "blocker").write_text("a file, not a directory\n")
    policy_file.write_text(policy_file.read_text() + "state_directory: blocker/state\n")
    done = check(policy_file)
    assert done.returncode == 0, done.stderr
    line = line_of(policy_file, "state_directory:")
    user = pwd.getpwuid(os.getuid()).pw_name
    queue = tmp_path / "blocker" / "state" / "queue" / "msg"
    assert done.stderr == (
        f"{policy_file}:{line}:18: warning: state_directory: {user} cannot create {queue}"
        f" ({tmp_path / 'blocker'} is not a directory): relay serve run as {user} would fail\n"
    )
    assert done.stdout.startswith(f"{policy_file}: ok (")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
@pytest.mark.parametrize("mode", [0o555, 0o000], ids=["read-only", "closed"])
def test_check_warns_when_the_user_cannot_create_the_state_directory(
    policy_file: Path, tmp_path: Path, mode: int
) -> None:
    """As ExecStartPre runs it, as the service user: the parent is someone else's
    (one it may not even look into is no crash either)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=mode)
    try:
        policy_file.write_text(policy_file.read_text() + "state_directory: locked/state\n")
        done = check(policy_file)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0, done.stderr
    user = pwd.getpwuid(os.getuid()).pw_name
    queue = locked / "state" / "queue" / "msg"
    assert f"warning: state_directory: {user} cannot create {queue} ({locked} is not" in (
        done.stderr
    )


def test_check_warns_of_a_queue_directory_the_relay_writes_in_that_it_cannot(
    policy_file: Path, tmp_path: Path
) -> None:
    """``queue/msg`` is where each message is written: one the relay cannot write
    in refuses every message (451), where only ``queue/`` itself was checked."""
    queue = tmp_path / "state" / "queue"
    (queue / "env").mkdir(parents=True)
    (queue / "msg").write_text("not a directory\n")  # no one writes in it, root included
    done = check(policy_file)
    assert done.returncode == 0, done.stderr
    user = pwd.getpwuid(os.getuid()).pw_name
    assert f"warning: state_directory: {user} cannot write in {queue / 'msg'}:" in done.stderr


NOBODY_CHECKS = """
import contextlib, io, os, sys
from relay.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main(["check", "-c", sys.argv[1]])  # as root first: root's files imported while they can be
os.setgid(65534)
os.setuid(65534)
sys.exit(main(["check", "-c", sys.argv[1]]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another user")
def test_check_passes_a_queue_directory_only_its_subdirectories_need_to_be_writable(
    policy_file: Path,
) -> None:
    """The relay writes in ``queue/msg`` and ``queue/env``, never in ``queue/``
    once they exist: a read-only ``queue/`` was warned of, yet the relay ran."""
    base = Path(tempfile.mkdtemp(prefix="relay-check-owner-"))
    try:
        base.chmod(0o755)
        shutil.copytree(policy_file.parent, base / "conf")
        queue = base / "conf" / "state" / "queue"
        for sub in ("msg", "env"):
            (queue / sub).mkdir(parents=True)
        (base / "conf" / "state" / "audit").mkdir()
        for path in [base / "conf", *(base / "conf").rglob("*")]:
            os.chown(path, 65534, 65534)
        queue.chmod(0o500)
        done = subprocess.run(
            [sys.executable, "-c", NOBODY_CHECKS, str(base / "conf" / policy_file.name)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    finally:
        shutil.rmtree(base)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr


def test_check_whose_report_cannot_be_written_exits_74(policy_file: Path, tmp_path: Path) -> None:
    """Its problems go to stderr: a full one ended it with a traceback no one saw
    and exit 1, where a stdout it cannot write is 74."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy_file.read_text().replace("port: 2525", "port: 0587"))
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "relay", "check", "-c", str(bad)],
            stdout=subprocess.PIPE, stderr=full, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    assert (done.returncode, done.stdout) == (74, "")


def test_under_the_journal_each_line_has_its_priority(tmp_path: Path) -> None:
    """The unit runs check before every start and reload; its lines were stored at
    the journal's default priority, so ``journalctl -p err`` did not say why a
    start failed (relay serve's own lines carry theirs)."""
    policy = variant(tmp_path, "tenants:\n", "bogus: 1\ntenants:\n")
    weak = "scrypt$2$1$1$cmVsYXktZGVtby1zYWx0IQ==$x0qG+cibjmfhHeWXcJAwGW27gNPyIus2vhexTU+5xXk="
    login = f"logins:\n  erp:\n    password_hash: '{weak}'\n    tenant: acme\ntenants:\n"
    warned = tmp_path / "warned.yaml"
    warned.write_text(policy.read_text().replace("bogus: 1\ntenants:\n", login))
    journal = tmp_path / "journal"
    for path in (policy, warned):
        journal.write_bytes(b"")
        device_inode = f"{journal.stat().st_dev}:{journal.stat().st_ino}"
        with journal.open("a") as stream:
            subprocess.run(
                [sys.executable, "-m", "relay", "check", "-c", str(path)],
                stdout=subprocess.DEVNULL, stderr=stream, timeout=60, cwd=ROOT,
                env={**os.environ, "JOURNAL_STREAM": device_inode}, check=False,
            )  # fmt: skip
        lines = journal.read_text().splitlines()
        if path == policy:
            assert lines == [
                f"<3>{policy}:19:1: bogus: unknown key (expected one of: version, platform,"
                " listeners, identify, control_headers, classify, dkim, upstreams, logins,"
                " tenants, state_directory, queue, audit, workers, run_as, suppression, metrics)",
                f"<3>{policy}: 1 problem",
            ]
        else:
            assert len(lines) == 1 and lines[0].startswith(f"<4>{warned}:"), lines
            assert ": warning: logins.erp.password_hash: a weak hash" in lines[0]


def test_check_warns_of_queued_mail_whose_audit_log_is_gone(
    policy_file: Path, tmp_path: Path
) -> None:
    """relay serve refuses to start then (exit 73) rather than begin a new chain;
    check said ok, and an upgrade, or the unit's start, went ahead on it."""
    from relay.spool import Spool
    from tests.spoolkit import make_entry

    state = tmp_path / "state"
    assert check(policy_file).returncode == 0  # a new state directory: nothing to say
    Spool(state / "queue").put(make_entry(), b"Subject: queued\r\n\r\nbody\r\n")
    shutil.rmtree(state / "audit", ignore_errors=True)
    done = check(policy_file)
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: state_directory: the queue holds 1 message but the audit log"
        f" {state / 'audit'} is gone: relay serve will not start (exit 73)"
    ) in done.stderr
    (state / "audit").mkdir()
    assert "audit log" not in check(policy_file).stderr


def test_check_reads_an_audit_link_to_nowhere_as_gone_and_a_crash_leftover_as_no_mail(
    policy_file: Path, tmp_path: Path
) -> None:
    """A link to a mount that did not come up is what serve finds gone; a message
    file a crash left without its record is one serve's recovery removes."""
    from relay.spool import Spool
    from tests.spoolkit import make_entry

    state = tmp_path / "state"
    spool = Spool(state / "queue")
    leftover = spool.message_path(make_entry().queue_id)
    leftover.write_bytes(b"Subject: cut short\r\n")
    assert "audit log" not in check(policy_file).stderr
    spool.put(make_entry(), b"Subject: queued\r\n\r\nbody\r\n")
    shutil.rmtree(state / "audit", ignore_errors=True)
    (state / "audit").symlink_to(tmp_path / "not-mounted")
    assert "queue holds 1 message but the audit log" in check(policy_file).stderr


@pytest.mark.parametrize(
    ("value", "said", "code"),
    [
        ("root", "run_as: expected the service user, not one with root's uid 0", 78),
        ("''", "run_as: expected the name of the service user the relay runs as", 78),
        (
            "no-such-relay-user",
            "warning: run_as: no user 'no-such-relay-user' on this host: relay serve would not"
            " start",
            0,
        ),
    ],
    ids=["root", "empty", "missing"],
)
def test_run_as_names_a_service_user(tmp_path: Path, value: str, said: str, code: int) -> None:
    """A user the host lacks may be the target host's: the file is not wrong."""
    policy = variant(tmp_path, "tenants:\n", f"run_as: {value}\ntenants:\n")
    done = check(policy)
    assert done.returncode == code, done.stderr
    assert f"{policy}:{line_of(policy, 'run_as:')}:9: {said}" in done.stderr


def test_check_warns_of_a_message_size_whose_reserve_the_state_disk_cannot_hold(
    tmp_path: Path,
) -> None:
    """Every MAIL on that listener got 452 4.3.1 for ever, while /readyz, judging
    by the smallest listener's reserve, said ready; check said ok."""
    st = os.statvfs(tmp_path)
    if (st.f_blocks - (st.f_bfree - st.f_bavail)) * st.f_frsize >= 2**40 * 3 // 2:
        pytest.skip("a file system of more than 1.5 TiB holds the largest reserve")
    big = "  - name: big\n    address: 127.0.0.1\n    port: 2526\n"
    big += "    max_message_size: 1099511627776\n"
    policy = variant(tmp_path, "dkim:\n", big + "dkim:\n")
    done = check(policy)
    assert done.returncode == 0, done.stderr
    line = line_of(policy, "max_message_size:")
    said = (
        f"{policy}:{line}:23: warning: listeners[1].max_message_size: listener big keeps"
        f" 1649267441664 bytes free (1.5 times this), and the file system of"
        f" {tmp_path / 'state' / 'queue'} holds N bytes at most: every MAIL on it would"
        " be refused (452 4.3.1 Insufficient system storage)\n"
    )
    assert re.sub(r"holds [0-9]+ bytes", "holds N bytes", done.stderr) == said


@pytest.mark.parametrize("tagged", ["name: !!bool x", "name: !!timestamp x"])
def test_check_refuses_a_value_its_tag_does_not_fit_without_a_traceback(
    policy_file: Path, tagged: str
) -> None:
    """As ExecStartPre and ExecReload, it showed PyYAML's traceback and exit 1."""
    policy_file.write_text(policy_file.read_text().replace("name: Acme AS", tagged))
    done = check(policy_file)
    assert done.returncode == 78, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    line = line_of(policy_file, tagged)
    assert f"{policy_file}:{line}:11: tenants.acme.name: expected a company name," in done.stderr
