"""The simulator's time line: the agenda applies events in time order, the journal keeps
the ground truth (exporter/simulator/timeline.py)."""

from __future__ import annotations

from exporter.simulator.catalog import COMMANDS
from exporter.simulator.model import PENDING, Action, Batch
from exporter.simulator.timeline import ANSWER, CHECKIN, CREATE, Agenda, Journal


def _actions(count: int) -> list[Action]:
    batch = Batch("b" * 24, None, "policy", 0.0)  # type: ignore[arg-type]
    return [Action(batch, index, COMMANDS[index]) for index in range(count)]


def test_the_agenda_pops_by_time_then_in_the_order_events_were_pushed() -> None:
    agenda = Agenda()
    agenda.push(20.0, CHECKIN, "late", None)
    agenda.push(10.0, CREATE, "first", None)
    agenda.push(10.0, ANSWER, "second", None)
    agenda.push(30.0, CHECKIN, "after the moment", None)
    popped = [(when, subject) for when, _, _, subject, _ in agenda.due(20.0)]
    assert popped == [(10.0, "first"), (10.0, "second"), (20.0, "late")]
    assert [subject for _, _, _, subject, _ in agenda.due(30.0)] == ["after the moment"]


def test_events_pushed_while_the_agenda_pops_come_out_when_they_are_due() -> None:
    agenda = Agenda()
    agenda.push(1.0, CREATE, "creation", None)
    popped = []
    for when, _, _, subject, _ in agenda.due(5.0):
        popped.append(subject)
        if subject == "creation":
            agenda.push(when + 2.0, CHECKIN, "its session", None)
            agenda.push(when + 9.0, ANSWER, "too late", None)
    assert popped == ["creation", "its session"]
    assert [subject for *_, subject, _ in agenda.due(10.0)] == ["too late"]


def test_a_journal_that_does_not_record_keeps_nothing() -> None:
    journal = Journal(record=False)
    actions = _actions(2)
    actions[0].sent = 1.0
    journal.created(0.0, actions)
    journal.entered(3.0, actions[0], "Acknowledged")
    journal.answered(3.0, actions[0])
    assert journal.events_after(-1.0) == [] and journal.acks_after(-1.0) == []


def test_the_journal_lists_what_came_strictly_after_a_moment_in_time_order() -> None:
    journal = Journal(record=True)
    first, second = _actions(2)
    journal.created(5.0, [first])
    journal.created(1.0, [second])  # history is built out of order
    second.sent = 2.0
    journal.entered(2.0, second, "Awaiting")
    journal.entered(4.5, second, "Acknowledged")
    journal.answered(4.5, second)
    journal.sort()
    assert journal.events_after(2.0) == [(4.5, second, "Acknowledged"), (5.0, first, PENDING)]
    assert journal.acks_after(0.0) == [(4.5, 2.5, second)]
    assert journal.acks_after(4.5) == []


def test_an_answer_to_an_action_never_sent_has_no_latency() -> None:
    journal = Journal(record=True)
    (action,) = _actions(1)
    journal.answered(3.0, action)
    assert journal.acks_after(0.0) == []
