"""Failed logins: slowed down, then refused per client address without an scrypt."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relay.ingress.authlimit import PER_LOGIN, AuthFailures, table
from relay.ingress.clientlimit import ClientCounts
from relay.sharedtable import EVICT_AMONG
from tests.ingress_harness import Raw, Relay
from tests.minimal_policy import listener
from tests.minimal_policy import policy as make_policy
from tests.test_workers import configure, free_port, serving


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain(login: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode())


def workers(clock: Clock, window: float = 60.0, count: int = 2) -> list[AuthFailures]:
    """One address's counts as each of ``count`` workers keeps and reads them."""
    shared = table(count, per_client=3)
    return [
        AuthFailures(per_client=3, window=window, clock=clock, shared=shared.row(i))
        for i in range(count)
    ]


def test_an_address_is_locked_after_its_failures_within_the_window() -> None:
    clock = Clock()
    failures = AuthFailures(per_client=3, window=60.0, clock=clock)
    assert [failures.failed("192.0.2.1") for _ in range(3)] == [False, False, True]
    assert failures.locked("192.0.2.1") == 60.0
    assert failures.locked("192.0.2.2") == 0.0
    clock.now += 59.0
    assert failures.locked("192.0.2.1") == 1.0
    clock.now += 1.0
    assert failures.locked("192.0.2.1") == 0.0


def test_just_after_a_boot_one_failure_is_one_failure() -> None:
    """The clock is the time since the boot: within the first window, the
    empty places of an address's slot were counted as failures too, and one
    wrong password locked the client out for the rest of the window."""
    clock = Clock()
    clock.now = 5.0
    failures = AuthFailures(per_client=3, window=600.0, clock=clock)
    assert [failures.failed("192.0.2.1") for _ in range(3)] == [False, False, True]
    failures.failed("192.0.2.2")
    assert failures.locked("192.0.2.2") == 0.0
    assert failures.locked("192.0.2.1") == 600.0


def test_failures_spread_beyond_the_window_never_lock() -> None:
    clock = Clock()
    failures = AuthFailures(per_client=3, window=60.0, clock=clock)
    for _ in range(10):
        assert not failures.failed("192.0.2.1")
        clock.now += 31.0
        assert failures.locked("192.0.2.1") == 0.0


def test_a_success_forgets_the_address_failures_at_that_login() -> None:
    clock = Clock()
    failures = AuthFailures(per_client=3, clock=clock)
    failures.failed("192.0.2.1", "erp-acme")
    failures.failed("192.0.2.1", "erp-acme")
    clock.now += 1.0
    failures.succeeded("192.0.2.1", "erp-acme")
    failures.failed("192.0.2.1", "erp-acme")  # the same millisecond: forgiven too
    clock.now += 1.0
    assert not failures.failed("192.0.2.1", "erp-acme")
    assert not failures.failed("192.0.2.1", "erp-acme")
    assert failures.failed("192.0.2.1", "erp-acme")


def test_a_success_at_one_login_leaves_the_guesses_at_another() -> None:
    """A client holding one login's password reset its address's count by
    logging in rightly after every few guesses, and guessed at another
    tenant's login without end."""
    clock = Clock()
    failures = AuthFailures(per_client=3, clock=clock)
    failures.failed("192.0.2.1", "erp-other")
    failures.failed("192.0.2.1", None)  # no login name to it: no success clears it
    clock.now += 1.0
    failures.succeeded("192.0.2.1", "erp-acme")
    assert failures.failed("192.0.2.1", "erp-other")
    assert failures.locked("192.0.2.1") > 0


def test_addresses_past_the_tables_room_are_not_counted_until_a_slot_is_done() -> None:
    clock = Clock()
    failures = AuthFailures(per_client=2, window=60.0, clients=3, clock=clock)
    for n in range(5):
        failures.failed(f"192.0.2.{n}")
        failures.failed(f"192.0.2.{n}")
    locked = [failures.locked(f"192.0.2.{n}") > 0 for n in range(5)]
    assert locked == [True, True, True, False, False]
    clock.now += 61.0  # the first three are done: their slots are taken by others
    assert failures.failed("192.0.2.3") is False and failures.failed("192.0.2.3") is True


def test_the_addresses_of_one_ipv6_64_are_counted_as_one_client() -> None:
    """Counted one by one, a host with a /64 changed address after each lock
    and guessed without end."""
    clock = Clock()
    failures = AuthFailures(per_client=3, window=60.0, clock=clock)
    assert not failures.failed("2001:db8:1:2::1")
    assert not failures.failed("2001:db8:1:2::2")
    assert failures.failed("2001:db8:1:2:ffff:ffff:ffff:fffe")
    assert failures.locked("2001:db8:1:2::7") == 60.0
    assert failures.locked("2001:db8:1:3::1") == 0.0  # another site's /64


def test_an_ipv4_mapped_address_is_counted_as_its_ipv4_address() -> None:
    clock = Clock()
    failures = AuthFailures(per_client=3, window=60.0, clock=clock)
    failures.failed("::ffff:192.0.2.1")
    failures.failed("192.0.2.1")
    assert failures.failed("::ffff:192.0.2.1")
    assert failures.locked("192.0.2.1") == 60.0
    assert failures.locked("::ffff:192.0.2.2") == 0.0


def test_a_table_full_of_one_failure_each_still_locks_a_guesser() -> None:
    """Past the row's room a failure was not counted: one failure each from as
    many addresses of one /64 as the row holds switched the lock-out off."""
    clock = Clock()
    failures = AuthFailures(per_client=3, window=600.0, clients=8, clock=clock)
    for n in range(8):
        clock.now += 1.0
        failures.failed(f"192.0.2.{n}")
    clock.now += 1.0
    assert [failures.failed("198.51.100.1", "erp-acme") for _ in range(3)] == [False, False, True]
    assert failures.locked("198.51.100.1") == 600.0
    assert failures.locked("192.0.2.0") == 0.0  # the oldest, given up for it


def test_a_full_table_gives_up_no_locked_client(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    failures = AuthFailures(per_client=2, window=60.0, clients=3, clock=clock)
    for n in range(3):
        failures.failed(f"192.0.2.{n}")
        failures.failed(f"192.0.2.{n}")
    with caplog.at_level(logging.ERROR, logger="relay"):
        assert not failures.failed("192.0.2.9") and not failures.failed("192.0.2.9")
    assert [failures.locked(f"192.0.2.{n}") > 0 for n in range(3)] == [True, True, True]
    assert failures.locked("192.0.2.9") == 0.0
    said = [r.getMessage() for r in caplog.records]
    assert said == [  # once: the second failure is within the minute
        "failed logins: a worker's table of 3 clients is full and the 16 near a new"
        " one's place are locked out: its failures are not counted"
    ]


def test_a_full_table_keeps_the_success_that_forgives_an_erps_typos() -> None:
    """Given up, the success made another worker's forgiven failures count
    again, and one more locked a legitimate client out."""
    clock, shared = Clock(), table(2, per_client=3, clients=8)
    one, two = (
        AuthFailures(per_client=3, window=600.0, clock=clock, shared=shared.row(i))
        for i in range(2)
    )
    one.failed("192.0.2.1", "erp-acme")
    one.failed("192.0.2.1", "erp-acme")
    clock.now += 1.0
    two.succeeded("192.0.2.1", "erp-acme")
    for n in range(2 * 7):  # the rest of worker two's row, then as many again
        clock.now += 1.0
        two.failed(f"10.0.0.{n}")
    clock.now += 1.0
    assert one.failed("192.0.2.1", "erp-acme") is False


def test_failures_in_every_worker_count_together() -> None:
    """The kernel hands each connection to any worker: counted apart, a client
    would get its tries once a worker."""
    clock = Clock()
    one, two = workers(clock)
    assert one.failed("192.0.2.1", "erp-acme") is False
    clock.now += 10.0
    assert two.failed("192.0.2.1", "erp-acme") is False
    assert two.failed("192.0.2.1", "erp-acme") is True
    assert one.locked("192.0.2.1") == 50.0  # until the first, in the other worker, is 60 s old
    clock.now += 1.0
    two.succeeded("192.0.2.1", "erp-acme")  # in either worker, forgets them all
    assert one.locked("192.0.2.1") == 0.0
    assert one.failed("192.0.2.1", "erp-other") is False
    clock.now += 1.0
    assert two.failed("192.0.2.1", "erp-other") is False
    one.succeeded("192.0.2.1", "erp-acme")  # not those at another login, in either worker
    assert two.failed("192.0.2.1", "erp-other") is True


@pytest.mark.parametrize("others", [1, 12])
def test_other_logins_succeeding_keep_an_erps_corrected_typos_forgotten(others: int) -> None:
    """A worker kept only its last success: another login's, after the first's,
    made the failures the first had cleared in other workers count again; so
    did a dozen other ERPs on one host logging in, when it kept as many as an
    address has tries, and one stray failure locked them all out."""
    clock = Clock()
    one, two = workers(clock)
    two.failed("192.0.2.1", "erp-acme")
    two.failed("192.0.2.1", "erp-acme")
    clock.now += 1.0
    one.succeeded("192.0.2.1", "erp-acme")
    for n in range(others):
        clock.now += 1.0
        one.succeeded("192.0.2.1", f"erp-{n}")
    assert two.failed("192.0.2.1", "erp-other") is False
    assert two.failed("192.0.2.1", "erp-other") is False
    assert two.failed("192.0.2.1", "erp-other") is True


def test_more_logins_with_corrected_typos_than_an_address_has_tries_stay_forgiven() -> None:
    """Each of more logins than a worker kept successes of corrected a typo:
    the oldest success gave way, an ERP's two corrected typos counted again,
    and one more failure locked every ERP at the address out."""
    clock = Clock()
    one, two = workers(clock)
    one.failed("192.0.2.1", "erp-acme")
    one.failed("192.0.2.1", "erp-acme")
    clock.now += 1.0
    one.succeeded("192.0.2.1", "erp-acme")
    for n in range(3):
        clock.now += 1.0
        two.failed("192.0.2.1", f"erp-{n}")
        clock.now += 1.0
        one.succeeded("192.0.2.1", f"erp-{n}")
    assert one.locked("192.0.2.1") == 0.0
    assert two.failed("192.0.2.1", "erp-other") is False


def test_failures_forgiven_do_not_push_out_the_guesses_at_another_login() -> None:
    """A client holding one login's password failed and logged in there, again
    and again: the forgiven failures took the places of its guesses at
    another login, which never locked."""
    clock = Clock()
    one, _ = workers(clock, window=600.0)
    one.failed("192.0.2.1", "erp-victim")
    one.failed("192.0.2.1", "erp-victim")
    for _ in range(5):
        clock.now += 1.0
        one.failed("192.0.2.1", "erp-own")
        clock.now += 1.0
        one.succeeded("192.0.2.1", "erp-own")
    clock.now += 1.0
    assert one.failed("192.0.2.1", "erp-victim") is True


@pytest.mark.parametrize("count", [1, 2])
def test_failures_at_its_own_login_while_locked_do_not_empty_the_count(count: int) -> None:
    """Guesses at another login one short of the lock, then, while a check of
    its own login's right password ran, failures at its own login (answers
    to AUTH PLAIN challenges left open), then the check's success: the
    failures had pushed the guesses out, the success forgave them, and as
    many guesses again went."""
    clock = Clock()
    rows = workers(clock, window=600.0, count=count)
    for n in range(2):
        clock.now += 1.0
        rows[n % count].failed("192.0.2.1", "erp-victim")
    for n in range(3 * count):
        clock.now += 0.001
        rows[n % count].failed("192.0.2.1", "erp-own")
    clock.now += 0.03
    rows[0].succeeded("192.0.2.1", "erp-own")
    clock.now += 1.0
    assert rows[0].failed("192.0.2.1", "erp-victim") is True


def test_guesses_checked_during_a_lock_of_forgivable_failures_count() -> None:
    """Guesses let through before a lock that failures at the client's own
    login made, ending during it, were dropped; its own login's success then
    forgave the lock away, and as many guesses again went."""
    clock = Clock()
    one, two = workers(clock, window=600.0)
    for _ in range(3):
        clock.now += 0.001
        one.failed("192.0.2.1", "erp-own")
    assert one.locked("192.0.2.1") > 0
    for _ in range(2):
        clock.now += 0.001
        two.failed("192.0.2.1", "erp-victim")  # checks begun before the lock
    clock.now += 0.01
    one.succeeded("192.0.2.1", "erp-own")
    clock.now += 1.0
    assert two.failed("192.0.2.1", "erp-victim") is True


def test_as_many_erps_correcting_a_typo_as_every_worker_keeps_failures_stay_forgiven() -> None:
    """A worker kept as many successes as an address has tries, while every
    worker keeps as many failures: twenty ERPs behind one address each
    correcting a typo, their successes in one worker, had typos count
    again, and everyone got 454."""
    clock = Clock()
    rows = workers(clock, window=600.0)
    for n in range(6):
        clock.now += 1.0
        rows[n % 2].failed("192.0.2.1", f"erp-{n}")
        clock.now += 1.0
        rows[0].succeeded("192.0.2.1", f"erp-{n}")
    assert rows[0].locked("192.0.2.1") == 0.0
    clock.now += 1.0
    assert rows[1].failed("192.0.2.1", "erp-stray") is False
    assert rows[1].failed("192.0.2.1", "erp-stray") is False


def test_a_locked_client_gets_454_without_a_check_also_on_a_new_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay")
    clock = Clock()
    failures = AuthFailures(per_client=3, window=600.0, delay=0.0, clock=clock)
    with Relay([listener()], failures=failures) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            for _ in range(3):
                assert raw.cmd(plain("erp-acme", "guess")).startswith("535 5.7.8 ")
            # the right password too: no scrypt is spent on a locked address
            reply = raw.cmd(plain("erp-acme", "demo-password"))
            assert reply == (
                "454 4.7.0 Too many failed logins from 127.0.0.1, try again in 600 seconds"
            )
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(b"AUTH LOGIN").startswith("454 4.7.0 ")
            assert raw.cmd(b"NOOP") == "250 2.0.0 OK"
            clock.now += 600.0
            assert raw.cmd(plain("erp-acme", "demo-password")).startswith("235 ")
    assert "AUTH locked client=127.0.0.1: 3 failed logins in 600 s" in caplog.text
    assert caplog.text.count("AUTH failed client=127.0.0.1") == 3


def test_a_lock_after_one_failure_is_logged_in_the_singular(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay")
    failures = AuthFailures(per_client=2, per_login=1, window=600.0, delay=0.0, clock=Clock())
    with Relay([listener()], failures=failures) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(plain("erp-acme", "guess")).startswith("535 5.7.8 ")
    assert "AUTH locked client=127.0.0.1 login='erp-acme': 1 failed login at it in 600 s" in (
        caplog.text
    )


@pytest.mark.parametrize("left", [0.8, 0.3])
def test_a_lock_with_a_second_left_says_one_second(left: float) -> None:
    """Its last second was said as ``try again in 1 seconds``; under half of
    it left is no "0 seconds", which a client could take for no wait."""
    clock = Clock()
    failures = AuthFailures(per_client=3, window=600.0, delay=0.0, clock=clock)
    with Relay([listener()], failures=failures) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(3):
            assert raw.cmd(plain("erp-acme", "guess")).startswith("535 5.7.8 ")
        clock.now += 600.0 - left
        reply = raw.cmd(plain("erp-acme", "demo-password"))
    assert reply == "454 4.7.0 Too many failed logins from 127.0.0.1, try again in 1 second"


def test_an_ipv6_client_is_locked_with_its_64_and_logged_by_its_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reply names what is locked, the log line the address fail2ban bans."""
    failures = AuthFailures(per_client=3, window=600.0, delay=0.0, clock=Clock())
    failures.failed("::5", "erp-acme")  # other addresses of the client's /64
    failures.failed("::6", "erp-acme")
    on_ipv6 = listener(address="::1", allow=("::1/128",))
    with Relay([on_ipv6], failures=failures) as relay, Raw(relay.port, host="::1") as raw:
        raw.ehlo()
        assert raw.cmd(plain("erp-acme", "guess")).startswith("535 5.7.8 ")
        reply = raw.cmd(plain("erp-acme", "demo-password"))
    assert reply == "454 4.7.0 Too many failed logins from ::/64, try again in 600 seconds"
    assert "AUTH failed client=::1 login='erp-acme'" in caplog.text
    assert "AUTH locked client=::1: 3 failed logins in 600 s" in caplog.text


def test_a_real_client_is_locked_with_the_table_full_of_others() -> None:
    failures = AuthFailures(per_client=3, window=600.0, delay=0.0, clients=8, clock=Clock())
    for n in range(8):
        failures.failed(f"2001:db8:{n}::1")
    with Relay([listener()], failures=failures) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(3):
            assert raw.cmd(plain("erp-acme", "guess")).startswith("535 5.7.8 ")
        assert raw.cmd(plain("erp-acme", "demo-password")).startswith("454 4.7.0 ")


def test_an_answer_to_a_challenge_left_open_while_locked_gets_454_and_counts_nothing() -> None:
    """Refused without a check (acting for another login), it was counted past
    the lock, in the places of guesses still being checked."""
    failures = AuthFailures(per_client=3, window=600.0, delay=0.0, clock=Clock())
    with Relay([listener()], failures=failures) as relay, Raw(relay.port) as waiting:
        waiting.ehlo()
        assert waiting.cmd(b"AUTH PLAIN").startswith("334")
        with Raw(relay.port) as raw:
            raw.ehlo()
            for _ in range(3):
                assert raw.cmd(plain("erp-acme", "guess")).startswith("535 5.7.8 ")
        counted = len(failures._recent("127.0.0.1"))
        answer = base64.b64encode(b"other\0erp-acme\0x")
        assert waiting.cmd(answer).startswith("454 4.7.0 ")
    assert len(failures._recent("127.0.0.1")) == counted == 3


def test_logging_in_rightly_between_guesses_does_not_lift_the_lock_out() -> None:
    """An ERP's own password, used after every few guesses at another login,
    cleared the address's count: the guessing never locked."""
    failures = AuthFailures(per_client=3, window=600.0, delay=0.0, clock=Clock())
    with Relay([listener()], failures=failures) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(plain("erp-other", "guess")).startswith("535 5.7.8 ")
            assert raw.cmd(plain("erp-other", "guess2")).startswith("535 5.7.8 ")
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(plain("erp-acme", "demo-password")).startswith("235 ")
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(plain("erp-other", "guess3")).startswith("535 5.7.8 ")
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(plain("erp-acme", "demo-password")).startswith("454 4.7.0 ")


def test_a_stale_password_locks_its_own_login_not_the_others_from_that_address() -> None:
    """One company's ERP retrying a stale password locked every company behind
    the same address (a hosted ERP server, a shared NAT) out of AUTH."""
    failures = AuthFailures(per_client=6, per_login=3, window=600.0, delay=0.0, clock=Clock())
    with Relay([listener()], failures=failures) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            for _ in range(3):
                assert raw.cmd(plain("erp-other", "stale")).startswith("535 5.7.8 ")
            reply = raw.cmd(plain("erp-other", "stale"))
            assert reply == (
                "454 4.7.0 Too many failed logins with this login name from 127.0.0.1,"
                " try again in 600 seconds"
            )
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(plain("erp-acme", "demo-password")).startswith("235 ")


def test_guesses_spread_over_login_names_lock_the_address() -> None:
    failures = AuthFailures(per_client=6, per_login=3, window=600.0, delay=0.0, clock=Clock())
    with Relay([listener()], failures=failures) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        for name in ("erp-a", "erp-b", "erp-c"):
            for _ in range(2):
                assert raw.cmd(plain(name, "guess")).startswith("535 5.7.8 ")
        reply = raw.cmd(plain("erp-acme", "demo-password"))
        assert reply.startswith("454 4.7.0 Too many failed logins from 127.0.0.1"), reply
        assert raw.cmd(b"AUTH LOGIN").startswith("454 4.7.0 Too many failed logins from ")


def test_a_failure_is_answered_after_the_delay_without_holding_up_others() -> None:
    answered: list[tuple[str, float]] = []
    with (
        Relay([listener()], failures=AuthFailures(delay=1.5)) as relay,
        Raw(relay.port) as slow,
        Raw(relay.port) as other,
    ):
        slow.ehlo()
        other.ehlo()

        def fail() -> None:
            started = time.monotonic()
            reply = slow.cmd(plain("erp-acme", "guess"))
            answered.append((reply, time.monotonic() - started))

        thread = threading.Thread(target=fail)
        thread.start()
        try:
            time.sleep(0.2)  # the failure is being held back now
            assert other.cmd(plain("erp-acme", "demo-password")).startswith("235 ")
            assert thread.is_alive()
        finally:
            thread.join(10)
    ((reply, took),) = answered
    assert reply.startswith("535 5.7.8 ")
    assert took >= 1.5


def _at_once(port: int, password: str, connections: int) -> list[str]:
    """The replies to one AUTH each on ``connections`` connections, sent at once."""
    raws = [Raw(port) for _ in range(connections)]
    try:
        for raw in raws:
            raw.ehlo()
        with ThreadPoolExecutor(connections) as pool:
            return list(pool.map(lambda r: r.cmd(plain("erp-acme", password)), raws))
    finally:
        for raw in raws:
            raw.close()


def test_guesses_on_many_connections_at_once_get_no_more_checks_than_one_after_another(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure was counted once its scrypt and delay were over, and the lock
    looked at only as an AUTH began: 40 connections at once had 40 passwords
    checked, and the lock line logged for each past the tenth."""
    caplog.set_level(logging.INFO, logger="relay")
    connections = 12
    failures = AuthFailures(per_client=3, window=600.0, delay=1.0)
    with Relay([listener()], failures=failures) as relay:
        replies = _at_once(relay.port, "guess", connections)
    assert sorted(r[:3] for r in replies) == ["454"] * (connections - 3) + ["535"] * 3
    assert caplog.text.count("AUTH failed client=127.0.0.1") == 3
    assert caplog.text.count("AUTH locked client=127.0.0.1") == 1


def test_right_passwords_on_many_connections_at_once_are_all_taken() -> None:
    """An ERP that opens a dozen connections at once, just after a start (no
    password remembered yet): counting each check as failed until it ended
    told the eleventh "Too many failed logins" when none had failed."""
    connections = 12
    failures = AuthFailures(per_client=3, window=600.0, delay=1.0)
    with Relay([listener()], failures=failures) as relay:
        replies = _at_once(relay.port, "demo-password", connections)
    assert [r[:3] for r in replies] == ["235"] * connections, replies


def test_a_login_that_succeeds_clears_the_address_failures() -> None:
    failures = AuthFailures(per_client=3, delay=0.0)
    with Relay([listener()], failures=failures) as relay:
        for password in ("guess", "guess", "demo-password", "guess", "guess", "demo-password"):
            with Raw(relay.port) as raw:
                raw.ehlo()
                expected = "235 " if password == "demo-password" else "535 "
                assert raw.cmd(plain("erp-acme", password)).startswith(expected)


def test_plain_credentials_for_another_login_count_as_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No scrypt is spent on them, but fail2ban and the lock-out must see them too."""
    failures = AuthFailures(per_client=2, delay=0.0, clock=Clock())
    with Relay([listener()], failures=failures) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        blob = base64.b64encode(b"someone\0erp-acme\0demo-password")
        for _ in range(2):
            assert raw.cmd(b"AUTH PLAIN " + blob).startswith("535 5.7.8 ")
        assert raw.cmd(plain("erp-acme", "demo-password")).startswith("454 4.7.0 ")
    assert caplog.text.count("AUTH failed client=127.0.0.1") == 2
    assert "for another login" in caplog.text


FAILED_LINE = re.compile(r"relay\[(\d+)\] WARNING AUTH failed client=127\.0\.0\.1 ", re.M)


def fail_once(port: int) -> str:
    """A wrong password on a connection of its own, ended once answered."""
    with Raw(port) as raw:
        raw.ehlo()
        return raw.cmd(plain("erp-acme", "guess"))


def test_a_real_relay_locks_a_client_whose_failures_went_to_both_workers(
    policy_file: Path, tmp_path: Path
) -> None:
    """Counted per worker, neither of the two would have the ten failures."""
    port = free_port()
    with serving(configure(policy_file, port), port, tmp_path / "relay.log") as relay:
        failed = 0
        with ThreadPoolExecutor(3) as pool:
            while len(set(FAILED_LINE.findall(relay.log()))) < 2:
                assert failed < PER_LOGIN - 3, "every connection went to one worker"
                replies = list(pool.map(fail_once, [port] * 3))
                assert all(r.startswith("535 ") for r in replies), replies
                failed += 3
            replies = list(pool.map(fail_once, [port] * (PER_LOGIN - failed)))
            assert all(r.startswith("535 ") for r in replies), replies
        with Raw(port) as raw:
            raw.ehlo()
            reply = raw.cmd(plain("erp-acme", "demo-password"))
        assert reply.startswith(
            "454 4.7.0 Too many failed logins with this login name from 127.0.0.1"
        ), reply


def test_a_burst_on_a_real_relay_gets_ten_checks_in_all_its_workers(
    policy_file: Path, tmp_path: Path
) -> None:
    """The checks under way were counted per worker: each of two let ten run,
    twenty guesses in all (one per CPU with ``workers: auto``). The lock-out
    is logged once, by the worker whose failure made it, not by both."""
    port = free_port()
    burst = 3 * PER_LOGIN
    with serving(configure(policy_file, port), port, tmp_path / "relay.log") as relay:
        replies = _at_once(port, "guess", burst)
        log = relay.log()
    assert sorted(r[:3] for r in replies) == ["454"] * (burst - PER_LOGIN) + ["535"] * PER_LOGIN
    assert log.count("AUTH failed client=127.0.0.1") == PER_LOGIN
    assert log.count("AUTH locked client=127.0.0.1") == 1, log


async def test_a_failure_recorded_while_a_check_took_its_place_is_counted() -> None:
    """A check read the failures, then another worker's check failed and left,
    then the first took a place: it saw neither, and a burst of guesses got one
    more check than the lock allows."""
    clock, shared, counts = Clock(), table(2, per_client=3), ClientCounts(2)
    mine, theirs = counts.row(0), counts.row(1)
    first = AuthFailures(per_client=3, clock=clock, shared=shared.row(0), checks=mine)
    second = AuthFailures(per_client=3, clock=clock, shared=shared.row(1), checks=theirs)
    first.failed("192.0.2.1", "erp")
    first.failed("192.0.2.1", "erp")
    enter = mine.enter

    def failing_meanwhile(listener: str, client: str) -> bool:
        second.failed(client, "erp")  # the other worker's check ends, failed
        return enter(listener, client)

    mine.enter = failing_meanwhile  # type: ignore[method-assign]
    assert not await asyncio.wait_for(first.turn("192.0.2.1", "erp"), 5)


def test_a_full_table_of_locked_clients_ranks_a_few_slots_for_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ranking went on past every locked slot, each ranking a search of every
    worker's row: seconds of the event loop's CPU for each failure of a new
    client once a row was full of locked ones."""
    clock, shared = Clock(), table(2, per_client=2, clients=256)
    one = AuthFailures(per_client=2, window=600.0, clock=clock, shared=shared.row(0))
    for n in range(256):
        one.failed(f"10.0.{n // 256}.{n % 256}")
        one.failed(f"10.0.{n // 256}.{n % 256}")
    ranked: list[int] = []
    rank = AuthFailures._rank

    def counted(self: AuthFailures, base: int) -> tuple[int, int] | None:
        ranked.append(base)
        return rank(self, base)

    monkeypatch.setattr(AuthFailures, "_rank", counted)
    one.failed("192.0.2.9")
    assert 0 < len(ranked) <= EVICT_AMONG


def test_the_default_limits_are_ten_failures_at_a_login_and_twenty_at_any() -> None:
    """The numbers README gives the sysadmin, who tells an ERP's users how many
    tries a stale password leaves them: a limit moved by one went unnoticed."""
    failures = AuthFailures(delay=0.0, clock=Clock())
    with Relay([listener()], failures=failures) as relay:

        def guesses(login: str, count: int) -> list[str]:
            replies = []
            for _ in range(0, count, 5):  # a connection is closed after ten AUTHs
                with Raw(relay.port) as raw:
                    raw.ehlo()
                    for _ in range(5):
                        replies.append(raw.cmd(plain(login, "guess"))[:10])
            return replies

        assert guesses("erp-acme", 10) == ["535 5.7.8 "] * 10
        with Raw(relay.port) as raw:
            raw.ehlo()
            reply = raw.cmd(plain("erp-acme", "demo-password"))
        assert reply == (
            "454 4.7.0 Too many failed logins with this login name from 127.0.0.1,"
            " try again in 600 seconds"
        )
        assert guesses("erp-globex", 10) == ["535 5.7.8 "] * 10
        with Raw(relay.port) as raw:
            raw.ehlo()
            reply = raw.cmd(plain("erp-initech", "guess"))
        assert reply == "454 4.7.0 Too many failed logins from 127.0.0.1, try again in 600 seconds"


def test_failures_without_a_login_name_leave_a_slot_free_for_a_guesser() -> None:
    """Credentials that are not UTF-8 name no login, so lock none: a full table
    of clients that sent a few of them was taken for one of locked clients,
    whose slots are never given up, and a guesser at a real login was not
    counted at all."""
    clock = Clock()
    failures = AuthFailures(per_client=6, per_login=3, window=600.0, clients=3, clock=clock)
    for n in range(3):
        for _ in range(3):
            clock.now += 1.0
            failures.failed(f"192.0.2.{n}")
    clock.now += 1.0
    assert [failures.failed("198.51.100.1", "erp-acme") for _ in range(3)] == [False, False, True]
    assert failures.locked("198.51.100.1", "erp-acme") == 600.0


def _slow_hash(password: str) -> str:
    """A hash whose check takes a good part of a second (p=16): long enough
    for another AUTH to be answered while it runs."""
    salt = b"0123456789abcdef"
    key = hashlib.scrypt(password.encode(), salt=salt, n=16384, r=8, p=16, dklen=32)
    return "$".join(("scrypt", "16384", "8", "16", _b64(salt), _b64(key)))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_a_lock_made_while_a_check_ran_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A guess whose scrypt was under way when another answer (credentials for
    another login, counted without a check) made the lock: its own failure,
    counted after, logged the lock a second time, and fail2ban or whoever
    reads the log saw two lock-outs for one."""
    caplog.set_level(logging.INFO, logger="relay")
    failures = AuthFailures(per_client=3, window=600.0, delay=0.0, clock=Clock())
    policy = make_policy((listener(),), logins={"erp-acme": _slow_hash("demo-password")})
    other = b"AUTH PLAIN " + base64.b64encode(b"someone\0erp-acme\0demo-password")
    with Relay([listener()], failures=failures, policy=policy) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            for _ in range(2):
                assert raw.cmd(other).startswith("535 5.7.8 ")
        with Raw(relay.port) as checked, Raw(relay.port) as fast, ThreadPoolExecutor(1) as pool:
            checked.ehlo()
            fast.ehlo()
            guess = pool.submit(checked.cmd, plain("erp-acme", "guess"))
            time.sleep(0.2)  # its scrypt under way
            assert not guess.done()
            assert fast.cmd(other).startswith("535 5.7.8 ")
            assert guess.result().startswith("535 5.7.8 ")
    assert caplog.text.count("AUTH failed client=127.0.0.1") == 4
    assert caplog.text.count("AUTH locked client=127.0.0.1") == 1, caplog.text
