"""Refresh-ahead's timing, with times passed in: the lead grows when refreshes fall
behind and shrinks back slowly, a refresh that could only start once its copy is stale
is dropped, not run, and due times are spread by a jitter drawn from a source the tests
set (none, fixed shares, or a seeded generator)."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from bridge.pipeline.credentials import Credential, Kind
from bridge.sessions.refresh import (
    JITTER_SHARE,
    REFRESH_AT,
    RefreshQueue,
    Taken,
    jitter_slice,
    recent_delay,
    refresh_lead,
    refresh_zone,
)

WINDOW = 4.0  # revalidate_after: a base lead of 0.2 s, at most 1 s


def _credential(name: str) -> Credential:
    return Credential(Kind.TOKEN, ("ory_st_" + name,))


def _queue(window: float = WINDOW) -> RefreshQueue:
    """A queue without jitter: every refresh due exactly the lead before its end."""
    return RefreshQueue(window, jitter=lambda: 0.0)


def test_the_lead_is_the_base_while_refreshes_keep_up():
    assert refresh_lead(WINDOW, 0.0) == pytest.approx(0.2)
    assert refresh_lead(WINDOW, 0.05) == pytest.approx(0.2)


def test_the_lead_is_twice_the_recent_delay_when_that_is_longer():
    assert refresh_lead(WINDOW, 0.3) == pytest.approx(0.6)


def test_the_lead_never_reaches_before_the_refresh_zone():
    assert refresh_lead(WINDOW, 30.0) == pytest.approx((1 - REFRESH_AT) * WINDOW)


def test_copies_are_looked_at_earlier_while_the_lead_is_long():
    assert refresh_zone(WINDOW, 0.2) == pytest.approx(REFRESH_AT * WINDOW)
    assert refresh_zone(WINDOW, 1.0) == pytest.approx(WINDOW / 2)  # two asks before due
    queue = _queue()
    queue.add("a", _credential("a"), stale_at=10.0, now=0.0)
    assert queue.take(10.5) is None  # dropped 0.7 s late: the lead is 1 s
    assert queue.zone == pytest.approx(WINDOW / 2)


def test_the_recent_delay_is_the_longest_seen_fading_by_half_each_window():
    assert recent_delay(0.0, 1.0, 0.4, WINDOW) == pytest.approx(0.4)
    assert recent_delay(0.4, WINDOW, 0.01, WINDOW) == pytest.approx(0.2)
    assert recent_delay(0.4, 2 * WINDOW, 0.01, WINDOW) == pytest.approx(0.1)
    assert recent_delay(0.4, 0.0, 0.6, WINDOW) == pytest.approx(0.6)


def test_a_refresh_is_taken_a_lead_before_its_copy_goes_stale():
    queue = _queue()
    assert queue.take(0.0) is None
    assert queue.add("a", _credential("a"), stale_at=10.0, now=0.0)
    assert queue.take(9.0) == pytest.approx(0.8)  # due at 10 - 0.2
    taken = queue.take(9.8)
    assert isinstance(taken, Taken)
    assert (taken.fingerprint, taken.due, taken.stale_at) == ("a", pytest.approx(9.8), 10.0)
    assert queue.take(9.8) is None


def test_one_refresh_per_copy_until_it_has_run():
    queue = _queue()
    assert queue.add("a", _credential("a"), stale_at=10.0, now=0.0)
    assert not queue.add("a", _credential("a"), stale_at=10.5, now=0.0)
    taken = queue.take(9.9)
    assert isinstance(taken, Taken)
    assert not queue.add("a", _credential("a"), stale_at=10.5, now=0.0)  # still running
    queue.finished(taken, 9.95)
    assert queue.add("a", _credential("a"), stale_at=14.0, now=9.95)


def test_the_copy_going_stale_first_is_refreshed_first():
    queue = _queue()
    assert queue.add("late", _credential("late"), stale_at=11.0, now=0.0)
    assert queue.add("early", _credential("early"), stale_at=10.0, now=0.0)
    assert not queue.add("later", _credential("later"), stale_at=12.0, now=0.0)  # not next
    taken = queue.take(9.9)
    assert isinstance(taken, Taken) and taken.fingerprint == "early"


def test_a_refresh_that_could_only_start_after_its_copy_went_stale_is_dropped():
    queue = _queue()
    queue.add("missed", _credential("missed"), stale_at=10.0, now=0.0)
    queue.add("in-time", _credential("in-time"), stale_at=10.5, now=0.0)
    taken = queue.take(10.2)  # both threads were busy until now
    assert isinstance(taken, Taken) and taken.fingerprint == "in-time"
    assert queue.dropped == 1
    assert queue.add("missed", _credential("missed"), stale_at=14.0, now=10.2)  # next window


def test_a_slow_refresh_makes_the_next_ones_due_earlier():
    queue = _queue()
    queue.add("a", _credential("a"), stale_at=10.0, now=0.0)
    queue.add("b", _credential("b"), stale_at=20.0, now=0.0)
    taken = queue.take(9.8)
    assert isinstance(taken, Taken)
    queue.finished(taken, 10.2)  # 0.4 s from due to done: the answer came too late
    assert queue.lead() == pytest.approx(0.8)
    assert queue.take(19.0) == pytest.approx(0.2)  # due at 20 - 0.8, not 20 - 0.2


def test_a_refresh_scheduled_after_its_due_time_is_due_at_once_and_not_late():
    queue = _queue()
    queue.add("a", _credential("a"), stale_at=10.0, now=9.9)  # asked for late in the zone
    taken = queue.take(9.9)
    assert isinstance(taken, Taken) and taken.due == 9.9
    queue.finished(taken, 9.95)
    assert queue.lead() == pytest.approx(0.2)


def test_dropped_refreshes_count_as_falling_behind():
    queue = _queue()
    queue.add("a", _credential("a"), stale_at=10.0, now=0.0)
    assert queue.take(10.1) is None
    assert queue.lead() == pytest.approx(0.6)  # 0.3 s late: twice that


def test_the_lead_comes_back_as_refreshes_keep_up_again():
    queue = _queue()
    queue.add("slow", _credential("slow"), stale_at=10.0, now=0.0)
    taken = queue.take(9.8)
    assert isinstance(taken, Taken)
    queue.finished(taken, 10.3)  # 0.5 s: the lead is as long as it gets, 1 s
    leads, now = [queue.lead()], 10.3
    for name in range(40):  # then a quick refresh every 0.2 s, for two windows
        now += 0.2
        queue.add(str(name), _credential(str(name)), stale_at=now + queue.lead(), now=now)
        quick = queue.take(now + 1e-6)  # due now
        assert isinstance(quick, Taken)
        queue.finished(quick, now + 0.01)
        leads.append(queue.lead())
    assert leads == sorted(leads, reverse=True)
    assert leads[0] == pytest.approx(1.0)
    assert leads[5] > 0.8  # a few quick refreshes do not undo a slow one
    assert leads[20] == pytest.approx(0.5, rel=0.01)  # one window on: half the delay, twice over
    assert leads[-1] == pytest.approx(0.25, rel=0.01)


def test_the_jitter_moves_a_refresh_earlier_by_its_share_of_the_slice():
    assert jitter_slice(WINDOW, 0.2) == pytest.approx(JITTER_SHARE * WINDOW)  # 0.6 s
    shares = iter([0.0, 0.5, 0.999])
    queue = RefreshQueue(WINDOW, jitter=lambda: next(shares))
    for name in ("none", "half", "most"):
        queue.add(name, _credential(name), stale_at=10.0, now=0.0)
    dues = []
    for _ in range(3):
        waiting = queue.take(0.0)
        assert isinstance(waiting, float)
        taken = queue.take(waiting)
        assert isinstance(taken, Taken)
        dues.append((taken.fingerprint, taken.due))
    assert [name for name, _ in dues] == ["most", "half", "none"]  # the one due first first
    assert [due for _, due in dues] == pytest.approx([10 - 0.2 - 0.5994, 9.5, 9.8])


def test_the_lead_and_the_jitter_never_reach_before_the_last_quarter():
    most = (1 - REFRESH_AT) * WINDOW
    assert jitter_slice(WINDOW, 0.6) == pytest.approx(most - 0.6)
    assert jitter_slice(WINDOW, most) == 0.0
    queue = RefreshQueue(WINDOW, jitter=lambda: 0.999)
    queue.add("a", _credential("a"), stale_at=10.0, now=0.0)  # 0.6 s of jitter, drawn now
    queue.add("b", _credential("b"), stale_at=20.0, now=0.0)
    # "a" was due 0.8 s before its end (a lead of 0.2, 0.6 of jitter) and is dropped
    # 1.3 s late: the lead grows to its most, 1 s, and "b" is due then, not 1.6 s before.
    assert queue.take(10.5) == pytest.approx(20.0 - most - 10.5)
    assert queue.dropped == 1 and queue.lead() == pytest.approx(most)


def test_refreshes_validated_together_spread_apart_window_after_window():
    """1,000 sessions validated within 2 s of a 5 s window (a warm-up): each refreshed
    when due, asked for again in the zone, for six windows. Without jitter they come due
    as tightly bunched in every window as in the first; with it, further apart each time."""
    window, sessions, rounds = 5.0, 1000, 6

    def spreads(jitter) -> list[float]:
        queue = RefreshQueue(window, jitter=jitter)
        dues: dict[str, list[float]] = {str(n): [] for n in range(sessions)}
        credential = _credential("herd")
        for n in range(sessions):
            validated = 2.0 * n / sessions
            queue.add(str(n), credential, validated + window, validated + REFRESH_AT * window)
        now = 0.0
        while (taken := queue.take(now)) is not None:
            if not isinstance(taken, Taken):
                now += taken
                continue
            dues[taken.fingerprint].append(taken.due)
            queue.finished(taken, now)  # done at once: refreshes keep up
            if len(dues[taken.fingerprint]) < rounds:
                queue.add(taken.fingerprint, credential, now + window, now + REFRESH_AT * window)
        assert all(len(due) == rounds for due in dues.values())
        return [statistics.pstdev(due[k] for due in dues.values()) for k in range(rounds)]

    bunched = spreads(lambda: 0.0)
    assert bunched == pytest.approx([bunched[0]] * rounds)
    spread = spreads(random.Random(20).random)
    assert all(later > earlier for earlier, later in itertools.pairwise(spread))
    assert spread[-1] > 1.25 * bunched[0]
