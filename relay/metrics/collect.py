"""The metrics, computed when Prometheus asks for them.

Messages and outcomes come from the audit log (``relay.metrics.follow``),
the queue from the spool, the list's size from the suppression file, the
free space from the file systems (``statvfs``), all read at the scrape;
only what the audit log does not say (connections, logins, upstream
attempts, the tenants' last hour) is counted by the workers, in memory
they share with this process (``relay.tally``). Names follow
Prometheus's rules (one prefix, base units, ``_total`` on counters) and
Postfix's words for outcomes, which the exporters sysadmins already graph use.
Labels are bounded by the policy: tenants, never users or addresses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import tally
from relay.clocksteps import ClockSteps
from relay.diskwait import DiskWaits
from relay.errors import RelayError
from relay.ingress.diskspace import INODE_RESERVE, free_space, reserve_for
from relay.metrics import follow, status
from relay.metrics.follow import AuditFollower
from relay.policy import tlspair
from relay.policy.model import Policy
from relay.ratelimit import RateCounts
from relay.spool import QueueEntry, Spool
from relay.suppression import SuppressionFile
from relay.tally import Tally

log = logging.getLogger("relay")

K = TypeVar("K", str, tuple[str, str])


def _version() -> str:
    try:
        return metadata.version("erp-relay")
    except metadata.PackageNotFoundError:
        return "unknown"


def waiting(entry: QueueEntry) -> tuple[str, str, int]:
    """What the metrics keep of a queued message: its tenant names its outcomes."""
    return entry.queue_id, entry.tenant, len(entry.pending())


class RelayCollector(Collector):
    """Made before the workers start, so that nothing they do is missed: the
    audit log's end and the queued messages' tenants are taken then, the
    tenants from the records the start's recovery read (reading them again
    took about 2 s for 50,000 queued messages). One scrape at a time: the
    follower keeps state."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        rates: RateCounts,
        counts: Tally,
        records: int = 0,
        disk: DiskWaits | None = None,
        steps: ClockSteps | None = None,
        queued: Iterable[tuple[str, str, int]] | None = None,
    ) -> None:
        """``steps``: the steps of the clock this process sees, so that the oldest
        message's age is the time that passed, as the engine counts its lifetime.
        ``queued``: (queue ID, tenant, recipients left) of the queued messages, as
        the start's recovery read them; read from the spool here without it."""
        self._policy = policy
        self._rates = rates
        self._counts = counts
        self._disk = disk
        self._steps = steps
        now = policy()
        self._spool = Spool(now.queue.directory, create=False)
        if queued is None:
            queued = [waiting(e) for e in self._spool.entries()]
        self._audit = AuditFollower(now.audit.directory, queued)
        self._audit.counts.records = records
        self._suppressions = (
            None if now.suppression is None else SuppressionFile(now.suppression.file)
        )
        self._version = _version()
        self._failing: dict[str, str] = {}  # part -> its error, said once in the log

    def collect(self) -> Iterator[Metric]:
        policy = self._policy()
        yield _info("relay_build", "The relay's version.", version=self._version)
        yield _info(
            "relay_policy", "The policy in use (relay check prints it).", version=policy.digest[:12]
        )
        yield from self._config()
        yield from self._disk_writes()
        yield from self._part("audit log", lambda: self._messages(policy))
        yield from self._part("queue", self._queue)
        yield from self._part("suppression list", self._suppression)
        yield from self._free_space(policy)
        yield from self._reserves(policy)
        yield from self._limits(policy)
        yield from self._smtp(policy)
        yield from self._certificates(policy)
        yield from self._upstreams(policy)

    def _part(self, name: str, families: Callable[[], Iterator[Metric]]) -> Iterator[Metric]:
        """A part that cannot be read is left out of the scrape, not the rest with it:
        the relay refusing mail because its list is unreadable is when the
        other counts matter most. Its error is logged when it begins or changes."""
        try:
            found = list(families())
        except (RelayError, OSError) as exc:
            self._left_out(name, exc)
            return
        self._read_again(name)
        yield from found

    def _left_out(self, name: str, error: Exception) -> None:
        if self._failing.get(name) != str(error):
            log.warning("metrics: the %s is left out: %s", name, error)
        self._failing[name] = str(error)

    def _read_again(self, name: str) -> None:
        if self._failing.pop(name, None) is not None:
            log.info("metrics: the %s is read again", name)

    def _config(self) -> Iterator[Metric]:
        state = status.STATUS
        yield GaugeMetricFamily(
            "relay_config_last_reload_successful",
            "1 if the last reload (or the start) loaded the policy, 0 if it kept the old one.",
            value=1 if state.reload_ok else 0,
        )
        yield GaugeMetricFamily(
            "relay_config_last_reload_success_timestamp_seconds",
            "When the policy in use was loaded.",
            value=state.reload_success_at,
        )
        running = GaugeMetricFamily(
            "relay_workers", "Worker processes, running and as configured.", labels=["state"]
        )
        running.add_metric(["running"], state.workers_running)
        running.add_metric(["configured"], state.workers_expected)
        yield running
        yield CounterMetricFamily(
            "relay_worker_restarts",
            "Worker processes that ended while the relay ran, each started again.",
            value=state.worker_restarts,
        )

    def _disk_writes(self) -> Iterator[Metric]:
        waiting = None if self._disk is None else self._disk.longest()
        yield GaugeMetricFamily(
            "relay_disk_write_waiting_seconds",
            "How long the oldest write to the disk (fsync) in progress has waited; 0: none.",
            value=0.0 if waiting is None else waiting.seconds(time.monotonic_ns()),
        )

    def _messages(self, policy: Policy) -> Iterator[Metric]:
        """Every tenant and signing key of the policy has its series from the start,
        at 0, and so has ``unknown`` where an outcome can fall to it: Prometheus's
        ``increase()`` takes the value a series first appears with for its start, so
        the first bounces of a batch after a start (or a reload that added the
        tenant) never counted towards an alert."""
        counts = self._audit.update()
        received = CounterMetricFamily(
            "relay_messages_received",
            "Messages accepted (answered 250), by tenant.",
            labels=["tenant"],
        )
        tenants = sorted(policy.tenants)
        for tenant in _with(tenants, counts.received):
            received.add_metric([tenant], counts.received[tenant])
        yield received
        signatures = CounterMetricFamily(
            "relay_dkim_signatures",
            "DKIM signatures on accepted messages, by signing domain and selector.",
            labels=["domain", "selector"],
        )
        keys = [(key.domain, key.selector) for key in policy.dkim_keys]
        for domain, selector in _with(keys, counts.signatures):
            signatures.add_metric([domain, selector], counts.signatures[(domain, selector)])
        yield signatures
        # an outcome's message may be known no longer; a received record names its tenant
        owners = [*tenants, follow.UNKNOWN]
        rejected = CounterMetricFamily(
            "relay_messages_rejected",
            "Messages refused at the end of DATA by the policy, by reply class.",
            labels=["class"],
        )
        for reply_class in ("4xx", "5xx"):
            rejected.add_metric([reply_class], counts.rejected[reply_class])
        yield rejected
        deliveries = CounterMetricFamily(
            "relay_deliveries",
            "Recipients' outcomes, by tenant and Postfix's status word"
            " (sent, deferred, bounced, expired, suppressed).",
            labels=["tenant", "status"],
        )
        every = [(t, word) for t in owners for word in follow.DELIVERY_STATUS.values()]
        for tenant, word in _with(every, counts.deliveries):
            deliveries.add_metric([tenant, word], counts.deliveries[(tenant, word)])
        yield deliveries
        for name, doc, counter in (
            (
                "relay_bounces",
                "Bounces that came back after delivery (relay bounce).",
                counts.bounces,
            ),
            (
                "relay_complaints",
                "Spam complaints (ARF reports) taken by relay bounce.",
                counts.complaints,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["tenant"])
            for tenant in _with(owners, counter):
                family.add_metric([tenant], counter[tenant])
            yield family
        yield CounterMetricFamily(
            "relay_audit_records", "Audit records written since the start.", value=counts.records
        )

    def _queue(self) -> Iterator[Metric]:
        came = None if self._steps is None else self._steps.arrival
        waiting = self._spool.waiting(time.time(), came)
        for name, doc, field in (
            ("relay_queue_messages", "Messages in the queue.", "count"),
            ("relay_queue_bytes", "Size of the queue's files.", "size"),
            (
                "relay_queue_oldest_message_age_seconds",
                "Age of the oldest message in the queue (0 when empty).",
                "oldest",
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=["queue"])
            for state, found in waiting.items():
                family.add_metric([state], getattr(found, field))
            yield family

    def _suppression(self) -> Iterator[Metric]:
        if self._suppressions is None:
            return
        yield GaugeMetricFamily(
            "relay_suppression_list_entries",
            "Addresses on the suppression list (per tenant they are listed for).",
            value=len(self._suppressions.current()),
        )

    def _free_space(self, policy: Policy) -> Iterator[Metric]:
        """Read at the scrape, a ``statvfs`` a directory: an alert can fire before
        mail is refused, which ``relay_smtp_insufficient_storage_total`` shows only
        once it is. Labelled with the mount point, as the spool and the audit log
        mostly share one file system, and its space is not twice as much. Each
        directory is read on its own: one gone took the other's reading with it."""
        labels = ["directory", "mountpoint"]
        free = GaugeMetricFamily(
            "relay_filesystem_free_bytes",
            "Bytes the relay may still write on the file system of its queue or audit log.",
            labels=labels,
        )
        inodes = GaugeMetricFamily(
            "relay_filesystem_free_inodes",
            "Free inodes of the file system of the relay's queue or audit log.",
            labels=labels,
        )
        for name, directory in (
            ("queue", policy.queue.directory),
            ("audit", policy.audit.directory),
        ):
            part = f"free space of the {name} directory"
            try:
                room, files = free_space(directory)
                where = [name, _mount_point(directory)]
            except OSError as exc:
                self._left_out(part, exc)
                continue
            self._read_again(part)
            free.add_metric(where, room)
            if files is not None:  # a file system keeping no count runs out of none
                inodes.add_metric(where, files)
        yield free
        yield inodes

    def _reserves(self, policy: Policy) -> Iterator[Metric]:
        """What the free space is compared with: under a listener's reserve, its
        MAIL commands get ``452 4.3.1``."""
        reserve = GaugeMetricFamily(
            "relay_filesystem_reserve_bytes",
            "Free bytes under which a listener refuses mail (452 4.3.1): 1.5 times its"
            " max_message_size, 1 MiB at least.",
            labels=["listener"],
        )
        for listener in sorted(policy.listeners, key=lambda x: x.name):
            reserve.add_metric([listener.name], reserve_for(listener.max_message_size))
        yield reserve
        yield GaugeMetricFamily(
            "relay_filesystem_reserve_inodes",
            "Free inodes under which every listener refuses mail (452 4.3.1).",
            value=INODE_RESERVE,
        )

    def _limits(self, policy: Policy) -> Iterator[Metric]:
        """Read from the workers' shared counts: each tenant's hour, and how close a
        limited one is to its limit."""
        limited = sorted((t.id, t.recipients_per_hour) for t in policy.tenants.values())
        sent = GaugeMetricFamily(
            "relay_tenant_recipients_last_hour",
            "Recipients of a tenant's accepted mail in the last 60 minutes.",
            labels=["tenant"],
        )
        limit = GaugeMetricFamily(
            "relay_tenant_recipients_per_hour_limit",
            "A tenant's recipients_per_hour.",
            labels=["tenant"],
        )
        now = time.monotonic()  # the workers count on it (``pipeline.Acceptor``)
        for tenant, per_hour in limited:
            sent.add_metric([tenant], self._rates.sent(tenant, now))
            if per_hour is not None:
                limit.add_metric([tenant], per_hour)
        yield sent
        yield limit

    def _smtp(self, policy: Policy) -> Iterator[Metric]:
        """The listeners' sessions, as the workers counted them."""
        names = sorted(listener.name for listener in policy.listeners)
        for family, doc, key, label, values in (
            ("relay_smtp_connections", "Connections clients made.", tally.CONNECTION, "", ("",)),
            (
                "relay_smtp_connections_refused",
                "Connections refused at once: not in the allow list, too many open.",
                tally.REFUSED,
                "reason",
                tally.REFUSED_REASONS,
            ),
            (
                "relay_smtp_connections_dropped",
                "Sessions the relay ended with a 421: idle too long, too many errors.",
                tally.DROPPED,
                "reason",
                tally.DROPPED_REASONS,
            ),
            (
                "relay_smtp_auth",
                "AUTH attempts: ok, failed (a 535), locked (refused after too many failures).",
                tally.AUTH,
                "result",
                tally.AUTH_RESULTS,
            ),
            (
                "relay_smtp_insufficient_storage",
                "MAIL commands and messages refused with 452 4.3.1: too little free space.",
                tally.NO_ROOM,
                "",
                ("",),
            ),
            (
                "relay_smtp_tls_handshake_failures",
                "TLS handshakes that failed, after STARTTLS or on a listener of implicit TLS.",
                tally.TLS_FAILED,
                "",
                ("",),
            ),
        ):
            labels = ["listener", label] if label else ["listener"]
            counts = CounterMetricFamily(family, doc, labels=labels)
            for name in names:
                for value in values:
                    asked = (key, name, value) if label else (key, name)
                    counts.add_metric([name, value][: len(labels)], self._counts.total(*asked))
            yield counts

    def _certificates(self, policy: Policy) -> Iterator[Metric]:
        """Each listener's certificate as the relay serves it (a reload keeps a valid
        one in place of one clients would refuse), for an alert weeks ahead."""
        family = GaugeMetricFamily(
            "relay_tls_certificate_expiry_timestamp_seconds",
            "When a listener's TLS certificate stops being valid (its notAfter).",
            labels=["listener"],
        )
        for listener in policy.listeners:
            ends = None if listener.tls is None else tlspair.not_after(listener.tls)
            if ends is not None:
                family.add_metric([listener.name], ends.timestamp())
        yield family

    def _upstreams(self, policy: Policy) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            "relay_upstream_attempts",
            "Delivery attempts by upstream: sent (taken for someone), deferred, refused.",
            labels=["upstream", "result"],
        )
        held = GaugeMetricFamily(
            "relay_upstream_suspended",
            "Worker processes holding back mail for the upstream: they could not use it, and"
            " no attempt has reached it since.",
            labels=["upstream"],
        )
        under_way = GaugeMetricFamily(
            "relay_upstream_attempts_in_progress",
            "Delivery attempts at the upstream begun and not ended yet, in all workers.",
            labels=["upstream"],
        )
        for name in sorted(policy.upstreams):
            for result in tally.UPSTREAM_RESULTS:
                counts.add_metric([name, result], self._counts.total(tally.UPSTREAM, name, result))
            held.add_metric([name], self._counts.holding(name))
            under_way.add_metric([name], self._counts.under_way(name))
        yield counts
        yield held
        yield under_way


def _with(zeros: Iterable[K], counted: Iterable[K]) -> list[K]:
    """The keys served: those to show at 0, and any counted besides (``unknown``, a
    tenant a reload removed)."""
    return sorted({*zeros, *counted})


def _mount_point(directory: Path) -> str:
    """Where the directory's file system is mounted: the last parent on its device."""
    path = directory.resolve()
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return str(path)


def _info(name: str, doc: str, **labels: str) -> Metric:
    family = GaugeMetricFamily(f"{name}_info", doc, labels=list(labels))
    family.add_metric(list(labels.values()), 1)
    return family
