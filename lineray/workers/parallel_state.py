"""Join and leave a tensor-parallel torch.distributed group.

One process per rank (a Ray worker actor). Rank 0 opens a listening socket on its
node (`Rendezvous`); every rank then joins the TCP store behind it: gloo on CPU,
NCCL on GPU. The store and gloo's own sockets stay on the interface of the
rendezvous address, so a replica on 127.0.0.1 opens no socket on the machine's
external interface.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lineray.models.layers import TPGroup


class Rendezvous:
    """A listening socket on `host` that rank 0 holds until the group's TCP store takes it over.

    torch's TCPStore binds to every interface when given only a port; handing it an
    already-bound socket keeps the store on `host` (loopback for a one-node replica)
    and leaves no window in which another process could grab the port.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def interface_of(ip: str) -> str | None:
    """The network interface gloo should use for `ip`: the loopback interface for a loopback address.

    Other addresses return None and gloo picks the interface of the machine's hostname.
    """
    if not ipaddress.ip_address(ip).is_loopback:
        return None
    IFF_LOOPBACK = 0x8
    for flags in sorted(Path("/sys/class/net").glob("*/flags")):  # Linux
        if int(flags.read_text(), 16) & IFF_LOOPBACK:
            return flags.parent.name
    return "lo"


def default_backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join_tp_group(rank: int, size: int, master_addr: str, master_port: int, *, device: torch.device,
                  collective_timeout_s: float = 60.0, join_timeout_s: float = 300.0,
                  listener: Rendezvous | None = None) -> TPGroup:
    """Join the group as `rank` of `size`; blocks until every rank has joined (or join_timeout_s passes).

    device: this rank's device, with its index on CUDA (see devices.setup_device); NCCL
    binds the group to it and creates its communicators now rather than at the first
    collective. Rank 0 passes the `listener` it opened at master_addr:master_port and
    hosts the group's TCP store on it. collective_timeout_s bounds every later
    collective: a peer that vanishes mid-step makes the others fail after at most
    this long (torch's default, 10 minutes, would hold a GPU that long).
    """
    if size == 1:
        if listener is not None:
            listener.close()
        return TPGroup()
    if dist.is_initialized():
        raise RuntimeError("this process is already in a torch.distributed group; call leave_tp_group() first")
    backend = default_backend(device)
    iface = interface_of(master_addr)
    extra = {}
    if backend == "gloo":
        if iface is not None:  # gloo's own sockets go on the same interface as the store
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    else:
        if device.index is None:
            raise ValueError(f"a NCCL rank needs a device with an index (cuda:N), got {device}")
        extra["device_id"] = device
        if iface is not None:  # NCCL's bootstrap sockets too, unless the cluster chose an interface
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    store = dist.TCPStore(master_addr, master_port, world_size=size, is_master=rank == 0,
                          timeout=timedelta(seconds=join_timeout_s),
                          master_listen_fd=listener.sock.detach() if listener is not None else None)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=timedelta(seconds=collective_timeout_s), **extra)
    # The replica is the whole world of its workers, so the default group is the TP group.
    return TPGroup(rank=rank, size=size, group=dist.group.WORLD)


def leave_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
