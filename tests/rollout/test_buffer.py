"""Staleness version arithmetic: a simulated driver loop with real version stamping."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from minpro_megatron.rollout.buffer import BoundedAgeBuffer, ExactDelaySchedule, StalenessError, token_age_histogram


@dataclass
class Group:
    versions: list[int]
    prompt: int = 0

    @property
    def min_version(self) -> int:
        return min(self.versions)

    @property
    def max_version(self) -> int:
        return max(self.versions)


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_exact_delay_version_arithmetic_over_10_steps(n: int) -> None:
    sched: ExactDelaySchedule[Group] = ExactDelaySchedule(n)
    live_version = 0  # the weights the rollout engine holds
    consumed = []
    for step in range(10):
        for target in sched.steps_to_generate(step):
            sched.put(target, [Group([live_version] * 5, prompt=target)])
        batch = sched.take(step)
        consumed.append(batch[0].min_version)
        live_version += 1  # the learner updates, then the weights are synced
    assert consumed == [max(0, s - n) for s in range(10)]
    # At most n + 1 batches are ever in flight, and exactly n remain at the end.
    assert len(sched.pending_steps) == n


def test_exact_delay_rejects_a_batch_from_the_wrong_version() -> None:
    sched: ExactDelaySchedule[Group] = ExactDelaySchedule(2)
    for t in sched.steps_to_generate(0):
        sched.put(t, [Group([0, 0])])
    sched.take(0)
    sched.put(3, [Group([1, 2])])  # a sync overlapped generation: two versions in one response
    sched.take(1)
    sched.take(2)
    with pytest.raises(StalenessError, match="must train on version 1"):
        sched.take(3)
    with pytest.raises(StalenessError, match="no batch was generated for step 9"):
        sched.take(9)
    with pytest.raises(StalenessError, match="generated twice"):
        sched.put(4, [])
        sched.put(4, [])


def test_bounded_age_admits_drops_and_requeues() -> None:
    buf: BoundedAgeBuffer[Group] = BoundedAgeBuffer(n=2, overflow="drop")
    buf.put([Group([0, 0]), Group([1, 3]), Group([3]), Group([2, 2])])
    taken, stale = buf.take(step=4, count=2)  # admit min version >= 2
    assert [g.versions for g in taken] == [[3], [2, 2]]
    assert [g.versions for g in stale] == [[0, 0], [1, 3]]
    assert buf.dropped == 2 and len(buf) == 0

    rq: BoundedAgeBuffer[Group] = BoundedAgeBuffer(n=0, overflow="requeue")
    rq.put([Group([5], prompt=1), Group([4], prompt=2), Group([5], prompt=3)])
    assert [g.prompt for g in rq.evict_stale(5)] == [2]
    assert rq.requeued == 1 and len(rq) == 2
    state = rq.state_dict()
    other: BoundedAgeBuffer[Group] = BoundedAgeBuffer(n=9)
    other.load_state_dict(state)
    assert other.n == 0 and len(other) == 2 and other.requeued == 1


def test_token_age_histogram() -> None:
    assert token_age_histogram([3, 3, 2, 0], step=4) == {1: 2, 2: 1, 4: 1}


def test_bad_staleness_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="rollout.staleness.n"):
        ExactDelaySchedule(-1)
    with pytest.raises(ValueError, match="rollout.staleness.overflow"):
        BoundedAgeBuffer(1, overflow="keep")  # type: ignore[arg-type]
