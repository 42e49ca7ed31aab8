"""Choose a bundled model's sampling settings by the judge's accuracy on full-cache samples.

    python -m lineray.quality.tune --model shapes-24 --model-dir DIR --samples 300 --write
    python -m lineray.quality.tune --model shapes-24 --model-dir DIR --samples 1000 --shipped --write

Samples use seeds 100000 + i (never the eval's seeds), classes cycling. --write stores the best
setting in DIR/gpt.json under "sampling" and every result under "sampling_tuning", as the digits
bundle records its own; with --shipped it checks the stored setting and records the result under
"sampling_check" (the bundle's test sets its floor from it).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.quality import metrics
from lineray.quality.runner import Bench, sample_images

TUNE_SEED = 100_000
# (cfg_scale, temperature, top_k); top_k 0 = off
GRID = [(1.0, 1.0, 0), (1.25, 1.0, 0), (1.0, 0.8, 0), (1.25, 0.8, 0), (1.5, 1.0, 0), (1.5, 0.8, 0),
        (2.0, 1.0, 0), (3.0, 1.0, 0), (2.0, 0.8, 0), (3.0, 0.8, 0), (2.0, 0.8, 8), (3.0, 0.6, 0), (4.0, 0.8, 0)]


def label(s: SamplingConfig) -> str:
    return f"cfg {s.cfg_scale:g} T {s.temperature:g}" + (f" top-k {s.top_k}" if s.top_k else "")


def judge_samples(bench: Bench, sampling: SamplingConfig, samples: int, batch_size: int,
                  seed: int = TUNE_SEED) -> dict:
    """Judge accuracy (and copy IoU, where the data has it) of `samples` full-cache images."""
    labels = torch.arange(samples) % bench.model.config.num_classes
    t0 = time.perf_counter()
    _, images = sample_images(bench, CacheSpec("full"), sampling, labels, [seed + i for i in range(samples)],
                              batch_size)
    predicted, _ = bench.judge.predict(images)
    result = {"accuracy": round(metrics.class_accuracy(predicted, labels), 4),
              "images_per_s": round(samples / (time.perf_counter() - t0), 2)}
    if bench.copy_iou is not None:
        result["copy_iou"] = round(float(bench.copy_iou(images).mean()), 4)
    # Per-class accuracy says which shapes the model has not learnt yet.
    result["per_class"] = [round(float((predicted[labels == c] == c).float().mean()), 3)
                           for c in range(bench.model.config.num_classes)]
    return result


def main(argv=None) -> int:
    from lineray.models.bundles import BUNDLES, bundle_module
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="bundle", default="digits", choices=list(BUNDLES))
    p.add_argument("--model-dir", type=Path, default=None, help="a training output directory (default: the bundle)")
    p.add_argument("--judge", type=Path, default=None, help="judge.safetensors (default: the bundled judge)")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--shipped", action="store_true", help="only the settings stored in gpt.json")
    p.add_argument("--write", action="store_true", help="store the best setting in gpt.json")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench.load(args.bundle, args.model_dir, args.judge, heldout=1)
    if args.shipped:
        grid = [bench.sampling]
    else:
        grid = [SamplingConfig(**{**asdict(bench.sampling), "cfg_scale": c, "temperature": t, "top_k": k})
                for c, t, k in GRID]
    results = {}
    for s in grid:
        results[label(s)] = judge_samples(bench, s, args.samples, args.batch_size)
        print(f"{label(s)}: {json.dumps(results[label(s)])}", flush=True)
    best_label, best = max(zip(results, grid), key=lambda kv: results[kv[0]]["accuracy"])
    print(f"best: {best_label} accuracy {results[best_label]['accuracy']:.3f} on {args.samples} samples")
    if args.write:
        b = bundle_module(args.bundle)
        path = (args.model_dir or b.ASSET_DIR) / b.GPT_JSON
        record = json.loads(path.read_text())
        note = f"full-cache samples, seeds {TUNE_SEED}+ (not the eval seeds), classes cycling; judge class accuracy"
        if args.shipped:  # the check the bundle's test sets its floor from
            record["sampling_check"] = {"note": note, "samples": args.samples, **results[best_label]}
        else:
            record["sampling"] = asdict(best)
            record["sampling_tuning"] = {
                "note": note, "samples": args.samples,
                "results": {k: {kk: vv for kk, vv in v.items() if kk != "per_class"} for k, v in results.items()}}
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote the {'check' if args.shipped else 'sampling settings'} into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
