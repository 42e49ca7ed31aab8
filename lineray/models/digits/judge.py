"""The judge: a small CNN that classifies 32x32 digits, and whose features define a Frechet distance.

Trained on the same augmented training split as the GPT, never on the held-out
set. `python -m lineray.models.digits.judge --out DIR --seed S` trains it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

from lineray.models.digits.data import NUM_CLASSES, AugmentedBatches, load_digits_split, render
from lineray.models.judges import FEATURE_DIM, JudgeCNN, conv_block, fit_judge


class DigitJudge(JudgeCNN):
    """[B, C, 32, 32] images in [-1, 1] -> digit logits; `features` is the pooled 128-d embedding."""

    def __init__(self):
        super().__init__(nn.Sequential(conv_block(1, 16), nn.MaxPool2d(2),  # 16x16
                                       conv_block(16, 32), nn.MaxPool2d(2),  # 8x8
                                       conv_block(32, 64), conv_block(64, FEATURE_DIM),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten()), NUM_CLASSES)


def train_judge(out: Path, seed: int = 0, steps: int = 800, batch_size: int = 128, lr: float = 2e-3,
                log_every: int = 100) -> dict:
    torch.manual_seed(seed)
    train, held = load_digits_split()
    judge = DigitJudge()
    seconds = fit_judge(judge, AugmentedBatches(train, batch_size, seed), steps, lr, log_every)
    pred, _ = judge.predict(render(held.images))
    accuracy = float((pred == held.labels).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    judge.save(out / "judge.safetensors")
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "heldout_accuracy": accuracy,
            "train_seconds": round(seconds, 1)}
    (out / "judge.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"judge held-out accuracy {accuracy:.4f} ({len(held)} real digits); wrote {out / 'judge.safetensors'}")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the digits judge classifier.")
    p.add_argument("--out", type=Path, required=True, help="directory for judge.safetensors / judge.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_judge(args.out, args.seed, args.steps, args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
