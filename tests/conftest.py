"""Fixtures shared by the tests: a policy directory with real DKIM keys,
upstreams with and without PIPELINING, and for the delivery engine's tests a
spool and a policy that delivers into a directory (modules may define their
own ``spool`` or ``policy``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from relay.keygen import generate
from relay.policy.model import DkimAlgorithm, Policy
from relay.spool import Spool
from relay.upstream import pipelining as pipelined_transaction
from tests import minimal_policy

if TYPE_CHECKING:
    from tests.relayproc import RelayProcess
    from tests.sink import SinkServer

DATA = Path(__file__).parent / "data"
KEYS = (
    ("platform.example", "s1", DkimAlgorithm.RSA),
    ("platform.example", "e1", DkimAlgorithm.ED25519),
    ("globex.example", "g1", DkimAlgorithm.RSA),
)


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Keys are slow to make; one set serves the whole session."""
    directory = tmp_path_factory.mktemp("keys")
    records = {}
    for domain, selector, algorithm in KEYS:
        _, record = generate(domain, selector, algorithm, directory)
        records[f"{selector}._domainkey.{domain}"] = _txt_value(record)
    return directory, records


def _txt_value(record: str) -> str:
    """The TXT value from a zone-file record: the quoted strings joined."""
    parts = record.split('"')[1::2]
    return "".join(parts)


@pytest.fixture
def policy_file(tmp_path: Path, key_dir: tuple[Path, dict[str, str]]) -> Path:
    shutil.copytree(key_dir[0], tmp_path / "keys")
    path = tmp_path / "relay.yaml"
    shutil.copy(DATA / "relay.yaml", path)
    return path


@pytest.fixture
def dns_records(key_dir: tuple[Path, dict[str, str]]) -> dict[str, str]:
    return key_dir[1]


@pytest.fixture(params=[False, True], ids=["one-at-a-time", "pipelining"])
def pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Whether the test's upstream offers PIPELINING; afterwards, that the
    transaction took the path the upstream offered (the real one, counted)."""
    runs: list[bool] = []
    real = pipelined_transaction.send

    async def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(True)
        return await real(*args, **kwargs)

    monkeypatch.setattr(pipelined_transaction, "send", counted)
    yield request.param
    assert bool(runs) == request.param, f"pipelined transactions: {len(runs)}"


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


@pytest.fixture
def policy(outbox: Path) -> Policy:
    return minimal_policy.delivering_to(outbox)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def relay_to_sink(policy_file: Path, tmp_path: Path) -> Iterator[tuple[RelayProcess, SinkServer]]:
    """A relay on the test policy whose upstream is a sink, both running."""
    from tests.relayproc import RelayProcess
    from tests.sink import SinkServer, free_port
    from tests.test_queue_e2e import configure

    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as proc:
            yield proc, sink
