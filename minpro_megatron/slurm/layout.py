"""Node/GPU arithmetic of a Slurm job, checked before anything is submitted.

``plan_layout(cfg)`` returns the derived numbers (ranks, DP, expert DP, servers) or raises ConfigError
naming the field and the fix. The learner rules that do not depend on Slurm (heads divisible by TP,
experts by EP, batch by DP x micro-batch, ...) come from ``RunConfig.validate(world_size)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from minpro_megatron.config import ConfigError, RunConfig

__all__ = ["JobLayout", "plan_layout", "parse_time"]


@dataclass(frozen=True)
class JobLayout:
    learner_nodes: int
    rollout_nodes: int
    gpus_per_node: int
    ranks_per_node: int
    world_size: int  # learner ranks
    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    etp: int
    expert_dp: int  # data-parallel size of the expert weights (their optimizer shards)
    servers_per_node: int
    num_servers: int
    rollout_tp: int

    @property
    def nodes(self) -> int:
        return self.learner_nodes + self.rollout_nodes

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def summary(self) -> list[str]:
        lines = [
            f"nodes: {self.nodes} = {self.learner_nodes} learner + {self.rollout_nodes} rollout"
            + (f", {self.gpus_per_node} GPUs each ({self.total_gpus} GPUs)" if self.gpus_per_node else ", CPU only"),
            f"learner: {self.world_size} ranks = {self.learner_nodes} node(s) x {self.ranks_per_node} = "
            f"TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp}"
            + (f"; experts: EP {self.ep} x ETP {self.etp}, expert DP {self.expert_dp}" if self.ep > 1 else ""),
        ]
        if self.rollout_nodes:
            lines.append(f"rollout: {self.num_servers} SGLang server(s) = {self.rollout_nodes} node(s) x "
                         f"{self.servers_per_node} per node, TP {self.rollout_tp} each, + router")
        return lines


def parse_time(text: str) -> int:
    """Slurm --time ([D-]HH:MM:SS, MM:SS, MM) in seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"slurm.time={text!r} is not a Slurm time; use HH:MM:SS or D-HH:MM:SS")
    d, a, b, c = (int(g) if g else None for g in m.groups())
    if c is not None:
        h, mi, s = a, b, c
    elif b is not None:
        h, mi, s = (a, b, 0) if d is not None else (0, a, b)
    else:
        h, mi, s = (a, 0, 0) if d is not None else (0, a, 0)
    return (d or 0) * 86400 + h * 3600 + mi * 60 + s


def plan_layout(cfg: RunConfig) -> JobLayout:
    s, p, m = cfg.slurm, cfg.parallel, cfg.model
    if s.learner_nodes < 1:
        raise ConfigError(f"slurm.learner_nodes must be >= 1, got {s.learner_nodes}")
    if s.rollout_nodes < 0:
        raise ConfigError(f"slurm.rollout_nodes must be >= 0, got {s.rollout_nodes}")
    if s.gpus_per_node < 0:
        raise ConfigError(f"slurm.gpus_per_node must be >= 0 (0: CPU nodes), got {s.gpus_per_node}")
    rpn = s.ranks_per_node()
    if rpn < 1:
        raise ConfigError("slurm.procs_per_node must be >= 1 on CPU nodes (slurm.gpus_per_node=0): "
                          "set slurm.procs_per_node to the learner ranks per node")
    if s.gpus_per_node and rpn > s.gpus_per_node:
        raise ConfigError(f"slurm.procs_per_node={rpn} exceeds slurm.gpus_per_node={s.gpus_per_node}: "
                          "one learner rank per GPU at most")
    world = s.learner_nodes * rpn
    # TP all-reduces every layer: keep the group inside a node (NVLink), never across the network
    if rpn % p.tensor:
        raise ConfigError(f"parallel.tensor={p.tensor} must divide the learner ranks per node ({rpn}) so a "
                          "TP group stays inside one node; lower parallel.tensor or change slurm.procs_per_node")
    if p.data is not None and p.tensor * p.pipeline * p.context * p.data != world:
        raise ConfigError(
            f"learner GPUs: slurm.learner_nodes={s.learner_nodes} x {rpn} per node = {world}, but parallel.tensor"
            f" x pipeline x context x data = {p.tensor}*{p.pipeline}*{p.context}*{p.data} = "
            f"{p.tensor * p.pipeline * p.context * p.data}; change slurm.learner_nodes or set parallel.data=null")
    cfg.validate(world_size=world)  # heads/TP, experts/EP, world/(TP*PP*CP), batch/DP ... name their fields
    dp = p.data_parallel_size(world)
    etp = p.expert_tensor or 1
    expert_dp = world // (p.expert * etp * p.pipeline)

    servers_per_node = num_servers = 0
    if cfg.rollout.backend == "sglang":
        if s.rollout_nodes == 0 and not cfg.rollout.server_urls:
            raise ConfigError("rollout.backend=sglang needs rollout nodes: set slurm.rollout_nodes >= 1 "
                              "(or rollout.server_urls to attach to servers running elsewhere)")
        if s.rollout_nodes:
            tp = cfg.rollout.server_tp_size
            if tp < 1 or (s.gpus_per_node and s.gpus_per_node % tp):
                raise ConfigError(f"rollout.server_tp_size={tp} must divide slurm.gpus_per_node={s.gpus_per_node} "
                                  "(each SGLang server takes server_tp_size GPUs of one node)")
            if m.num_attention_heads % tp:
                raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                                  f"rollout.server_tp_size={tp}; pick a server TP that divides it")
            servers_per_node = s.servers_per_node(tp)
            if servers_per_node < 1:
                raise ConfigError("slurm.rollout_servers_per_node must be >= 1 (CPU nodes: set it explicitly)")
            if s.gpus_per_node and servers_per_node * tp > s.gpus_per_node:
                raise ConfigError(f"slurm.rollout_servers_per_node={servers_per_node} x rollout.server_tp_size={tp}"
                                  f" needs more than slurm.gpus_per_node={s.gpus_per_node} GPUs")
            num_servers = servers_per_node * s.rollout_nodes
            if not m.hf_path:
                raise ConfigError("the rollout servers need a model: set model.hf_path (an HF checkpoint directory)")
    elif s.rollout_nodes:
        raise ConfigError(f"slurm.rollout_nodes={s.rollout_nodes} but rollout.backend={cfg.rollout.backend!r} "
                          "generates inside the learner: set slurm.rollout_nodes=0 or rollout.backend=sglang")

    limit = parse_time(s.time)
    if s.signal_seconds < 0 or (s.signal_seconds and s.signal_seconds >= limit):
        raise ConfigError(f"slurm.signal_seconds={s.signal_seconds} must be >= 0 and below slurm.time "
                          f"({limit} s): it is the warning before the time limit")
    for mount in s.container_mounts:
        if ":" not in mount:
            raise ConfigError(f"slurm.container_mounts entry {mount!r} must look like /host/path:/container/path")
    return JobLayout(learner_nodes=s.learner_nodes, rollout_nodes=s.rollout_nodes, gpus_per_node=s.gpus_per_node,
                     ranks_per_node=rpn, world_size=world, tp=p.tensor, pp=p.pipeline, cp=p.context, dp=dp,
                     ep=p.expert, etp=etp, expert_dp=expert_dp, servers_per_node=servers_per_node,
                     num_servers=num_servers, rollout_tp=cfg.rollout.server_tp_size)
