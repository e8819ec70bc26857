"""The RL loop: next batch -> rewards and advantages -> learner update(s) -> publish weights -> log.

    groups = batch source (exact delay or bounded age)     train/batch_source.py, train/rollouts.py
    samples -> learner.train_step (the configured loss)    learner/learner.py, losses/
    engine.update_weights(step)                            rollout/engine.py, weights/
    metrics -> TensorBoard                                  train/stats.py, metrics/writer.py

SPMD: every rank (torchrun, or srun + torchrun) runs ``RLTrainer.run``. Each data-parallel rank rolls out
and trains its own share of the prompts (groups never span DP ranks, so rewards and advantages are
local); rank 0 writes logs. A version is the RL step of the weights that generated a token.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch.distributed as dist

from minpro_megatron.config import RunConfig, load_config, to_dict
from minpro_megatron.data.dataset import PromptStream, drop_overlong, load_dataset_pair
from minpro_megatron.learner.recompute import recompute_old_logp
from minpro_megatron.metrics.writer import MetricsWriter
from minpro_megatron.parallel.rank0 import Rank0PhaseError
from minpro_megatron.rollout.engine import SyncStats, make_engine
from minpro_megatron.rollout.types import SamplingParams
from minpro_megatron.train import checkpointing
from minpro_megatron.train.batch_source import make_batch_source
from minpro_megatron.train.dp import DataParallel
from minpro_megatron.train.evaluation import greedy_accuracy
from minpro_megatron.train.groups import Group, train_sample, train_samples
from minpro_megatron.train.guard import NonFiniteError, UpdateGuard
from minpro_megatron.train.rollouts import Rollouts, RolloutStats
from minpro_megatron.train.stats import PhaseTimer, StepStats, batch_digest, mean_dicts, rollout_metrics
from minpro_megatron.train.stop import StopRequest
from minpro_megatron.train.tokens import BUILTIN_TOKENIZER, Codec, load_tokenizer
from minpro_megatron.train.warm_start import WarmStart

T = TypeVar("T")

__all__ = ["RLTrainer", "Group", "NonFiniteError", "BUILTIN_TOKENIZER", "load_tokenizer", "make_engine", "main"]


class RLTrainer:
    def __init__(self, cfg: RunConfig) -> None:
        from minpro_megatron.learner.learner import Learner

        # A SIGTERM / stop file during init and warm start is recorded and honoured at the next check.
        self.stop = StopRequest.install()
        self.cfg, self.rank, self.dp = cfg, dist.get_rank(), DataParallel()
        self.out_dir = Path(cfg.logging.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"
        if self.rank == 0:
            self._write_config()
        # cfg.model is already resolved from model.hf_path's config.json by load_config
        cfg.validate(world_size=dist.get_world_size())  # batch vs DP etc. before any server boots
        self.tokenizer = load_tokenizer(cfg)
        self.codec = Codec(self.tokenizer, cfg.data.chat_template)
        t = cfg.train
        self.learner = Learner(cfg, total_updates=t.steps * t.updates_per_batch)
        from minpro_megatron.weights.fake_quant import FakeQuant

        self.fake_quant = FakeQuant.from_config(self.learner.model, cfg)  # train.fake_quant: the servers' weights in the forward
        self.stream, self.eval_problems = self._load_data()
        self.rl_step = 0
        self.warm = WarmStart(cfg)
        self.guard = UpdateGuard(t.max_nonfinite_skips, self.rank)
        self._saved_step: int | None = None
        self.sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       max_new_tokens=cfg.rollout.max_new_tokens, n=t.group_size,
                                       stop_token_ids=(self.codec.eos_id,))
        found = checkpointing.resume(self.learner, cfg, self.ckpt_dir, self.rank)
        if found.kind == "new" and cfg.model.hf_path:
            self._load_hf_weights()
        self.rl_step = found.rl_step
        if found.kind == "resumed" and found.rank_state is None:  # another layout: only the step carries over
            self.warm.done = True
        # The engine starts from the (possibly resumed) learner: SGLang servers boot from its weights.
        self.engine = make_engine(cfg, self.learner, self.codec.eos_id, self.tokenizer, self.out_dir, version=self.rl_step)
        self.rollouts = Rollouts(self.engine, self.codec, self.sampling, self.dp, cfg.data.strict_format, t.advantage_eps)
        self.batches = make_batch_source(cfg, self.rollouts, self.stream)
        if found.rank_state is not None:
            self._load_rank_state(found.rank_state)
        # A resumed run keeps everything up to its checkpoint's step R (R's own points included) and drops
        # what a killed run logged after it; a fresh run starts the logs over.
        self.writer = MetricsWriter(
            self.out_dir / "tb", enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
            keep_through=self.rl_step if found.kind == "resumed" else None,
            wandb=({"project": cfg.logging.wandb_project or "minpro", "name": self.out_dir.name, "config": to_dict(cfg),
                    "dir": str(self.out_dir)} if cfg.logging.wandb else None),
        )

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        cfg, stop = self.cfg, self.stop  # a stop requested during init or warm start counts too
        if stop.should_stop():
            self._say(f"stop requested ({stop.reason}) during start-up: exiting at RL step {self.rl_step}")
            return {}
        if not self.warm_start():
            self.writer.flush()
            return {}
        if self.rl_step == 0:
            self._log(0, StepStats({**self.evaluate(), "data/dropped_overlong_rows": float(self.dropped_rows),
                                    **self.warm.outcome()}))
        last: dict[str, float] = {}
        with _progress(self.rank, cfg.train.steps, self.rl_step) as progress:
            while self.rl_step < cfg.train.steps:
                try:
                    stats = self.step()
                except _StepAborted as stopped:  # a stop took the servers before this step could update
                    self._say(str(stopped))
                    self.save()  # the state before the aborted step (a no-op when that step was saved)
                    break
                if cfg.train.eval_interval and self.rl_step % cfg.train.eval_interval == 0:
                    stats.metrics.update(self._stop_tolerant(self.evaluate, {}, "the evaluation"))
                self._log(self.rl_step, stats)
                last = stats.metrics
                if cfg.checkpoint.save_interval and self.rl_step % cfg.checkpoint.save_interval == 0:
                    self.save()
                if stop.should_stop():
                    self._say(f"stop requested ({stop.reason}): saving at RL step {self.rl_step}")
                    self.save()  # no-op when this step was just saved
                    break
                progress(self.rl_step, last)
        self._check_probe()  # the last sync's probe, when it ran in the background
        if cfg.checkpoint.save_interval:
            self.save()  # the final step (a no-op when it was saved above, or when resuming a finished run)
        self.writer.flush()
        return last

    def step(self) -> StepStats:
        """One RL step: batch -> (recomputed pi_old) -> update(s) -> join in-flight rollouts -> publish."""
        cfg, timer, metrics = self.cfg, PhaseTimer(), {}
        with timer("step"):
            try:
                groups, rollout = self.batches.next_batch(self.rl_step)
            except Rank0PhaseError as exc:  # raised on every rank at once, so should_stop() below is safe
                if not self.stop.should_stop():
                    raise
                self.batches.abort_step()
                raise _StepAborted(f"stop requested ({self.stop.reason}); the generation of step {self.rl_step + 1}'s "
                                   f"batch failed ({exc}): step {self.rl_step + 1} is abandoned before its update, "
                                   f"step {self.rl_step} is saved") from exc
            with timer("probe"):  # rollout.partial: this batch may hold tokens of the version the last sync probes
                self._check_probe()
            samples = train_samples(groups)
            if cfg.loss.old_logp == "recompute":  # pi_old from one learner forward; mismatch/* (learner/recompute.py)
                metrics.update(recompute_old_logp(self.learner, samples, self.dp.group))
            dump = self._sample_dump(groups) if cfg.logging.dump_samples else []  # scored before the update
            with timer("train"):
                updates = self._update(samples)
            rollout += self._stop_tolerant(self.batches.join, None, "the generation of the later steps' batches",
                                           on_failure=self.batches.drop_inflight) or RolloutStats()
            self.rl_step += 1
            if dump and self.rank == 0:
                from minpro_megatron.metrics.samples import append_rows

                append_rows(self.out_dir, [dict(row, step=self.rl_step) for row in dump])
            with timer("sync"):
                sync = self._publish()
            metrics.update(mean_dicts(updates))
            metrics["optim/skipped_updates"] = float(self.guard.skipped)
            if len(updates) > 1:  # the first update's ratio statistics show staleness alone (before this step's drift)
                metrics.update({f"loss_first_update/{n[5:]}": v for n, v in updates[0].items() if n.startswith("loss/")})
            batch, ages = rollout_metrics(groups, self.rl_step - 1, self.dp.group, self.dp.size)
            metrics.update({**batch, **self.batches.metrics()})
            metrics["debug/batch_digest"] = batch_digest(samples, self.dp.group)
            metrics.update({f"sync/{n}": v for n, v in sync.metrics().items()})
            tokens = all_reduce_sum_float(float(rollout.tokens), self.dp.group)
        train_s = timer.seconds["train"]
        metrics.update({
            "time/rollout_s": rollout.generate_s, "time/rollout_wait_s": rollout.wait_s, "time/train_s": train_s,
            "time/sync_s": timer.seconds["sync"], "time/step_s": timer.seconds["step"],
            "time/probe_wait_s": timer.seconds["probe"],  # the last sync's background probe (rollout.partial)
            "rollout/request_retries": float(rollout.retries),
            "throughput/train_tokens_per_s": metrics.get("loss/num_tokens", 0.0) / train_s if train_s > 0 else 0.0,
            "throughput/rollout_tokens_per_s": tokens / rollout.generate_s if rollout.generate_s > 0 else 0.0,
        })
        return StepStats(metrics, ages)

    def _publish(self) -> SyncStats:
        """Push the new weights into the engine; after a stop request a failed push leaves the step complete.
        With rollout.partial the push returns without its probe, which decodes behind the resumed rollouts:
        ``_check_probe`` finishes it before the next update."""
        step = self.rl_step
        defer = self.cfg.rollout.partial
        return self._stop_tolerant(lambda: self.engine.update_weights(step, defer_probe=defer), SyncStats(version=step),
                                   f"the weight sync to step {step}")

    def _check_probe(self) -> None:
        """Finish the last sync's background probe (rollout.partial; a no-op otherwise) while the learner still
        holds that version: before an update trains tokens it generated, and at the end of the run. A probe
        over rollout.verify_threshold fails the run here (WeightVerificationError, as a synchronous probe);
        its sync/verify_* metrics go to the row of the step it probed. A checkpoint does not wait for it: a
        resumed run's servers boot from (or are synced and probed with) the checkpoint's weights."""
        from minpro_megatron.weights.verify import WeightVerificationError

        try:
            probed = self._stop_tolerant(self.engine.check_deferred_probe, None, "the probe of the last weight sync")
        except WeightVerificationError as exc:
            if isinstance(exc.sync_result, SyncStats):
                self._log_probe(exc.sync_result)
            raise
        if probed is not None:
            self._log_probe(probed)

    def _log_probe(self, probed: SyncStats) -> None:
        self._log(probed.version, StepStats({f"sync/{n}": v for n, v in probed.metrics().items() if n.startswith("verify_")}))

    def _stop_tolerant(self, fn: Callable[[], T], fallback: T, what: str, on_failure: Callable[[], None] | None = None) -> T:
        """``fn()``, or ``fallback`` when the servers failed it after a stop request. Slurm's TERM (scancel,
        preemption) reaches the rollout servers with the learner, so they may be gone before the step in
        flight ends. Failures after the update cost only what needs servers: the batches generated for later
        steps (``on_failure`` gives their prompts back to the stream), the sync, the evaluation; the step itself
        is complete and run() saves it. Without a stop request a failure stays an error."""
        try:
            return fn()
        except Rank0PhaseError as exc:  # raised on every rank at once, so should_stop() below is safe
            if not self.stop.should_stop():
                raise
            if on_failure is not None:
                on_failure()
            self._say(f"stop requested ({self.stop.reason}); {what} failed ({exc}): the step in flight is "
                      "completed and saved without it")
            return fallback

    def _update(self, samples: list) -> list[dict[str, float]]:
        """``train.updates_per_batch`` optimizer updates on equal slices of the batch."""
        k = self.cfg.train.updates_per_batch
        if len(samples) % k:
            raise ValueError(f"{len(samples)} samples are not divisible by train.updates_per_batch={k}")
        per, out = len(samples) // k, []
        for u in range(k):
            r = self.learner.train_step(samples[u * per : (u + 1) * per])
            self.guard.count(r.update_successful, self.rl_step)
            out.append({**{(name if name.startswith("mismatch/") else f"loss/{name}"): v for name, v in r.metrics.items()},
                        "optim/grad_norm": r.grad_norm,
                        "optim/lr": r.lr, "optim/update_skipped": float(not r.update_successful)})
        return out

    # ---- warm start, evaluation, samples -------------------------------------------------------------------
    def warm_start(self) -> bool:
        """Supervised steps before RL (train/warm_start.py); then the engine serves the warm-started policy.
        False when a stop request ended it early (a checkpoint then holds the warm-start position)."""
        if self.warm.done:
            return True
        check = None
        if self.cfg.train.warm_start_until_accuracy:  # the criterion samples with the RL's engine (train/warm_check.py)
            from minpro_megatron.train.warm_check import SampledAccuracyCheck

            check = SampledAccuracyCheck(self.engine, self.sampling, self.codec, self.dp, self.cfg.data.strict_format,
                                         self.cfg.train.warm_start_check_samples)
        if not self.warm.run(self.learner, self.stream, self.codec, self.dp, self.guard, self.stop, self.save,
                             self.out_dir, self.rank, check):
            return False
        self.engine.update_weights(self.rl_step)
        return True

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out problems (pass@1, train/evaluation.py)."""
        if not self.eval_problems:
            return {}
        return {"eval/accuracy": greedy_accuracy(self.engine, self.eval_problems, self.sampling, self.codec, self.dp,
                                                 self.cfg.data.strict_format)}

    def _sample_dump(self, groups: Sequence[Group]) -> list[dict]:
        """logging.dump_samples rows of this rank's first samples, scored by the current (pre-update) policy.
        Collective: every rank scores the same number of samples (experts may span DP ranks)."""
        from minpro_megatron.metrics.samples import sample_row

        picked = [(g, s, r, a) for g in groups for s, r, a in zip(g.samples, g.rewards, g.advantages) if s.response_ids]
        n = int(-self.dp.max(-min(self.cfg.logging.dump_samples, len(picked))))
        picked = picked[:n]
        logps = self.learner.score([train_sample(s, a) for _, s, _, a in picked]) if n else []
        return [
            sample_row(self.rl_step + 1, i, prompt=g.problem.prompt, response=self.codec.response_text(s.response_ids),
                       answer=g.problem.answer, data_source=g.problem.data_source, reward=r, advantage=a,
                       versions=s.weight_versions, tokens=self.tokenizer.convert_ids_to_tokens(list(s.response_ids)),
                       behaviour_logp=list(s.logprobs), logp=lp.tolist(), prefix_first_value=self.cfg.loss.prefix_first_value)
            for i, ((g, s, r, a), lp) in enumerate(zip(picked, logps))
        ]

    # ---- state and checkpoints -----------------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        return {"rl_step": self.rl_step, **self.warm.state_dict(), **self.guard.state_dict(),
                "stream": self.stream.state_dict(), "engine": self.engine.state_dict(), **self.batches.state_dict()}

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        self.rl_step = int(state["rl_step"])
        self.warm.load_state_dict(state)
        self.guard.load_state_dict(state)
        self._saved_step = self.rl_step if self.warm.done else None
        self.stream.load_state_dict(state["stream"])
        self.engine.load_state_dict(state["engine"])
        self.batches.load_state_dict(state)

    def save(self) -> Path | None:
        """Checkpoint at the current RL step, once (a stop request at a save step does not save twice)."""
        from minpro_megatron.learner.checkpoint import checkpoint_path

        if self._saved_step == self.rl_step and self.warm.done:
            return checkpoint_path(self.ckpt_dir, self.rl_step)
        if not self.learner.params_finite():  # collective
            raise NonFiniteError(f"the learner's parameters are not finite at RL step {self.rl_step}: not saving them")
        path = checkpointing.save(self.learner, self.cfg, self.ckpt_dir, self.rl_step, self.rank_state())
        self._saved_step = self.rl_step
        return path

    @property
    def skipped_updates(self) -> int:
        return self.guard.skipped

    @property
    def warm_step(self) -> int:
        return self.warm.step

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        import yaml

        from minpro_megatron.config.secrets import masked_dict

        self.out_dir.mkdir(parents=True, exist_ok=True)
        # secret-looking slurm.env values as '***': the output directory is shared and copied around
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(masked_dict(to_dict(self.cfg)), sort_keys=False))

    def _load_data(self) -> tuple[PromptStream, list]:
        """Train and held-out problems, tokenized now: a prompt the servers cannot take (HTTP 400) is dropped
        and counted, not fatal later."""
        cfg = self.cfg
        train, evals = load_dataset_pair(cfg.data, cfg.train.seed)
        limit = cfg.model.max_position_embeddings - cfg.rollout.max_new_tokens
        train, notes = drop_overlong(train, self.codec.prompt, limit, "train")
        evals, eval_notes = drop_overlong(evals, self.codec.prompt, limit, "eval")
        self.dropped_rows = len(notes) + len(eval_notes)
        if self.dropped_rows:
            self._say(f"dropped {self.dropped_rows} over-long dataset row(s): {'; '.join((notes + eval_notes)[:5])}")
        return PromptStream(train, seed=cfg.train.seed), evals

    def _load_hf_weights(self) -> None:
        from minpro_megatron.convert.loader import load_hf_weights

        report = load_hf_weights(self.learner.model, self.cfg.model, self.cfg.model.hf_path)
        self.learner.optimizer.reload_model_params()  # fp32 main copies of bf16 weights
        self._say(f"loaded weights from {self.cfg.model.hf_path} ({report.params} parameters on rank 0, "
                  f"{report.bytes_read / 2**20:.1f} MiB read)")

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def _log(self, step: int, stats: StepStats) -> None:
        if self.rank != 0:
            return
        self.writer.scalars(step, stats.metrics)
        if stats.token_ages:
            self.writer.histogram(step, "rollout/token_age", stats.token_ages)

    def close(self) -> None:
        self.writer.close()
        self.engine.close()


class _StepAborted(Exception):
    """A stop request and lost rollouts ended a step before its update; the message says what is saved."""


def all_reduce_sum_float(value: float, group: Any) -> float:
    import torch

    from minpro_megatron.parallel.reduce import all_reduce_sum

    return float(all_reduce_sum(torch.tensor(value, dtype=torch.float64), group).item())


class _progress:
    """The RL progress bar on rank 0: ``with _progress(rank, total, done) as update: update(step, metrics)``."""

    def __init__(self, rank: int, total: int, done: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("[bold]RL[/] {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}")]
        self.bar = Progress(*columns, disable=rank != 0)
        self.task = self.bar.add_task("rl", total=total, completed=done, info="")

    def __enter__(self) -> "_progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, step: int, m: dict[str, float]) -> None:
        self.bar.update(self.task, completed=step, info=(
            f"reward {m['rollout/reward_mean']:.3f} acc {m['rollout/accuracy']:.3f} step {m['time/step_s']:.2f}s"))


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
    if cfg.model.hf_path and os.environ.get("RANK", "0") == "0":  # load_config took the architecture from config.json
        from minpro_megatron.config.hf_model import hf_override_message

        print(hf_override_message(load_config(config, overrides, resolve_model=False).model, cfg.model), flush=True)
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed

    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        cfg.validate(world_size=ctx.world_size)
        trainer = RLTrainer(cfg)
        try:
            trainer.run()
            if ctx.rank == 0:
                from minpro_megatron.metrics.run_summary import where_to_look, write_run_summary

                write_run_summary(Path(cfg.logging.output_dir))
                print(where_to_look(cfg.logging.output_dir, cfg.checkpoint.dir), flush=True)
        finally:
            trainer.close()
    finally:
        destroy_distributed(ctx)
    return 0
