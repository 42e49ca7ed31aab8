"""Janus-Pro on lineray: full cache vs LineAR, measured on this CPU and planned for the 7B.

    python benchmarks/family_throughput.py                 # Janus-Pro-1B width, 4 of 24 layers, fp32
    python benchmarks/family_throughput.py --layers 24     # the whole 1B depth (slow on 2 cores)

Three tables, side by side in one run:
  1. Janus-Pro-1B shapes (width 2048, 16 heads, FFN 5632, text vocab 102400, gen_head 2048, 24x24
     image tokens, CFG), random weights, fp32: full vs LineAR 1/6 at the same batch, one whole
     generation each (prefill + 576 tokens): ms per decode step, image tokens/s, K/V MiB allocated.
  2. The largest batch whose K/V fits a fixed cap (--kv-cap-mib) per policy, from the planner, and
     the throughput measured at that batch: what LineAR's smaller cache buys on a memory-bound device.
  3. Janus-Pro-7B (30 layers, width 4096, 32 heads), bf16, exact from the planner: K/V per image and
     the largest batch whose K/V fits 8 GiB, per policy, for two prefix capacities (max_prefix_len).

A full-depth 1B run takes far more than 5 minutes on 2 shared cores (~0.1 s per layer per step
here), so by default the model keeps the 1B's width, heads, embeddings and head but only --layers
of its 24 blocks, and times the first --tokens image tokens (both said in the titles); per-layer
costs (attention over the cache, K/V bytes) scale with depth. Half the image is past LineAR 1/6's
first eviction (line 5), but full's attention cost keeps growing after it, so the cut favours full. The
prompts are random token ids of 20-40 tokens (a Janus-Pro prompt with its chat template), left-padded
in one batch; --max-prefix sets the cache's prefix capacity. Timings on a shared machine are noisy:
the policies of a table run in turns, one decode step each (`Turns`), so both see the same load.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_spec, machine, print_table  # noqa: E402

from lineray.kernels.sampling import SamplingConfig  # noqa: E402
from lineray.models.config import preset  # noqa: E402
from lineray.models.generate import Condition, generate_tokens, new_cache  # noqa: E402
from lineray.models.sizing import memory_plan  # noqa: E402
from lineray.models.transformer import Transformer  # noqa: E402

MiB = 2**20
SAMPLING = SamplingConfig(cfg_scale=5.0, temperature=1.0)  # Janus-Pro's defaults


def build(layers: int, max_prefix: int) -> Transformer:
    cfg = replace(preset("janus-pro-1b"), n_layer=layers, max_prefix_len=max_prefix, bos_token_id=100000,
                  cfg_pad_token_id=100015)
    model = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a non-zero head, so sampling is not uniform
        model.output.fc2.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return model.eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 41, (n,), generator=g)
    return [[100000] + torch.randint(0, 100000, (int(k) - 2,), generator=g).tolist() + [100016] for k in lengths]


class StopGeneration(Exception):
    pass


class Turns:
    """Runs several generations in lock step, one decode step at a time each in turn (threads that hand
    a turn to the next), so that every policy sees the same load from the other processes on a shared
    machine. Each generation is timed over its own turns only."""

    def __init__(self, n: int):
        self.cond = threading.Condition()
        self.turn, self.active = 0, list(range(n))

    def wait(self, k: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == k)

    def done(self, k: int, finished: bool = False) -> None:
        with self.cond:
            later = [j for j in self.active if j > k] or self.active
            if finished:
                self.active.remove(k)
                later = [j for j in later if j != k] or self.active
            self.turn = later[0] if later else -1
            self.cond.notify_all()


def timed(model: Transformer, cases: list[tuple[str, int]], tokens: int) -> list[dict]:
    """For each (policy, batch): the prefill and the first `tokens` image tokens, all cases in turns."""
    turns, rows = Turns(len(cases)), [None] * len(cases)

    def run(k: int, policy: str, batch: int) -> None:
        own, steps = [0.0], []
        cache = new_cache(model, cache_spec(policy), 2 * batch, True)

        def on_step(i: int) -> None:
            now = time.perf_counter()
            steps.append(now - start[0])
            own[0] += now - start[0]
            if i + 1 == tokens:
                raise StopGeneration
            turns.done(k)
            turns.wait(k)
            start[0] = time.perf_counter()

        turns.wait(k)
        start = [time.perf_counter()]
        try:
            generate_tokens(model, Condition.prompts(prompts(batch)), list(range(batch)), sampling=SAMPLING,
                            cache_spec=cache_spec(policy), cache=cache, on_step=on_step, step_mode="dynamic")
        except StopGeneration:
            pass
        finally:
            turns.done(k, finished=True)
        rows[k] = dict(policy=policy, batch=batch, tokens=tokens, ms_per_step=sum(steps[1:]) / (tokens - 1) * 1e3,
                       tokens_per_s=batch * tokens / own[0], own_s=own[0], kv_mib=cache.memory().kv_bytes / MiB,
                       slots=cache.capacity)

    threads = [threading.Thread(target=run, args=(k, *case)) for k, case in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="blocks of the 1B model to keep (24 = all)")
    ap.add_argument("--tokens", type=int, default=288, help="image tokens timed per generation (576 = all)")
    ap.add_argument("--batch", type=int, default=4, help="images per batch in table 1")
    ap.add_argument("--kv-cap-mib", type=int, default=160, help="K/V budget of table 2 (MiB, fp32, reduced depth)")
    ap.add_argument("--max-prefix", type=int, default=64, help="the cache's prefix capacity (max_prefix_len)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-measure", action="store_true", help="only the planner tables")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    policies = ["full", "linear:1/6"]

    if not args.skip_measure:
        model = build(args.layers, args.max_prefix)
        depth = f"{args.layers} of 24 layers" if args.layers < 24 else "all 24 layers"
        depth += f", first {args.tokens} of 576 tokens" if args.tokens < 576 else ""
        rows = timed(model, [(p, args.batch) for p in policies], args.tokens)
        for r in rows:
            r["speed_vs_full"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
            r["kv_vs_full"] = r["kv_mib"] / rows[0]["kv_mib"]
        print_table(rows, ["policy", "batch", "slots", "kv_mib", "kv_vs_full", "ms_per_step", "tokens_per_s",
                           "speed_vs_full", "own_s"],
                    f"1. Janus-Pro-1B shapes ({depth}), random weights, 24x24, CFG 5, fp32, prompts 20-40 tokens, "
                    f"prefix capacity {args.max_prefix}: same batch")

        per_image = {p: memory_plan(model.config, cache_spec(p), torch.float32).kv_bytes_per_image for p in policies}
        rows = timed(model, [(p, args.kv_cap_mib * MiB // per_image[p]) for p in policies], args.tokens)
        for r in rows:
            r["kv_per_image_mib"] = per_image[r["policy"]] / MiB
            r["speed_vs_full"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print_table(rows, ["policy", "kv_per_image_mib", "batch", "kv_mib", "ms_per_step", "tokens_per_s",
                           "speed_vs_full", "own_s"],
                    f"2. Largest batch under a {args.kv_cap_mib} MiB K/V cap (planner), measured there ({depth}, fp32)")

    rows = []
    for max_prefix in (256, 64):
        cfg = replace(preset("janus-pro-7b"), max_prefix_len=max_prefix)
        full = memory_plan(cfg, cache_spec("full"), torch.bfloat16).kv_bytes_per_image
        for p in ["full", "linear:1/4", "linear:1/6", "linear:1/8"]:
            plan = memory_plan(cfg, cache_spec(p), torch.bfloat16)
            slots = max_prefix + cfg.cache_plan(cache_spec(p)).visual_capacity
            rows.append(dict(max_prefix_len=max_prefix, policy=p, slots=slots,
                             kv_per_image_mib=plan.kv_bytes_per_image / MiB, kv_vs_full=plan.kv_bytes_per_image / full,
                             batch_in_8gib_kv=8 * 2**30 // plan.kv_bytes_per_image,
                             batch_in_80gib=plan.max_batch(80 * 2**30)))
    print_table(rows, ["max_prefix_len", "policy", "slots", "kv_per_image_mib", "kv_vs_full", "batch_in_8gib_kv",
                       "batch_in_80gib"],
                "3. Janus-Pro-7B, bf16, planner (exact K/V, both CFG rows; 'batch_in_80gib' = weights 13.2 GiB + K/V + "
                "activations in one 80 GiB device)")


if __name__ == "__main__":
    main()
