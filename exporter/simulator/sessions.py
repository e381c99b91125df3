"""Sessions: how a batch's actions move once created, from ``Pending`` to their end.

Action path: ``Pending`` → ``Awaiting`` (``sentAt`` = check-in) → a final status
(``receivedAt`` a few seconds later, or at a later check-in), or → ``Cancel`` by the
administrator (``canceledAt``) from either pending status. Device-side cancellations
(``OperationCanceled``…) are answers: they carry both ``receivedAt`` and ``canceledAt``.

While history is built, a device checks in only when it has work (check-ins are memoryless,
so the first check-in after a creation is drawn then); afterwards every online device checks
in on its own schedule.

Creating a batch sends a push notification (WNS) that asks the device for a session; a
device that is awake answers it within seconds, one that is asleep or rarely connected
often does not, and its batch waits for the next scheduled session. Which pushes land is
drawn from a generator of its own, so the fleet a seed builds does not depend on it.

One setting fails on one hardware model every time (``catalog.MODEL_FAILURE``).

Sessions and answers are reported to the fleet's :class:`~exporter.simulator.health.Health`
(compliance and builds), which draws from a generator of its own.
"""

from __future__ import annotations

import itertools
import math
import random

from exporter.simulator import catalog
from exporter.simulator.catalog import Config
from exporter.simulator.health import Health
from exporter.simulator.model import (
    ACTIVE,
    AWAITING,
    HOUR,
    PENDING,
    PROVISIONING,
    Action,
    Batch,
    Device,
    millis,
)
from exporter.simulator.timeline import (
    ANSWER,
    CANCEL_ACTION,
    CANCEL_BATCH,
    CHECKIN,
    Agenda,
    Journal,
)
from exporter.statuses import PENDING_STATUSES, StatusClass, classify

STUCK_SHARE = 0.04  # actions a device leaves unanswered until a later session
DEVICE_CANCEL_SHARE = 0.01
ACTION_CANCEL_SHARE = 0.01
BATCH_CANCEL_SHARE = 0.02
MIN_INTERVAL = 30.0  # seconds between two sessions of one device, at least
MAX_ANSWER_DELAY = 120.0
_DELAY_MU, _DELAY_SIGMA = math.log(2.0), 0.9  # lognormal answer delay: median 2 s
_PUSH_MU, _PUSH_SIGMA = math.log(15.0), 1.0  # push to session: median 15 s
MAX_PUSH_DELAY = 600.0
PROVISIONING_SPAN = HOUR  # from enrollment to the end of the setup sessions

_CUM_ERROR_WEIGHTS = tuple(itertools.accumulate(catalog.ERROR_WEIGHTS))

Outcome = tuple[str, int | None]  # an answer's status and SyncML code


class Sessions:
    """Check-ins, answers and cancellations: what moves actions after their creation.

    ``building`` is true while the history before ``history_end`` is made.
    """

    __slots__ = (
        "_agenda", "_health", "_journal", "_push_rng", "_rng", "building", "history_end",
    )

    def __init__(
        self,
        rng: random.Random,
        push_rng: random.Random | None,
        agenda: Agenda,
        journal: Journal,
        history_end: float,
        health: Health | None = None,
    ) -> None:
        self._rng = rng
        self._health = health
        self._push_rng = push_rng  # None: pushes never land
        self._agenda = agenda
        self._journal = journal
        self.building = True
        self.history_end = history_end

    # --- batches ---------------------------------------------------------------------------

    def created(self, batch: Batch, when: float) -> None:
        """A new batch, all ``Pending``: plan its cancellations and the session that sends it."""
        device = batch.device
        self._journal.created(when, batch.actions)
        if batch.error_ratio is None:
            self._plan_cancellations(batch, when)
        if self.building and device.next_checkin is None:
            self.schedule_checkin(device, when)
        elif not self.building:
            self._push_notification(device, when)

    def _plan_cancellations(self, batch: Batch, when: float) -> None:
        rng = self._rng
        if rng.random() < BATCH_CANCEL_SHARE:
            moment = millis(when + rng.expovariate(1.0 / (2 * HOUR)))
            self._agenda.push(moment, CANCEL_BATCH, batch, None)
        for action in batch.actions:
            if rng.random() < ACTION_CANCEL_SHARE:
                moment = millis(when + rng.expovariate(1.0 / HOUR))
                self._agenda.push(moment, CANCEL_ACTION, action, None)

    def _push_notification(self, device: Device, when: float) -> None:
        """A session soon after ``when``, when the push reaches the device."""
        rng = self._push_rng
        if rng is None or not device.online_at(when) or rng.random() >= _push_reach(device):
            return
        delay = min(MAX_PUSH_DELAY, 1.0 + math.exp(_PUSH_MU + _PUSH_SIGMA * rng.gauss()))
        moment = millis(when + delay)
        if device.next_checkin is None or moment < device.next_checkin:
            # The scheduled session's event stays on the heap and is skipped when it comes
            # (see checkin): a device keeps one schedule.
            device.next_checkin = moment
            self._agenda.push(moment, CHECKIN, device, None)

    # --- sessions --------------------------------------------------------------------------

    def schedule_checkin(self, device: Device, after: float) -> None:
        interval = max(MIN_INTERVAL, self._rng.expovariate(1.0 / device.mean_interval))
        device.next_checkin = millis(after + interval)
        self._agenda.push(device.next_checkin, CHECKIN, device, None)

    def checkin(self, when: float, device: Device) -> None:
        """The session scheduled at ``when``, unless a push moved the device's schedule."""
        if device.next_checkin != when:
            return
        device.next_checkin = None
        if device.offline_since is not None and when >= device.offline_since:
            return
        device.last_report = when
        device.json = None
        if device.state == PROVISIONING and when >= device.profile.enrolled + PROVISIONING_SPAN:
            device.state = ACTIVE
        if self._health is not None:
            self._health.checked_in(when, device)
        # While history is built nobody can look, so answers due before the start need no
        # trip through the heap (the journal is sorted once at the end of the build).
        direct: list[tuple[float, Action, Outcome]] = []
        waiting = False
        for batch in device.open:
            waiting |= self._send(when, device, batch, direct)
        for answered, action, outcome in direct:
            self.answer(answered, action, outcome)
        if not self.building or waiting:
            self.schedule_checkin(device, when)

    def _send(
        self,
        when: float,
        device: Device,
        batch: Batch,
        direct: list[tuple[float, Action, Outcome]],
    ) -> bool:
        """Sends the batch's pending actions and draws the answers; True if some wait."""
        rng = self._rng
        changed = waiting = False
        burst = batch.error_ratio is not None
        for action in batch.actions:
            if action.status == PENDING:
                self._enter(action, when, AWAITING)
                action.sent = when
                changed = True
            if action.status != AWAITING or action in device.inflight:
                continue
            if not burst and rng.random() < STUCK_SHARE:
                waiting = True
                continue
            outcome = self._outcome(device, batch, action)
            delay = min(MAX_ANSWER_DELAY, math.exp(_DELAY_MU + _DELAY_SIGMA * rng.gauss()))
            answered = millis(when + 0.05 + delay)
            if self.building and answered <= self.history_end:
                direct.append((answered, action, outcome))
            else:
                device.inflight.add(action)
                self._agenda.push(answered, ANSWER, action, outcome)
        if changed:
            batch.touch(when)
        return waiting

    def _outcome(self, device: Device, batch: Batch, action: Action) -> Outcome:
        rng = self._rng
        failure = catalog.MODEL_FAILURE
        if (batch.error_ratio is None and device.profile.model == failure.model
                and action.config[0] == failure.path):
            return failure.status, catalog.status_code(failure.status)
        share = device.error_share if batch.error_ratio is None else batch.error_ratio
        draw = rng.random()
        if draw < share:
            status = rng.choices(catalog.ERROR_STATUSES, cum_weights=_CUM_ERROR_WEIGHTS)[0]
        elif batch.error_ratio is None and draw < share + DEVICE_CANCEL_SHARE:
            status = rng.choice(catalog.DEVICE_CANCELS)
        else:
            status = _success(rng, action.config)
        return status, catalog.status_code(status)

    # --- answers and cancellations ---------------------------------------------------------

    def answer(self, when: float, action: Action, outcome: Outcome) -> None:
        action.batch.device.inflight.discard(action)
        if action.batch.deleted or action.status != AWAITING:
            return  # canceled meanwhile, or gone
        status, code = outcome
        action.code = code
        action.received = when
        if classify(status) is StatusClass.CANCELED:
            action.canceled = when
        else:
            action.data = _results(action.config, status)
        self._enter(action, when, status)
        self._journal.answered(when, action)
        if self._health is not None:
            self._health.answered(when, action, status)
        _close(action, when)

    def cancel(self, when: float, action: Action) -> None:
        """The administrator's cancellation, if the action is still pending."""
        if action.batch.deleted or action.status not in PENDING_STATUSES:
            return
        action.batch.device.inflight.discard(action)
        action.canceled = when
        self._enter(action, when, catalog.ADMIN_CANCEL)
        _close(action, when)

    def _enter(self, action: Action, when: float, status: str) -> None:
        action.status = status
        action.json = None
        self._journal.entered(when, action, status)


def _close(action: Action, when: float) -> None:
    batch = action.batch
    batch.touch(when)
    batch.open_count -= 1
    if batch.open_count == 0:
        batch.device.open.pop(batch, None)


def _push_reach(device: Device) -> float:
    """Share of pushes that wake a session: devices that sync often are usually awake."""
    if device.mean_interval <= HOUR:
        return 0.95
    if device.mean_interval <= 12 * HOUR:
        return 0.6
    return 0.25


def _success(rng: random.Random, config: Config) -> str:
    action = config[1]
    if action == "Delete" and rng.random() < 0.25:
        return "DeleteWithoutArchive"
    draw = rng.random()
    if draw < 0.003:
        return "ConflictDetectedResolvedServerCommandWinning"
    if draw < 0.005:
        return "AuthenticationAccepted"
    return "Acknowledged"


def _results(config: Config, status: str) -> tuple[tuple[str, str], ...]:
    """What the device returned: the node value for a successful Get, nothing otherwise."""
    if config[1] == "Get" and classify(status) is StatusClass.SUCCESS:
        fmt = config[3]
        return (("format", fmt), ("value", catalog.GET_RESULTS.get(fmt, "")))
    return ()
