"""The alert rules docs/metrics.md suggests, against a real relay scraped over
loopback: each series a rule's ``increase()`` reads is there from the start
(Prometheus takes a series' first value as its start, so an event that made
the series was never counted), a full disk and a worker that died show, and
every rule is one Prometheus loads."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
from pathlib import Path

import pytest
import yaml

from relay.audit import AuditError
from relay.errors import SmtpReply
from relay.ingress.diskspace import INODE_RESERVE
from relay.ingress.handler import _out_of_space
from relay.policy.load import load
from relay.spool import SpoolError
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_metrics import _get, _metrics_policy, _samples, _value, _workers

DOC = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
RULES = re.search(r"```yaml\n(groups:\n.*?)```", DOC, re.DOTALL)
SCRAPE = re.search(r"```yaml\n# prometheus.yml\n(.*?)```", DOC, re.DOTALL)
STATUSES = ("sent", "deferred", "bounced", "expired", "suppressed")
INITECH = """  initech:
    name: Initech
    address: info@initech.example
    upstream: default
    verified_domains: [initech.example]
    users:
      peter:
        name: Peter Gibbons
        address: peter@initech.example
"""

SIGNING_KEYS = (("platform.example", "s1"), ("platform.example", "e1"), ("globex.example", "g1"))
INITECH_KEY = """    - domain: initech.example
      selector: i1
      algorithm: rsa
      key_file: keys/globex.example.g1.private
"""


def _rules() -> list[dict]:
    assert RULES is not None
    return [rule for group in yaml.safe_load(RULES.group(1))["groups"] for rule in group["rules"]]


def _has(samples: dict, name: str, **labels: str) -> bool:
    return (name, tuple(sorted(labels.items()))) in samples


def test_each_tenant_has_its_series_at_zero_from_the_start_and_after_a_reload(
    policy_file: Path, tmp_path: Path
) -> None:
    """25 bounces within one scrape interval after a start never raised the
    suggested RelayBouncing: the series appeared with them, at 25."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            wait_for(lambda: f"metrics on http://127.0.0.1:{metrics}/metrics" in relay.log())
            start = _samples(metrics)
            for tenant in ("acme", "globex"):
                for name in ("received", "bounces", "complaints"):
                    family = f"relay_{'messages_' if name == 'received' else ''}{name}_total"
                    assert _has(start, family, tenant=tenant), (family, tenant)
                    assert _value(start, family, tenant=tenant) == 0
                for status in STATUSES:
                    assert _has(start, "relay_deliveries_total", tenant=tenant, status=status)
                    assert (
                        _value(start, "relay_deliveries_total", tenant=tenant, status=status) == 0
                    )
            for status in STATUSES:  # an outcome of a message ended before the start
                assert _has(start, "relay_deliveries_total", tenant="unknown", status=status)
            for family in ("relay_bounces_total", "relay_complaints_total"):
                assert _has(start, family, tenant="unknown")
            unknown = [
                value for (_, labels), value in start.items() if ("tenant", "unknown") in labels
            ]
            assert unknown and not any(unknown)
            assert not _has(start, "relay_messages_received_total", tenant="unknown")

            policy.write_text(policy.read_text().replace("tenants:\n", "tenants:\n" + INITECH, 1))
            relay.signal(signal.SIGHUP)
            wait_for(lambda: "policy reloaded" in relay.log())
            again = _samples(metrics)
            assert _has(again, "relay_deliveries_total", tenant="initech", status="bounced")
            assert _has(again, "relay_messages_received_total", tenant="initech")


def test_each_signing_key_has_its_series_at_zero_from_the_start_and_after_a_reload(
    policy_file: Path, tmp_path: Path
) -> None:
    """A key's first signatures made its series, so ``increase()`` never counted
    them, and an alert on a key whose count stops saw nothing stop."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            start = _samples(metrics)
            for domain, selector in SIGNING_KEYS:
                signed = {"domain": domain, "selector": selector}
                assert _has(start, "relay_dkim_signatures_total", **signed), signed
                assert _value(start, "relay_dkim_signatures_total", **signed) == 0

            text = policy.read_text().replace("\nupstreams:\n", f"\n{INITECH_KEY}upstreams:\n", 1)
            policy.write_text(text)
            relay.signal(signal.SIGHUP)
            wait_for(lambda: "policy reloaded" in relay.log())
            again = _samples(metrics)
            added = {"domain": "initech.example", "selector": "i1"}
            assert _has(again, "relay_dkim_signatures_total", **added)
            assert _value(again, "relay_dkim_signatures_total", **added) == 0


def _taking_a_tebibyte(policy_file: Path, port: int, sink_port: int, metrics: int) -> Path:
    """The metrics policy with its listener taking messages of up to 1 TiB: it
    keeps 1.5 TiB free, more than any test disk has, so it refuses for space."""
    policy = _metrics_policy(policy_file, port, sink_port, metrics, workers=2)
    text = policy.read_text()
    policy.write_text(
        text.replace(f"port: {port}\n", f"port: {port}\n    max_message_size: {2**40}\n", 1)
    )
    return policy


def test_mail_refused_for_want_of_space_is_counted(policy_file: Path, tmp_path: Path) -> None:
    """A listener taking messages of up to 1 TiB keeps 1.5 TiB free, more than
    this disk has: /readyz said 503 and every MAIL got 452, and no metric moved."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _taking_a_tebibyte(policy_file, port, sink.port, metrics)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            start = _samples(metrics)
            assert _has(start, "relay_smtp_insufficient_storage_total", listener="local")
            for _ in range(3):
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                    client.ehlo()
                    assert client.mail("jan@acme.example")[0] == 452
            after = _samples(metrics)
            assert _value(after, "relay_smtp_insufficient_storage_total", listener="local") == 3
            assert _value(after, "relay_messages_rejected_total", **{"class": "4xx"}) == 0


def _df(directory: Path) -> tuple[str, int, int | None]:
    """Mount point, free bytes and free inodes as df reads them (None: no count)."""
    done = subprocess.run(
        ["df", "--output=target,avail,iavail", "-B1", str(directory)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    target, avail, iavail = done.stdout.splitlines()[-1].split()
    return target, int(avail), None if iavail == "-" else int(iavail)


def test_the_free_space_is_served_with_the_reserve_mail_is_refused_under(
    policy_file: Path, tmp_path: Path
) -> None:
    """Nothing let an alert fire before mail was refused for want of space: the
    spool's and the audit log's free space are served beside each listener's
    reserve, and a listener whose reserve is over the free space refuses."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _taking_a_tebibyte(policy_file, port, sink.port, metrics)
        state = load(policy)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            samples = _samples(metrics)
            reserve = _value(samples, "relay_filesystem_reserve_bytes", listener="local")
            assert reserve == 2**40 * 3 // 2
            assert _value(samples, "relay_filesystem_reserve_inodes") == INODE_RESERVE
            for name, directory in (
                ("queue", state.queue.directory),
                ("audit", state.audit.directory),
            ):
                mountpoint, avail, iavail = _df(directory)
                where = {"directory": name, "mountpoint": mountpoint}
                free = samples[("relay_filesystem_free_bytes", tuple(sorted(where.items())))]
                assert abs(free - avail) < 256 << 20 and free < reserve
                inodes = samples.get(("relay_filesystem_free_inodes", tuple(sorted(where.items()))))
                if iavail is None:
                    assert inodes is None
                else:
                    assert inodes is not None and abs(inodes - iavail) < 10_000
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.ehlo()
                assert client.mail("jan@acme.example")[0] == 452
    assert RULES is not None
    assert set(re.findall(r"relay_filesystem_\w+", RULES.group(1))) <= {n for n, _ in samples}


def test_a_directory_that_cannot_be_read_takes_only_its_own_free_space_out(
    policy_file: Path, tmp_path: Path
) -> None:
    """With the audit directory gone, the queue's free space went out of the
    scrape with it, and no space alert could fire for either."""
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        audit = load(policy).audit.directory
        log = tmp_path / "relay.log"
        with RelayProcess(policy, port, log):
            audit.rename(audit.with_name("audit.away"))
            try:
                served = {dict(labels).get("directory") for name, labels in _samples(metrics)
                          if name == "relay_filesystem_free_bytes"}  # fmt: skip
            finally:
                audit.with_name("audit.away").rename(audit)
        assert served == {"queue"}
        assert "metrics: the free space of the audit directory is left out" in log.read_text()


def test_a_worker_that_died_is_counted(policy_file: Path, tmp_path: Path) -> None:
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            start = _samples(metrics)
            assert _has(start, "relay_worker_restarts_total")
            assert _value(start, "relay_worker_restarts_total") == 0
            os.kill(_workers(relay)[0], signal.SIGKILL)
            wait_for(lambda: _value(_samples(metrics), "relay_worker_restarts_total") == 1)
            wait_for(lambda: _get(metrics, "/readyz")[0] == 200)
            assert _value(_samples(metrics), "relay_worker_restarts_total") == 1
            # a counter: each death adds one, for increase() over the alert's window
            os.kill(_workers(relay)[-1], signal.SIGKILL)
            wait_for(lambda: _value(_samples(metrics), "relay_worker_restarts_total") == 2)


def _selectors(expr: str) -> list[tuple[str, dict[str, list[str]]]]:
    """What each ``increase()`` of a rule reads: the metric, and each label's values."""
    found = []
    for name, matchers in re.findall(r"increase\((\w+)(?:\{([^}]*)\})?\[", expr):
        wanted = {
            label: values.split("|")
            for label, values in re.findall(r'(\w+)=~?"([^"]*)"', matchers or "")
        }
        found.append((name, wanted))
    return found


def test_what_each_suggested_rule_increases_is_there_from_the_start(
    policy_file: Path, tmp_path: Path
) -> None:
    rules = _rules()
    read = [found for rule in rules for found in _selectors(rule["expr"])]
    assert {name for name, _ in read} >= {
        "relay_deliveries_total", "relay_smtp_insufficient_storage_total",
        "relay_worker_restarts_total",
    }  # fmt: skip
    with SinkServer(Sink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=2)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            start = _samples(metrics)
    for name, wanted in read:
        served = [dict(labels) for sample, labels in start if sample == name]
        assert served, name
        for label, values in wanted.items():
            for value in values:
                assert any(labels.get(label) == value for labels in served), (name, label, value)


def test_the_relay_being_gone_is_a_rule_on_the_scrape_configs_job() -> None:
    assert SCRAPE is not None
    job = yaml.safe_load(SCRAPE.group(1))["scrape_configs"][0]["job_name"]
    assert any(rule["expr"].strip() == f'up{{job="{job}"}} == 0' for rule in _rules())
    failing = next(rule for rule in _rules() if rule["alert"] == "RelayUpstreamFailing")
    assert "relay_upstream_suspended" in failing["expr"]
    assert "deferred" not in failing["expr"]  # a full mailbox retried at night paged


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_prometheus_loads_the_suggested_rules(tmp_path: Path) -> None:
    assert RULES is not None
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES.group(1))
    done = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _fires(
    tmp_path: Path, alert: str, series: dict[str, str], annotations: dict[str, str] | None = None
) -> None:
    """``promtool test rules``: the suggested ``alert`` fires at 5 minutes, for
    ``instance="r:1"``, on ``series`` (each its values, one a minute)."""
    fired: dict[str, object] = {"exp_labels": {"instance": "r:1", "job": "erp-relay"}}
    if annotations:
        fired["exp_annotations"] = annotations
    assert RULES is not None
    (tmp_path / "rules.yml").write_text(RULES.group(1))
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": alert,
                        "exp_alerts": [fired],
                    }
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    done = subprocess.run(
        ["promtool", "test", "rules", "test.yml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_a_worker_missing_for_minutes_fires_its_alert(tmp_path: Path) -> None:
    """The two sides of the comparison differ in ``state``: matched one to one on
    every label, they paired nothing, and the rule never fired, however long a
    worker stayed down (``promtool check rules`` took it)."""
    series = 'relay_workers{{instance="r:1", job="erp-relay", state="{}"}}'
    _fires(
        tmp_path,
        "RelayWorkersMissing",
        {series.format("running"): "1x10", series.format("configured"): "2x10"},
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_mail_an_hour_old_and_not_tried_yet_fires_the_old_queue_alert(tmp_path: Path) -> None:
    """It read the deferred queue only: the backlog of an upstream that answers,
    slowly, is never deferred, and 5,000 messages waited two hours unseen."""
    series = 'relay_queue_oldest_message_age_seconds{{instance="r:1", job="erp-relay", queue="{}"}}'
    _fires(
        tmp_path,
        "RelayQueueOld",
        {series.format("active"): "4000+60x10", series.format("deferred"): "0x10"},
        {"summary": "mail has waited over an hour: relay queue list"},
    )


def test_a_write_that_finds_the_disk_full_counts_as_refused_for_want_of_space() -> None:
    """Past the reserve's check, the spool or the audit log may still run out as
    the message is written: that 452 4.3.1 was counted nowhere."""
    disk_full = SpoolError(Path("spool/msg/X"), "No space left on device")
    for cause in (disk_full, AuditError("audit log: No space left on device")):
        try:
            raise SmtpReply(452, "4.3.1", "Insufficient system storage") from cause
        except SmtpReply as refused:
            assert _out_of_space(refused)
    upstreams = SmtpReply(452, "4.3.1", "Upstream's own disk is full")  # passed back, not ours
    assert not _out_of_space(upstreams)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_a_write_to_the_disk_waiting_fires_the_disk_alert(tmp_path: Path) -> None:
    """A hung disk held every client's 250 back and nothing alerted."""
    series = 'relay_disk_write_waiting_seconds{instance="r:1", job="erp-relay"}'
    _fires(
        tmp_path,
        "RelayDiskNotAnswering",
        {series: "0 0 0 40 100 160 220 280"},
        {
            "summary": "a write to the relay's disk has not finished for 30s: the ERPs wait"
            " for their replies; journalctl -u erp-relay names the process and the directory"
        },
    )
