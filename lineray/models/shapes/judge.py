"""The shapes judge: a small CNN that names the shape of a 96x96 scene, and whose features define a Frechet distance.

Trained on generated scenes only (a seeded stream that never draws the held-out seed), half of
them passed through the tokenizer (encode -> decode), because the GPT's samples are decoded
tokens. `python -m lineray.models.shapes.judge --out DIR --tokenizer DIR/tokenizer.safetensors`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

from lineray.models.judges import FEATURE_DIM, JudgeCNN, conv_block, fit_judge
from lineray.models.patch_tokenizer import PatchTokenizer
from lineray.models.shapes.data import NUM_CLASSES, SceneBatches, copy_iou, heldout_scenes


class ShapeJudge(JudgeCNN):
    """[B, C, 96, 96] images in [-1, 1] -> shape logits; `features` is the pooled 128-d embedding."""

    def __init__(self):
        super().__init__(nn.Sequential(conv_block(1, 16), nn.MaxPool2d(2),  # 48x48
                                       conv_block(16, 32), nn.MaxPool2d(2),  # 24x24
                                       conv_block(32, 64), nn.MaxPool2d(2),  # 12x12
                                       conv_block(64, FEATURE_DIM),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten()), NUM_CLASSES)


class TokenizedBatches:
    """Training scenes, the first `fraction` of each batch replaced by its tokenizer reconstruction."""

    def __init__(self, batches: SceneBatches, tokenizer: PatchTokenizer | None, fraction: float = 0.5):
        self.batches, self.tokenizer, self.fraction = batches, tokenizer, fraction

    def __iter__(self):
        return self

    def __next__(self):
        images, labels = next(self.batches)
        if self.tokenizer is not None:
            k = int(len(images) * self.fraction)
            images = images.clone()
            images[:k] = self.tokenizer.decode_codes(self.tokenizer.encode(images[:k]))[:, :1]
        return images, labels


def evaluate_judge(judge: ShapeJudge, tokenizer: PatchTokenizer | None, n: int = 500) -> dict:
    """Accuracy on the held-out scenes, as drawn and (with a tokenizer) after the tokenizer's round trip."""
    held = heldout_scenes(n)
    pred, _ = judge.predict(held.images)
    result = {"heldout_accuracy": float((pred == held.labels).float().mean()), "heldout_scenes": n}
    if tokenizer is not None:
        recon = tokenizer.decode_codes(tokenizer.encode(held.images))
        pred, _ = judge.predict(recon)
        result["heldout_accuracy_tokenized"] = float((pred == held.labels).float().mean())
        result["heldout_copy_iou_tokenized"] = float(copy_iou(recon).mean())
    return result


def train_judge(out: Path, tokenizer: Path | None = None, seed: int = 0, steps: int = 400, batch_size: int = 64,
                lr: float = 2e-3, log_every: int = 50) -> dict:
    torch.manual_seed(seed)
    tok = PatchTokenizer.load(tokenizer) if tokenizer is not None else None
    judge = ShapeJudge()
    # Seeds 1000+ are the judge's own stream (the GPT trains on seed + 1 = 1 by default).
    seconds = fit_judge(judge, TokenizedBatches(SceneBatches(batch_size, seed=1000 + seed), tok), steps, lr,
                        log_every)
    out.mkdir(parents=True, exist_ok=True)
    judge.save(out / "judge.safetensors")
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, **evaluate_judge(judge, tok),
            "train_seconds": round(seconds, 1)}
    (out / "judge.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"judge held-out accuracy {info['heldout_accuracy']:.4f} ({info['heldout_scenes']} scenes"
          + (f"; {info['heldout_accuracy_tokenized']:.4f} after the tokenizer" if tok is not None else "")
          + f"); wrote {out / 'judge.safetensors'}", flush=True)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the shapes judge classifier.")
    p.add_argument("--out", type=Path, required=True, help="directory for judge.safetensors / judge.json")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.safetensors: half of each batch goes through its round trip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_judge(args.out, args.tokenizer, args.seed, args.steps, args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
