"""Steps of the wall clock told from time passing (``relay.clocksteps``)."""

from __future__ import annotations

from relay.clocksteps import MOST, STEP, ClockSteps


class Clocks:
    def __init__(self) -> None:
        self.wall, self.boot = 1_800_000_000.0, 500.0

    def passes(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds


def steps() -> tuple[Clocks, ClockSteps]:
    clocks = Clocks()
    return clocks, ClockSteps(lambda: clocks.wall, lambda: clocks.boot)


def test_time_passing_is_no_step_however_long_between_looks() -> None:
    clocks, seen = steps()
    clocks.passes(30 * 86400)
    clocks.wall += STEP - 1  # a slew, or a look late
    assert seen.look() == 0.0
    assert seen.arrival(clocks.wall - 10) == clocks.wall - 10


def test_a_step_forward_moves_only_what_came_before_it() -> None:
    clocks, seen = steps()
    before = clocks.wall - 1
    clocks.passes(3)
    between = clocks.wall  # after the last look, before the step
    clocks.passes(2)
    clocks.wall += 86400
    after = clocks.wall
    clocks.passes(5)
    assert seen.look() == 86400
    assert seen.arrival(before) == before + 86400
    assert seen.arrival(between) == between + 86400
    assert seen.arrival(after) == after


def test_a_step_back_takes_back_the_steps_forward_before_it_the_last_first() -> None:
    clocks, seen = steps()
    first = clocks.wall - 1
    clocks.wall += 3600
    assert seen.look() == 3600
    second = clocks.wall - 1
    clocks.wall += 7200
    assert seen.look() == 7200
    clocks.wall -= 9000
    assert seen.look() == -9000
    assert seen.taken_back == 9000
    assert seen.arrival(first) == first + 1800
    assert seen.arrival(second) == second
    clocks.wall -= 86400  # more than was gained: nothing is owed the other way
    assert seen.look() == -86400
    assert seen.taken_back == 1800
    assert seen.arrival(first) == first
    clocks.wall -= 3600
    assert seen.look() == -3600
    assert seen.taken_back == 0


def test_a_step_set_right_leaves_no_sliver_for_a_later_step_back() -> None:
    """The clocks' readings gave +518400.002 and -518400.001: a thousandth of a
    second stayed a step, and the next step back was said to set it right."""
    clocks, seen = steps()
    clocks.wall += 518400.002
    seen.look()
    clocks.wall -= 518400.001
    assert seen.look() < 0
    clocks.wall -= 86400
    assert seen.look() == -86400
    assert seen.taken_back == 0


def test_only_the_latest_steps_are_kept() -> None:
    clocks, seen = steps()
    start = clocks.wall - 1
    for _ in range(MOST + 5):
        clocks.wall += 100
        seen.look()
    assert seen.arrival(start) == start + 100 * MOST


def test_a_gain_of_exactly_step_seconds_is_a_step() -> None:
    clocks, seen = steps()
    before = clocks.wall - 1
    clocks.wall += STEP
    assert seen.look() == STEP
    assert seen.arrival(before) == before + STEP


def test_a_message_that_came_as_the_clock_stepped_came_before_the_step() -> None:
    """It came at the time the clock read without the step: its lifetime is
    counted from there, not cut short by the step."""
    clocks, seen = steps()
    clocks.passes(5)
    came = clocks.wall
    clocks.wall += 3600
    assert seen.look() == 3600
    assert seen.arrival(came) == came + 3600


def test_a_look_replaces_the_steps_a_reader_holds_rather_than_changing_them() -> None:
    """The metrics' thread reads the steps while the supervisor's loop looks: a
    step back changed a step in place and then dropped it, so a scrape in
    between read an age neither before nor after the look."""
    clocks, seen = steps()
    for gained in (6 * 86400, 86400):
        clocks.wall += gained
        assert seen.look() == gained
    held = seen._steps  # what a reader in the other thread is summing
    as_held = list(held)
    clocks.wall -= 7 * 86400
    assert seen.look() == -7 * 86400
    assert held == as_held
    assert seen.arrival(clocks.wall - 10) == clocks.wall - 10
