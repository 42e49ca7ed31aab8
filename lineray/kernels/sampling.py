"""Classifier-free guidance and per-image reproducible sampling.

Each image owns a table of uniforms drawn once from its own seed; step i samples
by inverse CDF with that image's i-th uniform. The token an image gets therefore
depends only on its own seed and logits, never on which batch or rank it ran in,
and every tensor-parallel rank samples the same token without communicating.
"""
from __future__ import annotations

import torch
from pydantic.dataclasses import dataclass

from lineray.validation import STRICT


@dataclass(frozen=True, config=STRICT)  # validated on construction (lineray.validation)
class SamplingConfig:
    cfg_scale: float = 4.0
    cfg_interval: int = -1  # apply CFG to tokens 0..cfg_interval only; -1 = all tokens
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering

    def __post_init__(self):
        if self.cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1.0 (1.0 disables guidance), got {self.cfg_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0


def image_uniforms(seeds: list[int], n_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, n_tokens] uniforms in [0, 1), row b drawn from seeds[b] alone."""
    rows = [torch.rand(n_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(device)


def guided_logits(logits: torch.Tensor, n_images: int, step: int | torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Rows are [cond; uncond] when CFG is on; return [n_images, V] fp32 logits to sample from.

    step: the index of the token sampled, an int or a 0-dim device tensor (static-shape step)."""
    logits = logits.float()
    if not cfg.uses_cfg:
        return logits
    cond, uncond = logits[:n_images], logits[n_images:]
    guided = uncond + (cond - uncond) * cfg.cfg_scale
    if cfg.cfg_interval == -1:
        return guided
    if torch.is_tensor(step):  # no host sync: both are computed, one is kept
        return torch.where(step > cfg.cfg_interval, cond, guided)
    return cond if step > cfg.cfg_interval else guided


def sample(logits: torch.Tensor, u: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Draw one token per row by inverse CDF. logits [B, V] fp32, u [B] in [0, 1)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    ids = None
    if 0 < cfg.top_k < logits.size(-1):
        logits, ids = logits.topk(cfg.top_k, dim=-1)  # sorted, largest first
    elif cfg.top_p < 1.0:
        logits, ids = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float64)
    if cfg.top_p < 1.0:
        # Keep the smallest prefix whose mass exceeds top_p (the first token is always kept).
        drop = (probs.cumsum(-1) - probs) > cfg.top_p
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.size(-1) - 1)
    return choice.squeeze(-1) if ids is None else ids.gather(-1, choice).squeeze(-1)
