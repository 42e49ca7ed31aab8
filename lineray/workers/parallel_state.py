"""Join and leave a tensor-parallel torch.distributed group, and time its collectives.

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
import time
from dataclasses import dataclass, field
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


def default_backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


@dataclass
class CollectiveStats:
    """Wall time spent in collectives (all-reduce, all-gather) since the last reset."""
    all_reduce_s: float = 0.0
    all_reduce_calls: int = 0
    all_gather_s: float = 0.0
    all_gather_calls: int = 0

    def reset(self) -> None:
        self.all_reduce_s = self.all_gather_s = 0.0
        self.all_reduce_calls = self.all_gather_calls = 0

    def snapshot(self) -> dict:
        return dict(all_reduce_s=self.all_reduce_s, all_reduce_calls=self.all_reduce_calls,
                    all_gather_s=self.all_gather_s, all_gather_calls=self.all_gather_calls)


@dataclass(frozen=True)
class TimedTPGroup(TPGroup):
    """A TPGroup that adds up the time its collectives take (the TP overhead per step).

    On GPU the collectives are asynchronous, so the figure is only meaningful on CPU/gloo
    (or with a synchronize, which we do not add to the hot path).
    """
    stats: CollectiveStats = field(default_factory=CollectiveStats, compare=False)

    def all_reduce(self, x: torch.Tensor, *args, **kw) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        out = super().all_reduce(x, *args, **kw)
        self.stats.all_reduce_s += time.perf_counter() - t0
        self.stats.all_reduce_calls += 1
        return out

    def all_gather_last(self, x: torch.Tensor, *args, **kw) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        out = super().all_gather_last(x, *args, **kw)
        self.stats.all_gather_s += time.perf_counter() - t0
        self.stats.all_gather_calls += 1
        return out


def time_all_reduce(tp: TPGroup, shape: tuple[int, ...], n: int = 100, dtype=torch.float32) -> float:
    """Seconds per all-reduce of a tensor of `shape`, back to back after a barrier (no compute between).

    This is the pure communication cost; the all-reduce time measured inside a decode
    step is larger by however long a rank waits for its slower peers.
    """
    if tp.size == 1:
        return 0.0
    x = torch.zeros(shape, dtype=dtype)
    dist.barrier(group=tp.group)
    t0 = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(x, group=tp.group)
    return (time.perf_counter() - t0) / n


def join_tp_group(rank: int, size: int, master_addr: str, master_port: int, *, device: str = "cpu",
                  timeout_s: float = 300.0, listener: Rendezvous | None = None) -> TimedTPGroup:
    """Join the group as `rank` of `size`; blocks until every rank has joined (or timeout_s passes).

    Rank 0 passes the `listener` it opened at master_addr:master_port and hosts the
    group's TCP store on it. timeout_s also bounds every later collective: a peer that
    vanishes mid-step makes the others fail after at most this long.
    """
    if size == 1:
        if listener is not None:
            listener.close()
        return TimedTPGroup()
    if dist.is_initialized():
        raise RuntimeError("this process is already in a torch.distributed group; call leave_tp_group() first")
    backend = default_backend(device)
    if backend == "gloo":
        iface = interface_of(master_addr)
        if iface is not None:  # gloo's own sockets go on the same interface as the store
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    else:
        torch.cuda.set_device(torch.device(device))
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, master_port, world_size=size, is_master=rank == 0, timeout=timeout,
                          master_listen_fd=listener.sock.detach() if listener is not None else None)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    # The replica is the whole world of its workers, so the default group is the TP group.
    return TimedTPGroup(rank=rank, size=size, group=dist.group.WORLD)


def leave_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
