"""Random packed batches for loss tests: a list of per-sequence dicts plus their packed form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minpro_megatron.parallel.cp_layout import ZigzagLayout


def random_sequences(
    seed: int,
    n_seqs: int = 5,
    max_len: int = 12,
    lr_scale: float = 0.3,
    masked_seq: bool = True,
    dtype: torch.dtype = torch.float64,
) -> list[dict]:
    """Sequences of a prompt (mask False) then a response (mask True, with a few holes)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n_seqs):
        n = int(torch.randint(1, max_len + 1, (1,), generator=g))
        prompt = int(torch.randint(0, n, (1,), generator=g))
        logp = -torch.rand(n, generator=g, dtype=torch.float64) * 3
        old = logp + lr_scale * torch.randn(n, generator=g, dtype=torch.float64)
        mask = torch.arange(n) >= prompt
        mask &= torch.rand(n, generator=g) > 0.1  # holes: untrained response tokens (e.g. tool output)
        if masked_seq and i == 1:
            mask[:] = False
        adv = torch.full((n,), float(torch.randn(1, generator=g, dtype=torch.float64)))
        seqs.append({"logp": logp.to(dtype), "old_logp": old.to(dtype), "adv": adv.to(dtype), "mask": mask})
    return seqs


def with_rollout(seqs: list[dict], seed: int, scale: float = 0.4) -> list[dict]:
    """The same sequences with server log-probs ``rollout_logp`` = old_logp + scale * noise."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for s in seqs:
        noise = scale * torch.randn(len(s["mask"]), generator=g, dtype=torch.float64)
        out.append({**s, "rollout_logp": (s["old_logp"].double() + noise).to(s["old_logp"].dtype)})
    return out


@dataclass
class Packed:
    layout: ZigzagLayout
    logp: torch.Tensor  # global padded, leaf with grad
    old_logp: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    rollout_logp: torch.Tensor | None = None


def pack(seqs: list[dict], cp_size: int = 1, dtype: torch.dtype | None = None) -> Packed:
    layout = ZigzagLayout(torch.tensor([len(s["mask"]) for s in seqs]), cp_size=cp_size)
    dtype = dtype or seqs[0]["logp"].dtype

    def cat(key: str, fill) -> torch.Tensor:
        return layout.pad(torch.cat([s[key] for s in seqs]), fill)

    return Packed(
        layout=layout,
        logp=cat("logp", 0.0).to(dtype).detach().requires_grad_(True),
        old_logp=cat("old_logp", 0.0).to(dtype),
        adv=cat("adv", 0.0).to(dtype),
        mask=cat("mask", False),
        rollout_logp=cat("rollout_logp", 0.0).to(dtype) if "rollout_logp" in seqs[0] else None,
    )


def reference_leaves(seqs: list[dict]) -> list[dict]:
    """Float64 copies whose logp are fresh leaves (for the reference's autograd)."""
    out = []
    for s in seqs:
        d = {k: (v.double() if v.is_floating_point() else v.clone()) for k, v in s.items()}
        d["logp"] = d["logp"].detach().clone().requires_grad_(True)
        out.append(d)
    return out


def split_grad(packed: Packed) -> list[torch.Tensor]:
    flat = packed.layout.unpad(packed.logp.grad)
    return list(torch.split(flat, packed.layout.seqlens.tolist()))
