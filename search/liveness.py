"""Several drivers on one study: each records that it is alive, and which RUNNING trials are orphans.

Every driver keeps one record in the study's user attrs, `driver:<id>`: host, pid, the trial
numbers it has in flight, a beat counter it bumps every `heartbeat.interval_s`, and `stopped`
once it exits. A RUNNING trial is an orphan when no live driver lists it: either no other driver
is alive, or no live driver has listed it for `heartbeat.grace_s` (a trial a driver has just
asked is listed from its next beat on).

A driver is judged alive by whether its counter *changes* as this driver watches — not by
comparing its clock with ours — so hosts need no synchronised clocks. Two wall-clock shortcuts
only widen that: a record marked `stopped`, or silent for longer than its `give_up_s` (twice its
storage retry window plus its grace: no live driver goes quiet that long), is dead at first
sight, so a study resumed after a crash reclaims the dead driver's trials at once. After an
outage or a stall of this driver, everything is watched afresh, so trials are never failed
because this driver missed the others' beats.

Why our own records rather than Optuna's heartbeats (`RDBStorage(heartbeat_interval=...)`,
`fail_stale_trials`): Optuna records them from a thread `Study.optimize` starts per trial and
has no record for our ask/tell loop; JournalStorage has none at all; it compares times from the
database server only in RDB; and it stores no driver identity, which `mergetune status` shows.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import optuna
from optuna.trial import FrozenTrial

from mergetune.search.config import StudyConfig
from mergetune.studies.storage import StorageRetry

DRIVER_ATTR_PREFIX = "driver:"
STOP_RETRY_S = 5.0


@dataclass
class DriverRecord:
    """What one driver tells the others; stored as the study user attr `driver:<id>`."""

    id: str
    host: str
    pid: int
    started: float  # wall clock (s since the epoch), for people
    beat: float  # wall clock of the last beat
    beats: int  # bumped every beat: what other drivers watch
    in_flight: list[int]
    grace_s: float
    give_up_s: float
    stopped: float | None = None

    @property
    def key(self) -> str:
        return DRIVER_ATTR_PREFIX + self.id

    def certainly_dead(self, now: float) -> bool:
        return self.stopped is not None or now - self.beat > self.give_up_s


def driver_records(user_attrs: dict) -> list[DriverRecord]:
    """The driver records among a study's user attrs, oldest start first."""
    records = []
    for key, value in user_attrs.items():
        if key.startswith(DRIVER_ATTR_PREFIX) and isinstance(value, dict):
            try:
                records.append(DriverRecord(**value))
            except TypeError:
                continue  # a record of another mergetune version: ignored
    return sorted(records, key=lambda r: r.started)


@dataclass
class Heartbeat:
    """This driver's record: written at start, every `interval_s` while it runs, and once more at stop."""

    study: optuna.Study
    config: StudyConfig
    storage: StorageRetry
    clock: Callable[[], float] = time.time
    record: DriverRecord = field(init=False)
    _last: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        now = self.clock()
        self.record = DriverRecord(
            id=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}",
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            beat=now,
            beats=0,
            in_flight=[],
            grace_s=self.config.heartbeat.grace_s,
            give_up_s=2 * self.config.storage_retry_s + self.config.heartbeat.grace_s,
        )

    @property
    def id(self) -> str:
        return self.record.id

    def beat(self, in_flight: Iterable[int], force: bool = False) -> None:
        """Write the record if `interval_s` has passed since the last write (or `force`)."""
        now = time.monotonic()
        if not force and now - self._last < self.config.heartbeat.interval_s:
            return
        self.record.in_flight = sorted(in_flight)
        self.record.beats += 1
        self.record.beat = self.clock()
        self.storage(self.study.set_user_attr, self.record.key, asdict(self.record))
        self._last = now

    def stop(self) -> None:
        """Mark this driver stopped, so others take its trials over at once; a storage that is down
        gets a few seconds (then the record goes silent and the grace period does the same)."""
        self.record.in_flight = []
        self.record.stopped = self.clock()
        StorageRetry(window_s=STOP_RETRY_S)(self.study.set_user_attr, self.record.key, asdict(self.record))


@dataclass
class Liveness:
    """Which RUNNING trials are orphans, from the driver records as this driver has watched them change."""

    me: str
    grace_s: float
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    _beats_seen: dict[str, tuple[int, float]] = field(default_factory=dict)  # id → (counter, when it last changed)
    _unlisted_since: dict[int, float] = field(default_factory=dict)  # trial number → first seen unlisted
    _last_look: float | None = None
    alive_others: list[DriverRecord] = field(default_factory=list)

    def look(self, records: list[DriverRecord]) -> None:
        """Update what is known about the other drivers (call with fresh records)."""
        now, wall = self.clock(), self.wall_clock()
        if self._last_look is not None and now - self._last_look > self.grace_s / 2:
            self.forget(now)  # this driver stalled: it may have missed beats
        self._last_look = now
        alive = []
        for record in records:
            if record.id == self.me or record.certainly_dead(wall):
                continue
            seen = self._beats_seen.get(record.id)
            if seen is None or seen[0] != record.beats:
                self._beats_seen[record.id] = seen = (record.beats, now)
            if now - seen[1] < self.grace_s:
                alive.append(record)
        self.alive_others = alive

    def is_alive(self, driver_id: str) -> bool:
        return driver_id == self.me or any(r.id == driver_id for r in self.alive_others)

    def orphans(self, running: list[FrozenTrial], records: list[DriverRecord], mine: set[int]) -> list[FrozenTrial]:
        """RUNNING trials no live driver has: read `running` before `records`, so a trial a driver has
        just created has that driver's record in `records`."""
        self.look(records)
        now = self.clock()
        listed = {number for record in self.alive_others for number in record.in_flight}
        found = []
        for trial in running:
            if trial.number in mine or trial.number in listed:
                self._unlisted_since.pop(trial.number, None)
                continue
            since = self._unlisted_since.setdefault(trial.number, now)
            if not self.alive_others or now - since >= self.grace_s:
                found.append(trial)
        running_numbers = {t.number for t in running}
        self._unlisted_since = {n: t for n, t in self._unlisted_since.items() if n in running_numbers}
        return found

    def forget(self, now: float | None = None) -> None:
        """Watch every driver and trial afresh (after this driver was cut off from the storage)."""
        now = self.clock() if now is None else now
        self._beats_seen = {key: (beats, now) for key, (beats, _) in self._beats_seen.items()}
        self._unlisted_since = {}
