"""Megatron's zigzag context-parallel layout for packed (THD) sequences.

Every packed sequence is padded to a multiple of ``2 * cp`` and cut into ``2 * cp`` equal chunks;
CP rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r`` of *every* sequence (load balance for causal
attention), concatenated sequence by sequence. This is the order TransformerEngine's THD context
parallelism expects (``thd_get_partitioned_indices``) and the one Megatron's ``get_batch_on_this_cp_rank``
uses per sequence, so log-probs computed CP-locally line up with it.

A layout is pure geometry plus the process groups that own the batch; it holds no activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["ZigzagLayout", "padded_lengths"]


def padded_lengths(seqlens: torch.Tensor, multiple: int) -> torch.Tensor:
    """Round each length up to a multiple of ``multiple``."""
    seqlens = torch.as_tensor(seqlens, dtype=torch.int64)
    return (seqlens + multiple - 1) // multiple * multiple


@dataclass(frozen=True, eq=False)
class ZigzagLayout:
    """Where each token of a packed batch lives under zigzag context parallelism.

    Args:
        seqlens: true (unpadded) length of each packed sequence, prompt + response.
        cp_size / cp_rank: context-parallel size and this rank's index in the CP group.
        cp_group: the CP process group (None when cp_size == 1 or in single-process references).
        dp_cp_group: the group whose ranks hold *disjoint* tokens of one global batch (data- and
            context-parallel ranks together); global token counts and batch statistics reduce over it.
        pad_multiple: extra padding requirement (e.g. TP for sequence parallelism); every sequence is
            padded to a multiple of lcm(2 * cp_size, pad_multiple) when cp_size > 1, else pad_multiple.
    """

    seqlens: torch.Tensor
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_cp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        seqlens = torch.as_tensor(self.seqlens, dtype=torch.int64).reshape(-1).cpu()
        object.__setattr__(self, "seqlens", seqlens)
        if self.cp_size < 1:
            raise ValueError(f"ZigzagLayout.cp_size must be >= 1, got {self.cp_size}")
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"ZigzagLayout.cp_rank={self.cp_rank} is outside [0, cp_size={self.cp_size})")
        if (seqlens < 1).any():
            bad = int(torch.nonzero(seqlens < 1)[0])
            raise ValueError(f"ZigzagLayout.seqlens[{bad}] = {int(seqlens[bad])}: every packed sequence needs >= 1 token")
        if self.pad_multiple < 1:
            raise ValueError(f"ZigzagLayout.pad_multiple must be >= 1, got {self.pad_multiple}")

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return int(self.seqlens.numel())

    @property
    def num_chunks(self) -> int:
        """Chunks per sequence: 2 * cp (1 when there is no context parallelism)."""
        return 2 * self.cp_size if self.cp_size > 1 else 1

    @cached_property
    def multiple(self) -> int:
        import math

        base = 2 * self.cp_size if self.cp_size > 1 else 1
        return base * self.pad_multiple // math.gcd(base, self.pad_multiple)

    @cached_property
    def padded_seqlens(self) -> torch.Tensor:
        return padded_lengths(self.seqlens, self.multiple)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """[S+1] offsets of the unpadded packed batch (int32, as attention kernels want them)."""
        return _cumsum0(self.seqlens).to(torch.int32)

    @cached_property
    def cu_seqlens_padded(self) -> torch.Tensor:
        """[S+1] offsets of the padded packed batch (the global THD tensor)."""
        return _cumsum0(self.padded_seqlens).to(torch.int32)

    @property
    def total_padded(self) -> int:
        return int(self.padded_seqlens.sum())

    @property
    def local_len(self) -> int:
        return self.total_padded // self.cp_size

    @cached_property
    def chunk_lens(self) -> torch.Tensor:
        return self.padded_seqlens // self.num_chunks

    def local_chunk_ids(self, rank: int | None = None) -> tuple[int, ...]:
        r = self.cp_rank if rank is None else rank
        return (r,) if self.cp_size == 1 else (r, 2 * self.cp_size - 1 - r)

    @cached_property
    def _local_maps(self) -> dict[str, torch.Tensor]:
        return self._maps_for_rank(self.cp_rank)

    def _maps_for_rank(self, rank: int) -> dict[str, torch.Tensor]:
        """Per local token: global padded index, sequence id, chunk id, local segment id, position.

        Local order (TE THD order): for each sequence, its first local chunk, then its second.
        """
        chunk_ids = torch.tensor(self.local_chunk_ids(rank), dtype=torch.int64)
        n_loc = chunk_ids.numel()
        seg_seq = torch.arange(self.num_seqs).repeat_interleave(n_loc)
        seg_chunk = chunk_ids.repeat(self.num_seqs)
        seg_len = self.chunk_lens[seg_seq]
        segment = torch.repeat_interleave(torch.arange(seg_seq.numel()), seg_len)
        position = seg_chunk[segment] * seg_len[segment] + _ragged_arange(seg_len)
        seq = seg_seq[segment]
        return {
            "index": self.cu_seqlens_padded[:-1].to(torch.int64)[seq] + position,
            "seq": seq,
            "chunk": seg_chunk[segment],
            "segment": segment,
            "position": position,
        }

    @property
    def local_index(self) -> torch.Tensor:
        """Index of each local token in the global padded packed tensor."""
        return self._local_maps["index"]

    @property
    def local_seq_ids(self) -> torch.Tensor:
        return self._local_maps["seq"]

    @property
    def local_chunk_of_token(self) -> torch.Tensor:
        return self._local_maps["chunk"]

    @property
    def local_segment_ids(self) -> torch.Tensor:
        """Local (sequence, chunk) segment of each local token: seq * n_local_chunks + which."""
        return self._local_maps["segment"]

    @property
    def local_positions(self) -> torch.Tensor:
        """Position of each local token inside its sequence (0-based; >= seqlen means padding)."""
        return self._local_maps["position"]

    @cached_property
    def local_valid(self) -> torch.Tensor:
        """True for real tokens, False for the padding added for the CP split."""
        return self.local_positions < self.seqlens[self.local_seq_ids]

    @cached_property
    def has_padding(self) -> bool:
        return bool((self.padded_seqlens != self.seqlens).any())

    @cached_property
    def local_segment_starts(self) -> torch.Tensor:
        """True at the first local token of each (sequence, chunk) segment."""
        seg = self.local_segment_ids
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[1:] = seg[1:] != seg[:-1]
        return starts

    @cached_property
    def local_segment_last(self) -> torch.Tensor:
        """Index of the last local token of each segment (segments are never empty)."""
        seg = self.local_segment_ids
        ends = torch.ones_like(seg, dtype=torch.bool)
        ends[:-1] = seg[1:] != seg[:-1]
        return torch.nonzero(ends).flatten()

    @cached_property
    def local_carry_index(self) -> torch.Tensor:
        """seq * num_chunks + chunk of each local token (row of a flattened [S, num_chunks] table)."""
        return self.local_seq_ids * self.num_chunks + self.local_chunk_of_token

    @property
    def num_local_segments(self) -> int:
        return self.num_seqs * len(self.local_chunk_ids())

    # ---- data movement ---------------------------------------------------------------------------
    def pad(self, packed: torch.Tensor, value: float | int | bool = 0) -> torch.Tensor:
        """Unpadded packed [T, ...] -> padded packed [T_pad, ...]."""
        if packed.shape[0] != int(self.seqlens.sum()):
            raise ValueError(
                f"pad: expected {int(self.seqlens.sum())} packed tokens (sum of seqlens), got {packed.shape[0]}"
            )
        out = packed.new_full((self.total_padded, *packed.shape[1:]), value)
        out[self._unpadded_to_padded.to(packed.device)] = packed
        return out

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Padded packed [T_pad, ...] -> unpadded packed [T, ...]."""
        self._check_len(padded, self.total_padded, "unpad")
        return padded[self._unpadded_to_padded.to(padded.device)]

    @cached_property
    def _unpadded_to_padded(self) -> torch.Tensor:
        starts = torch.repeat_interleave(self.cu_seqlens_padded[:-1].to(torch.int64), self.seqlens)
        return starts + _ragged_arange(self.seqlens)

    def split(self, padded: torch.Tensor) -> torch.Tensor:
        """Global padded packed [T_pad, ...] -> this rank's tokens [T_pad / cp, ...]."""
        self._check_len(padded, self.total_padded, "split")
        return padded[self.local_index.to(padded.device)]

    def split_for_rank(self, padded: torch.Tensor, rank: int) -> torch.Tensor:
        self._check_len(padded, self.total_padded, "split_for_rank")
        return padded[self._maps_for_rank(rank)["index"].to(padded.device)]

    def merge(self, locals_by_rank: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of split: the local tensors of every CP rank -> global padded packed tensor."""
        if len(locals_by_rank) != self.cp_size:
            raise ValueError(f"merge: expected {self.cp_size} local tensors (one per CP rank), got {len(locals_by_rank)}")
        first = locals_by_rank[0]
        out = first.new_empty((self.total_padded, *first.shape[1:]))
        for rank, local in enumerate(locals_by_rank):
            self._check_len(local, self.local_len, f"merge (rank {rank})")
            out[self._maps_for_rank(rank)["index"].to(local.device)] = local
        return out

    def all_gather_merge(self, local: torch.Tensor) -> torch.Tensor:
        """Collective merge over ``cp_group`` (for tests and debugging, O(T) communication)."""
        if self.cp_size == 1:
            return local.clone()
        parts = [torch.empty_like(local) for _ in range(self.cp_size)]
        dist.all_gather(parts, local.contiguous(), group=self.cp_group)
        return self.merge(parts)

    def for_rank(self, rank: int, **groups: dist.ProcessGroup | None) -> "ZigzagLayout":
        """The same batch seen from another CP rank (single-process references and tests)."""
        return ZigzagLayout(self.seqlens, self.cp_size, rank, pad_multiple=self.pad_multiple, **groups)

    @staticmethod
    def _check_len(t: torch.Tensor, n: int, what: str) -> None:
        if t.shape[0] != n:
            raise ValueError(f"{what}: expected leading dimension {n}, got {tuple(t.shape)}")


def _cumsum0(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])


def _ragged_arange(lengths: torch.Tensor) -> torch.Tensor:
    """concat(arange(n) for n in lengths) without a Python loop."""
    lengths = lengths.to(torch.int64)
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    starts = torch.repeat_interleave(_cumsum0(lengths)[:-1], lengths)
    return torch.arange(total, dtype=torch.int64) - starts
