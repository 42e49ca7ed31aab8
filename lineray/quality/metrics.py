"""Offline quality metrics for comparing KV cache policies on the same model.

All inputs are plain tensors, so each metric can be checked on hand-built cases:
logits [..., V], tokens [...], features [N, D].
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of `tokens` [...] under `logits` [..., V]."""
    return float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens.reshape(-1)))


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per position, in nats: how much the distribution moved away from the reference."""
    ref_logp = F.log_softmax(ref_logits.double(), dim=-1)
    logp = F.log_softmax(logits.double(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions whose most likely next token is the same as under the reference."""
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean())


def token_agreement(ref_tokens: torch.Tensor, tokens: torch.Tensor) -> float:
    """Fraction of equal tokens between two generations from the same seeds."""
    if ref_tokens.shape != tokens.shape:
        raise ValueError(f"token tensors differ in shape: {list(ref_tokens.shape)} vs {list(tokens.shape)}")
    return float((ref_tokens == tokens).float().mean())


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the judge assigns to the class they were generated for."""
    return float((predicted.reshape(-1) == labels.reshape(-1)).float().mean())


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of [N, D] features (float64)."""
    x = features.detach().double().cpu().numpy()
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors as [N, D], got shape {list(x.shape)}")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula, any feature space).

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2); the symmetric form keeps the
    matrix square root real.
    """
    mu_a, s_a = feature_stats(features_a)
    mu_b, s_b = feature_stats(features_b)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))
    return max(value, 0.0)
