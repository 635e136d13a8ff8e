"""The counts only a worker sees: connections made and refused, sessions dropped,
logins, STARTTLS handshakes, upstream attempts. A real relay with two workers,
real clients and a sink on loopback; each count must be exact, whichever
worker the kernel gave each connection to."""

from __future__ import annotations

import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography import x509

from relay import tally
from relay.deliver import counted, result
from relay.engine import Attempt
from relay.ingress.authlimit import PER_LOGIN
from relay.policy.model import DirectoryUpstream
from relay.tally import Tally
from tests.certs import make_certs
from tests.ingress_harness import Raw
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port
from tests.test_auth_limit import plain
from tests.test_metrics import _metrics_policy, _samples, _value
from tests.test_queue_e2e import send

GONE = "gone@example.org"
CONNECTIONS = 10  # the local listener's max_connections_per_client


def test_each_worker_adds_to_its_row_and_the_reader_sums_them() -> None:
    counts = Tally(2)
    first, second = counts.row(0), counts.row(1)
    first.add(tally.AUTH, "local", "failed")
    first.add(tally.AUTH, "local", "failed")
    second.add(tally.AUTH, "local", "failed")
    second.add(tally.AUTH, "submission", "failed")
    assert counts.total(tally.AUTH, "local", "failed") == 3
    assert counts.total(tally.AUTH, "submission", "failed") == 1
    assert counts.total(tally.AUTH, "local", "ok") == 0
    counts.row(0).add(tally.AUTH, "local", "failed")  # a replacement worker goes on from there
    assert counts.total(tally.AUTH, "local", "failed") == 4


def test_an_attempt_is_sent_when_someone_took_it_refused_when_everyone_refused_it() -> None:
    assert result(Attempt({"a@x": (250, "250 ok"), "b@x": (550, "550 no")})) == "sent"
    assert result(Attempt({"a@x": (550, "550 no"), "b@x": (553, "553 no")})) == "refused"
    assert result(Attempt({"a@x": (550, "550 no"), "b@x": (451, "451 later")})) == "deferred"
    assert result(Attempt({"a@x": (451, "451 4.4.1 Upstream unreachable")})) == "deferred"


async def test_only_an_attempt_that_reached_its_upstream_lets_another_workers_mail_go() -> None:
    """A worker holding an upstream's mail lets it go when another worker's attempt
    reaches the upstream; one that found it unusable too is no such news."""
    counts = Tally(2)
    holding, other = counts.row(0), counts.row(1)
    down = "451 4.4.1 Upstream smarthost: connection refused (connecting)"
    answers = [Attempt({"a@x": (451, down)}, unreachable=down), Attempt({"a@x": (250, "250 ok")})]

    async def send(*args: object, **kwargs: object) -> Attempt:
        return answers.pop(0)

    smarthost = DirectoryUpstream(name="smarthost", path=Path("unused"))
    holding.suspended("smarthost", True)
    time.sleep(0.002)  # the attempts begin after the hold, on a clock counted in ms
    await counted(send, other)(smarthost)
    assert not holding.reached_since_held("smarthost")
    await counted(send, other)(smarthost)
    assert holding.reached_since_held("smarthost")


def _policy(policy_file: Path, tmp_path: Path, ports: dict[str, int], sink: int) -> Path:
    certs = make_certs(tmp_path / "tls")
    theirs = make_certs(tmp_path / "tls-partners", days=2)  # an expiry of its own
    path = _metrics_policy(policy_file, ports["local"], sink, ports["metrics"], workers=2)
    text = path.read_text()
    local = f"    port: {ports['local']}\n    auth: optional\n"
    assert local in text
    listeners = (
        f"{local}    max_connections_per_client: {CONNECTIONS}\n"
        f"    tls: {{cert: {certs.cert}, key: {certs.key}}}\n"
        f"  - name: partners\n    address: 127.0.0.1\n    port: {ports['partners']}\n"
        "    allow: [192.0.2.0/24]\n"
        f"    tls: {{cert: {theirs.cert}, key: {theirs.key}}}\n"
        f"  - name: idle\n    address: 127.0.0.1\n    port: {ports['idle']}\n"
        "    idle_timeout: 1\n    max_connections: 1\n"
    )
    down = (
        f"  down:\n    type: smtp\n    host: 127.0.0.1\n    port: {ports['closed']}\n"
        "    tls: none\n    timeout: 2\n"
    )
    text = text.replace(local, listeners).replace("upstreams:\n", "upstreams:\n" + down)
    text = text.replace(
        "    upstream: default\n    verified_domains", "    upstream: down\n    verified_domains"
    )
    path.write_text(text)
    return path


def _auth(port: int, password: str) -> str:
    with Raw(port) as raw:
        raw.ehlo()
        return raw.cmd(plain("erp-acme", password))


def test_what_the_sessions_and_the_attempts_came_to_is_counted(
    policy_file: Path, tmp_path: Path
) -> None:
    gone = "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown"
    with SinkServer(Sink(refuse={GONE: gone})) as sink:
        ports = {name: free_port() for name in ("local", "partners", "idle", "metrics")}
        ports["closed"] = free_port()
        policy = _policy(policy_file, tmp_path, ports, sink.port)
        local = ports["local"]
        with RelayProcess(policy, local, tmp_path / "relay.log") as relay:
            wait_for(lambda: f"on http://127.0.0.1:{ports['metrics']}/metrics" in relay.log())

            def counted() -> dict:
                return _samples(ports["metrics"])

            probes = _value(counted(), "relay_smtp_connections_total", listener="local")
            made = 0  # connections to the local listener since: the start's probes were before

            held = [Raw(local) for _ in range(CONNECTIONS)]  # first: none ending meanwhile
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=10) as one_more:
                    assert one_more.recv(512).startswith(b"421 4.7.0 Too many connections")
            finally:
                for raw in held:
                    raw.sock.close()
            made += CONNECTIONS + 1

            send(local, rcpts=("ok@example.org",))
            send(local, rcpts=(GONE,))
            with Raw(local) as raw:  # globex's own upstream is down
                raw.envelope(b"hank@globex.example")
                assert raw.cmd(b"DATA").startswith("354")
                assert raw.cmd(b"Subject: hello\r\n\r\nhello\r\n.").startswith("250")
            made += 3

            assert _auth(local, "demo-password").startswith("235 ")
            with ThreadPoolExecutor(3) as pool:  # well below the limit of open connections
                failed = list(pool.map(_auth, [local] * PER_LOGIN, ["guess"] * PER_LOGIN))
            assert all(reply.startswith("535 ") for reply in failed), failed
            assert _auth(local, "demo-password").startswith("454 ")
            made += PER_LOGIN + 2

            with Raw(local) as raw:
                raw.ehlo()
                for _ in range(30):
                    reply = raw.cmd(b"RCPT TO:<one@example.org>")  # 503: no MAIL yet
                    if reply.startswith("421"):
                        break
                assert reply.startswith("421 4.7.0 Too many errors"), reply
            with Raw(local) as raw:
                raw.ehlo()
                assert raw.cmd(b"STARTTLS").startswith("220")
                raw.send(b"EHLO client.example\r\n")  # not a TLS handshake
                assert raw.sock.recv(512) == b""
            made += 2

            for _ in range(20):  # reset at once: nobody was refused
                with socket.create_connection(("127.0.0.1", local), timeout=10) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            made += 20

            with socket.create_connection(("127.0.0.1", ports["partners"]), timeout=10) as sock:
                assert sock.recv(512).startswith(b"554 5.7.1 Client 127.0.0.1 is not allowed")
            with Raw(ports["idle"]) as raw:
                with socket.create_connection(("127.0.0.1", ports["idle"]), timeout=10) as second:
                    assert (
                        second.recv(512) == b"421 4.3.2 Too many connections, try again later\r\n"
                    )
                assert raw.line().startswith(b"421 4.4.2 ")

            def attempts(upstream: str, outcome: str) -> float:
                return _value(counted(), "relay_upstream_attempts_total", upstream=upstream,
                              result=outcome)  # fmt: skip

            wait_for(lambda: attempts("default", "sent") >= 2)  # ok@, and jan's notice
            wait_for(lambda: attempts("default", "refused") >= 1)
            wait_for(lambda: attempts("down", "deferred") >= 1)
            wait_for(lambda: "TLS handshake failed" in relay.log())
            wait_for(lambda: "disconnected after CONNECT: 421 4.4.2" in relay.log())
            now = counted()
            assert "refused client=None" not in relay.log()

    def value(name: str, **labels: str) -> float:
        return _value(now, f"relay_smtp_{name}_total", **labels)

    assert value("connections", listener="local") == probes + made
    assert value("connections", listener="partners") == 1
    assert value("connections", listener="idle") == 2
    refused = {
        (listener, reason): value("connections_refused", listener=listener, reason=reason)
        for listener in ("local", "partners", "idle")
        for reason in tally.REFUSED_REASONS
    }
    assert refused == {
        ("local", "not_allowed"): 0,
        ("local", "too_many"): 0,
        ("local", "too_many_from_client"): 1,
        ("local", "out_of_files"): 0,
        ("partners", "not_allowed"): 1,
        ("partners", "too_many"): 0,
        ("partners", "too_many_from_client"): 0,
        ("partners", "out_of_files"): 0,
        ("idle", "not_allowed"): 0,
        ("idle", "too_many"): 1,
        ("idle", "too_many_from_client"): 0,
        ("idle", "out_of_files"): 0,
    }
    assert value("connections_dropped", listener="local", reason="errors") == 1
    assert value("connections_dropped", listener="local", reason="timeout") == 0
    assert value("connections_dropped", listener="idle", reason="timeout") == 1
    assert value("auth", listener="local", result="ok") == 1
    assert value("auth", listener="local", result="failed") == PER_LOGIN
    assert value("auth", listener="local", result="locked") == 1
    assert value("tls_handshake_failures", listener="local") == 1
    expiry = "relay_tls_certificate_expiry_timestamp_seconds"
    for listener, tls in (("local", "tls"), ("partners", "tls-partners")):  # each its own
        cert = x509.load_pem_x509_certificate((tmp_path / tls / "server.pem").read_bytes())
        assert _value(now, expiry, listener=listener) == cert.not_valid_after_utc.timestamp()
    assert (expiry, (("listener", "idle"),)) not in now  # no TLS there: no sample
    assert _value(now, "relay_upstream_attempts_total", upstream="default", result="sent") == 2
    assert _value(now, "relay_upstream_attempts_total", upstream="default", result="refused") == 1
    assert _value(now, "relay_upstream_attempts_total", upstream="down", result="sent") == 0
