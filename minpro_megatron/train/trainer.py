"""The RL program: prompts -> rollouts -> rewards -> GRPO group advantages -> learner update(s) with the
configured loss -> weight sync, with exact-delay or bounded-age staleness, TensorBoard for every metric,
and checkpoints of the whole RL state.

SPMD: every rank (torchrun, or srun + torchrun) runs ``RLTrainer.run``. Each data-parallel rank rolls out
and trains its own share of the prompts (groups never span DP ranks, so rewards and advantages are
local); rank 0 writes logs. Versions count RL steps: version v = the policy after v RL steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.advantages import group_advantages
from minpro_megatron.config import RunConfig, load_config, to_dict
from minpro_megatron.data.dataset import PromptStream, drop_overlong, load_dataset_pair
from minpro_megatron.data.prompts import encode_prompt
from minpro_megatron.data.tasks import Problem
from minpro_megatron.learner.batch import TrainSample, global_batch_totals
from minpro_megatron.learner.recompute import recompute_old_logp
from minpro_megatron.metrics.writer import MetricsWriter
from minpro_megatron.parallel.reduce import all_reduce_sum
from minpro_megatron.rewards import reward
from minpro_megatron.rollout.buffer import BoundedAgeBuffer, ExactDelaySchedule, token_age_histogram
from minpro_megatron.rollout.types import RolloutSample, SamplingParams

__all__ = ["RLTrainer", "Group", "NonFiniteError", "main"]

log = logging.getLogger("minpro_megatron.train.trainer")


class NonFiniteError(RuntimeError):
    """Non-finite gradients or parameters: too many skipped updates, or weights that must not be published."""


@dataclasses.dataclass
class Group:
    """The G responses of one prompt with their rewards and advantages (the buffer's unit)."""

    problem: Problem
    samples: list[RolloutSample]
    rewards: list[float]
    advantages: list[float]

    @property
    def min_version(self) -> int:
        return min(min(s.weight_versions) for s in self.samples if s.weight_versions)

    @property
    def max_version(self) -> int:
        return max(max(s.weight_versions) for s in self.samples if s.weight_versions)

    def to_state(self) -> dict:
        return {
            "problem": dataclasses.asdict(self.problem),
            "samples": [dataclasses.asdict(s) for s in self.samples],
            "rewards": self.rewards,
            "advantages": self.advantages,
        }

    @staticmethod
    def from_state(state: dict) -> "Group":
        from minpro_megatron.rollout.types import WeightVersionSpan

        samples = []
        for s in state["samples"]:
            s = dict(s)
            s["version_spans"] = [WeightVersionSpan(**v) for v in s.get("version_spans", [])]
            samples.append(RolloutSample(**s))
        return Group(Problem(**state["problem"]), samples, list(state["rewards"]), list(state["advantages"]))


class RLTrainer:
    def __init__(self, cfg: RunConfig) -> None:
        from megatron.core import parallel_state as ps

        from minpro_megatron.learner.learner import Learner

        from minpro_megatron.train.stop import StopRequest

        # A SIGTERM / stop file during init and warm start is recorded and honoured at the next check
        # (after the engine is up, and after every warm-start step) instead of being lost.
        self.stop = StopRequest.install()
        self.cfg = cfg
        self.ps = ps
        self.rank = dist.get_rank()
        self.out_dir = Path(cfg.logging.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            from minpro_megatron.config.secrets import masked_dict

            # secret-looking slurm.env values as '***': the output directory is shared and copied around
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(masked_dict(to_dict(cfg)), sort_keys=False))
        if cfg.model.hf_path:  # the architecture comes from config.json, never from hand-written arguments
            from minpro_megatron.convert.hf_config import resolve_model_config

            cfg.model = resolve_model_config(cfg.model)
        cfg.validate(world_size=dist.get_world_size())  # batch vs DP etc. before any server boots
        self.tokenizer = load_tokenizer(cfg)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.bos_id = self.tokenizer.bos_token_id
        t = cfg.train
        self.learner = Learner(cfg, total_updates=t.steps * t.updates_per_batch)
        train, evals = load_dataset_pair(cfg.data, t.seed)
        # tokenized now: a prompt the servers cannot take (HTTP 400) is dropped and counted, not fatal later
        limit = cfg.model.max_position_embeddings - cfg.rollout.max_new_tokens
        train, notes = drop_overlong(train, self.encode_prompt, limit, "train")
        evals, eval_notes = drop_overlong(evals, self.encode_prompt, limit, "eval")
        self.dropped_rows = len(notes) + len(eval_notes)
        if self.dropped_rows and self.rank == 0:
            print(f"dropped {self.dropped_rows} over-long dataset row(s): {'; '.join((notes + eval_notes)[:5])}", flush=True)
        self.stream = PromptStream(train, seed=t.seed)
        self.eval_problems = evals
        st = cfg.rollout.staleness
        self.schedule: ExactDelaySchedule[Group] | None = ExactDelaySchedule(st.n) if st.mode == "exact" else None
        self.buffer: BoundedAgeBuffer[Group] | None = (
            BoundedAgeBuffer(st.n, st.overflow) if st.mode == "bounded" else None
        )
        self.rl_step = 0
        self.warm_started = t.warm_start_steps == 0
        self.warm_step = 0  # warm-start updates done (a stop during the warm start saves and resumes from here)
        self.skipped_updates = 0  # updates skipped for a non-finite gradient (all time)
        self.skipped_in_row = 0
        self._saved_step: int | None = None
        self.sampling = SamplingParams(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            n=t.group_size,
            stop_token_ids=(self.eos_id,),
        )
        self._engine_state: dict | None = None
        self._initialised_from: Path | None = None  # a model-only checkpoint (checkpoint.load) the run starts from
        resumed = self._maybe_resume()
        if not resumed and cfg.model.hf_path and not self._initialised_from:
            from minpro_megatron.convert.loader import load_hf_weights

            report = load_hf_weights(self.learner.model, cfg.model, cfg.model.hf_path)
            self.learner.optimizer.reload_model_params()  # fp32 main copies of bf16 weights
            if self.rank == 0:
                print(f"loaded weights from {cfg.model.hf_path} ({report.params} parameters on rank 0, "
                      f"{report.bytes_read / 2**20:.1f} MiB read)", flush=True)
        # The engine starts from the (possibly resumed) learner: SGLang servers boot from its weights.
        self.engine = make_engine(cfg, self.learner, self.eos_id, self.tokenizer, self.out_dir, version=self.rl_step)
        if self._engine_state is not None:
            self.engine.load_state_dict(self._engine_state)
        self._inflight: list[tuple[int | None, Any]] = []  # (target step or None for the buffer, started rollout)
        # A resumed run keeps everything up to its checkpoint's step R (R's own points included) and drops
        # what a killed run logged after it; a fresh run starts the logs over.
        self.writer = MetricsWriter(
            self.out_dir / "tb", enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
            keep_through=self.rl_step if resumed else None,
            wandb=({"project": cfg.logging.wandb_project or "minpro", "name": self.out_dir.name, "config": to_dict(cfg),
                    "dir": str(self.out_dir)} if cfg.logging.wandb else None),
        )

    # ---- tokens ------------------------------------------------------------------------------------------
    def encode_prompt(self, problem: Problem) -> list[int]:
        return encode_prompt(self.tokenizer, problem.prompt, self.cfg.data.chat_template)

    def decode_response(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- data-parallel sharding -------------------------------------------------------------------------
    def _dp(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def _max_dp(self, value: float) -> float:
        t = torch.tensor([float(value)])
        if self._dp() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ps.get_data_parallel_group())
        return float(t.item())

    def _any_dp_rank(self, flag: bool) -> bool:
        return self._max_dp(1.0 if flag else 0.0) > 0
    def _my_share(self, items: Sequence[Any]) -> list[Any]:
        dp, r = self.ps.get_data_parallel_world_size(), self.ps.get_data_parallel_rank()
        if len(items) % dp:
            raise ValueError(f"{len(items)} prompts are not divisible by the data-parallel size {dp}")
        return list(items)[r::dp]

    # ---- rollout ---------------------------------------------------------------------------------------
    def start_rollout(self, problems: Sequence[Problem], shard: bool = True) -> tuple[Any, list[Problem], float]:
        """Start generating this rank's share of ``problems`` (all of them if not ``shard``); collective.
        Engines with ``start_generate`` (SGLang) generate in the background until ``finish_rollout``."""
        mine = self._my_share(problems) if shard else list(problems)
        prompts = [self.encode_prompt(p) for p in mine]
        if hasattr(self.engine, "start_generate"):
            return self.engine.start_generate(prompts, self.sampling), mine, math.nan
        t0 = time.perf_counter()
        return self.engine.generate(prompts, self.sampling), mine, time.perf_counter() - t0

    def finish_rollout(self, started: tuple[Any, list[Problem], float]) -> tuple[list[Group], dict[str, float]]:
        """Collect the samples, score them and normalise advantages within each group."""
        handle, mine, gen_s = started
        t1 = time.perf_counter()
        if hasattr(self.engine, "finish"):
            groups_samples = self.engine.finish(handle)
            gen_s = handle.seconds  # rank 0's generation time (0 elsewhere); the wait shows the overlap
        else:
            groups_samples = handle
        wait_s = time.perf_counter() - t1
        groups = []
        for problem, samples in zip(mine, groups_samples):
            rewards = [
                reward(problem.data_source, self.decode_response(s.response_ids), problem.answer, self.cfg.data.strict_format)
                for s in samples
            ]
            groups.append(Group(problem, list(samples), rewards, group_advantages(rewards, self.cfg.train.advantage_eps)))
        tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
        return groups, {"time/rollout_s": gen_s, "time/rollout_wait_s": wait_s, "_gen_tokens": float(tokens)}

    def rollout(self, problems: Sequence[Problem], shard: bool = True) -> tuple[list[Group], dict[str, float]]:
        return self.finish_rollout(self.start_rollout(problems, shard))

    def _next_batch(self) -> tuple[list[Group], dict[str, float]]:
        """This step's groups per the staleness mode (generating whatever must be generated now)."""
        stats: dict[str, float] = {"time/rollout_s": 0.0, "_gen_tokens": 0.0}

        def add(s: dict[str, float]) -> None:
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v

        if self.schedule is not None:
            for target in self.schedule.steps_to_generate(self.rl_step):
                if target in self.schedule.pending_steps:
                    continue
                started = self.start_rollout(self.stream.take(self.cfg.train.rollout_batch_size))
                if target == self.rl_step:  # needed now (n = 0, or the first step)
                    groups, s = self.finish_rollout(started)
                    add(s)
                    self.schedule.put(target, groups)
                else:  # a later step's batch: generated while this step trains (async overlap)
                    self._inflight.append((target, started))
            return self.schedule.take(self.rl_step), stats
        assert self.buffer is not None
        need = self.cfg.train.rollout_batch_size // self.ps.get_data_parallel_world_size()
        taken: list[Group] = []
        # Generation is collective across DP ranks when experts span them (EP > 1), so every decision to
        # generate is made jointly: all ranks generate whenever any rank needs to.
        while self._any_dp_rank(len(taken) < need):
            if self._any_dp_rank(len(self.buffer) < need - len(taken)):
                groups, s = self.rollout(self.stream.take(self.cfg.train.rollout_batch_size))
                add(s)
                self.buffer.put(groups)
            got, stale = self.buffer.take(self.rl_step, max(need - len(taken), 0))
            taken += got
            requeue = [g.problem for g in stale] if self.buffer.overflow == "requeue" else []
            width = int(self._max_dp(len(requeue)))
            if width:
                # This rank's stale prompts again, padded with fresh ones to the widest rank's count (every
                # rank draws the same number from the stream, so the replicated streams stay in step).
                fresh = self._my_share(self.stream.take(width * self._dp()))
                problems = requeue + fresh[: width - len(requeue)]
                groups, s = self.rollout(problems, shard=False)
                add(s)
                self.buffer.put(groups)
        # Run ahead: the next batch is generated while this step trains (with SGLang, concurrently); its
        # tokens are at least one version old when consumed, admitted while within n versions.
        if self._any_dp_rank(len(self.buffer) < need):
            self._inflight.append((None, self.start_rollout(self.stream.take(self.cfg.train.rollout_batch_size))))
        return taken, stats

    # ---- one RL step -------------------------------------------------------------------------------------
    def train_samples(self, groups: Sequence[Group]) -> list[TrainSample]:
        out = []
        for g in groups:
            for s, adv in zip(g.samples, g.advantages):
                if not s.response_ids:
                    continue
                out.append(
                    TrainSample(
                        torch.tensor(s.prompt_ids + s.response_ids), len(s.prompt_ids), torch.tensor(s.logprobs),
                        adv, version=s.min_version,
                    )
                )
        return out

    def step(self) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        groups, metrics = self._next_batch()
        samples = self.train_samples(groups)
        if cfg.loss.old_logp == "recompute":  # pi_old from one learner forward; mismatch/* (learner/recompute.py)
            metrics.update(recompute_old_logp(self.learner, samples, self.ps.get_data_parallel_group()))
        k = cfg.train.updates_per_batch
        if len(samples) % k:
            raise ValueError(f"{len(samples)} samples are not divisible by train.updates_per_batch={k}")
        dump = self._sample_dump(groups) if cfg.logging.dump_samples else []  # scored before the update
        t1 = time.perf_counter()
        per = len(samples) // k
        update_metrics: list[dict[str, float]] = []
        for u in range(k):
            r = self.learner.train_step(samples[u * per : (u + 1) * per])
            self._count_update(r.update_successful)
            m = {f"loss/{name}": v for name, v in r.metrics.items()}
            m.update({"optim/grad_norm": r.grad_norm, "optim/lr": r.lr, "optim/update_skipped": float(not r.update_successful)})
            update_metrics.append(m)
        train_s = time.perf_counter() - t1
        for target, started in self._inflight:  # generated by this step's weights: join before the sync
            groups_t, s = self.finish_rollout(started)
            if target is None:  # bounded age: into the buffer
                assert self.buffer is not None
                self.buffer.put(groups_t)
            else:
                assert self.schedule is not None
                self.schedule.put(target, groups_t)
            for key, value in s.items():
                metrics[key] = metrics.get(key, 0.0) + value
        self._inflight = []
        self.rl_step += 1
        if dump and self.rank == 0:
            from minpro_megatron.metrics.samples import append_rows

            append_rows(self.out_dir, [dict(row, step=self.rl_step) for row in dump])
        t2 = time.perf_counter()
        sync = self.engine.update_weights(self.rl_step)
        sync_s = time.perf_counter() - t2
        metrics.update(_mean_dicts(update_metrics))
        metrics["optim/skipped_updates"] = float(self.skipped_updates)
        if k > 1:  # the first update's ratio statistics show staleness alone (before this step's own drift)
            metrics.update({f"loss_first_update/{n[5:]}": v for n, v in update_metrics[0].items() if n.startswith("loss/")})
        metrics.update(self._rollout_metrics(groups))
        metrics["debug/batch_digest"] = self._batch_digest(samples)
        metrics.update({f"sync/{n}": v for n, v in sync.items()})
        trained_tokens = metrics.get("loss/num_tokens", 0.0)
        metrics.update(
            {
                "time/train_s": train_s,
                "time/sync_s": sync_s,
                "time/step_s": time.perf_counter() - t0,
                "throughput/train_tokens_per_s": trained_tokens / train_s if train_s > 0 else 0.0,
                "throughput/rollout_tokens_per_s": (
                    all_reduce_sum(torch.tensor(metrics.pop("_gen_tokens"), dtype=torch.float64), self.ps.get_data_parallel_group()).item()
                    / metrics["time/rollout_s"] if metrics["time/rollout_s"] > 0 else 0.0
                ),
            }
        )
        metrics.pop("_gen_tokens", None)
        return metrics

    def _sample_dump(self, groups: Sequence[Group]) -> list[dict]:
        """logging.dump_samples rows of this rank's first samples, scored by the current (pre-update) policy.
        Collective: every rank scores the same number of samples (experts may span DP ranks)."""
        from minpro_megatron.metrics.samples import sample_row

        picked = [(g, s, r, a) for g in groups for s, r, a in zip(g.samples, g.rewards, g.advantages) if s.response_ids]
        n = int(-self._max_dp(-min(self.cfg.logging.dump_samples, len(picked))))
        picked = picked[:n]
        logps = self.learner.score([
            TrainSample(torch.tensor(s.prompt_ids + s.response_ids), len(s.prompt_ids), torch.tensor(s.logprobs), a)
            for _, s, _, a in picked
        ]) if n else []
        rows = []
        for i, ((g, s, r, a), lp) in enumerate(zip(picked, logps)):
            rows.append(sample_row(
                self.rl_step + 1, i, prompt=g.problem.prompt, response=self.decode_response(s.response_ids),
                answer=g.problem.answer, data_source=g.problem.data_source, reward=r, advantage=a,
                versions=s.weight_versions, tokens=self.tokenizer.convert_ids_to_tokens(list(s.response_ids)),
                behaviour_logp=list(s.logprobs), logp=lp.tolist(), prefix_first_value=self.cfg.loss.prefix_first_value,
            ))
        return rows

    def _count_update(self, ok: bool) -> None:
        """Count a skipped (non-finite) update; too many in a row end the run on every rank (the flag is
        the same on all ranks: Learner all-reduces it)."""
        if ok:
            self.skipped_in_row = 0
            return
        self.skipped_updates += 1
        self.skipped_in_row += 1
        if self.rank == 0:
            log.warning("non-finite gradient: update skipped (%d in a row, %d in all)", self.skipped_in_row, self.skipped_updates)
        limit = self.cfg.train.max_nonfinite_skips
        if self.skipped_in_row > limit:
            raise NonFiniteError(
                f"{self.skipped_in_row} updates in a row had non-finite gradients (skipped; parameters are unchanged "
                f"since the last good update) at RL step {self.rl_step}: more than train.max_nonfinite_skips={limit}. "
                "Lower optim.lr, check the data and rewards, or resume from the last checkpoint"
            )

    def _batch_digest(self, samples: Sequence[TrainSample]) -> float:
        """A 32-bit digest of the trained tokens of all DP ranks (equal batches -> equal digests): makes
        "the resumed run trains on the same batch" checkable from the logs."""
        import hashlib

        h = hashlib.sha256()
        for s in samples:
            h.update(s.tokens.numpy().tobytes())
            h.update(s.old_logp.numpy().tobytes())
        local = torch.tensor([int(h.hexdigest()[:7], 16)], dtype=torch.float64)  # 28 bits: exact after a sum
        return float(all_reduce_sum(local, self.ps.get_data_parallel_group()))

    def _rollout_metrics(self, groups: Sequence[Group]) -> dict[str, float]:
        rewards = [r for g in groups for r in g.rewards]
        lengths = [len(s.response_ids) for g in groups for s in g.samples]
        ages = [self.rl_step - 1 - v for g in groups for s in g.samples for v in s.weight_versions]
        local = torch.tensor(
            [sum(rewards), sum(r * r for r in rewards), len(rewards), sum(1.0 for r in rewards if r >= 1.0),
             sum(lengths), sum(ages), len(ages), sum(1 for g in groups if len(set(g.rewards)) == 1)],
            dtype=torch.float64,
        )
        t = all_reduce_sum(local, self.ps.get_data_parallel_group()).tolist()
        n = max(t[2], 1.0)
        mean = t[0] / n
        out = {
            "rollout/reward_mean": mean,
            "rollout/reward_std": math.sqrt(max(t[1] / n - mean * mean, 0.0)),
            "rollout/accuracy": t[3] / n,
            "rollout/response_length": t[4] / n,
            "rollout/staleness_mean": t[5] / max(t[6], 1.0),
            "rollout/zero_adv_group_frac": t[7] / max(len(groups) * self.ps.get_data_parallel_world_size(), 1),
        }
        if self.buffer is not None:  # cumulative counts of stale groups, over all DP ranks
            c = all_reduce_sum(torch.tensor([self.buffer.dropped, self.buffer.requeued], dtype=torch.float64),
                               self.ps.get_data_parallel_group())
            out["rollout/stale_dropped"], out["rollout/stale_requeued"] = float(c[0]), float(c[1])
        versions = [v for g in groups for s in g.samples for v in s.weight_versions]
        self._last_ages = token_age_histogram(versions, self.rl_step - 1)
        return out

    # ---- warm start and evaluation -----------------------------------------------------------------------
    def warm_start(self) -> bool:
        """Supervised steps on correct answers so the reward is not zero when RL starts. Logged on its own
        step axis (TensorBoard run tb/warm_start). Returns False when a stop request ended it early (a
        checkpoint then holds the warm-start position)."""
        t = self.cfg.train
        if self.warm_started:
            return True
        from rich.progress import Progress

        writer = MetricsWriter(self.out_dir / "tb" / "warm_start", enabled=self.rank == 0,
                               tensorboard=self.cfg.logging.tensorboard, keep_through=self.warm_step - 1 if self.warm_step else None)
        try:
            with Progress(disable=self.rank != 0) as progress:
                task = progress.add_task("warm start (supervised)", total=t.warm_start_steps, completed=self.warm_step)
                while self.warm_step < t.warm_start_steps:
                    i = self.warm_step
                    # One RL step's worth of samples per warm-start step, whatever train.updates_per_batch is: the
                    # supervised start must not depend on how the RL batch is later split into updates (a
                    # divided batch left the updates_per_batch=4 cells of the study at zero accuracy).
                    problems = self._my_share(self.stream.take(t.rollout_batch_size * t.group_size))
                    shard = [self._sft_sample(p) for p in problems]
                    r = self.learner.sft_step(shard, lr=t.warm_start_lr)
                    self._count_update(r.update_successful)
                    self.warm_step += 1
                    if self.rank == 0 and (i % 10 == 0 or i == t.warm_start_steps - 1):
                        writer.scalars(i, {"warm_start/nll": r.metrics.get("loss", math.nan), "warm_start/grad_norm": r.grad_norm})
                    progress.advance(task)
                    if self.warm_step < t.warm_start_steps and self.stop.should_stop():
                        if self.rank == 0:
                            print(f"stop requested ({self.stop.reason}) during the warm start: saving at warm-start step "
                                  f"{self.warm_step}", flush=True)
                        self.save()
                        return False
        finally:
            writer.close()
        self.learner.restore_scheduled_lr()
        self.warm_started = True
        self.engine.update_weights(self.rl_step)  # the rollout engine must serve the warm-started policy
        return True

    def _sft_sample(self, p: Problem) -> TrainSample:
        prompt = self.encode_prompt(p)
        answer = list(self.tokenizer.encode(p.answer, add_special_tokens=False)) + [self.eos_id]
        return TrainSample(torch.tensor(prompt + answer), len(prompt), torch.zeros(len(answer)), 0.0)

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out problems (pass@1)."""
        if not self.eval_problems:
            return {}
        dp = self.ps.get_data_parallel_world_size()
        problems = self.eval_problems[: len(self.eval_problems) // dp * dp]
        mine = self._my_share(problems)
        greedy = dataclasses.replace(self.sampling, temperature=0.0, n=1)
        out = self.engine.generate([self.encode_prompt(p) for p in mine], greedy)
        correct = sum(
            reward(p.data_source, self.decode_response(g[0].response_ids), p.answer, self.cfg.data.strict_format)
            for p, g in zip(mine, out)
        )
        t = all_reduce_sum(torch.tensor([correct, len(mine)], dtype=torch.float64), self.ps.get_data_parallel_group())
        return {"eval/accuracy": float(t[0] / max(t[1], 1.0))}

    # ---- checkpoints -------------------------------------------------------------------------------------
    def rank_state(self) -> dict:
        state: dict[str, Any] = {
            "rl_step": self.rl_step,
            "warm_started": self.warm_started,
            "warm_step": self.warm_step,
            "skipped_updates": self.skipped_updates,
            "skipped_in_row": self.skipped_in_row,
            "stream": self.stream.state_dict(),
            "engine": self.engine.state_dict(),
        }
        if self.schedule is not None:
            state["pending"] = {str(k): [g.to_state() for g in v] for k, v in self.schedule._pending.items()}
        if self.buffer is not None:
            bs = self.buffer.state_dict()
            bs["queue"] = [g.to_state() for g in bs["queue"]]
            state["buffer"] = bs
        return state

    def model_metadata(self) -> dict:
        """What every checkpoint records so that tools/convert_megatron_to_hf.py needs no other input:
        the (resolved) model config, the original config.json and the tokenizer."""
        m = self.cfg.model
        hf_config = None
        if m.hf_path:
            from minpro_megatron.convert.hf_config import load_hf_config

            hf_config = load_hf_config(m.hf_path)
        return {"model_config": to_dict(m), "hf_config": hf_config,
                "tokenizer": m.tokenizer_path or m.hf_path or BUILTIN_TOKENIZER}

    def save(self) -> Path | None:
        """Checkpoint at the current RL step, once (a stop request at a save step does not save twice)."""
        from minpro_megatron.learner.checkpoint import checkpoint_path, save_checkpoint

        if self._saved_step == self.rl_step and self.warm_started:
            return checkpoint_path(self.ckpt_dir, self.rl_step)
        if not self.learner.params_finite():  # collective
            raise NonFiniteError(f"the learner's parameters are not finite at RL step {self.rl_step}: not saving them")
        path = save_checkpoint(
            self.learner, self.ckpt_dir, extra={"rl_step": self.rl_step, "config": to_dict(self.cfg), **self.model_metadata()},
            keep_last=self.cfg.checkpoint.keep_last, rank_state=self.rank_state(), iteration=self.rl_step,
        )
        self._saved_step = self.rl_step
        return path

    def _maybe_resume(self) -> bool:
        from minpro_megatron.learner.checkpoint import latest_iteration, load_checkpoint, load_rank_state

        root = Path(self.cfg.checkpoint.load) if self.cfg.checkpoint.load else self.ckpt_dir
        if self.cfg.checkpoint.load and latest_iteration(self.ckpt_dir) is not None:
            root = self.ckpt_dir  # a requeued run continues from its own checkpoints, not from its starting point
        elif self.cfg.checkpoint.load and _is_model_only(root):
            return self._start_from_model_checkpoint(root)
        if latest_iteration(root) is None:
            if self.cfg.checkpoint.load:
                raise FileNotFoundError(f"checkpoint.load={str(root)!r} holds no checkpoint (no latest_checkpointed_iteration.txt)")
            return False
        from minpro_megatron.learner.checkpoint import read_common
        from minpro_megatron.config.resume import check_resume_config

        path, common = read_common(root)
        check_resume_config((common.get("extra") or {}).get("config"), to_dict(self.cfg), str(path))
        extra = load_checkpoint(self.learner, root)
        state = load_rank_state(root)
        if state is None:
            log.warning("resuming from %s with another layout: trainer state (data cursor, pending batches) restarts", root)
            self.rl_step = int(extra.get("rl_step", 0))
            self.warm_started = True
            return True
        self.rl_step = int(state["rl_step"])
        self.warm_started = bool(state["warm_started"])
        self.warm_step = int(state.get("warm_step", self.cfg.train.warm_start_steps if self.warm_started else 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.skipped_in_row = int(state.get("skipped_in_row", 0))
        self._saved_step = self.rl_step if self.warm_started else None
        self.stream.load_state_dict(state["stream"])
        self._engine_state = state["engine"]
        if self.schedule is not None and "pending" in state:
            self.schedule._pending = {int(k): [Group.from_state(g) for g in v] for k, v in state["pending"].items()}
        if self.buffer is not None and "buffer" in state:
            bs = dict(state["buffer"])
            bs["queue"] = [Group.from_state(g) for g in bs["queue"]]
            self.buffer.load_state_dict(bs)
        if self.rank == 0:
            print(f"resumed from {root} at RL step {self.rl_step}", flush=True)
        return True

    def _start_from_model_checkpoint(self, root: Path) -> bool:
        """checkpoint.load is a model-only checkpoint (tools/convert_hf_to_megatron.py): a new run from its
        weights, said in plain words. Returns False: nothing is resumed (step 0, new optimizer and data)."""
        from minpro_megatron.convert.megatron_checkpoint import load_model_checkpoint

        path = load_model_checkpoint(self.learner.model, root)
        self.learner.optimizer.reload_model_params()
        self._initialised_from = path
        if self.rank == 0:
            warm = (f"then {self.cfg.train.warm_start_steps} warm-start steps" if self.cfg.train.warm_start_steps
                    else "no warm start (train.warm_start_steps=0)")
            print(f"starting a new run from the weights of {path} (a model-only checkpoint, e.g. converted from "
                  f"Hugging Face): RL step 0, a fresh optimizer and LR schedule, the data from the start, {warm}; "
                  f"checkpoints go to {self.ckpt_dir}", flush=True)
        return False

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.cfg
        stop = self.stop  # installed in __init__: a request during init or warm start counts too
        if stop.should_stop():
            if self.rank == 0:
                print(f"stop requested ({stop.reason}) during start-up: exiting at RL step {self.rl_step}", flush=True)
            return {}
        if not self.warm_start():
            self.writer.flush()
            return {}
        if self.rl_step == 0:
            self._log(0, {**self.evaluate(), "data/dropped_overlong_rows": float(self.dropped_rows)})
        last: dict[str, float] = {}
        columns = [TextColumn("[bold]RL[/] {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}")]
        with Progress(*columns, disable=self.rank != 0) as progress:
            task = progress.add_task("rl", total=cfg.train.steps, completed=self.rl_step, info="")
            while self.rl_step < cfg.train.steps:
                metrics = self.step()
                if cfg.train.eval_interval and self.rl_step % cfg.train.eval_interval == 0:
                    metrics.update(self.evaluate())
                self._log(self.rl_step, metrics)
                last = metrics
                if cfg.checkpoint.save_interval and self.rl_step % cfg.checkpoint.save_interval == 0:
                    self.save()
                if stop.should_stop():
                    if self.rank == 0:
                        print(f"stop requested ({stop.reason}): saving at RL step {self.rl_step}", flush=True)
                    self.save()  # no-op when this step was just saved
                    break
                progress.update(task, completed=self.rl_step, info=(
                    f"reward {metrics['rollout/reward_mean']:.3f} acc {metrics['rollout/accuracy']:.3f} "
                    f"step {metrics['time/step_s']:.2f}s"))
        if cfg.checkpoint.save_interval:
            self.save()  # the final step (a no-op when it was saved above, or when resuming a finished run)
        self.writer.flush()
        return last

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self.writer.scalars(step, {k: v for k, v in metrics.items() if not k.startswith("_")})
        ages = getattr(self, "_last_ages", None)
        if ages:
            self.writer.histogram(step, "rollout/token_age", ages)

    def close(self) -> None:
        self.writer.close()
        self.engine.close()


def _mean_dicts(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    if not dicts:
        return {}
    keys = dicts[0].keys()
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


def _is_model_only(root: Path) -> bool:
    """A checkpoint without optimizer or scheduler state (what the converters write)."""
    from megatron.core import dist_checkpointing

    from minpro_megatron.learner.checkpoint import checkpoint_path, latest_iteration

    iteration = latest_iteration(root)
    if iteration is None:
        return False
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_path(root, iteration)))
    return "scheduler" not in common


BUILTIN_TOKENIZER = "builtin:char"  # checkpoint metadata: the character tokenizer of models/tiny_hf.py


def load_tokenizer(cfg: RunConfig):
    """The policy's tokenizer: from model.tokenizer_path / model.hf_path, or the built-in character
    tokenizer of the embedded default."""
    path = cfg.model.tokenizer_path or cfg.model.hf_path
    if path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    else:
        from minpro_megatron.models.tiny_hf import build_char_tokenizer

        tok = build_char_tokenizer()
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path or 'built-in'} has no eos_token; set one (generation stops on it)")
    if len(tok) > cfg.model.vocab_size and not cfg.model.hf_path:
        raise ValueError(f"tokenizer has {len(tok)} tokens but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    return tok


def make_engine(cfg: RunConfig, learner: Any, eos_id: int, tokenizer: Any, out_dir: Path, version: int) -> Any:
    if cfg.rollout.backend == "local":
        from minpro_megatron.rollout.local_engine import LocalEngine

        engine = LocalEngine(learner, eos_token_id=eos_id, seed=cfg.train.seed)
        engine.update_weights(version)
        return engine
    from minpro_megatron.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(cfg, learner, eos_id, tokenizer, out_dir, version=version)


def main(argv: Sequence[str] | None = None) -> int:
    """``minpro-train CONFIG [section.field=value ...]`` (launch with torchrun for several processes);
    ``minpro-train --show-config [CONFIG] [overrides]`` prints the resolved config with each field's help."""
    from minpro_megatron.cli_support import Parser

    p = Parser(prog="minpro-train", description="The RL trainer: minpro-train CONFIG [section.field=value ...] "
               "(under torchrun for a parallel layout). Fields: docs/config.md or --show-config.")
    p.add_argument("args", nargs="*", metavar="CONFIG [OVERRIDE]", help="run config YAML, then section.field=value overrides")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (each field with its help text and default) and exit")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    config = a.args[0] if a.args and "=" not in a.args[0] else None
    overrides = a.args[1:] if config else a.args
    if config is None and not a.show_config:
        p.error("a run config is required, e.g. minpro-train examples/tiny_moe_cpu.yaml (or --show-config)")
    cfg = load_config(config, overrides)
    if a.show_config:
        from minpro_megatron.config.docs import render_resolved

        print(render_resolved(cfg, f"minpro-train --show-config {' '.join(a.args)}".rstrip()), end="")
        return 0
    # Everything the run reads from outside is checked before a process group, model or folder exists.
    from minpro_megatron.preflight import check_run_inputs

    check_run_inputs(cfg)
    if cfg.model.hf_path:  # validate against the real architecture (config.json)
        from minpro_megatron.convert.hf_config import hf_override_message, resolve_model_config

        configured, cfg.model = cfg.model, resolve_model_config(cfg.model)
        if os.environ.get("RANK", "0") == "0":
            print(hf_override_message(configured, cfg.model), flush=True)
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed

    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        cfg.validate(world_size=ctx.world_size)
        trainer = RLTrainer(cfg)
        try:
            trainer.run()
            if ctx.rank == 0:
                from minpro_megatron.metrics.run_summary import write_run_summary

                write_run_summary(Path(cfg.logging.output_dir))
        finally:
            trainer.close()
    finally:
        destroy_distributed(ctx)
    return 0
