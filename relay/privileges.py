"""Root's privileges given up once the ports are bound, as Postfix, Exim and
OpenSMTPD do: the processes that parse SMTP, MIME and AUTH from the network
then run as the policy's ``run_as``, and a flaw in that parsing is the service
user's, not root's.

Everything after the drop happens as that user: the policy is read again
(keys, certificates, password files), the state directory opened, the
workers forked. A file only root can read then fails the start, as it would
fail the next reload, rather than at that reload days later.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import sysconfig

from relay.errors import RelayError

log = logging.getLogger("relay")


class PrivilegeError(RelayError):
    """The relay cannot run as the policy's ``run_as``."""

    def __init__(self, user: str, reason: str) -> None:
        super().__init__(f"run_as: {user}: {reason}")


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def become(user: str | None) -> bool:
    """Run as ``user`` from here on when started as root; whether root was given up.

    Not root, the relay must already be that user: files it made as another
    would be that other's, and the service user could not use them.
    """
    if user is None:
        return False
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(user, "no such user on this host") from None
    euid = os.geteuid()
    if euid != 0:
        if euid == entry.pw_uid:
            return False
        raise PrivilegeError(
            user,
            f"the relay runs as {_name(euid)} and only root can become {user}: start it as"
            f" root or as {user}",
        )
    if entry.pw_uid == 0:
        raise PrivilegeError(user, "has root's uid 0")
    code = _code_directories()  # sysconfig imports as it goes too: root reads them
    try:
        os.initgroups(user, entry.pw_gid)  # its groups too: ssl-cert for /etc/ssl/private
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise PrivilegeError(user, f"cannot become that user: {exc.strerror or exc}") from exc
    _confirm(user, entry.pw_uid)
    _can_read(user, code)
    log.info(
        "running as %s (uid %d, gid %d%s) now that the listeners are bound",
        user,
        entry.pw_uid,
        entry.pw_gid,
        _groups(entry.pw_gid),
    )
    return True


def _confirm(user: str, uid: int) -> None:
    """Root given up for good: a process that could take it back has not."""
    if os.getuid() != uid or os.geteuid() != uid or 0 in os.getresgid():
        raise PrivilegeError(user, "root's ids are still held after the switch")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError(user, "root could be taken back after the switch")


def _code_directories() -> list[str]:
    import relay

    paths = sysconfig.get_paths()
    wanted = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    found = [path for path in wanted if os.path.isdir(path)]  # a venv may have no platlib
    return list(dict.fromkeys([*found, os.path.dirname(relay.__file__)]))


def _can_read(user: str, code: list[str]) -> None:
    """Python imports as it goes (a codec at the first message in its charset),
    so the user must be able to read the interpreter's library and the
    relay's packages: a Python under root's home would fail mid-message."""
    for directory in code:
        if not os.access(directory, os.R_OK | os.X_OK):
            raise PrivilegeError(
                user,
                f"cannot read {directory}, where the relay's Python and packages are;"
                f" install them where {user} can read them (the README has /opt/erp-relay)",
            )


def _groups(primary: int) -> str:
    others = sorted(set(os.getgroups()) - {primary})
    if not others:
        return ""
    names = []
    for gid in others:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return ", groups " + ", ".join(names)
