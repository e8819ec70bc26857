"""Pick the network interface for NCCL/Gloo from the route to the master, not from a hard-coded name.

    eval "$(python -m minpro_megatron.slurm.netif --export "$MASTER_ADDR")"

A UDP ``connect`` (no packet is sent) asks the kernel which source address it would use to reach the
master; the interface holding that address is the one NCCL and Gloo must use. On the master node itself
the source address is the master's own address, so its interface (not ``lo``) comes back, which a plain
``ip route get`` gets wrong. Variables already set in the environment (the user's choice) are kept.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import socket
import sys

import psutil

__all__ = ["route_source_ip", "interface_for_ip", "pick_interface", "emulated_node_ip", "socket_env", "main"]

IFNAME_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


def route_source_ip(host: str) -> str:
    """The local IPv4 address the kernel would use to send to ``host``."""
    try:
        target = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except socket.gaierror as exc:
        raise RuntimeError(f"cannot resolve master address {host!r}: {exc}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))  # UDP connect only selects a route
        return s.getsockname()[0]


def interface_for_ip(ip: str) -> str:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    raise RuntimeError(f"no local interface holds {ip} (interfaces: {', '.join(psutil.net_if_addrs())})")


def pick_interface(master_addr: str) -> tuple[str, str]:
    """(interface name, local IPv4 address) used to reach ``master_addr``."""
    ip = route_source_ip(master_addr)
    return interface_for_ip(ip), ip


def emulated_node_ip(route_ip: str, node_name: str | None) -> str:
    """``route_ip``, except on emulated nodes sharing one host (slurm/local_cluster.py gives node k the
    loopback alias 127.0.0.(k+1)): there the route to the master always leaves from 127.0.0.1, so a node
    whose own name resolves to another loopback address is that address. Real nodes never reach each
    other over loopback, so this changes nothing on a cluster."""
    if not node_name or not ipaddress.ip_address(route_ip).is_loopback:
        return route_ip
    try:
        own = socket.getaddrinfo(node_name, None, socket.AF_INET)[0][4][0]
    except socket.gaierror:
        return route_ip
    return own if ipaddress.ip_address(own).is_loopback else route_ip


def socket_env(master_addr: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (unless already set) and MINPRO_NODE_IP for this node."""
    environ = os.environ if environ is None else environ
    iface, ip = pick_interface(master_addr)
    ip = emulated_node_ip(ip, environ.get("SLURMD_NODENAME"))
    env = {var: iface for var in IFNAME_VARS if not environ.get(var)}
    env["MINPRO_NODE_IP"] = ip
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.slurm.netif", description=__doc__.split("\n")[0])
    ap.add_argument("master_addr")
    ap.add_argument("--export", action="store_true", help="print shell `export` lines for eval")
    args = ap.parse_args(argv)
    env = socket_env(args.master_addr)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    kept = [f"{v}={os.environ[v]}" for v in IFNAME_VARS if os.environ.get(v)]
    print(f"[netif] {host}: node address {env['MINPRO_NODE_IP']} toward {args.master_addr} "
          f"({', '.join(f'{k}={v}' for k, v in env.items() if k in IFNAME_VARS) or 'kept ' + ', '.join(kept)})",
          file=sys.stderr)
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}" if args.export else f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
