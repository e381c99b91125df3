"""Sessions: how actions move once created — check-ins, answers, cancellations
(exporter/simulator/sessions.py)."""

from __future__ import annotations

import dataclasses
import random

from exporter.simulator import catalog
from exporter.simulator.model import (
    ACTIVE,
    AWAITING,
    PENDING,
    PROVISIONING,
    Action,
    Batch,
    Device,
    ObjectIds,
)
from exporter.simulator.profiles import new_device
from exporter.simulator.sessions import MAX_ANSWER_DELAY, MIN_INTERVAL, PROVISIONING_SPAN, Sessions
from exporter.simulator.timeline import ANSWER, CHECKIN, Agenda, Journal
from exporter.statuses import StatusClass, classify

START = 1_770_717_600.0


class Rig:
    def __init__(self, quirk: str | None = None, *, building: bool = False) -> None:
        rng = random.Random("sessions")
        self.agenda = Agenda()
        self.journal = Journal(record=True)
        self.sessions = Sessions(rng, None, self.agenda, self.journal, history_end=START)
        self.sessions.building = building
        self.device = new_device(
            rng, ObjectIds(rng), 0, START, quirk, taken=(), checkin_seconds=600.0
        )

    def batch(
        self,
        count: int,
        when: float,
        error_ratio: float | None = None,
        configs: tuple[catalog.Config, ...] = catalog.COMMANDS,
    ) -> Batch:
        """A batch as the fleet creates one."""
        batch = Batch(f"{len(self.device.batches):024x}", self.device, "policy", when)
        batch.error_ratio = error_ratio
        batch.actions = [Action(batch, i, configs[i]) for i in range(count)]
        batch.open_count = count
        self.device.batches.append(batch)
        self.device.open[batch] = None
        self.sessions.created(batch, when)
        return batch

    def run(self, moment: float) -> None:
        for when, _, kind, subject, extra in self.agenda.due(moment):
            if kind == ANSWER:
                self.sessions.answer(when, subject, extra)  # type: ignore[arg-type]
            elif kind == CHECKIN:
                self.sessions.checkin(when, subject)  # type: ignore[arg-type]

    def checkin(self, when: float) -> None:
        self.device.next_checkin = when
        self.sessions.checkin(when, self.device)


def test_a_new_batch_is_pending_and_waits_for_a_session_when_no_push_lands() -> None:
    rig = Rig()
    batch = rig.batch(3, START, error_ratio=0.0)  # a burst: no cancellations planned
    assert [action.status for action in batch.actions] == [PENDING] * 3
    assert [status for _, _, status in rig.journal.events_after(0.0)] == [PENDING] * 3
    assert rig.device.next_checkin is None and list(rig.agenda.due(START + 86400)) == []


def test_while_history_is_built_a_new_batch_draws_its_devices_next_session() -> None:
    rig = Rig(building=True)
    rig.batch(2, START - 3600, error_ratio=0.0)
    assert rig.device.next_checkin is not None
    assert rig.device.next_checkin >= START - 3600 + MIN_INTERVAL


def test_a_session_sends_the_pending_actions_and_their_answers_follow_within_seconds() -> None:
    rig = Rig()
    batch = rig.batch(4, START, error_ratio=1.0)
    rig.checkin(START + 60)
    assert rig.device.last_report == START + 60
    assert all(a.status == AWAITING and a.sent == START + 60 for a in batch.actions)
    rig.run(START + 60 + 0.05 + MAX_ANSWER_DELAY)
    assert all(classify(a.status) is StatusClass.ERROR for a in batch.actions)
    assert all(0 < a.received - a.sent <= 0.05 + MAX_ANSWER_DELAY for a in batch.actions)
    assert batch not in rig.device.open and batch.open_count == 0
    assert len(rig.journal.acks_after(0.0)) == 4
    assert rig.device.next_checkin is not None  # online: its next session is scheduled


def test_while_history_is_built_answers_due_before_its_end_need_no_heap() -> None:
    rig = Rig(building=True)
    batch = rig.batch(2, START - 3600, error_ratio=0.0)
    rig.checkin(START - 3000)
    assert all(action.final for action in batch.actions)
    assert all(kind != ANSWER for _, _, kind, _, _ in rig.agenda.due(START))


def test_a_session_the_schedule_moved_away_from_does_not_happen() -> None:
    rig = Rig()
    batch = rig.batch(2, START, error_ratio=0.0)
    rig.device.next_checkin = START + 30  # a push brought it forward
    rig.sessions.checkin(START + 600, rig.device)
    assert rig.device.last_report is None
    assert all(action.status == PENDING for action in batch.actions)


def test_a_silent_device_has_no_session_and_no_next_one() -> None:
    rig = Rig()
    rig.device.offline_since = START + 10
    batch = rig.batch(2, START, error_ratio=0.0)
    rig.checkin(START + 10)
    assert rig.device.last_report is None and rig.device.next_checkin is None
    assert all(action.status == PENDING for action in batch.actions)


def test_an_administrator_cancels_only_what_is_still_pending() -> None:
    rig = Rig()
    batch = rig.batch(2, START, error_ratio=1.0)
    rig.checkin(START + 60)
    first, second = batch.actions
    rig.sessions.cancel(START + 61, first)  # before its answer arrives
    assert (first.status, first.canceled) == (catalog.ADMIN_CANCEL, START + 61)
    rig.run(START + 60 + 0.05 + MAX_ANSWER_DELAY)
    assert first.status == catalog.ADMIN_CANCEL and first.received is None
    answered = second.status
    rig.sessions.cancel(START + 500, second)
    assert second.status == answered and second.canceled is None
    assert batch.open_count == 0


def test_a_provisioning_device_becomes_active_at_its_first_session_after_setup() -> None:
    rig = Rig(PROVISIONING)
    setup_end = rig.device.enrolled + PROVISIONING_SPAN
    rig.checkin(setup_end - 1)
    assert rig.device.state == PROVISIONING
    rig.checkin(setup_end)
    assert rig.device.state == ACTIVE


def test_one_setting_fails_on_one_model_every_time() -> None:
    failure = catalog.MODEL_FAILURE
    rig = Rig()
    profile = dataclasses.replace(rig.device.profile, model=failure.model)
    rig.device = Device(
        rig.device.id, profile, state=ACTIVE, mean_interval=600.0, offline_since=None,
        error_share=0.0,
    )
    config = next(c for c in catalog.COMMANDS if c[0] == failure.path)
    statuses = set()
    for round_ in range(10):
        moment = START + round_ * 1000
        batch = rig.batch(1, moment, configs=(config,))
        rig.checkin(moment + 1)
        rig.run(moment + 1 + 0.05 + MAX_ANSWER_DELAY)
        statuses.add(batch.actions[0].status)
    assert statuses - {AWAITING} == {failure.status}  # a few stay unanswered till later
