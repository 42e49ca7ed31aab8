"""Tensor-parallel overhead on this machine: tp=1 vs tp=2 for one model, batch and grid.

Both sides run the same path (a TPReplica of Ray worker actors on a private local
Ray, gloo over loopback); tp=1 gets all the threads in one rank, tp=2 splits them
over two ranks. Per configuration: decode step time, image tokens/s, time inside
all-reduce and all-gather per step (this includes waiting for the slower rank),
the same all-reduce timed alone (pure communication; the difference is waiting), and
per-rank memory (weights, K/V, peak RSS). Prints the metrics side by side
with the tp=2/tp=1 ratio and writes one CSV row per configuration.

    .venv/bin/python benchmarks/tp_overhead.py --quick          # 32 tokens per run, a few minutes
    .venv/bin/python benchmarks/tp_overhead.py --tokens 576     # the whole 24x24 image
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse  # noqa: E402
import csv  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lineray.cache import CacheSpec  # noqa: E402
from lineray.cluster.local import ray_session  # noqa: E402
from lineray.kernels.sampling import SamplingConfig  # noqa: E402
from lineray.models.generate import Condition  # noqa: E402
from lineray.models.spec import ModelSpec  # noqa: E402
from lineray.workers.replica import ReplicaConfig  # noqa: E402
from lineray.workers.instrumented import InstrumentedTPReplica  # noqa: E402
from lineray.workers.tp_replica import TPOptions  # noqa: E402

MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="GPT-B")
    p.add_argument("--grid", type=int, default=24, help="image tokens per side")
    p.add_argument("--batch", type=int, default=8, help="images per batch (CFG doubles the rows)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes to compare")
    p.add_argument("--tokens", type=int, default=None, help="tokens to generate per run (default: the whole image)")
    p.add_argument("--quick", action="store_true", help="32 tokens per run")
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1),
                   help="CPUs (and torch threads) the replica gets, split over its ranks")
    p.add_argument("--csv", default="benchmarks/results/tp_overhead.csv")
    args = p.parse_args(argv)
    if args.quick and args.tokens is None:
        args.tokens = 32
    args.tp = [int(t) for t in args.tp.split(",")]
    return args


def run_one(args, tp: int) -> dict:
    spec = ModelSpec(preset=args.preset, checkpoint="random", decoder="random", grid_size=args.grid, dtype=args.dtype)
    n_tokens = spec.config().image_tokens
    steps = min(args.tokens or n_tokens, n_tokens)
    cfg = ReplicaConfig(model=spec, cache=CacheSpec(), sampling=SamplingConfig(cfg_scale=args.cfg_scale), tp=tp)
    threads = max(1, int(args.cpus) // tp)
    opts = TPOptions(cpus_per_rank=args.cpus / tp, threads_per_rank=threads, stall_timeout_s=900)
    cond = Condition.classes(torch.randint(0, spec.config().num_classes, (args.batch,),
                                           generator=torch.Generator().manual_seed(0)))
    seeds = list(range(args.batch))
    t0 = time.perf_counter()
    with InstrumentedTPReplica(cfg, opts) as replica:
        start_s = time.perf_counter() - t0
        replica.time_batch(cond, seeds, max_tokens=2)  # warm-up: allocates the cache, first-call costs
        with tqdm(total=steps, desc=f"tp={tp}", unit="tok") as bar:
            timing = replica.time_batch(cond, seeds, max_tokens=steps, on_step=lambda i: bar.update(1))
        ranks = replica.rank_info()
        latency = replica.all_reduce_latency(args.batch * (2 if cfg.sampling.uses_cfg else 1))
    decode_steps = max(1, timing[0]["steps"] - 1)
    step_s = timing[0]["decode_s"] / decode_steps
    mean = lambda key: sum(t[key] for t in timing) / len(timing)  # noqa: E731
    step_all = timing[0]["wall_s"] / timing[0]["steps"]
    return {
        "tp": tp,
        "threads_per_rank": threads,
        "rows": args.batch * (2 if cfg.sampling.uses_cfg else 1),
        "tokens": timing[0]["steps"],
        "startup_s": start_s,
        "ms_per_step": 1e3 * step_s,
        "image_tokens_per_s": args.batch / step_s,
        "images_per_s_projected": args.batch / step_s / n_tokens,
        "all_reduce_ms_per_step": 1e3 * mean("all_reduce_s") / timing[0]["steps"],
        "all_reduce_calls_per_step": mean("all_reduce_calls") / timing[0]["steps"],
        "all_reduce_alone_ms": 1e3 * latency,  # one all-reduce with nothing else running: pure transfer
        "all_gather_ms_per_step": 1e3 * mean("all_gather_s") / timing[0]["steps"],
        "collective_share": (mean("all_reduce_s") + mean("all_gather_s")) / timing[0]["steps"] / step_all,
        "weights_mib_per_rank": ranks[0].weight_bytes / MiB,
        "sharded_weights_mib_per_rank": ranks[0].sharded_weight_bytes / MiB,
        "kv_mib_per_rank": ranks[0].kv.kv_bytes / MiB,
        "peak_rss_mib_per_rank": max(r.peak_rss_bytes for r in ranks) / MiB,
    }


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    names = [f"tp={r['tp']}" for r in rows]
    header = f"{'metric':30s}" + "".join(f"{n:>12s}" for n in names)
    if len(rows) > 1:
        header += "".join(f"{n + '/' + names[0]:>14s}" for n in names[1:])
    print(header)
    print("-" * len(header))
    for key in base:
        if key == "tp":
            continue
        line = f"{key:30s}" + "".join(f"{r[key]:12.3f}" if isinstance(r[key], float) else f"{r[key]:12d}" for r in rows)
        for r in rows[1:]:
            line += f"{r[key] / base[key]:14.2f}" if base[key] else f"{'-':>14s}"
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine()}")
    print(f"settings: {args.preset} {args.grid}x{args.grid}, batch {args.batch} (CFG {args.cfg_scale:g}), {args.dtype}, "
          f"{args.tokens or 'all'} tokens per run, {args.cpus:g} CPUs, torch {torch.__version__}")
    temp_dir = tempfile.mkdtemp(prefix="lr-bench-", dir="/tmp")
    try:
        with ray_session(num_cpus=int(args.cpus), temp_dir=temp_dir):
            rows = [run_one(args, tp) for tp in args.tp]
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    print()
    print_table(rows)
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
