"""What the bundled models' judges share: a small CNN classifier whose pooled features define a Frechet distance.

A judge is a `body` (images -> [B, FEATURE_DIM] features) and a linear `head` (features -> class
logits); each bundle builds its own body for its image size (digits/judge.py, shapes/judge.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

FEATURE_DIM = 128


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class JudgeCNN(nn.Module):
    """[B, C, H, W] images in [-1, 1] (channels averaged) -> class logits; `features` is the pooled embedding."""

    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float().mean(1, keepdim=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted classes [B], features [B, FEATURE_DIM]) in eval mode."""
        self.eval()
        feats = torch.cat([self.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        return self.head(feats).argmax(-1), feats

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "JudgeCNN":
        from safetensors.torch import load_file
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"judge weights not found: {path}")
        judge = cls()
        judge.load_state_dict(load_file(str(path)))
        return judge.eval()


def fit_judge(judge: JudgeCNN, batches, steps: int, lr: float = 2e-3, log_every: int = 100) -> float:
    """Train `judge` on `steps` (images, labels) batches (AdamW, one-cycle schedule); returns the seconds taken."""
    import torch.nn.functional as F
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
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
            print(f"judge step {step}/{steps} loss {loss.item():.4f} {rate:.2f} steps/s "
                  f"ETA {(steps - step) / rate:.0f}s", flush=True)
    judge.eval()
    return time.time() - t0
