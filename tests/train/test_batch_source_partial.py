"""In-flight weight updates in the batch source (rollout.partial, train/batch_source.py BoundedAgeSource):
the run-ahead generation is not joined before the weight sync, it is collected at the next step, so a
response holds tokens of the version that started it and the version after the sync; bounded age measures
it by its oldest token; every prompt is trained on exactly once, in stream order, also across a checkpoint
taken with a generation in flight and a step whose collection failed.

The real BoundedAgeSource, BoundedAgeBuffer and PromptStream, driven like RLTrainer.step (next_batch ->
update -> join -> publish), with stand-ins named as such: ``FakeRollouts`` (a response of two tokens, the
first from the version live at start, the second from the one live at collection: what SGLang's retract
pause gives a request that continues across a sync) and ``OneRankDP`` (data parallel size 1, no process group).
"""

from __future__ import annotations

import pytest

from minpro_megatron.data.dataset import PromptStream
from minpro_megatron.data.tasks import Problem
from minpro_megatron.rollout.types import RolloutSample, SampleGroup
from minpro_megatron.train.batch_source import BoundedAgeSource
from minpro_megatron.train.groups import Group, train_samples
from minpro_megatron.train.rollouts import RolloutStats, StartedRollout

BATCH = 3


class ServersGone(RuntimeError):
    pass


class OneRankDP:
    size, rank, group = 1, 0, None

    def max(self, value: float) -> float:
        return float(value)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def share(self, items):
        return list(items)


class FakeRollouts:
    def __init__(self) -> None:
        self.version = 0
        self.dp = OneRankDP()
        self.fail_next_finish = False

    def start(self, problems, shard: bool = True) -> StartedRollout:
        return StartedRollout(pending=self.version, problems=list(problems))  # type: ignore[arg-type]

    def run(self, problems, shard: bool = True):
        return self.finish(self.start(problems, shard))

    def finish(self, started: StartedRollout) -> tuple[list[Group], RolloutStats]:
        if self.fail_next_finish:
            self.fail_next_finish = False
            raise ServersGone("connection refused")
        v0, v1 = started.pending, self.version
        lp = [-0.5 - v0, -0.5 - v1]  # behaviour log-prob of each token at its own version
        groups = [Group(p, SampleGroup([RolloutSample(0, 0, [1], [2, 3], lp, [v0, v1], "length", "fake")]), [0.0], [1.0])
                  for p in started.problems]
        return groups, RolloutStats()


def _problems(n: int) -> list[Problem]:
    return [Problem(prompt=f"p{i}", answer=str(i), data_source="arithmetic") for i in range(n)]


def _run(partial: bool, steps: int, n: int = 1, save_at: int | None = None, fail_collect_at: int | None = None):
    """Drive the source like RLTrainer.step; returns (prompts trained on in order, each step's groups)."""
    rollouts = FakeRollouts()
    stream = PromptStream(_problems(1000), seed=3)
    source = BoundedAgeSource(n, "drop", rollouts, stream, BATCH, partial=partial)  # type: ignore[arg-type]
    trained, batches, step = [], [], 0
    while step < steps:
        if step == fail_collect_at:  # the servers fail the collection of the in-flight generation
            rollouts.fail_next_finish = True
            with pytest.raises(ServersGone):
                source.next_batch(step)
            source.abort_step()
            fail_collect_at = None
            continue
        groups, _ = source.next_batch(step)
        trained += [g.problem.prompt for g in groups]
        batches.append(groups)
        source.join()  # after the update: a no-op with partial (the generation goes on across the sync)
        step += 1
        rollouts.version = step  # the weight sync
        if step == save_at:  # checkpoint with a generation in flight, loaded into a fresh source (a resumed job)
            state, pos = source.state_dict(), stream.state_dict()
            stream = PromptStream(_problems(1000), seed=3)
            stream.load_state_dict(pos)
            source = BoundedAgeSource(n, "drop", rollouts, stream, BATCH, partial=partial)  # type: ignore[arg-type]
            source.load_state_dict(state)
    return trained, batches


def test_partial_responses_span_the_sync_and_age_by_their_oldest_token() -> None:
    trained, batches = _run(partial=True, steps=5)
    for step, groups in enumerate(batches):
        for g in groups:
            s = g.samples[0]
            if step == 0:  # generated synchronously at step 0 by version 0
                assert s.weight_versions == [0, 0]
            else:  # started at step - 1 (version step - 1), collected after the sync to step
                assert s.weight_versions == [step - 1, step]
                assert g.min_version == step - 1 and g.max_version == step  # age 1 = n: admitted
            (ts,) = train_samples([g])
            assert ts.old_logp.tolist() == s.logprobs  # each token keeps its own version's behaviour log-prob
    # without partial the run-ahead is joined before the sync: one version per response
    _, plain = _run(partial=False, steps=5)
    assert all(len(set(g.samples[0].weight_versions)) == 1 for groups in plain for g in groups)
    assert trained == [p.prompt for p in PromptStream(_problems(1000), seed=3).take(5 * BATCH)]


def test_bounded_age_drops_partial_responses_older_than_n() -> None:
    # n = 1 admits age 1; were age measured by the newest token, n = 0 would admit them too
    _, batches = _run(partial=True, steps=3, n=0)
    assert all(g.min_version == step and g.max_version == step for step, groups in enumerate(batches) for g in groups)


@pytest.mark.parametrize("save_at", [1, 3])
def test_a_checkpoint_with_a_generation_in_flight_loses_no_prompt(save_at: int) -> None:
    want, _ = _run(partial=True, steps=5)
    got, _ = _run(partial=True, steps=5, save_at=save_at)
    assert got == want  # the in-flight prompts are taken again by the resumed run, in stream order


def test_a_failed_collection_gives_the_in_flight_prompts_back() -> None:
    want, _ = _run(partial=True, steps=5)
    got, _ = _run(partial=True, steps=5, fail_collect_at=2)
    assert got == want
