"""``relay serve``: the daemon's lifecycle around the listeners.

SIGHUP reloads the policy. A broken file never replaces a working policy:
the problems are logged and the old one stays, so ``systemctl reload`` with
a typo does not take mail down. Listener settings are bound into the open
sockets, so changes to them are reported and wait for a restart.

SIGTERM and SIGINT stop accepting at once, let transactions under way
finish for up to ``STOP_GRACE`` seconds (an ERP that got no reply would send
the message again) and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from relay.errors import PolicyError, RelayError
from relay.policy.model import Policy

if TYPE_CHECKING:
    from relay.audit import AuditLog

log = logging.getLogger("relay")

STOP_GRACE = 10.0
AUDIT_UPKEEP = 86400.0
EX_OSERR = 71
EX_CANTCREAT = 73
EX_CONFIG = 78
LOG_FORMAT = "%(asctime)s relay[%(process)d] %(levelname)s %(message)s"


class PolicyHolder:
    """The current policy; swapping one reference is atomic for every reader."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


async def serve(policy_path: Path, ready: Callable[[], None] | None = None) -> int:
    from relay.audit import AuditError, events
    from relay.deliver import attempt
    from relay.engine import Engine
    from relay.ingress import start
    from relay.pipeline import Acceptor
    from relay.policy.load import load
    from relay.record import Recorder, audit_log
    from relay.spool import Spool, SpoolError
    from relay.upstream.pool import close_default_pool

    try:
        policy = load(policy_path)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        log.error("%s: invalid policy, not starting", policy_path)
        return EX_CONFIG
    holder = PolicyHolder(policy)
    try:
        spool = Spool(policy.queue.directory)
        recovered = await asyncio.to_thread(spool.recover)
        audit = audit_log(policy)
        await asyncio.to_thread(audit.maintain)
        audit.append(
            events.policy_loaded(policy_file=str(policy_path), policy_sha256=policy.digest)
        )
    except (SpoolError, AuditError, OSError) as exc:
        log.error("cannot open the state directory: %s", exc)
        return EX_CANTCREAT
    log.info("spool %s: %d messages to deliver", policy.queue.directory, recovered)
    engine = Engine(spool, holder.current, attempt, Recorder(audit))
    acceptor = Acceptor(spool, engine, Recorder(audit))
    try:
        ingress = await start(policy.listeners, holder.current, acceptor.process)
    except ssl.SSLError as exc:
        log.error("cannot load a listener's TLS certificate or key: %s", exc)
        return EX_CONFIG
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return EX_OSERR
    for listener, host, port in ingress.bound():
        log.info("listening on %s (listener %s)", _hostport(host, port), listener.name)
    log.info("policy %s loaded from %s", policy.digest[:12], policy_path)

    loop = asyncio.get_running_loop()
    delivering = loop.create_task(engine.run())
    upkeep = loop.create_task(_audit_upkeep(audit))
    stopping = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        if reloads:
            log.info("SIGHUP: a reload is already running")
            return
        task = loop.create_task(_reload(policy_path, holder, load, audit))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        if ready is not None:
            ready()
        await stopping.wait()
        log.info("stopping: no new connections; waiting up to %gs for transactions", STOP_GRACE)
        await ingress.close(STOP_GRACE)
        await engine.stop(STOP_GRACE)
        await delivering
        await close_default_pool()
        upkeep.cancel()
        audit.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0


async def _reload(
    path: Path, holder: PolicyHolder, load: Callable[[Path], Policy], audit: AuditLog
) -> None:
    from relay.audit import events

    old = holder.policy
    try:
        new = await asyncio.to_thread(load, path)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        log.error("reload failed: keeping policy %s", old.digest[:12])
        return
    except Exception:
        log.exception("reload failed: keeping policy %s", old.digest[:12])
        return
    holder.policy = new
    log.info("policy reloaded: %s (was %s)", new.digest[:12], old.digest[:12])
    record = events.policy_loaded(policy_file=str(path), policy_sha256=new.digest)
    try:
        await asyncio.to_thread(audit.append, record)
    except RelayError as exc:
        log.error("cannot write the audit log: %s", exc)
    changed = sorted({item.name for item in set(new.listeners) ^ set(old.listeners)})
    if changed:
        log.warning(
            "listener settings changed (%s): they take effect after a restart", ", ".join(changed)
        )


async def _audit_upkeep(audit: AuditLog) -> None:
    """Compress closed days and apply retention once a day, as the policy asks."""
    while True:
        await asyncio.sleep(AUDIT_UPKEEP)
        try:
            done = await asyncio.to_thread(audit.maintain)
        except RelayError as exc:
            log.error("audit log upkeep failed: %s", exc)
            continue
        for line in done:
            log.info("audit log: %s", line)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # aiosmtpd logs every command at INFO and its own doubts per connection
    # at WARNING; the relay logs what an operator needs itself.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def run(policy_path: Path) -> int:
    import uvloop

    configure_logging()
    return uvloop.run(serve(Path(policy_path)))
