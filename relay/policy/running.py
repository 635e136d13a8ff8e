"""The policy a running relay goes by, found from its policy file.

While the file does not load (an edit the relay refused at its reload, so it
keeps what it had), the tools and ``relay bounce`` go by the text a relay
with workers keeps in its state directory: that is when an operator needs
them most, and a bounce deferred meanwhile left the relay sending to the
address. The state directory comes from the file's ``state_directory``
line, read as text: the YAML may be what broke.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from relay import statefiles, statelock
from relay.errors import PolicyError
from relay.policy.files import RefusedFile
from relay.policy.load import StateSettings, load, load_state, text_if_unchanged
from relay.policy.model import Policy
from relay.policy.schema import tidy
from relay.policy.yamlsource import read_bytes

_STATE_LINE = re.compile(  # a plain or quoted scalar, perhaps with a comment after it
    r"^state_directory:[ \t]*([\"']?)([^\s\"'#][^\"'#]*?)\1[ \t]*(?:#.*)?$", re.MULTILINE
)


def state_directory(path: Path) -> Path | None:
    """The file's ``state_directory`` line (or the default beside the file)."""
    try:
        text = read_bytes(path).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, RefusedFile, UnicodeDecodeError):
        return None
    found = _STATE_LINE.search(text)
    state = Path(found.group(2) if found else "state")
    return state if state.is_absolute() else tidy(path.absolute().parent / state)


def running_policy_file(path: Path) -> Path | None:
    """The running policy's kept text, if there is one."""
    state = state_directory(path)
    if state is None:
        return None
    checked = state / statelock.CHECKED_NAME
    try:
        return checked if checked.is_file() else None
    except OSError:  # a state directory this user may not look into
        return None


def as_running(path: Path) -> StateSettings | None:
    """The state settings alone, when the file and the files it reads are those
    of the policy a relay with workers last put in use (its version, as it
    recorded it): it loaded whole then, and building its keys, logins and
    certificates again, which the tools do not use, took seconds for
    thousands of tenants. None otherwise: an edit not in use yet is loaded
    whole, to say what is wrong with it."""
    state = state_directory(path)
    if state is None:
        return None
    try:
        with statefiles.open_read(state / statelock.CHECKED_FILES) as record:
            checked = json.loads(record.read())
        if checked["policy"] != os.path.realpath(path):
            return None  # brought along from elsewhere (``cp -a``): no relay's here
        text = text_if_unchanged(path, checked["files"], checked["digest"])
        if text is None:
            return None
        settings = load_state(path, text, loaded=True)
    except (OSError, PolicyError, ValueError, KeyError, TypeError):
        return None
    # the directory the YAML names, not another its line-by-line reading found
    same = settings.queue.directory.parent.resolve() == state.resolve()
    return settings if same else None


def running_state(path: Path) -> tuple[StateSettings, Path] | None:
    """The kept text's state settings and where it is kept. Of it only those are
    read, so a listener key or CA file the relay has refused since (keeping
    what it had) does not stop the tools as well. None when there is no kept
    text, it does not load or it is another state directory's."""
    kept = running_policy_file(path)
    if kept is None:
        return None
    try:
        with statefiles.open_read(kept) as text:  # a link there is the service user's
            state = load_state(path, text.read())
    except (PolicyError, OSError):
        return None
    return (state, kept) if _here(state.queue.directory, kept) else None


def running_policy(path: Path) -> tuple[Policy, Path] | None:
    """The whole policy from the kept text, and where it is kept: its paths
    resolve beside ``path``, so a DKIM key or password file that no longer
    loads stops it (None), as does what stops ``running_state``."""
    kept = running_policy_file(path)
    if kept is None:
        return None
    try:
        with statefiles.open_read(kept) as text:
            policy = load(path, data=text.read())
    except (PolicyError, OSError):
        return None
    return (policy, kept) if _here(policy.queue.directory, kept) else None


def _here(queue: Path, kept: Path) -> bool:
    """A copy brought along from another state directory (``cp -a``) runs nowhere here."""
    return queue.parent.resolve() == kept.parent.resolve()
