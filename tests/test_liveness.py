"""Which RUNNING trials are orphans: Liveness against hand-written driver records and a fake clock."""

from types import SimpleNamespace

from mergetune.search.liveness import DriverRecord, Liveness, driver_records

GRACE = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(id_, beats, in_flight, beat=1000.0, stopped=None, give_up_s=300.0):
    return DriverRecord(id=id_, host="h", pid=1, started=0.0, beat=beat, beats=beats, in_flight=in_flight,
                        grace_s=GRACE, give_up_s=give_up_s, stopped=stopped)


def trials(*numbers):
    return [SimpleNamespace(number=n) for n in numbers]


def watcher(clock):
    return Liveness("me", GRACE, clock=clock, wall_clock=clock)


def test_a_beating_driver_keeps_its_trials_and_a_silent_one_loses_them_after_the_grace_period():
    clock = Clock()
    live = watcher(clock)
    assert live.orphans(trials(1, 2, 3), [record("a", 1, [1, 2])], mine={3}) == []
    for beats in range(2, 5):  # "a" beats while 9 s pass: nothing is an orphan
        clock.now += 3
        assert live.orphans(trials(1, 2, 3), [record("a", beats, [1, 2], beat=clock.now)], mine={3}) == []
    silent = record("a", 4, [1, 2], beat=clock.now)
    for _ in range(3):  # 9 s without a beat: still within the grace period
        clock.now += 3
        assert live.orphans(trials(1, 2, 3), [silent], mine={3}) == []
    clock.now += 3  # the counter has not moved for 12 s: "a" is dead, and no other driver lives
    assert [t.number for t in live.orphans(trials(1, 2, 3), [silent], mine={3})] == [1, 2]


def test_a_trial_no_live_driver_lists_waits_the_grace_period_while_others_live():
    clock = Clock()
    live = watcher(clock)
    others = lambda: [record("a", int(clock.now), [1], beat=clock.now)]  # noqa: E731 - beats on every look
    assert live.orphans(trials(1, 7), others(), mine=set()) == []  # 7: maybe just asked by "a"
    clock.now += 4  # looks come every few seconds, as the driver's ticks do
    assert live.orphans(trials(1, 7), others(), mine=set()) == []
    clock.now += 4
    assert live.orphans(trials(1, 7), others(), mine=set()) == []
    clock.now += 3
    assert [t.number for t in live.orphans(trials(1, 7), others(), mine=set())] == [7]


def test_trials_of_stopped_or_long_silent_drivers_are_orphans_at_once():
    clock = Clock()
    stopped = record("a", 9, [1], stopped=990.0)
    ancient = record("b", 9, [2], beat=clock.now - 301)  # longer than its give_up_s
    assert [t.number for t in watcher(clock).orphans(trials(1, 2), [stopped, ancient], mine=set())] == [1, 2]


def test_after_this_driver_stalls_it_watches_afresh_before_judging():
    clock = Clock()
    live = watcher(clock)
    a = record("a", 1, [1])
    assert live.orphans(trials(1), [a], mine=set()) == []
    clock.now += 30  # this driver was cut off for 30 s: "a"'s beats in between were not seen
    assert live.orphans(trials(1), [a], mine=set()) == []
    for _ in range(2):
        clock.now += 4
        assert live.orphans(trials(1), [a], mine=set()) == []
    clock.now += 4  # watched silent for 12 s since this driver came back
    assert [t.number for t in live.orphans(trials(1), [a], mine=set())] == [1]


def test_driver_records_are_read_from_the_study_attrs():
    from dataclasses import asdict

    attrs = {"config": {}, "driver:b": asdict(record("b", 1, [], beat=5.0)), "driver:x": {"old": "format"}}
    attrs["driver:a"] = {**asdict(record("a", 1, [])), "started": -1.0}
    assert [r.id for r in driver_records(attrs)] == ["a", "b"]
