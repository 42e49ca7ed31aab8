"""The VQ-16 image decoder of LlamaGen (tokenizer/tokenizer_image/vq_model.py): codes -> pixels.

Only the decoding half is built (codebook, post_quant_conv, decoder); the
encoder's keys in a published checkpoint are recognised and skipped. Janus-Pro ships the
same decoder (module for module) inside its checkpoint; lineray.models.janus.keys maps its
two layouts' names onto these, and `config_from_shapes` sizes a decoder from the tensors.

Decoding is ~0.4 TFLOP per 384 px image, most of it 3x3 convolutions at full
resolution: on a GPU it runs in bf16 with channels_last activations (cuDNN's fast
layout for them), `chunk_size` images at a time so that the activations of a large
batch (a few hundred MB per 384 px image) never sit in memory together.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.models.checkpoint import load_checkpoint

VQ_UNUSED_PREFIXES = ("encoder.", "quant_conv.", "quantize.codebook_used")


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def config_from_shapes(shapes: dict[str, tuple[int, ...]], codebook_l2_norm: bool = True) -> VQConfig:
    """The VQConfig whose decoder has these tensor shapes (keys as VQDecoder names them).

    Only the per-level channel counts are defined by the tensors, not how they factor into
    ch x ch_mult; any factoring builds the same modules, so ch is their gcd."""
    def shape(key):
        if key not in shapes:
            raise ValueError(f"the VQ decoder's tensors lack {key}")
        return shapes[key]
    level_key = re.compile(r"decoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight$")
    levels = sorted({int(m[1]) for k in shapes if (m := level_key.match(k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"the VQ decoder's tensors have no consecutive decoder.conv_blocks levels (found {levels})")
    res_blocks = sum(1 for k in shapes if re.match(r"decoder\.conv_blocks\.0\.res\.\d+\.conv1\.weight$", k))
    # decoder level 0 is the lowest resolution, i.e. ch_mult's last entry
    outs = [shape(f"decoder.conv_blocks.{lvl}.res.0.conv1.weight")[0] for lvl in reversed(levels)]
    ch = math.gcd(*outs)
    codebook_size, embed_dim = shape("quantize.embedding.weight")
    return VQConfig(codebook_size=codebook_size, codebook_embed_dim=embed_dim, codebook_l2_norm=codebook_l2_norm,
                    z_channels=shape("post_quant_conv.weight")[0], ch=ch, ch_mult=tuple(o // ch for o in outs),
                    num_res_blocks=res_blocks - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # one head over all pixels
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        # Nearest copies values, so it is exact in any dtype (LlamaGen upsamples via fp32, twice the memory).
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.conv_blocks = nn.ModuleList()
        for level in range(n):
            block = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[n - level - 1]
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if level == 0:
                    attn.append(AttnBlock(block_in))
            block.res, block.attn = res, attn
            if level != n - 1:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> latents [B, C, h, w]."""
        table = F.normalize(self.embedding.weight, p=2, dim=-1) if self.l2_norm else self.embedding.weight
        return table[codes].permute(0, 3, 1, 2).contiguous()


class VQDecoder(nn.Module):
    """codes [B, h, w] -> images [B, 3, 16h, 16w] in [-1, 1]."""

    def __init__(self, cfg: VQConfig = VQConfig(), chunk_size: int = 16):
        super().__init__()
        self.config = cfg
        self.chunk_size = chunk_size  # images decoded at a time
        self.memory_format = torch.contiguous_format
        self.quantize = Quantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def image_size(self, grid: int) -> int:
        return grid * self.config.downsample

    def to_device(self, device: str | torch.device, dtype: torch.dtype | None = None,
                  channels_last: bool | None = None) -> "VQDecoder":
        """Move to `device` for inference. By default on CUDA: bf16 (where the GPU has it) and
        channels_last; elsewhere as loaded (fp32, default layout). The codebook stays fp32."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if dtype is None:
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        self.memory_format = torch.channels_last if (cuda if channels_last is None else channels_last) \
            else torch.contiguous_format
        self.to(device=device, dtype=dtype, memory_format=self.memory_format)
        self.quantize.float()
        return self.eval()

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """codes [B, h, w] -> images [B, 3, H, W] fp32 in [-1, 1], chunk_size (default self.chunk_size) at a time."""
        return torch.cat([self._decode(chunk) for chunk in codes.split(chunk_size or self.chunk_size)])

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        latents = self.quantize.lookup(codes).to(self.post_quant_conv.weight.dtype)
        z = self.post_quant_conv(latents.contiguous(memory_format=self.memory_format))
        return self.decoder(z).float().clamp(-1, 1)

    def load(self, path_or_reader) -> "VQDecoder":
        """Weights from a LlamaGen VQ checkpoint file, or from a reader (e.g. Janus's key-mapped folder)."""
        load_checkpoint(self, path_or_reader, ignore_prefixes=VQ_UNUSED_PREFIXES)
        return self
