"""Chameleon's image decoder (Meta's `vqgan.ckpt` + `vqgan.yaml`, a taming-transformers VQGAN): codes -> pixels.

Lumina-mGPT decodes its image tokens with this model (LUM model/chameleon_vae_ori/vqgan.py,
taken from taming-transformers). It differs from LlamaGen's VQ-16 (vq.py) in layout, not in
parts: the same ResNet, attention and upsampling blocks, but

- the codebook (8192 x 256) is looked up as stored, without l2-normalisation;
- the middle block is `mid.block_1 / attn_1 / block_2` and the upsampling levels are `up.N`
  with `up.0` the HIGHEST resolution (taming builds them lowest-first and prepends each), so a
  decode runs `up.4, up.3, ... up.0`; level N has `num_res_blocks + 1` blocks and an upsample
  conv except at level 0;
- attention inside a level only where its resolution is in `attn_resolutions` (Chameleon: none).

Only the decoding half is built; the checkpoint's encoder, quant_conv and the training loss'
networks are skipped by name. Grids may be non-square: codes [B, h, w] -> [B, 3, 16h, 16w].
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.models.checkpoint import CheckpointError, load_checkpoint
from lineray.models.vq import AttnBlock, Quantizer, ResnetBlock, Upsample, VQConfig, VQDecoder, _norm

# Parts of Meta's checkpoint the decoder does not use: the encoder half and the GAN/perceptual loss.
VQGAN_UNUSED_PREFIXES = ("encoder.", "quant_conv.", "loss.")


@dataclass(frozen=True)
class VQGANConfig(VQConfig):
    """vqgan.yaml's `model.params` (embed_dim, n_embed) and `ddconfig`, Chameleon's values by default."""
    codebook_size: int = 8192  # n_embed
    codebook_embed_dim: int = 256  # embed_dim
    codebook_l2_norm: bool = False
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 512  # only used to place attn_resolutions, as taming does
    out_ch: int = 3

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "VQGANConfig":
        """Read Meta's vqgan.yaml (`model: {params: {embed_dim, n_embed, ddconfig: {...}}}`)."""
        from lineray.yamlfile import load_mapping
        data = load_mapping(path, CheckpointError, "VQGAN config")
        params = data.get("model", {}).get("params", data)
        dd = params.get("ddconfig")
        if not isinstance(dd, dict) or "n_embed" not in params or "embed_dim" not in params:
            raise CheckpointError(f"{path}: expected model.params with n_embed, embed_dim and ddconfig "
                                  "(taming VQModel layout)")
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dd.items() if k in known}
        return cls(codebook_size=int(params["n_embed"]), codebook_embed_dim=int(params["embed_dim"]), **values)


class TamingDecoder(nn.Module):
    """taming's Decoder (key names as in Meta's checkpoint, without the temb projections it never has)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        levels = []
        for level in reversed(range(n)):  # lowest resolution first, stored highest first
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level]))
                block_in = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(VQDecoder):
    """codes [B, h, w] -> images [B, 3, 16h, 16w] in [-1, 1]; the VQDecoder protocol
    (`decode_codes`, `codebook_size`, `image_size`, `to_device`) with taming's layout."""

    def __init__(self, cfg: VQGANConfig = VQGANConfig(), chunk_size: int = 4):
        nn.Module.__init__(self)
        self.config = cfg
        self.chunk_size = chunk_size  # 768 px images: ~1.5 GB of fp32 activations each at full resolution
        self.memory_format = torch.contiguous_format
        self.quantize = Quantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)
        self.decoder = TamingDecoder(cfg)

    @classmethod
    def from_files(cls, checkpoint: str | os.PathLike, config: str | os.PathLike | None = None) -> "VQGANDecoder":
        """Meta's `vqgan.ckpt` with its `vqgan.yaml` (default: the yaml beside the checkpoint)."""
        checkpoint = Path(checkpoint)
        config = Path(config) if config is not None else checkpoint.with_suffix(".yaml")
        return cls(VQGANConfig.from_yaml(config)).load(checkpoint)

    def load(self, path) -> "VQGANDecoder":
        load_checkpoint(self, path, ignore_prefixes=VQGAN_UNUSED_PREFIXES)
        return self
