"""Load the policy YAML into the frozen ``Policy``, or say everything wrong with it.

The relay refuses to start on an invalid policy, so the sysadmin's only
view of a mistake is this module's report: every problem at once, in file
order, each as ``FILE:LINE:COL: dotted.path: message`` like a compiler,
rather than a traceback about the first one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TextIO

from relay.errors import PolicyError
from relay.gcpause import collection_paused
from relay.policy import accounts, sections
from relay.policy.files import Reads, RefusedFile, read_limited, reading
from relay.policy.model import (
    AuditSettings,
    AuthMode,
    Policy,
    QueueSettings,
    Sources,
    SuppressionSettings,
)
from relay.policy.schema import Ctx, Map
from relay.policy.values import LARGEST_FILE, warn_if_policy_exposed
from relay.policy.yamlsource import Problems, read, read_bytes
from relay.quantity import quantity

EX_CONFIG = 78
EX_OSERR = 71  # relay serve's exit where the open-files limit is too few to serve
VERSION = 1
_SECTIONS = ("version", "platform", "listeners", "identify", "control_headers", "classify")
_SECTIONS += ("dkim", "upstreams", "logins", "tenants", "state_directory", "queue", "audit")
_SECTIONS += ("workers", "run_as", "suppression", "metrics")
_REQUIRED = ("version", "platform", "listeners", "upstreams", "tenants")


def load(path: Path, data: bytes | None = None, files: Mapping[str, bytes] | None = None) -> Policy:
    """Read and validate the policy; raises PolicyError listing every problem.

    ``data`` stands in for the file's content (paths in it still resolve
    beside ``path``), and ``files`` for the files it names, by path (as in
    ``Policy.sources``): the workers build exactly what their supervisor checked.
    """
    return _load(path, data, files)[0]


def policy_version(text: bytes, files: Mapping[str, bytes]) -> str:
    """The policy's identifier: a SHA-256 over its text and the files it read, so
    that a new DKIM key (or password, or certificate) is a new version in the
    log and the audit log, as a new text is. The files go by their real names:
    the same policy named as ``../relay.yaml`` or through a linked directory
    read as another version than the running one (``relay status``). A name is
    hashed as its bytes: one in Latin-1 under a UTF-8 locale is not UTF-8 text."""
    digest = hashlib.sha256()
    named = {os.fsencode(os.path.realpath(name)): data for name, data in files.items()}
    for chunk in (text, *(part for name in sorted(named) for part in (name, named[name]))):
        digest.update(len(chunk).to_bytes(8, "big") + chunk)
    return digest.hexdigest()


def text_if_unchanged(path: Path, names: Iterable[str], digest: str) -> bytes | None:
    """The policy file's text when it and the files ``names`` read now as they
    did for the version ``digest``, so that what was built from them stands
    (building it again took seconds for thousands of tenants); None when one
    differs or cannot be read."""
    try:
        text = read_bytes(path)
        files = {name: read_limited(Path(name), LARGEST_FILE, "a file it names") for name in names}
    except (OSError, RefusedFile):  # a FIFO in a key's place waited for a writer
        return None
    return text if policy_version(text, files) == digest else None


def _load(
    path: Path, data: bytes | None = None, files: Mapping[str, bytes] | None = None
) -> tuple[Policy, list[str]]:
    """The policy and the warnings about this host, which only ``relay check`` shows."""
    with collection_paused():
        return _read_and_build(path, data, files)


def _read_and_build(
    path: Path, data: bytes | None, files: Mapping[str, bytes] | None
) -> tuple[Policy, list[str]]:
    problems = Problems(str(path))
    data, root = read(path, problems, data)
    policy = None
    if data is not None and root is not None:
        ctx = Ctx(problems, path.absolute().parent)
        with reading(Reads(files)) as reads:
            top = Map(ctx, root, "", _SECTIONS, _REQUIRED)
            policy = _build(ctx, top, path, Sources(data, MappingProxyType(reads.read)))
    if len(problems) or policy is None:
        raise PolicyError(problems.in_file_order() or [f"{path}: invalid policy"])
    return policy, problems.warnings_in_file_order()


@dataclass(frozen=True)
class StateSettings:
    """Where the spool, the audit log and the suppression list are, and the audit
    key: all the queue, audit and suppression tools go by."""

    queue: QueueSettings
    audit: AuditSettings
    suppression: SuppressionSettings
    # the policy's tenant ids, for a tool to check one it is given; None when unknown
    tenants: frozenset[str] | None = None

    @classmethod
    def of(cls, policy: Policy) -> StateSettings:
        assert policy.suppression is not None  # a loaded policy has one
        return cls(policy.queue, policy.audit, policy.suppression, frozenset(policy.tenants))


def load_state(path: Path, data: bytes | None = None, loaded: bool = False) -> StateSettings:
    """Only the policy's state settings; raises PolicyError listing their problems.

    The queue and audit tools need no listener certificate, CA file or DKIM
    key, so one that no longer loads (the relay keeps the pair it read) does
    not stop them; nor is a key tried by signing each time they run.
    ``loaded``: the text is one that loaded whole (the running relay's), so
    the tenant ids it names are the policy's.
    """
    problems = Problems(str(path))
    with collection_paused():
        data, root = read(path, problems, data)
    state = None
    if data is not None and root is not None:
        ctx = Ctx(problems, path.absolute().parent)
        top = Map(ctx, root, "", _SECTIONS, _REQUIRED)
        queue, audit, suppression = sections.state(ctx, top) if top.ok else (None, None, None)
        if queue is not None and audit is not None and suppression is not None:
            state = StateSettings(queue, audit, suppression, _tenant_ids(top) if loaded else None)
    if len(problems) or state is None:
        raise PolicyError(problems.in_file_order() or [f"{path}: invalid policy"])
    return state


def _tenant_ids(top: Map) -> frozenset[str]:
    """The ids as the build reads them (merge keys expanded), without building a tenant."""
    return frozenset(name for name, *_ in top.entries("tenants", "a mapping of tenant ids"))


def _build(ctx: Ctx, root: Map, path: Path, sources: Sources) -> Policy | None:
    """``sources.files`` fills as the sections read their files: all are in by the end."""
    if not root.ok:
        return None
    version = root.integer("version", None, 0, 2**31, f"the policy version ({VERSION})")
    if version is not None and version != VERSION:
        message = f"unsupported policy version {version}: this relay reads version {VERSION}"
        ctx.problem(root.get("version"), "version", message)
    run_as = sections.run_as(ctx, root)  # before the files whose owner it judges
    rules, doc_types = sections.classify(ctx, root)
    keys, key_domains = sections.dkim(ctx, root)
    platform = sections.platform(ctx, root, key_domains)
    listeners = sections.listeners(ctx, root)
    upstreams, upstream_names = accounts.upstreams(ctx, root)
    roster = accounts.Roster()
    tenants = accounts.tenants(ctx, root, upstream_names, doc_types, roster, key_domains)
    logins = accounts.logins(ctx, root, roster.users)
    if logins is not None:
        accounts.warn_of_tenants_no_login_reaches(ctx, roster, logins)
    if platform is not None:
        accounts.warn_of_bounce_address(ctx, roster, platform.return_path)
    anonymous = listeners is not None and any(
        listener.auth is not AuthMode.REQUIRED for listener in listeners
    )
    identify, control_headers = sections.identify(
        ctx, root, roster.default_user, anonymous, roster.login_only.keys()
    )
    queue, audit, suppression = sections.state(ctx, root)
    workers = sections.workers(ctx, root)
    metrics = sections.metrics(ctx, root)
    warn_if_policy_exposed(ctx, path.absolute(), bool(logins))
    parts = (platform, listeners, identify, rules, control_headers, keys, upstreams, logins)
    if len(ctx.problems) or None in parts or None in (tenants, queue, audit, workers, suppression):
        return None
    return Policy(
        source=path,
        digest=policy_version(sources.text, sources.files),
        platform=platform,
        listeners=listeners,
        identify=identify,
        classify=rules,
        control_headers=control_headers,
        dkim_keys=keys,
        upstreams=upstreams,
        logins=logins,
        tenants=tenants,
        addresses=MappingProxyType(dict(roster.addresses)),
        queue=queue,
        audit=audit,
        workers=workers,
        run_as=run_as,
        suppression=suppression,
        metrics=metrics,
        sources=sources,
    )


def check_main(path: Path, out: TextIO, err: TextIO) -> int:
    """``relay check``: the problems and a count on ``err`` (exit 78), or one ok line
    (after any warnings on ``err``)."""
    try:
        policy, warnings = _load(path)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        print(f"{path}: {quantity(len(exc.problems), 'problem')}", file=err)
        return EX_CONFIG
    from relay.ingress.filelimit import serve_limit, too_few

    said = too_few(serve_limit())
    if said is not None:  # in the unit's ExecStartPre: the start stops here, and says why
        print(f"{path}: {said}; relay serve would not start", file=err)
        return EX_OSERR
    problems = _state_problems(policy)
    if problems:
        for problem in problems:
            print(problem, file=err)
        print(f"{path}: {quantity(len(problems), 'problem')}", file=err)
        return EX_CONFIG
    for warning in [*warnings, *_state_warnings(policy), *_file_warnings(policy)]:
        print(warning, file=err)
    users = sum(len(tenant.users) for tenant in policy.tenants.values())
    summary = ", ".join(
        (
            f"policy {policy.digest[:12]}",
            quantity(len(policy.tenants), "tenant"),
            quantity(users, "user"),
            quantity(len(policy.classify), "document rule"),
        )
    )
    print(f"{path}: ok ({summary})", file=out)
    return 0


def _state_problems(policy: Policy) -> list[str]:
    """What the state directory holds that keeps ``relay serve`` from starting
    whoever runs it: a suppression list that is not a plain file (a FIFO, whose
    open waited for ever). One this user cannot read is a warning
    (``_state_warnings``): the relay's user may."""
    from relay import statefiles

    if policy.suppression is None:
        return []
    file = policy.suppression.file
    try:
        os.close(statefiles.open_plain(file))
    except statefiles.NotAFile as exc:
        return [
            f"{policy.source}: state_directory: the suppression list {file} is {exc.strerror}:"
            " relay serve would not start (exit 73)"
        ]
    except OSError:
        return []  # none yet is an empty list; one not readable is warned of
    return []


def _state_warnings(policy: Policy) -> list[str]:
    """What the state directory holds that the policy leaves without effect."""
    from relay.suppression import SuppressionError
    from relay.suppression.strays import stray_warning

    try:
        said = stray_warning(policy)
    except SuppressionError as exc:
        said = str(exc)
    return [] if said is None else [f"{policy.source}: warning: {said}"]


def _file_warnings(policy: Policy) -> list[str]:
    """The connection limits the open-files limit ``relay serve`` would run under
    here leaves out of reach: in the unit's ExecStartPre, the unit's."""
    from relay.ingress.filelimit import serve_limit, unreachable

    return [f"{policy.source}: warning: {said}" for said in unreachable(serve_limit(), policy)]
