"""The bundled models' image tokenizer: a fixed k-means codebook over p x p pixel patches.

An image is cut into a grid of p x p patches (digits: 2x2, 32 px -> 16x16 tokens; shapes: 4x4,
96 px -> 24x24); each patch becomes the index of its nearest codebook entry (a token), and
decoding pastes the entries back. It plays the part of LlamaGen's VQ model (`decode_codes`,
`codebook_size`) for the bundled models, at a size a CPU fits in seconds.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchTokenizer(nn.Module):
    def __init__(self, codebook: torch.Tensor, patch: int = 2):
        super().__init__()
        if codebook.dim() != 2 or codebook.size(1) != patch * patch:
            raise ValueError(f"codebook must be [K, {patch * patch}] for {patch}x{patch} patches, "
                             f"got {list(codebook.shape)}")
        self.patch = patch
        self.register_buffer("codebook", codebook.float())  # [K, patch*patch], pixel values in [-1, 1]

    @property
    def codebook_size(self) -> int:
        return self.codebook.size(0)

    def image_size(self, grid: int) -> int:
        return grid * self.patch

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] (channels averaged) -> [B, H/p * W/p, p*p] row-major."""
        gray = images.float().mean(1, keepdim=True)
        return F.unfold(gray, self.patch, stride=self.patch).transpose(1, 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> codes [B, H/p, W/p] int64 (nearest codebook entry)."""
        b, _, h, w = images.shape
        x = self.patches(images)
        codes = torch.cdist(x, self.codebook.to(x.device).expand(b, -1, -1)).argmin(-1)
        return codes.view(b, h // self.patch, w // self.patch)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> images [B, 3, h*p, w*p] in [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [batch, h, w], got {list(codes.shape)}")
        if len(codes) and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"code {int(codes.max())} is out of range for a codebook of {self.codebook_size}")
        b, h, w = codes.shape
        cols = self.codebook[codes.reshape(b, -1).to(self.codebook.device)].transpose(1, 2)  # [B, p*p, h*w]
        gray = F.fold(cols, (h * self.patch, w * self.patch), self.patch, stride=self.patch)
        return gray.expand(-1, 3, -1, -1).clamp(-1, 1)

    # -- files ---------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        save_file({"codebook": self.codebook.contiguous().cpu()}, str(path),
                  metadata={"patch": str(self.patch)})

    @classmethod
    def load(cls, path: str | Path) -> "PatchTokenizer":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            if "codebook" not in f.keys():
                raise ValueError(f"{path}: no 'codebook' tensor in the tokenizer file")
            patch = int((f.metadata() or {}).get("patch", 2))
            return cls(f.get_tensor("codebook"), patch)

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int, seed: int = 0, patch: int = 2,
            max_patches: int = 200_000) -> "PatchTokenizer":
        """k-means (scikit-learn) over the patches of `images` [B, C, H, W] in [-1, 1]."""
        from sklearn.cluster import KMeans
        x = cls(torch.zeros(1, patch * patch), patch).patches(images).reshape(-1, patch * patch)
        if len(x) > max_patches:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_patches]]
        km = KMeans(n_clusters=codebook_size, n_init=4, random_state=seed).fit(x.numpy())
        centers = torch.tensor(km.cluster_centers_, dtype=torch.float32)
        # Order codes by brightness so token ids read sensibly (0 = background).
        return cls(centers[centers.mean(1).argsort()], patch)

    def reconstruction_error(self, images: torch.Tensor) -> dict:
        """Mean squared error and PSNR (pixels in [-1, 1], peak-to-peak 2) of encode -> decode."""
        gray = images.float().mean(1, keepdim=True)
        recon = self.decode_codes(self.encode(gray))[:, :1]
        mse = float((recon - gray).pow(2).mean())
        return {"mse": mse, "psnr_db": 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()}
