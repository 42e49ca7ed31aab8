"""Decode throughput and peak memory per model, grid, batch, dtype and cache policy.

    python benchmarks/decode_throughput.py --suite engine   # issue 2: GPT-B, 16x16/24x24, batch 4/16, fp32/bf16
    python benchmarks/decode_throughput.py --suite cache    # issue 3: policies side by side, 24x24 and 32x32
    python benchmarks/decode_throughput.py --suite reference  # lineray vs LlamaGen's padded static cache + mask
    python benchmarks/decode_throughput.py --suite compile    # eager vs torch.compile'd dense parts
    python benchmarks/decode_throughput.py --suite step --repeat 3  # dynamic vs static-shape decode step

Random weights (no checkpoint download is possible here); timing does not depend on
the values. Every case runs in its own process (so peak RSS is the case's own) and
times one whole generation (prefill + all image tokens, CFG on). `--warmup` first
runs an untimed one (its time is `cold_s`); cases whose policy ends in `+compile`
(ReplicaConfig.compile) always warm up, so compile time is not counted as decode
time. Ratios are to the first case of each group, measured in the same run.
`--steps dynamic,static,compiled` runs each case with those decode step modes
(generate_tokens(step_mode=...)); `--repeat N` runs the whole list N times in
alternation and reports the median with the min-max spread, for a noisy machine;
`--interleave` alternates the step modes inside one process per policy (same model,
same cache), which cancels most of the load other processes put on a shared machine.
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
    "step": dict(presets=["GPT-B"], grids=[16], batches=[4], dtypes=["float32"], policies=["full", "linear:1/6"],
                 steps=["dynamic", "static"]),
}


class StopGeneration(Exception):
    """Raised from on_step to time only the first --tokens tokens of a generation."""


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
    n_tok = case.get("tokens") or model.config.image_tokens

    def stop_early(i):
        if i + 1 == n_tok and n_tok < model.config.image_tokens:
            raise StopGeneration

    def fn(step_mode=case.get("step", "auto")):
        try:
            generate_tokens(model, cond, seeds, sampling=sampling, cache=cache, step_mode=step_mode,
                            on_step=stop_early)
        except StopGeneration:
            pass

    if "interleave" in case:  # every step mode on this one model, alternating, round after round
        rates = {mode: [] for mode in case["interleave"]}
        for _ in range(case["rounds"]):
            for mode in rates:
                t0 = time.perf_counter()
                fn(mode)
                rates[mode].append(n_img * n_tok / (time.perf_counter() - t0))
        return dict(rates=rates, kv_mib=kv_bytes / 2**20, peak_rss_mib=peak_rss_mib())
    cold = None
    if case["warmup"] or case.get("step") == "compiled":
        t0 = time.perf_counter()
        fn()
        cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    print(f"case done: cold {cold or 0:.1f}s, timed {dt:.1f}s", file=sys.stderr)
    return dict(tokens_per_s=n_img * n_tok / dt, images_per_s=n_img * n_tok / model.config.image_tokens / dt,
                seconds=dt, step_ms=dt / n_tok * 1e3,
                cold_s=cold, kv_mib=None if kv_bytes is None else kv_bytes / 2**20, peak_rss_mib=peak_rss_mib())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=SUITES, default="engine")
    ap.add_argument("--presets"), ap.add_argument("--grids"), ap.add_argument("--batches")
    ap.add_argument("--dtypes"), ap.add_argument("--policies")
    ap.add_argument("--steps", help="decode step modes, e.g. dynamic,static,compiled (default: auto)")
    ap.add_argument("--repeat", type=int, default=1, help="alternating rounds over all cases (median, min-max)")
    ap.add_argument("--interleave", action="store_true",
                    help="run a policy's --steps in one process, alternating each round (robust to a busy machine)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="time only the first N image tokens of each generation (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", action="store_true", help="run one untimed generation first")
    ap.add_argument("--csv", default=None, help="CSV path (default benchmarks/results/decode_<suite>.csv)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    suite = dict(SUITES[args.suite])
    suite.setdefault("steps", ["auto"])
    for key in ("presets", "grids", "batches", "dtypes", "policies", "steps"):
        if getattr(args, key):
            vals = getattr(args, key).split(",")
            suite[key] = [int(v) for v in vals] if key in ("grids", "batches") else vals
    print(f"machine: {machine()}")
    print(f"settings: {suite}, CFG 4.0 (2 rows per image), top-k 2000, random weights, whole generations, "
          f"{'timed after one warm-up generation' if args.warmup else 'first generation timed'}"
          f"{f', {args.repeat} alternating rounds (median, min-max)' if args.repeat > 1 else ''}")
    groups = [[dict(preset=preset, grid=grid, batch=batch, dtype=dtype, policy=policy, step=step, threads=args.threads,
                    warmup=args.warmup or policy.endswith("+compile"), tokens=args.tokens)
               for policy in suite["policies"] for step in suite["steps"]]
              for preset in suite["presets"] for grid in suite["grids"] for batch in suite["batches"]
              for dtype in suite["dtypes"]]
    runs = {}  # case index -> results of every round
    if args.interleave:  # one process per policy runs all its step modes in turn
        for g, group in enumerate(groups):
            for c, case in enumerate(group):
                if c % len(suite["steps"]):
                    continue
                out = run_isolated(__file__, case | dict(interleave=suite["steps"], rounds=args.repeat))
                for k, mode in enumerate(suite["steps"]):
                    runs[g, c + k] = [dict(out, tokens_per_s=t) for t in out["rates"][mode]]
                print(f"  {case['policy']}: " + ", ".join(f"{m} {sorted(v)}" for m, v in out["rates"].items()),
                      flush=True)
    for rnd in range(0 if args.interleave else args.repeat):
        for g, group in enumerate(groups):
            for c, case in enumerate(group):
                r = run_isolated(__file__, case)
                runs.setdefault((g, c), []).append(r)
                print(f"  round {rnd + 1}: {case['preset']} {case['grid']}x{case['grid']} batch {case['batch']} "
                      f"{case['dtype']} {case['policy']} {case['step']}: {r['tokens_per_s']:.0f} tok/s", flush=True)
    rows = []
    for g, group in enumerate(groups):
        base = None
        for c, case in enumerate(group):
            rs = runs[g, c]
            tps = sorted(r["tokens_per_s"] for r in rs)
            r = case | rs[0] | dict(tokens_per_s=tps[(len(tps) - 1) // 2], tok_s_min=tps[0], tok_s_max=tps[-1])
            r["images_per_s"] = r["tokens_per_s"] / (case["grid"] ** 2)  # at this token rate
            r["step_ms"] = 1e3 * case["batch"] / r["tokens_per_s"]
            base = base or r
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("kv_mib") and base.get("kv_mib"):
                r["kv_ratio"] = r["kv_mib"] / base["kv_mib"]
            if len(suite["steps"]) > 1:  # vs the first step mode of the same policy
                first = next(x for x in rows + [r] if x["policy"] == case["policy"] and x["preset"] == case["preset"]
                             and (x["grid"], x["batch"], x["dtype"]) == (case["grid"], case["batch"], case["dtype"]))
                r["vs_first_step"] = r["tokens_per_s"] / first["tokens_per_s"]
            rows.append(r)
    cols = ["preset", "grid", "batch", "dtype", "policy", "step", "tokens_per_s", "tok_s_min", "tok_s_max",
            "images_per_s", "step_ms", "cold_s", "kv_mib", "peak_rss_mib", "speedup", "kv_ratio", "vs_first_step"]
    print_table(rows, cols, title=f"decode throughput ({args.suite})")
    path = write_csv(rows, args.csv or Path(__file__).parent / "results" / f"decode_{args.suite}.csv")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
