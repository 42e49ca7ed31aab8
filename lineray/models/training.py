"""Pieces shared by the scripts that train the bundled models (digits, shapes): schedule, optimiser,
autocast choice, held-out loss and the safetensors + JSON model files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lineray.models.transformer import Transformer


def use_bf16(mode: str) -> bool:
    """bf16 autocast helps only on CPUs with native bf16 (AVX512_BF16/AMX); elsewhere it is ~50x slower."""
    if mode not in ("auto", "bf16", "off"):
        raise ValueError(f"autocast must be auto, bf16 or off, got {mode!r}")
    if mode == "auto":
        from lineray.models.spec import native_bf16
        return native_bf16("cpu")
    return mode == "bf16"


def learning_rate(cfg, step: int, total: int) -> float:
    """Linear warmup over cfg.warmup_steps, then cosine decay from cfg.lr to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, cfg) -> torch.optim.Optimizer:
    """AdamW with cfg.weight_decay on the matrices (not on norms and embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def heldout_nll(model: Transformer, labels: torch.Tensor, tokens: torch.Tensor, bf16: bool,
                batch_size: int = 120) -> float:
    """Mean next-token negative log-likelihood (nats/token) of real sequences under their true labels."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(labels), batch_size):
        lab, tok = labels[i:i + batch_size], tokens[i:i + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(lab, tok[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), tok.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / tokens.numel()


def save_model(model: Transformer, out: Path, gpt_file: str, gpt_json: str, info: dict) -> None:
    """Write the weights (fp32 safetensors) and the JSON record {config, sampling (kept), training}."""
    from safetensors.torch import save_file
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / gpt_file))
    old = json.loads((out / gpt_json).read_text()) if (out / gpt_json).is_file() else {}
    record = {"config": model.config.to_dict(), **({"sampling": old["sampling"]} if "sampling" in old else {}),
              "training": info}
    (out / gpt_json).write_text(json.dumps(record, indent=2) + "\n")
