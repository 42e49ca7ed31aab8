"""The judge: a small CNN that classifies 32x32 digits, and whose features define a Frechet distance.

Trained on the same augmented training split as the GPT, never on the held-out
set. `python -m lineray.models.digits.judge --out DIR --seed S` trains it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.models.digits.data import NUM_CLASSES, AugmentedBatches, load_digits_split, render

FEATURE_DIM = 128


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitJudge(nn.Module):
    """[B, C, 32, 32] images in [-1, 1] -> class logits; `features` is the pooled 128-d embedding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_block(1, 16), nn.MaxPool2d(2),  # 16x16
                                  conv_block(16, 32), nn.MaxPool2d(2),  # 8x8
                                  conv_block(32, 64), conv_block(64, FEATURE_DIM),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float().mean(1, keepdim=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted classes [B], features [B, 128]) in eval mode."""
        self.eval()
        feats = torch.cat([self.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        return self.head(feats).argmax(-1), feats

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "DigitJudge":
        from safetensors.torch import load_file
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"judge weights not found: {path}")
        judge = cls()
        judge.load_state_dict(load_file(str(path)))
        return judge.eval()


def train_judge(out: Path, seed: int = 0, steps: int = 800, batch_size: int = 128, lr: float = 2e-3,
                log_every: int = 100) -> dict:
    torch.manual_seed(seed)
    train, held = load_digits_split()
    judge = DigitJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batches = AugmentedBatches(train, batch_size, seed)
    t0 = time.time()
    judge.train()
    for step in range(1, steps + 1):
        images, labels = next(batches)
        loss = F.cross_entropy(judge(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            rate = step / (time.time() - t0)
            print(f"judge step {step}/{steps} loss {loss.item():.4f} {rate:.1f} steps/s "
                  f"ETA {(steps - step) / rate:.0f}s", flush=True)
    pred, _ = judge.predict(render(held.images))
    accuracy = float((pred == held.labels).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    judge.save(out / "judge.safetensors")
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "heldout_accuracy": accuracy,
            "train_seconds": round(time.time() - t0, 1)}
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
