"""The largest batch that fits a memory cap, per cache policy.

    python benchmarks/max_batch.py [--kv-cap-gib 8] [--device-gib 80] [--grid 24] [--verify]
    python benchmarks/max_batch.py --measure --kv-cap-gib 0.5 --dtype float32 --measure-policies full,linear:1/6
    python benchmarks/max_batch.py --peak --grid 12 --dtype float32 --measure-policies full,linear:1/6,heavy_hitter:1/6

K/V memory is static and preallocated, so it is exact arithmetic (checked against a
real allocation with --verify). Two caps: a pure K/V cap (the issue's "8 GiB of K/V")
and a whole-device budget (weights + K/V + per-step activations), the latter being
what jobs use to pick their default batch size.

--peak runs GPT-B (random weights, 2 images, CFG) once per policy under the profiler and
compares the planned memory (K/V + metadata + activations + prefill/eviction temporaries)
with the measured peak of tensor allocations (`sizing.peak_allocated_bytes`).

--measure then runs GPT-B at each policy's largest batch under the K/V cap (one whole
generation each, in its own process, via decode_throughput.py): the throughput a
fixed amount of cache memory buys, side by side.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_spec, machine, print_table, run_isolated, write_csv  # noqa: E402

from lineray.models.config import preset  # noqa: E402
from lineray.models.sizing import memory_plan  # noqa: E402

POLICIES = ["full", "linear:1/4", "linear:1/6", "linear:1/8", "window:1/6", "heavy_hitter:1/6"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="GPT-B,GPT-XL,GPT-3B")
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--kv-cap-gib", type=float, default=8.0)
    ap.add_argument("--device-gib", type=float, default=80.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--verify", action="store_true", help="allocate GPT-B caches and compare with the plan")
    ap.add_argument("--measure", action="store_true",
                    help="run GPT-B at each policy's largest batch under --kv-cap-gib and compare throughput")
    ap.add_argument("--measure-policies", default="full,linear:1/6", help="policies for --measure and --peak")
    ap.add_argument("--peak", action="store_true", help="GPT-B planned vs measured peak memory per policy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "max_batch.csv"))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"machine: {machine()}")
    print(f"settings: grid {args.grid}x{args.grid}, {args.dtype}, CFG (2 rows per image), "
          f"K/V cap {args.kv_cap_gib} GiB, device budget {args.device_gib} GiB")
    rows = []
    for name in args.presets.split(","):
        cfg = preset(name, grid_size=args.grid)
        base = None
        for policy in POLICIES:
            plan = memory_plan(cfg, cache_spec(policy), dtype)
            kv_cap_batch = int(args.kv_cap_gib * 2**30 // plan.kv_bytes_per_image)
            device_batch = plan.max_batch(int(args.device_gib * 2**30))
            base = base or (kv_cap_batch, device_batch)
            rows.append(dict(preset=name, policy=policy, kv_mib_per_image=plan.kv_bytes_per_image / 2**20,
                             max_batch_kv_cap=kv_cap_batch, vs_full=kv_cap_batch / base[0],
                             max_batch_device=device_batch, device_vs_full=device_batch / max(1, base[1])))
    print_table(rows, list(rows[0]), title="largest batch per policy")
    if args.verify:
        from lineray.models.generate import new_cache
        from lineray.models.spec import ModelSpec
        model = ModelSpec(preset="GPT-B", checkpoint="random", decoder="random", grid_size=args.grid,
                          dtype=args.dtype).build_model()
        for policy in POLICIES:
            cache = new_cache(model, cache_spec(policy), rows=2 * 4, use_cfg=True)
            want = memory_plan(model.config, cache_spec(policy), dtype).kv_bytes_per_image * 4
            got = cache.memory().kv_bytes
            print(f"verify GPT-B {policy}: allocated {got / 2**20:.1f} MiB for 4 images, planned {want / 2**20:.1f} MiB "
                  f"{'OK' if got == want else 'MISMATCH'}")
            del cache
    print(f"\nwrote {write_csv(rows, args.csv)}")
    if args.peak:
        peak(args, dtype)
    if args.measure:
        measure(args, dtype)


def peak(args, dtype: torch.dtype, n_img: int = 2) -> None:
    """Planned vs measured peak of one whole generation (prefill, every step, every eviction)."""
    from lineray.kernels.sampling import SamplingConfig
    from lineray.models.generate import Condition, generate_tokens
    from lineray.models.sizing import peak_allocated_bytes
    from lineray.models.spec import ModelSpec
    torch.set_num_threads(args.threads)
    model = ModelSpec(preset="GPT-B", checkpoint="random", decoder="random", grid_size=args.grid,
                      dtype=args.dtype).build_model()
    cond, seeds = Condition.classes(list(range(n_img))), list(range(n_img))
    rows = []
    for policy in args.measure_policies.split(","):
        spec = cache_spec(policy)
        plan = memory_plan(model.config, spec, dtype)
        measured = peak_allocated_bytes(lambda: generate_tokens(model, cond, seeds, sampling=SamplingConfig(top_k=2000),
                                                                cache_spec=spec))
        planned = plan.bytes_per_image * n_img
        rows.append(dict(policy=policy, kv_mib=plan.kv_bytes_per_image * n_img / 2**20, planned_mib=planned / 2**20,
                         measured_mib=measured / 2**20, measured_vs_planned=measured / planned))
        print(f"  {policy}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB", flush=True)
    print_table(rows, list(rows[0]), title=f"GPT-B {args.grid}x{args.grid} {args.dtype}, {n_img} images with CFG: "
                                           f"planned vs measured peak (beside the weights)")


def measure(args, dtype: torch.dtype) -> None:
    """Throughput of GPT-B at the largest batch each policy fits under the K/V cap."""
    script = str(Path(__file__).parent / "decode_throughput.py")
    cfg = preset("GPT-B", grid_size=args.grid)
    rows, base = [], None
    for policy in args.measure_policies.split(","):
        batch = int(args.kv_cap_gib * 2**30 // memory_plan(cfg, cache_spec(policy), dtype).kv_bytes_per_image)
        case = dict(preset="GPT-B", grid=args.grid, batch=batch, dtype=args.dtype, policy=policy,
                    threads=args.threads, warmup=False)
        r = case | run_isolated(script, case)
        base = base or r
        r["throughput_vs_full"] = r["images_per_s"] / base["images_per_s"]
        rows.append(r)
        print(f"  {policy} at batch {batch}: {r['images_per_s']:.3f} img/s", flush=True)
    cols = ["policy", "batch", "kv_mib", "tokens_per_s", "images_per_s", "step_ms", "peak_rss_mib",
            "throughput_vs_full"]
    print_table(rows, cols, title=f"GPT-B {args.grid}x{args.grid} {args.dtype}, the largest batch under "
                                  f"{args.kv_cap_gib} GiB of K/V")
    print(f"\nwrote {write_csv(rows, Path(args.csv).with_name('max_batch_measured.csv'))}")


if __name__ == "__main__":
    main()
