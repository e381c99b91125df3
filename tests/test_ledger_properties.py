"""The exactly-once ledger against every sequence of reads an upstream can produce.

Hypothesis draws one batch's true story (when it was created, when each action was sent,
answered or canceled) and a sequence of reads of it: fresh, stale (a lagging replica's view
of an earlier moment), short (a subset of the actions), 404s and window exits (the batch
leaves the view), restarts (a new process with a new watermark) and ledger pruning. The
truth is computed from the story alone: the statuses each action entered after the
watermark, and per setting the actions whose final status came after it. The state may never
count more than that, and once a fresh full read comes after everything, it counts exactly
that (unless pruning forgot what a stale read never showed).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.settings import setting
from exporter.state import FleetState
from exporter.statuses import classify

DEVICE = "65f0c0ffee65f0c0ffee0001"
BATCH = "65f0c0ffee65f0c0ffee1001"
START = 1_000_000.0
FINALS = ("Acknowledged", "UnexpectedError", "Cancel", "CommandNotFound")


@dataclass(frozen=True)
class Story:
    """One action's truth: the moments it entered each status (None: never)."""

    cmd: str
    sent: float | None
    final: str | None
    final_at: float | None

    def entered(self, created: float, until: float) -> dict[str, float]:
        moments = {"Pending": created}
        if self.sent is not None and self.sent <= until:
            moments["Awaiting"] = self.sent
        if self.final is not None and self.final_at is not None and self.final_at <= until:
            moments[self.final] = self.final_at
        return moments

    def shown(self, created: float, at: float) -> Action:
        """What a read of the truth at ``at`` shows."""
        moments = self.entered(created, at)
        status = list(moments)[-1]  # the furthest along the path by then
        canceled = status == "Cancel"
        answered = status in FINALS and not canceled
        return Action(
            self.cmd,
            status,
            None,
            moments.get("Awaiting"),
            moments[status] if answered else None,
            moments[status] if canceled else None,
            path=self.path,
            operation="Replace",
        )

    @property
    def path(self) -> str:
        # Two settings, one of them under instance ids that must fold into one.
        return f"./Device/Vendor/MSFT/Policy/{self.cmd}/X" if self.cmd[-1] in "02468" else (
            f"./Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/{{{self.cmd[-1] * 8}-0000-0000"
            f"-0000-000000000000}}/DownloadInstall"
        )


@st.composite
def stories(draw: st.DrawFn) -> tuple[float, list[Story]]:
    # Up to 200 s before the watermark (history) or after it, and before the first read.
    created = START - 200 + draw(st.integers(-200, 200))
    out = []
    for i in range(draw(st.integers(1, 5))):
        sent = draw(st.one_of(st.none(), st.integers(1, 200).map(lambda d: created + d)))
        final = draw(st.one_of(st.none(), st.sampled_from(FINALS)))
        if final is not None and final != "Cancel" and sent is None:
            final = None  # a device answers only what it was sent
        base = sent if sent is not None else created
        final_at = base + draw(st.integers(0, 200)) if final is not None else None
        out.append(Story(f"cmd-{i}", sent, final, final_at))
    return created, out


READ = st.one_of(
    st.tuples(st.just("fresh"), st.just(0)),
    st.tuples(st.just("stale"), st.integers(1, 300)),
    st.tuples(st.just("short"), st.integers(0, 31)),
    st.tuples(st.just("404"), st.just(0)),
    st.tuples(st.just("window"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
    st.tuples(st.just("prune"), st.just(0)),
)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def fresh_state(clock: Clock) -> FleetState:
    state = FleetState(
        organization="acme",
        latency_buckets=(1, 10, 100),
        metrics=SelfMetrics(),
        clock=clock,
        ledger_retention_seconds=60,
    )
    state.watch(DEVICE)
    return state


def counted(state: FleetState) -> dict[str, int]:
    return {status: n for status, _, n in state.transitions() if n}


def latencies(state: FleetState) -> int:
    return sum(h.count for h in state.latency().values())


def truth(created: float, actions: list[Story], after: float, until: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for story in actions:
        for status, moment in story.entered(created, until).items():
            if moment > after:
                out[status] = out.get(status, 0) + 1
    return out


def setting_results(state: FleetState) -> dict[tuple[str, str], int]:
    return {(name, c): n for name, _, c, n in state.setting_results() if n}


def settled(actions: list[Story], after: float, until: float) -> dict[tuple[str, str], int]:
    """Per (setting, status_class), the actions whose final status came in (after, until]."""
    out: dict[tuple[str, str], int] = {}
    for story in actions:
        final, moment = story.final, story.final_at
        if final is not None and moment is not None and after < moment <= until:
            key = (setting(story.path), classify(final).value)
            out[key] = out.get(key, 0) + 1
    return out


def answered(actions: list[Story], after: float, until: float) -> int:
    finals = [s.final_at for s in actions if s.final not in (None, "Cancel")]
    return sum(1 for moment in finals if moment is not None and after < moment <= until)


@settings(max_examples=400, deadline=None)
@given(
    story=stories(),
    reads=st.lists(st.tuples(st.integers(0, 120), READ), min_size=1, max_size=12),
)
def test_each_status_counts_once_per_action_whatever_the_reads(
    story: tuple[float, list[Story]], reads: list[tuple[int, tuple[str, int]]]
) -> None:
    created, actions = story
    clock = Clock()
    clock.now = START - 200
    state = fresh_state(clock)
    watermark = clock.now
    clock.now = START  # reads start here, after the batch was created
    batch = Batch(BATCH, name="policy", created_at=created)
    pruned = False

    def read(at: float, subset: list[Story]) -> None:
        state.apply_actions(DEVICE, batch, [s.shown(created, at) for s in subset])

    for advance, (kind, arg) in reads:
        clock.now += advance
        if kind == "fresh":
            read(clock.now, actions)
        elif kind == "stale":  # a replica lagging behind, though not to before the batch
            read(max(created, clock.now - arg), actions)
        elif kind == "short":
            read(clock.now, [s for i, s in enumerate(actions) if arg >> i & 1])
        elif kind == "404":
            state.drop_batch(DEVICE, BATCH)
        elif kind == "window":
            state.retain_batches(DEVICE, [])
        elif kind == "restart":
            state, watermark, pruned = fresh_state(clock), clock.now, False
        else:
            pruned |= state.prune_ledger() > 0
        # Never more than the truth, whatever came before.
        expected = truth(created, actions, watermark, clock.now)
        for status, n in counted(state).items():
            assert n <= expected.get(status, 0), (status, counted(state), expected)
        assert latencies(state) <= answered(actions, watermark, clock.now)
        expected_settings = settled(actions, watermark, clock.now)
        for key, n in setting_results(state).items():
            assert n <= expected_settings.get(key, 0), (key, setting_results(state))

    clock.now += 1000  # every story is over
    read(clock.now, actions)
    expected = truth(created, actions, watermark, clock.now)
    if pruned:
        for status, n in counted(state).items():
            assert n <= expected.get(status, 0)
    else:
        assert counted(state) == expected
        assert latencies(state) == answered(actions, watermark, clock.now)
        assert setting_results(state) == settled(actions, watermark, clock.now)
        for s in actions:
            entered = set(s.entered(created, clock.now))
            assert state.entered(DEVICE, BATCH, s.cmd) == entered
