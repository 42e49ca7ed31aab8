"""Lumina-mGPT memory per policy (exact planner) and decode-step time against position (reduced depth).

    python benchmarks/lumina_memory.py [--batch 8] [--positions 0,12,24,36,47] [--skip-timing]

1. Lumina-mGPT-768 (48 lines of 48 codes + end-of-line = 2,352 tokens) and -1024 (64 x 65 = 4,160),
   7B shapes, bf16, CFG (2 rows per image), tp 1: K/V per image and the largest batch under 8, 40 and
   80 GiB, per policy (full, LineAR 1/4, 1/6, 1/8), from the exact planner (lineray.models.sizing):
   once as a pure K/V cap and once as a device budget (weights + K/V + step activations). Budgets
   count whole lines of W+1 tokens; the prefix capacity (max_prefix_len, 384) is held by every policy.
2. A reduced-depth Lumina-mGPT-768 (same width 4096 and 32 heads, 2 layers, random bf16 weights): ms
   per decode step, full vs LineAR 1/8 at the same batch, at several image lines. A whole 2,352-step
   image per policy takes too long on this shared 2-core CPU, so each measurement is one whole line
   (49 steps: its end-of-line and, for LineAR, the eviction at its end included; the fastest of
   --repeat runs) after the cache has
   been fast-forwarded to that line: its counters say the line's position and it holds as many slots
   as it would there (full: every token so far; LineAR: the 6-line budget), with random K/V contents,
   which do not change the work. Policies alternate per line in one process; timings are noisy.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_spec, machine, print_table, write_csv  # noqa: E402

from lineray.kernels.sampling import SamplingConfig, guided_logits, sample  # noqa: E402
from lineray.models.config import preset  # noqa: E402
from lineray.models.generate import Condition, condition_rows, new_cache  # noqa: E402
from lineray.models.sizing import memory_plan  # noqa: E402

POLICIES = ["full", "linear:1/4", "linear:1/6", "linear:1/8"]
BUDGETS_GIB = (8, 40, 80)
GIB = 2**30


def planner_table(dtype: torch.dtype) -> list[dict]:
    rows = []
    for name in ("lumina-mgpt-768", "lumina-mgpt-1024"):
        cfg = preset(name)
        full_kv = None
        for policy in POLICIES:
            spec = cache_spec(policy)
            plan = memory_plan(cfg, spec, dtype)
            cache_plan = cfg.cache_plan(spec)
            full_kv = full_kv or plan.kv_bytes_per_image
            row = dict(model=name, policy=policy, lines_kept=f"{cache_plan.budget_lines}/{cfg.grid_h}",
                       visual_slots=cache_plan.visual_capacity, kv_mib_per_image=plan.kv_bytes_per_image / 2**20,
                       kv_vs_full=plan.kv_bytes_per_image / full_kv)
            for g in BUDGETS_GIB:
                row[f"kv_cap_{g}g"] = int(g * GIB // plan.kv_bytes_per_image)
            for g in BUDGETS_GIB:
                row[f"device_{g}g"] = plan.max_batch(g * GIB)
            rows.append(row)
    return rows


def timing_model(dtype: torch.dtype):
    from lineray.models.transformer import Transformer
    cfg = replace(preset("lumina-mgpt-768"), n_layer=2)
    model = Transformer(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype) * 0.02)
    return model


@torch.inference_mode()
def time_line(model, policy: str, batch: int, line: int, prompt_len: int = 64) -> tuple[float, int]:
    """ms per step over image line `line` (49 steps), after fast-forwarding the cache to its start;
    returns (ms/step, visual slots held at the line's start)."""
    cfg = model.config
    L = cfg.line_tokens
    sampling = SamplingConfig(cfg_scale=3.0, top_k=2000)
    ids = [[cfg.bos_token_id] + list(range(100, 100 + prompt_len - 4)) + [8710, 8197, 8828, 8828]] * batch
    x, key_mask = condition_rows(model, Condition.prompts(ids), use_cfg=True)
    cache = new_cache(model, cache_spec(policy), x.size(0), use_cfg=True)
    cache.reset(key_mask)
    logits = model.prefill(x, cache)
    written = line * L
    held = written if not cache.plan.evicts else min(written, cache.plan.budget)
    g = torch.Generator().manual_seed(line)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    cache._set_fill(cache.prefix_len + held, written)  # fast-forward (module docstring)
    cache.position.add_(written)
    u = torch.rand(batch, L, generator=g, dtype=torch.float64)
    start = time.perf_counter()
    for i in range(L):  # L steps: the line's last token is fed too, so LineAR's eviction at its end is timed
        tok = model.force_tokens(sample(guided_logits(logits, batch, written + i, sampling), u[:, i], sampling),
                                 written + i)
        logits = model.decode(torch.cat([tok, tok]), cache)
    ms = (time.perf_counter() - start) * 1e3 / L
    del cache
    return ms, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8, help="images per batch in the timing (CFG: twice the rows)")
    ap.add_argument("--positions", default="0,16,32,47", help="image lines (of 48) to time at")
    ap.add_argument("--repeat", type=int, default=2, help="measurements per (line, policy); the fastest is kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "lumina_memory.csv"))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    rows = planner_table(dtype)
    print_table(rows, list(rows[0]), title=f"Lumina-mGPT 7B, {args.dtype}, CFG, tp 1: K/V per image and the "
                                           f"largest batch (pure K/V cap; device = weights + K/V + activations)")
    write_csv(rows, args.csv)
    if args.skip_timing:
        return
    print(f"\nbuilding the reduced-depth model (4096 wide, 32 heads, 2 layers, {args.dtype}, random weights)...",
          flush=True)
    model = timing_model(dtype)
    n = args.batch
    for policy in ("full", "linear:1/8"):  # the planned K/V of the real cache, checked on this model
        cache = new_cache(model, cache_spec(policy), 2 * n, use_cfg=True)
        want = memory_plan(model.config, cache_spec(policy), dtype).kv_bytes_per_image * n
        print(f"check {policy}: allocated K/V {cache.memory().kv_bytes / 2**20:.1f} MiB for {n} images, planned "
              f"{want / 2**20:.1f} MiB: {'OK' if cache.memory().kv_bytes == want else 'MISMATCH'}")
        del cache
    timing = []
    for line in (int(p) for p in args.positions.split(",")):
        row = dict(line=line, position=line * model.config.line_tokens)
        runs = {p: [] for p in ("full", "linear:1/8")}
        for _ in range(args.repeat):  # policies alternate, so both see the machine's same moments
            for policy in runs:
                runs[policy].append(time_line(model, policy, n, line))
                print(f"  line {line} {policy}: {runs[policy][-1][0]:.0f} ms/step "
                      f"({runs[policy][-1][1]} visual slots held)", flush=True)
        for policy, got in runs.items():
            key = policy.replace(":", " ")
            row[f"{key} slots"] = got[0][1]
            row[f"{key} ms/step"] = min(ms for ms, _ in got)  # the least disturbed run on a shared machine
        row["full / linear"] = row["full ms/step"] / row["linear 1/8 ms/step"]
        timing.append(row)
    print_table(timing, list(timing[0]), title=f"reduced-depth Lumina-mGPT-768 (2 layers), batch {n} images "
                                               f"(CFG: {2 * n} rows), one 49-step line per measurement")
    write_csv(timing, Path(args.csv).with_name("lumina_timing.csv"))


if __name__ == "__main__":
    main()
