"""Two real gloo ranks on this machine (torch.multiprocessing, no Ray), talking over loopback only."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lineray.models.layers import TPGroup
from lineray.workers.parallel_state import interface_of


def run_on_two_ranks(fn, *args, tmp: Path):
    """Run fn(tp, *args) on both ranks of a tp=2 gloo group; return rank 0's result (anything torch.save
    keeps). fn must be a module-level function: the spawned ranks import it by name."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GLOO_SOCKET_IFNAME", interface_of("127.0.0.1"))
        mp.spawn(_rank, args=(fn, args, str(tmp / "store"), str(tmp / "out.pt")), nprocs=2, join=True)
    return torch.load(tmp / "out.pt", weights_only=True)


def _rank(rank: int, fn, args: tuple, store: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        out = fn(TPGroup(rank, 2, dist.group.WORLD), *args)
        if rank == 0:
            torch.save(out, result)
    finally:
        dist.destroy_process_group()
