"""The Megatron-Core learner: model chunks + DDP + distributed optimizer + LR schedule, and the RL train
step (packed THD micro-batches through ``get_forward_backward_func``, CP-local log-probs -> prefix scan ->
registry loss).

Loss scaling. Each micro-batch's registry loss is this rank's *share* of the step's global objective
(normalised by the step's global token / sequence counts, ``BatchTotals``). Megatron then divides the
returned loss by the number of micro-batches (schedules.forward_step_calc_loss, 3-tuple path without
``calculate_per_token_loss``) and DDP averages gradients over the DP x CP group. The loss function
therefore returns ``share * dp_cp_size * num_microbatches``, so the accumulated gradient is exactly the
sum of shares over micro-batches and ranks: the gradient of the global token-mean (or seq-mean) loss.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.config import RunConfig
from minpro_megatron.learner.batch import MicroBatch, TrainSample, global_batch_totals, pack_micro_batch, split_micro_batches
from minpro_megatron.learner.logprobs import capture_output_layer_input, logprobs_from_hidden, prepare_packed_inputs
from minpro_megatron.learner.model_provider import build_model_chunks, transformer_config_from, unwrap_model
from minpro_megatron.learner.routing_replay import (
    RoutingTally, check_replay_supported, gather_recorded, moe_layer_numbers, rank_slice, recording, replaying,
    routing_valid,
)
from minpro_megatron.losses import BatchTotals, policy_loss
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.parallel.json_collectives import broadcast_json
from minpro_megatron.parallel.reduce import all_reduce_sum

__all__ = ["Learner", "StepResult", "combine_microbatch_metrics"]


@dataclass
class StepResult:
    step: int
    grad_norm: float
    lr: float
    update_successful: bool
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.metrics.get("loss", math.nan)


def combine_microbatch_metrics(per_mb: Sequence[dict[str, float]]) -> dict[str, float]:
    """Step metrics from micro-batch metrics: sums for losses and counts, extrema for *_min / *_max,
    token-weighted means for everything else (a quantile such as *_p10 is averaged: an approximation
    across micro-batches, exact within one)."""
    if not per_mb:
        return {}
    weights = [max(m.get("num_tokens", 0.0), 0.0) for m in per_mb]
    wsum = sum(weights)
    out: dict[str, float] = {}
    for key in per_mb[0]:
        vals = [m[key] for m in per_mb if key in m]
        if key in ("loss", "num_tokens", "nonfinite_count", "mismatch_masked_count"):
            out[key] = float(sum(vals))
        elif key.endswith("_min"):
            finite = [v for v in vals if not math.isnan(v)]
            out[key] = min(finite) if finite else math.nan
        elif key.endswith("_max") or key == "m2po_threshold":
            finite = [v for v in vals if not math.isnan(v)]
            out[key] = max(finite) if finite else math.nan
        else:
            pairs = [(v, w) for v, w in zip(vals, weights) if not math.isnan(v) and w > 0]
            tw = sum(w for _, w in pairs)
            out[key] = sum(v * w for v, w in pairs) / tw if tw > 0 else (vals[0] if wsum == 0 else math.nan)
    return out


class Learner:
    """Owns the model, optimizer and scheduler of this rank. Every rank of the job constructs one after
    ``learner.distributed.init_distributed`` and calls ``train_step`` with its data-parallel shard."""

    def __init__(self, cfg: RunConfig, total_updates: int | None = None) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg = cfg
        self.ps = ps
        # rollout.routing_replay=rollout: routers replay the rollout's expert choices (learner/routing_replay.py)
        self.replay_routing = cfg.rollout.routing_replay == "rollout"
        if self.replay_routing:
            check_replay_supported()
        self.routing_log: list[dict[int, torch.Tensor]] | None = None  # set: each forward's recorded routing
        self.last_routing: list[torch.Tensor] | None = None  # last_token_logits' routing per sequence (replay on)
        self.routing_tally: RoutingTally | None = None  # during train_step: own vs replayed routing (replay on)
        self.last_routing_tally: RoutingTally | None = None  # the last train_step's
        self.config = transformer_config_from(
            cfg.model, cfg.parallel, **({"moe_enable_routing_replay": True} if self.replay_routing else {})
        )
        chunks = build_model_chunks(cfg.model, cfg.parallel, config=self.config)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        for m in self.model:
            m.broadcast_params()  # identical replicas across DP (also after a seed difference)
        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                use_distributed_optimizer=o.use_distributed_optimizer,
                bf16=self.config.bf16,
                fp16=self.config.fp16,
                params_dtype=self.config.params_dtype,
            ),
            self.model,
        )
        total_updates = total_updates or max(cfg.train.steps * cfg.train.updates_per_batch, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.lr_warmup_steps > 0 else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_steps,
            lr_decay_steps=max(total_updates, o.lr_warmup_steps + 1),
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(total_updates, 1),
            wd_incr_style="constant",
        )
        self.step = 0  # optimizer updates done
        # packed inputs and loss tensors live where the model does (the current CUDA device, or the CPU)
        self.device = next(self.model[0].parameters()).device

    # ---- parallel geometry ---------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    @property
    def is_last_stage(self) -> bool:
        return self.ps.is_pipeline_last_stage(ignore_virtual=True)

    def _pack(self, samples: Sequence[TrainSample]) -> MicroBatch:
        ps = self.ps
        return pack_micro_batch(
            samples,
            cp_size=ps.get_context_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            cp_group=ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None,
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            sequence_parallel=bool(self.config.sequence_parallel),
            device=self.device,
        )

    # ---- forward / backward ----------------------------------------------------------------------------
    def _run_schedule(
        self,
        micro_batches: list[MicroBatch],
        loss_fn: Callable[[MicroBatch, torch.Tensor, torch.Tensor, torch.nn.Module], tuple[torch.Tensor, dict]],
        forward_only: bool,
    ) -> list[dict]:
        """Run micro-batches through the pipeline schedule; ``loss_fn(mb, hidden, weight, model)`` on the
        last stage returns (loss to backpropagate, report dict). Returns the reports (last stage only)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
            mb = next(data_iterator)
            call = dict(
                input_ids=mb.inputs.input_ids,
                position_ids=mb.inputs.position_ids,
                attention_mask=None,
                packed_seq_params=mb.inputs.packed_seq_params,
            )
            post = getattr(unwrap_model(model), "post_process", True)
            with self._routing_context(mb, model):
                if not post:
                    return model(**call), None
                with capture_output_layer_input(model) as cap:
                    output = model(**call)
            hidden, weight = cap.hidden, cap.weight

            def loss_func(_output: torch.Tensor):
                loss, report = loss_fn(mb, hidden, weight, model)
                return loss, torch.tensor(1, dtype=torch.int, device=loss.device), report

            return output, loss_func

        iters: Any = iter(micro_batches)
        if len(self.model) > 1:
            iters = [iter(micro_batches) for _ in self.model]
        max_len = max(mb.inputs.input_ids.shape[1] for mb in micro_batches)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters,
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=max_len,
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def _routing_context(self, mb: Any, model: torch.nn.Module) -> Any:
        """Replay the micro-batch's routing (this TP rank's tokens of it), or record into ``routing_log``."""
        if not self.replay_routing:
            return contextlib.nullcontext()
        routing = getattr(mb, "routing", None)
        if routing is not None:
            ps = self.ps
            tp, rank, sp = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), bool(self.config.sequence_parallel)
            valid = rank_slice(routing_valid(mb.layout), tp, rank, sp) if self.routing_tally is not None else None
            return replaying(model, rank_slice(routing, tp, rank, sp), valid, self.routing_tally)
        if self.routing_log is not None:
            rec: dict[int, torch.Tensor] = {}
            self.routing_log.append(rec)
            return recording(model, rec)
        return contextlib.nullcontext()

    def train_step(self, shard: Sequence[TrainSample], totals: BatchTotals | None = None) -> StepResult:
        """One optimizer update on this DP rank's ``shard`` (the same on every TP/PP/CP rank of the DP
        group). ``totals``: the step's global trained-token / sequence counts (computed if omitted)."""
        cfg = self.cfg
        if totals is None:
            totals = global_batch_totals(shard, self.ps.get_data_parallel_group())
        mbs = [self._pack(s) for s in split_micro_batches(shard, cfg.train.micro_batch_size)]
        scale = float(self.ps.get_data_parallel_world_size(with_context_parallel=True) * len(mbs))
        temperature = cfg.rollout.temperature
        vocab = cfg.model.vocab_size  # the output layer may carry TP padding rows beyond it

        def loss_fn(mb: MicroBatch, hidden: torch.Tensor, weight: torch.Tensor, model: torch.nn.Module):
            logp, ent = logprobs_from_hidden(model, hidden, weight, mb.inputs, temperature=temperature, valid_vocab=vocab)
            share, metrics = policy_loss(
                logp, mb.old_logp, mb.advantages, mb.mask, mb.layout, cfg.loss, ref_logp=mb.ref_logp, totals=totals,
                rollout_logp=mb.rollout_logp,
            )
            metrics.update(_entropy_metrics(ent, mb))
            return share * scale, metrics

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        tally = self.routing_tally = RoutingTally() if self.replay_routing else None
        try:
            reports = self._run_schedule(mbs, loss_fn, forward_only=False)
        finally:
            self.routing_tally = None
        ok, grad_norm = self._guarded_optimizer_step()
        if ok:
            self.scheduler.step(increment=1)
        self.step += 1
        metrics = self._share_from_last_stage(combine_microbatch_metrics(reports) if self.is_last_stage else None)
        if tally is not None:
            self.last_routing_tally = tally
            metrics.update(self._routing_agreement(tally))
        return StepResult(
            step=self.step,
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            update_successful=bool(ok),
            metrics=metrics,
        )

    def _routing_agreement(self, tally: RoutingTally) -> dict[str, float]:
        """``mismatch/routing_agree_frac`` (collective): of the replayed (token, MoE layer) pairs of this step,
        the share where the learner's own router would have chosen the same experts; ``mismatch/routing_pairs``:
        how many pairs were replayed (every rank's routers: each pair once per TP rank without sequence
        parallelism, which leaves the fraction unchanged)."""
        t = torch.tensor([float(sum(tally.agree.values())), float(sum(tally.total.values()))], dtype=torch.float64,
                         device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        agree, total = t.tolist()
        return {"mismatch/routing_agree_frac": agree / total if total else math.nan, "mismatch/routing_pairs": total}

    def sft_step(self, shard: Sequence[TrainSample], lr: float | None = None) -> StepResult:
        """One supervised update: token-mean negative log-likelihood of the trained response tokens
        (``TrainSample.old_logp`` and ``advantage`` are ignored). ``lr`` overrides the schedule's rate for
        this update only (the warm start before RL)."""
        totals = global_batch_totals(shard, self.ps.get_data_parallel_group())
        mbs = [self._pack(s) for s in split_micro_batches(shard, self.cfg.train.micro_batch_size)]
        scale = float(self.ps.get_data_parallel_world_size(with_context_parallel=True) * len(mbs))
        vocab = self.cfg.model.vocab_size

        def loss_fn(mb: MicroBatch, hidden: torch.Tensor, weight: torch.Tensor, model: torch.nn.Module):
            logp, _ = logprobs_from_hidden(model, hidden, weight, mb.inputs, temperature=1.0, with_entropy=False, valid_vocab=vocab)
            nll = -torch.where(mb.mask, logp, 0.0).sum() / max(totals.num_tokens, 1.0)
            t = all_reduce_sum(torch.stack([nll.detach().double(), mb.mask.sum().double()]), mb.layout.dp_cp_group)
            return nll * scale, {"loss": float(t[0]), "num_tokens": float(t[1])}

        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_schedule(mbs, loss_fn, forward_only=False)
        ok, grad_norm = self._guarded_optimizer_step()
        self.step += 1
        metrics = self._share_from_last_stage(combine_microbatch_metrics(reports) if self.is_last_stage else None)
        return StepResult(self.step, float(grad_norm) if grad_norm is not None else math.nan,
                          float(self.optimizer.param_groups[0]["lr"]), bool(ok), metrics)

    def _guarded_optimizer_step(self) -> tuple[bool, Any]:
        """optimizer.step() unless any rank holds a non-finite gradient: then the update is skipped (grads
        zeroed, parameters and Adam state untouched) and (False, nan) returned on every rank.

        Without this, a NaN gradient passes through clipping (NaN norm -> NaN scale) into the parameters:
        megatron's own overflow check covers only fp16 loss scaling."""
        if not self._grads_finite():
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            return False, math.nan
        ok, grad_norm, _ = self.optimizer.step()
        return bool(ok), grad_norm

    def _all_ranks_ok(self, local_ok: bool) -> bool:
        flag = torch.tensor([0.0 if local_ok else 1.0], device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag.item()) == 0.0

    def _grads_finite(self) -> bool:
        """Collective over all ranks: every gradient (the DDP main_grad buffers) is finite. One flag per
        tensor stays on the device and is reduced there: a single host sync per step, not one per tensor."""
        flags = []
        for m in self.model:
            for p in m.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None:
                    flags.append(torch.isfinite(g).all())
        return self._all_ranks_ok(bool(torch.stack(flags).all()) if flags else True)

    def params_finite(self) -> bool:
        """Collective over all ranks: every parameter of the model is finite (checked before weights are
        published to rollout servers or written to a checkpoint)."""
        flags = [torch.isfinite(p).all() for m in self.model for p in m.parameters()]
        return self._all_ranks_ok(bool(torch.stack(flags).all()) if flags else True)

    def restore_scheduled_lr(self) -> None:
        """Re-apply the LR schedule's current rate (after sft_step overrode it)."""
        self.scheduler.step(increment=0)

    @torch.no_grad()
    def score(self, shard: Sequence[TrainSample], temperature: float | None = None) -> list[torch.Tensor]:
        """Current-policy log-probs of every response token of ``shard`` (forward only), on every rank of
        the DP group: for recomputing behaviour log-probs, reference log-probs and sync verification."""
        temperature = self.cfg.rollout.temperature if temperature is None else temperature
        vocab = self.cfg.model.vocab_size
        mbs = [self._pack([s]) for s in shard]

        def loss_fn(mb: MicroBatch, hidden: torch.Tensor, weight: torch.Tensor, model: torch.nn.Module):
            logp, _ = logprobs_from_hidden(model, hidden, weight, mb.inputs, temperature=temperature, with_entropy=False, valid_vocab=vocab)
            full = _gather_cp(logp, mb)
            s = mb.samples[0]
            resp = full[s.prompt_len - 1 : s.prompt_len - 1 + s.response_len]
            return torch.zeros((), device=logp.device), {"logp": resp.cpu()}

        reports = self._run_schedule(mbs, loss_fn, forward_only=True)
        logps = [r["logp"].tolist() for r in reports] if self.is_last_stage else None
        return [torch.tensor(lp, dtype=torch.float32) for lp in self._share_from_last_stage(logps)]

    @torch.no_grad()
    def last_token_logits(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Full-vocabulary fp32 logits at the last token of each sequence (the next-token distribution),
        for sampling with the learner's own model. Returned on the last pipeline stage (identical on its
        TP and CP ranks), None on the other stages."""
        from megatron.core import tensor_parallel

        ps = self.ps
        layout = ZigzagLayout(
            torch.tensor([int(s.numel()) for s in sequences]),
            cp_size=ps.get_context_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            cp_group=ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None,
            pad_multiple=ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size()
            if self.config.sequence_parallel else 1,
        )
        inputs = prepare_packed_inputs(
            list(sequences), layout, device=self.device, tp_size=ps.get_tensor_model_parallel_world_size(),
            sequence_parallel=bool(self.config.sequence_parallel),
        )

        def loss_fn(mb: Any, hidden: torch.Tensor, weight: torch.Tensor, model: torch.nn.Module):
            if self.config.sequence_parallel:
                hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            hidden = hidden.reshape(hidden.shape[0], -1)
            is_last = layout.local_positions == layout.seqlens[layout.local_seq_ids] - 1
            rows = torch.nonzero(is_last).flatten().to(hidden.device)
            local = hidden[rows].float() @ weight.float().t()  # [k, V / TP]
            local = tensor_parallel.gather_from_tensor_model_parallel_region(local)[:, : self.cfg.model.vocab_size]
            full = local.new_zeros((layout.num_seqs, local.shape[1]))
            full[layout.local_seq_ids.to(hidden.device)[rows]] = local
            if layout.cp_size > 1:  # each sequence's last token lives on exactly one CP rank
                dist.all_reduce(full, group=layout.cp_group)
            return torch.zeros((), device=full.device), {"logits": full}

        log = self.routing_log = [] if self.replay_routing else None  # the local engine's routing (R3)
        try:
            reports = self._run_schedule([_Forward(inputs)], loss_fn, forward_only=True)
        finally:
            self.routing_log = None
        if log is not None:
            self.last_routing = gather_recorded(
                log, layout, len(moe_layer_numbers(self.config)), self.config.moe_router_topk,
                tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                sequence_parallel=bool(self.config.sequence_parallel),
                groups=[ps.get_model_parallel_group(), layout.cp_group],
            )
        return reports[0]["logits"] if self.is_last_stage else None

    def _share_from_last_stage(self, obj: Any) -> Any:
        """Broadcast JSON-able data from the last pipeline stage to the other stages."""
        ps = self.ps
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return obj
        return broadcast_json(obj, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())


@dataclass
class _Forward:
    """A forward-only micro-batch: just the packed inputs."""

    inputs: Any


def _entropy_metrics(ent: torch.Tensor | None, mb: MicroBatch) -> dict[str, float]:
    if ent is None:
        return {}
    t = torch.stack([torch.where(mb.mask, ent.detach().float(), 0.0).sum().double(), mb.mask.sum().double()])
    t = all_reduce_sum(t, mb.layout.dp_cp_group)
    return {"entropy": float(t[0] / t[1]) if t[1] > 0 else math.nan}


def _gather_cp(local: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """CP-local per-position values of a one-sequence micro-batch -> the unpadded sequence."""
    return mb.layout.unpad(mb.layout.all_gather_merge(local.detach()))
