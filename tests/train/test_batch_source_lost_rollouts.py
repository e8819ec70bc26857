"""Rollouts lost at a stop (train/batch_source.py ``abort_step`` / ``drop_inflight``): every prompt is
trained on exactly once and in stream order, and exact delay regenerates a lost batch with the live weights.

The real ExactDelaySource and PromptStream, driven step by step like the trainer (next_batch -> update ->
join), with a fake generator (named as such: ``FakeRollouts``) standing in for the engine: it stamps every
sample with the live weight version and fails a collection on demand like dead servers.
"""

from __future__ import annotations

import pytest

from minpro_megatron.data.dataset import PromptStream
from minpro_megatron.data.tasks import Problem
from minpro_megatron.rollout.types import RolloutSample, SampleGroup
from minpro_megatron.train.batch_source import ExactDelaySource
from minpro_megatron.train.groups import Group
from minpro_megatron.train.rollouts import RolloutStats, StartedRollout

BATCH = 3


class ServersGone(RuntimeError):
    pass


class FakeRollouts:
    """Generation stand-in: one single-sample group per prompt, every token of the live ``version``."""

    def __init__(self) -> None:
        self.version = 0
        self.fail_next_finish = False

    def start(self, problems, shard: bool = True) -> StartedRollout:
        return StartedRollout(pending=self.version, problems=list(problems))  # type: ignore[arg-type]

    def finish(self, started: StartedRollout) -> tuple[list[Group], RolloutStats]:
        if self.fail_next_finish:
            self.fail_next_finish = False
            raise ServersGone("connection refused")
        version = started.pending
        groups = [Group(p, SampleGroup([RolloutSample(0, 0, [1], [2], [0.0], [version], "stop", "fake")]), [0.0], [0.0])
                  for p in started.problems]
        return groups, RolloutStats()


def _problems(n: int) -> list[Problem]:
    return [Problem(prompt=f"p{i}", answer=str(i), data_source="arithmetic") for i in range(n)]


def _run(n: int, steps: int, lose_join_at: set[int] = frozenset(), abort_at: set[int] = frozenset(),
         resume_state: bool = True) -> tuple[list[str], list[int]]:
    """Drive the source like RLTrainer.step; returns the prompts trained on (in order) and each step's staleness."""
    rollouts = FakeRollouts()
    stream = PromptStream(_problems(1000), seed=7)
    source = ExactDelaySource(n, rollouts, stream, BATCH)  # type: ignore[arg-type]
    trained, ages, step = [], [], 0
    while step < steps:
        rollouts.version = step
        if step in abort_at:  # the step's own generation fails: state back to before it; a resumed run retries
            rollouts.fail_next_finish = True
            with pytest.raises(ServersGone):  # (a case list error if this step generates nothing itself)
                source.next_batch(step)
            source.abort_step()
            abort_at = abort_at - {step}
            if resume_state:  # what the checkpoint holds, loaded into a fresh source (a resumed job)
                state, pos = source.state_dict(), stream.state_dict()
                stream = PromptStream(_problems(1000), seed=7)
                stream.load_state_dict(pos)
                source = ExactDelaySource(n, rollouts, stream, BATCH)  # type: ignore[arg-type]
                source.load_state_dict(state)
            continue
        groups, _ = source.next_batch(step)
        trained += [g.problem.prompt for g in groups]
        ages.append(step - groups[0].min_version)
        if step in lose_join_at:  # after the update: the later steps' batches are lost with the servers
            rollouts.fail_next_finish = True
            with pytest.raises(ServersGone):
                source.join()
            source.drop_inflight()
        else:
            source.join()
        step += 1
        if step - 1 in lose_join_at and resume_state:
            state, pos = source.state_dict(), stream.state_dict()
            stream = PromptStream(_problems(1000), seed=7)
            stream.load_state_dict(pos)
            source = ExactDelaySource(n, rollouts, stream, BATCH)  # type: ignore[arg-type]
            source.load_state_dict(state)
    return trained, ages


CASES = {  # steps whose later batches are lost after the update, steps whose own generation fails before it
    0: [(set(), {3}), (set(), {1, 4})],  # n = 0 generates nothing ahead: only aborts
    1: [({2}, set()), ({2, 3}, set()), ({1}, set()), ({2}, {3})],  # step 3 regenerates its own batch: may abort
    2: [({2}, set()), ({2, 3}, set()), ({1}, set())],
    3: [({2}, set()), ({2, 3}, set()), ({1}, set())],
}


@pytest.mark.parametrize("n", sorted(CASES))
def test_lost_rollouts_keep_every_prompt_once_in_order(n) -> None:
    ref, ref_ages = _run(n, 8)
    assert ref_ages == [min(s, n) for s in range(8)]
    for lose, abort in CASES[n]:
        trained, ages = _run(n, 8, lose_join_at=lose, abort_at=abort)
        assert trained == ref, (n, lose, abort)  # no prompt lost, none twice, same order
        assert all(a <= n for a in ages)


def test_a_lost_batch_is_regenerated_with_the_live_weights() -> None:
    # n=2: at step 2 the batch of step 4 is lost; step 3 has its batch (generated at version 1); at step 3 the
    # batch of step 4 is generated again (version 3: age 1 instead of 2), then step 5's as usual (version 3)
    _, ages = _run(2, 7, lose_join_at={2})
    assert ages == [0, 1, 2, 2, 1, 2, 2]
    # n=1: step 3's batch lost at step 2 is generated by step 3 itself (age 0); the first try fails, the retry
    # after the abort works
    _, ages = _run(1, 6, lose_join_at={2}, abort_at={3})
    assert ages == [0, 1, 1, 0, 1, 1]
