"""Decode throughput and peak memory per model, grid, batch, dtype and cache policy.

    python benchmarks/decode_throughput.py --suite engine   # issue 2: GPT-B, 16x16/24x24, batch 4/16, fp32/bf16
    python benchmarks/decode_throughput.py --suite cache    # issue 3: policies side by side, 24x24 and 32x32
    python benchmarks/decode_throughput.py --suite reference  # lineray vs LlamaGen's padded static cache + mask
    python benchmarks/decode_throughput.py --suite compile    # eager vs torch.compile'd dense parts

Random weights (no checkpoint download is possible here); timing does not depend on
the values. Every case runs in its own process (so peak RSS is the case's own) and
times one whole generation (prefill + all image tokens, CFG on). `--warmup` first
runs an untimed one (its time is `cold_s`); cases whose policy ends in `+compile`
(ReplicaConfig.compile) always warm up, so compile time is not counted as decode
time. Ratios are to the first case of each group, measured in the same run.
Run on a quiet machine: on 2 cores any other process shows up in the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_spec, machine, peak_rss_mib, print_table, run_isolated, write_csv  # noqa: E402

SUITES = {
    "engine": dict(presets=["GPT-B"], grids=[16, 24], batches=[4, 16], dtypes=["float32", "bfloat16"],
                   policies=["full"]),
    "cache": dict(presets=["GPT-B"], grids=[24, 32], batches=[16], dtypes=["bfloat16"],
                  policies=["full", "linear:1/4", "linear:1/6", "linear:1/8", "window:1/6", "heavy_hitter:1/6"]),
    "reference": dict(presets=["GPT-B"], grids=[24], batches=[16], dtypes=["bfloat16", "float32"],
                      policies=["reference", "full"]),
    "compile": dict(presets=["GPT-B"], grids=[16], batches=[4], dtypes=["float32"],
                    policies=["full", "full+compile", "linear:1/6", "linear:1/6+compile"]),
}


def run_case(case: dict) -> dict:
    import torch

    from lineray.kernels.sampling import SamplingConfig
    from lineray.models.generate import Condition, generate_tokens, new_cache
    from lineray.models.spec import ModelSpec

    torch.set_num_threads(case["threads"])
    policy, compiled = case["policy"].removesuffix("+compile"), case["policy"].endswith("+compile")
    model = ModelSpec(preset=case["preset"], checkpoint="random", decoder="random", grid_size=case["grid"],
                      dtype=case["dtype"]).build_model(compile=compiled)
    n_img = case["batch"]
    sampling = SamplingConfig(cfg_scale=4.0, top_k=2000)
    cond = Condition.classes([i % 1000 for i in range(n_img)])
    seeds = list(range(n_img))
    if policy == "reference":
        from reference_decode import PaddedStaticCache
        cache = PaddedStaticCache(model, rows=2 * n_img)
    else:
        cache = new_cache(model, cache_spec(policy), 2 * n_img, True)
    kv_bytes = cache.memory().kv_bytes
    fn = lambda: generate_tokens(model, cond, seeds, sampling=sampling, cache=cache)  # noqa: E731
    cold = None
    if case["warmup"]:
        t0 = time.perf_counter()
        fn()
        cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    print(f"case done: cold {cold or 0:.1f}s, timed {dt:.1f}s", file=sys.stderr)
    n_tok = model.config.image_tokens
    return dict(tokens_per_s=n_img * n_tok / dt, images_per_s=n_img / dt, seconds=dt, step_ms=dt / n_tok * 1e3,
                cold_s=cold, kv_mib=None if kv_bytes is None else kv_bytes / 2**20, peak_rss_mib=peak_rss_mib())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=SUITES, default="engine")
    ap.add_argument("--presets"), ap.add_argument("--grids"), ap.add_argument("--batches")
    ap.add_argument("--dtypes"), ap.add_argument("--policies")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", action="store_true", help="run one untimed generation first")
    ap.add_argument("--csv", default=None, help="CSV path (default benchmarks/results/decode_<suite>.csv)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    suite = dict(SUITES[args.suite])
    for key in ("presets", "grids", "batches", "dtypes", "policies"):
        if getattr(args, key):
            vals = getattr(args, key).split(",")
            suite[key] = [int(v) for v in vals] if key in ("grids", "batches") else vals
    print(f"machine: {machine()}")
    print(f"settings: {suite}, CFG 4.0 (2 rows per image), top-k 2000, random weights, whole generations, "
          f"{'timed after one warm-up generation' if args.warmup else 'first generation timed'}")
    rows = []
    for preset in suite["presets"]:
        for grid in suite["grids"]:
            for batch in suite["batches"]:
                for dtype in suite["dtypes"]:
                    base = None
                    for policy in suite["policies"]:
                        case = dict(preset=preset, grid=grid, batch=batch, dtype=dtype, policy=policy,
                                    threads=args.threads,
                                    warmup=args.warmup or policy.endswith("+compile"))
                        r = case | run_isolated(__file__, case)
                        base = base or r
                        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
                        if r.get("kv_mib") and base.get("kv_mib"):
                            r["kv_ratio"] = r["kv_mib"] / base["kv_mib"]
                        rows.append(r)
                        print(f"  {preset} {grid}x{grid} batch {batch} {dtype} {policy}: "
                              f"{r['tokens_per_s']:.0f} tok/s, {r['images_per_s']:.3f} img/s", flush=True)
    cols = ["preset", "grid", "batch", "dtype", "policy", "tokens_per_s", "images_per_s", "step_ms", "cold_s", "kv_mib",
            "peak_rss_mib", "speedup", "kv_ratio"]
    print_table(rows, cols, title=f"decode throughput ({args.suite})")
    path = write_csv(rows, args.csv or Path(__file__).parent / "results" / f"decode_{args.suite}.csv")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
