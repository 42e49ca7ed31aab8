"""The logits all-gather (TPGroup.all_gather_last) on a real 3-rank gloo group: every rank gets the
full tensor in rank order, with equal and unequal parts (a vocabulary tp does not divide)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lineray.models.layers import TPGroup
from lineray.workers.parallel_state import interface_of

SIZE = 3


def _rank(rank: int, port: int, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = interface_of("127.0.0.1")
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, SIZE, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=SIZE)
    tp = TPGroup(rank=rank, size=SIZE, group=dist.group.WORLD)
    try:
        ok = []
        for shape, n, dtype in [((4, 12), 12, torch.float32),  # 4 per rank
                                ((2, 1, 16), 16, torch.bfloat16),  # 6, 5, 5: padded parts
                                ((5, 7), 7, torch.float32),  # 3, 2, 2
                                ((2,), 2, torch.float32)]:  # 1, 1, 0: an empty part
            full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape).to(dtype)
            got = tp.all_gather_last(full[..., tp.part(n)].contiguous(), n)
            ok.append(got.dtype == dtype and torch.equal(got, full))
        results[rank] = ok
    finally:
        dist.destroy_process_group()


def test_all_gather_last_returns_the_full_tensor_in_rank_order():
    with socket.socket() as s:  # a free loopback port for the store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * SIZE
    assert dict(results) == {r: [True] * 4 for r in range(SIZE)}
