"""The weight-update group's rendezvous port is listening before any server is told it.

CI once failed with EADDRINUSE: DistributedTransport probed a free port, told the servers, and only then
bound it; under load another process (torch stores listen on every interface) took the port in between.
Now rank 0's store binds port 0 first and the servers get the port it holds.

The server here is a STAND-IN (a process that joins the real gloo group as rank 1, as SGLang's
``/init_weights_update_group`` does); the real SGLang path is tests/rollout/test_fleet_sglang.py.
"""

from __future__ import annotations

import socket
import multiprocessing as mp

import torch
import torch.distributed as dist

from minpro_megatron.weights.transports import DistributedTransport
from minpro_megatron.weights.update_group import destroy_update_group, host_update_store, init_update_group


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def _stand_in(addr: str, port: int, rank: int, world: int, name: str, backend: str, out) -> None:
    pg = init_update_group(addr, port, world, name, backend, rank=rank, timeout_s=30)
    out.put(("joined", True))
    got = torch.zeros(3)
    dist.broadcast(got, src=0, group=pg)
    out.put(("received", got.tolist()))
    destroy_update_group(pg)


class StandInServer:
    """Joins the update group in its own process during the POST, as SGLang does."""

    url = "http://stand-in:1"

    def __init__(self) -> None:
        self.out = mp.get_context("spawn").Queue()
        self.proc = None
        self.seen: dict = {}

    def healthy(self, timeout_s: float = 10) -> bool:
        return True

    def init_weights_update_group(self, addr: str, port: int, rank_offset: int, world: int, name: str, backend: str) -> None:
        self.seen["listening"] = _listening(addr, port)  # at the moment the server is told the port
        self.proc = mp.get_context("spawn").Process(target=_stand_in, args=(addr, port, rank_offset, world, name, backend, self.out))
        self.proc.start()
        key, value = self.out.get(timeout=60)  # the POST returns once the server has joined
        self.seen[key] = value

    def destroy_weights_update_group(self, name: str) -> None:
        pass


def test_servers_are_told_a_port_that_rank0_already_holds():
    server = StandInServer()
    transport = DistributedTransport(backend="gloo", timeout_s=30)
    transport.prepare([server])
    try:
        assert server.seen == {"listening": True, "joined": True}
        dist.broadcast(torch.tensor([1.0, 2.0, 3.0]), src=0, group=transport.pg)  # the group works
        assert server.out.get(timeout=60) == ("received", [1.0, 2.0, 3.0])
    finally:
        transport.close([server])
        server.proc.join(timeout=30)


def test_host_store_holds_its_os_chosen_port_on_every_interface():
    store = host_update_store("127.0.0.1", None, world_size=2, timeout_s=10)
    assert store.port > 0 and _listening("127.0.0.1", store.port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # nobody else can bind it now
        try:
            s.bind(("0.0.0.0", store.port))
            taken = False
        except OSError:
            taken = True
    assert taken


def test_master_address_not_on_this_host_fails_at_once_naming_the_setting() -> None:
    # torch would wait out its whole connect timeout on an address no interface here holds (CI: 20 s, then
    # a bare "client socket has timed out"); the check answers before any server is told anything.
    import time

    import pytest

    from minpro_megatron.weights.update_group import check_local_address

    check_local_address("127.0.0.1")  # a local address passes
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"rollout\.weight_sync_master_address='10\.255\.255\.1'.*Cannot assign requested address"):
        host_update_store("10.255.255.1", None, 2, timeout_s=20)
    assert time.monotonic() - t0 < 5


def test_tp_sizes_by_url_follow_a_live_set_that_shrinks() -> None:
    # a fleet of attached servers syncs only those that answer (one may be restarting): the transport's TP
    # sizes must follow the servers it is given, not the full list it was built with
    import pytest

    from minpro_megatron.weights.transports import server_tp_sizes

    class S:
        def __init__(self, url: str) -> None:
            self.url = url

    a, b = S("http://a:1"), S("http://b:2")
    assert server_tp_sizes({"http://a:1": 2, "http://b:2": 4}, [b], "T") == [4]
    assert server_tp_sizes(None, [a, b], "T") == [1, 1]
    assert server_tp_sizes([2, 4], [a, b], "T") == [2, 4]
    with pytest.raises(ValueError, match=r"T.tp_sizes has 2 entries for 1 servers"):
        server_tp_sizes([2, 4], [a], "T")
    with pytest.raises(ValueError, match=r"no entry for \['http://c:3'\]"):
        server_tp_sizes({"http://a:1": 2}, [S("http://c:3")], "T")
