"""The trainer's side of SGLang's weight-update process group.

SGLang servers join with ``init_custom_process_group`` (sglang/srt/utils/common.py): a TCP rendezvous at
master_address:master_port, a PrefixStore named after the group, and a process group built outside the
default one (the trainer's Megatron world stays untouched). The trainer must build the same group as
rank 0; this mirrors that function with torch APIs only, so the learner does not import sglang.
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["check_local_address", "host_update_store", "init_update_group", "destroy_update_group"]


def host_update_store(master_address: str, master_port: int | None, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening before any server learns its port.

    ``master_port=None`` binds port 0, so the OS picks the port at bind time: no other process can take
    it between choosing a port and listening on it (a free-port probe followed by a later bind lost that
    race under load; torch's store listens on every interface, so a probe of one address could also miss
    a port taken on another)."""
    check_local_address(master_address)
    return dist.TCPStore(
        master_address, master_port or 0, world_size, is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=True,
    )


def check_local_address(address: str) -> None:
    """Fail at once, naming the setting, when ``address`` is not one of this host's: the store listens here
    and rank 0 connects to it too, so torch would otherwise wait out its whole connect timeout."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
    except OSError as exc:
        raise OSError(
            exc.errno, f"rollout.weight_sync_master_address={address!r} is not an address of this host "
            f"({exc.strerror}); rank 0 hosts the weight-update group: use this node's IP, or leave it unset"
        ) from exc


def init_update_group(
    master_address: str,
    master_port: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    rank: int = 0,
    timeout_s: float = 300.0,
    store: dist.Store | None = None,
) -> ProcessGroup:
    """Join (rank 0: host) the group; blocks until all ``world_size`` ranks have joined. ``store``: rank 0's
    store from host_update_store (then master_address/master_port only name it in errors)."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    if world_size < 2:
        raise ValueError(f"weight-update group world_size={world_size}: needs the trainer and >= 1 server rank")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)  # same prefix as SGLang's side
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, backend_options=None, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # as SGLang does: src=0 means group rank 0
    return pg


def destroy_update_group(pg: ProcessGroup | None) -> None:
    if pg is None:
        return
    try:
        dist.destroy_process_group(pg)
    except Exception:  # already gone (peer died): nothing left to release here
        pass
