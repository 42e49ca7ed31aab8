"""GPU smoke benchmark: GPT-B and GPT-XL (random weights, bf16, 24x24), full cache vs LineAR 1/6, batch 64 and 256.

Per case, each in a fresh process (so its peak memory is its own): ms per decode step and
images/s over one whole generation (timed after a warm-up generation, which captures the
CUDA graphs), K/V GiB, peak GPU memory, and host_idle: the share of steady-state decode
time in which the GPU has no kernel to run because it waits for the host to launch one
(torch.profiler over 32 steps after the first lines, from an idle GPU until their last
kernel is done: 1 - kernel time / wall time).
Step modes (generate_tokens(step_mode=...)): "dynamic" is the eager step, "cuda_graph"
its static-shape twin replayed as one CUDA graph. Speedup is to the full cache of the
same model, batch and mode. A case that does not fit in the GPU's memory says so.

    bash benchmarks/gpu_smoke.sh                  # the GPU tests, then this table
    python benchmarks/gpu_smoke.py --quick        # GPT-B, batch 64 only
    python benchmarks/gpu_smoke.py --device cpu --presets GPT-tiny --grid 8 --batches 2   # checks the script only
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_spec, machine, peak_rss_mib, print_table, run_isolated, write_csv  # noqa: E402

GiB = 2**30
COLUMNS = ["preset", "policy", "batch", "mode", "ms_per_step", "images_per_s", "speedup", "kv_gib", "peak_gib",
           "host_idle", "error"]


class _Stop(Exception):
    """Ends a generation once the profiled steps are done."""


def step_modes_supported() -> bool:
    from lineray.models.generate import generate_tokens
    return "step_mode" in inspect.signature(generate_tokens).parameters


def host_idle_share(run, device, n_tokens: int) -> float | None:
    """1 - (kernel time / wall time) over `active` decode steps in steady state (None on CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    wait, warmup, active = min(64, n_tokens // 4), 4, min(32, n_tokens // 2)
    first, last = wait + warmup - 1, wait + warmup + active - 1  # the on_step calls that open and close recording
    marks = {}

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def on_step(i: int) -> None:
        # The window starts on an idle GPU and ends when its last kernel is done (CUPTI drops kernels that
        # finish after recording stops); at most one step's launch time is counted twice over 32 steps.
        if i == last:
            sync()
            marks["end"] = time.perf_counter()
        if i == first:
            sync()
        prof.step()
        if i == first:
            marks["start"] = time.perf_counter()
        if i == last:
            raise _Stop

    # Kernels only: recording every CPU op would add host time of its own.
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity], schedule=schedule(wait=wait, warmup=warmup, active=active)) as prof:
        try:
            run(on_step=on_step)
        except _Stop:
            pass
    if not cuda:
        return None
    busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                  for e in prof.key_averages())
    wall_us = (marks["end"] - marks["start"]) * 1e6
    return None if busy_us <= 0 else max(0.0, 1.0 - busy_us / wall_us)


def run_case(case: dict) -> dict:
    import torch

    from lineray.kernels.sampling import SamplingConfig
    from lineray.models.generate import Condition, generate_tokens, new_cache
    from lineray.models import spec as model_spec
    from lineray.models.spec import ModelSpec
    from lineray.workers.devices import setup_device

    RANDOM = getattr(model_spec, "RANDOM", None)  # checkpoint/decoder "random" in issue 12's ModelSpec, None before

    device = setup_device(case["device"])
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    n = case["batch"]
    sampling = SamplingConfig(cfg_scale=4.0, top_k=2000)
    cond, seeds = Condition.classes([i % 1000 for i in range(n)]), list(range(n))
    mode = {"step_mode": case["mode"]} if case["mode"] != "default" else {}
    try:
        model = ModelSpec(preset=case["preset"], checkpoint=RANDOM, decoder=RANDOM, grid_size=case["grid"],
                          dtype=case["dtype"]).build_model(device=device)
        cache = new_cache(model, cache_spec(case["policy"]), 2 * n, True)

        def run(**kw):
            return generate_tokens(model, cond, seeds, sampling=sampling, cache=cache, **mode, **kw)

        run()  # warm-up: CUDA graph capture, cuBLAS heuristics, allocator pools
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        run()
        sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / GiB if cuda else peak_rss_mib() / 1024
        n_tok = model.config.image_tokens
        host_idle = host_idle_share(run, device, n_tok)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # OOM inside a graph capture is a plain RuntimeError
        if "out of memory" not in str(e):
            raise
        return dict(error="out of GPU memory")
    return dict(ms_per_step=seconds / n_tok * 1e3, images_per_s=n / seconds, kv_gib=cache.memory().kv_bytes / GiB,
                peak_gib=peak, host_idle=host_idle)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="GPT-B,GPT-XL")
    ap.add_argument("--policies", default="full,linear:1/6")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--modes", default=None, help="step modes (default: dynamic,cuda_graph on CUDA)")
    ap.add_argument("--grid", type=int, default=24, help="image tokens per side (24: 384 px)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu only to check the script itself")
    ap.add_argument("--quick", action="store_true", help="GPT-B, batch 64")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "gpu_smoke.csv"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing to do.")
        return 0
    if args.quick:
        args.presets, args.batches = "GPT-B", "64"
    if args.modes is None:
        cuda = args.device.startswith("cuda")
        args.modes = ("dynamic,cuda_graph" if cuda else "dynamic,static") if step_modes_supported() else "default"
    print(f"machine: {machine()}")
    print(f"settings: {args.grid}x{args.grid} tokens, {args.dtype}, CFG 4.0 (2 rows per image), top-k 2000, "
          f"random weights, whole generations timed after a warm-up one, device {args.device}")
    rows = []
    for preset in args.presets.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for mode in args.modes.split(","):
                base = None
                for policy in args.policies.split(","):
                    case = dict(preset=preset, policy=policy, batch=batch, mode=mode, grid=args.grid,
                                dtype=args.dtype, device=args.device)
                    r = case | run_isolated(__file__, case)
                    if "error" not in r:
                        base = base or r
                        r["speedup"] = r["images_per_s"] / base["images_per_s"]
                        print(f"  {preset} batch {batch} {mode} {policy}: {r['ms_per_step']:.2f} ms/step, "
                              f"{r['images_per_s']:.2f} img/s", flush=True)
                    else:
                        print(f"  {preset} batch {batch} {mode} {policy}: {r['error']}", flush=True)
                    rows.append(r)
    print_table(rows, COLUMNS, title="GPU smoke: decode per step (host_idle: share of the step the GPU waits "
                                     "for the host; peak_gib: GPU memory, or process RSS on CPU)")
    print(f"\nwrote {write_csv(rows, args.csv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
