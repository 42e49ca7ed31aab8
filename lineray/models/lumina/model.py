"""Lumina-mGPT's parts on the shared Transformer (MODELS.md B1-B3; issue 14).

The LM is Chameleon-7B: the shared Llama blocks with qk-norm (per-head LayerNorm with weight and
bias on q and k, before RoPE), 1D rotate-half RoPE (theta 10000), RMSNorm eps 1e-5, SwiGLU. What is
Lumina's own:

  prompt_embedding  one table for the whole 65,536-token vocabulary (Chameleon's embed_tokens). It
                    embeds the prompt AND the image tokens: the image tokens are ids of the same
                    vocabulary (codes `IMGIMG...Z`, end-of-line `<reserved08799>`), so the family
                    registers it once, under one name, as both the prefix and the image embedding.
  output            lm_head restricted to the rows of the image codes (one contiguous id range,
                    read by name from the vocabulary), vocab-parallel: a rank reads and multiplies
                    only its share of those rows. Its logits are indexed by token id up to
                    `vocab_size` (past the end-of-line id); columns that are not image codes hold
                    NOT_AN_IMAGE_CODE, so at an image position only image codes are sampled, with or
                    without CFG (a finite value: guidance subtracts two such columns).

Token layout of one image (item_processor.py; inference_solver.py MultiModalLogitsProcessor): the
prompt, begin-of-image, the height and width size tokens (here forced from the requested size, so
they are the last three prefix tokens), then `grid_h` lines of `grid_w` codes + one end-of-line
token (forced: `line_extra` 1, `line_token_id`), then end-of-image (forced; never fed, added by
`token_stream`). A LineAR line is therefore `grid_w + 1` tokens.

CFG as Lumina runs it (LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor): the
unconditional branch is its own sequence [begin-of-image, h, w, generated...] with positions from
0. With left padding, a key mask and per-row positions it is a row whose prefix is the last three
slots of its prompt row (`null_prompt`).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.cache import CacheSpec, KVCache
from lineray.kernels.sampling import image_uniforms, sample
from lineray.models.config import GPTConfig
from lineray.models.layers import CheckpointTensor, SliceReader, TPGroup
from lineray.models.lumina import sizes
from lineray.models.lumina.vocab import PATCH_PX

IMAGE_PREFIX_TOKENS = 3  # begin-of-image, height, width: the unconditional row's whole prefix
NOT_AN_IMAGE_CODE = -1e30  # the logit of every head column that is not an image code
SEED_MASK = 2**63 - 1


def shared_embedding(cfg: GPTConfig) -> nn.Module:
    """The shared text+image table, Chameleon's embed_tokens."""
    return nn.Embedding(cfg.text_vocab_size, cfg.dim)


def image_embedding(cfg: GPTConfig, prefix: nn.Module) -> nn.Module:
    """Image tokens are ids of the same vocabulary: the prefix table itself (registered once)."""
    return prefix


def forced_tokens(cfg: GPTConfig) -> torch.Tensor:
    """[image_tokens]: end-of-line at each line's last slot, -1 (sampled) elsewhere."""
    lines = torch.full((cfg.grid_h, cfg.line_tokens), -1, dtype=torch.long)
    lines[:, cfg.grid_width:] = cfg.line_token_id
    return lines.flatten()


class ImageCodeHead(nn.Module):
    """lm_head's image-code rows [start, stop) of a [text_vocab, dim] checkpoint tensor, split by rows
    across ranks and gathered; logits [..., vocab_size] indexed by token id. Below them, every rank holds
    the rows of the size tokens whole (a few dozen: `size_logits`, for sampling the image size)."""

    def __init__(self, cfg: GPTConfig, tp: TPGroup = TPGroup()):
        super().__init__()
        self.tp = tp
        self.start, self.stop = cfg.image_token_range
        self.width = cfg.vocab_size
        self.full_shape = (cfg.text_vocab_size, cfg.dim)
        self.size_ids = tuple(cfg.size_token_ids)
        rows = tp.part(self.stop - self.start)
        self.code_rows = rows.stop - rows.start
        self.weight = nn.Parameter(torch.empty(self.code_rows + len(self.size_ids), cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.tp.all_gather_last(F.linear(x, self.weight[:self.code_rows]), self.stop - self.start)
        if self.start == 0 and self.stop == self.width:
            return codes
        out = codes.new_full((*codes.shape[:-1], self.width), NOT_AN_IMAGE_CODE)
        out[..., self.start:self.stop] = codes
        return out

    def size_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., G]: the logit of the size token of g x 32 px at column g - 1 (the same on every rank)."""
        return F.linear(x, self.weight[self.code_rows:])

    def load_shard(self, read: SliceReader) -> torch.Tensor:
        mine = self.tp.part(self.stop - self.start)
        rows = [read(rows=slice(self.start + mine.start, self.start + mine.stop))]
        return torch.cat(rows + [read(rows=slice(i, i + 1)) for i in self.size_ids])

    def checkpoint_tensors(self, prefix: str) -> list[CheckpointTensor]:
        return [CheckpointTensor(prefix + "weight", self.full_shape, self.weight, self.load_shard)]


def output_head(cfg: GPTConfig, tp: TPGroup) -> nn.Module:
    return ImageCodeHead(cfg, tp)


def image_grids(cfg: GPTConfig) -> list[tuple[int, int]]:
    return sizes.allowed_grids(cfg)


def grid_problem(cfg: GPTConfig, rows: int, cols: int) -> str | None:
    return sizes.grid_problem(cfg, rows, cols)


def grid_prefix(cfg: GPTConfig, rows: int, cols: int) -> list[int]:
    """The size tokens (height, then width, in 32 px patches) that follow begin-of-image for this grid."""
    return [size_token_id(cfg, rows), size_token_id(cfg, cols)]


def size_token_id(cfg: GPTConfig, codes: int) -> int:
    g = codes // sizes.CODES_PER_PATCH
    if not 1 <= g <= len(cfg.size_token_ids):
        raise ValueError(f"no size token for {g * PATCH_PX} px: this model's vocabulary has sizes up to "
                         f"{len(cfg.size_token_ids) * PATCH_PX} px")
    return cfg.size_token_ids[g - 1]


def sample_grids(model: nn.Module, cond, seeds: list[int], sampling) -> list[tuple[int, int]]:
    """Draw each image's size as Lumina does after begin-of-image: height, then width, sampled from the
    conditional row alone (no CFG) at the sampling temperature under the image top-k (inference_solver.py).
    lineray restricts the two tokens to the model's crop sizes (sizes.crop_sizes: heights, then the widths
    paired with the drawn height) and draws them from a stream of each image's seed apart from its image
    tokens' (`size_uniforms`), so an image equals the one generated alone, with that size forced.

    cond: prompt ids ending with begin-of-image. One prefill and one step over a cache of one visual slot."""
    cfg = model.config
    choices = crop_sizes_with_tokens(cfg)
    x, mask = cond.prompt_ids.to(model.device), cond.prompt_mask.to(model.device)
    cache = KVCache(CacheSpec().plan(1, 1), n_layers=cfg.n_layer, rows=len(x), heads=model.local_heads,
                    head_dim=cfg.head_dim, prefix_len=cfg.prefix_len, dtype=model.dtype, device=model.device)
    cache.reset(mask)
    rule = replace(sampling, cfg_scale=1.0)  # no CFG for the size tokens
    u = size_uniforms(seeds).to(model.device)
    size_head = model.output.size_logits
    heights = sample(only(model.prefill(x, cache, head=size_head).float(), [{h for h, _ in choices}] * len(x)),
                     u[:, 0], rule) + 1
    heights = heights.tolist()
    tokens = torch.tensor([cfg.size_token_ids[h - 1] for h in heights], device=model.device)
    widths = [{w for h2, w in choices if h2 == h} for h in heights]
    widths = (sample(only(model.decode(tokens, cache, head=size_head).float(), widths), u[:, 1], rule) + 1).tolist()
    return [(h * sizes.CODES_PER_PATCH, w * sizes.CODES_PER_PATCH) for h, w in zip(heights, widths)]


def crop_sizes_with_tokens(cfg: GPTConfig) -> list[tuple[int, int]]:
    """(height, width) in patches of the crop sizes whose two size tokens the model's vocabulary has."""
    top = len(cfg.size_token_ids)
    found = [(s.height // PATCH_PX, s.width // PATCH_PX) for s in sizes.crop_sizes(cfg.target_size)]
    found = [(h, w) for h, w in found if h <= top and w <= top]
    if not found:
        raise ValueError(f"this model has no size to sample: target size {cfg.target_size} px, size tokens up to "
                         f"{top * PATCH_PX} px")
    return found


def only(logits: torch.Tensor, allowed: list[set[int]]) -> torch.Tensor:
    """Size logits [B, G] with every column but each row's allowed sizes (g, 1-based) at -inf."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for r, gs in enumerate(allowed):
        keep[r, [g - 1 for g in gs]] = True
    return logits.masked_fill(~keep, float("-inf"))


def size_uniforms(seeds: list[int]) -> torch.Tensor:
    """[B, 2] uniforms for the height and width tokens, from a stream of each seed apart from the image's."""
    return image_uniforms([int.from_bytes(hashlib.blake2b(f"size\0{int(s)}".encode(), digest_size=8).digest(),
                                          "little") & SEED_MASK for s in seeds], 2)


def null_prompt(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None):
    """Lumina's unconditional rows: only the image prefix (begin-of-image, height, width), which is the
    last three slots of every left-padded prompt row; the rest is masked, so its positions start at 0."""
    keep = torch.arange(ids.size(1), device=ids.device) >= ids.size(1) - IMAGE_PREFIX_TOKENS
    null_mask = keep.expand_as(ids).clone()
    return ids, null_mask if mask is None else null_mask & mask


def token_stream(tokens: torch.Tensor, prefix: list[int], end_of_image: int) -> torch.Tensor:
    """One image's tokens [N] as the original model emits them after the prompt:
    begin-of-image, height, width, the lines with their end-of-line tokens, end-of-image."""
    head = torch.tensor(prefix[-IMAGE_PREFIX_TOKENS:], dtype=torch.long, device=tokens.device)
    return torch.cat([head, tokens, torch.tensor([end_of_image], device=tokens.device)])


def image_codes(tokens: torch.Tensor, cfg: GPTConfig, vocab) -> torch.Tensor:
    """Generated tokens [B, grid_h * (grid_w + 1)] -> VQGAN codes [B, grid_h, grid_w]: the end-of-line
    column dropped, BPE ids mapped to codes through the vocabulary's names."""
    lines = tokens.view(tokens.size(0), cfg.grid_h, cfg.line_tokens)[..., :cfg.grid_width]
    return vocab.bpe_to_code(lines.reshape(-1)).view(lines.shape)


class LuminaImageDecoder(nn.Module):
    """Lumina-mGPT's image tokens -> pixels: Chameleon's VQGAN behind the vocabulary's BPE -> code map.

    `decode_codes` takes the generated tokens laid out by line, [B, grid_h, grid_w + 1] (each line's
    end-of-line last, as `tokens.view(-1, cfg.grid_h, cfg.line_tokens)` gives them) or [B, grid_h,
    grid_w] without it; it drops the end-of-line column, maps BPE ids to codes by name and decodes
    (item_processor.decode_image). The rest of the decoder protocol is the VQGAN's."""

    def __init__(self, vqgan, vocab):
        super().__init__()
        self.vqgan, self.vocab = vqgan, vocab
        if vqgan.codebook_size != vocab.image_count:
            raise ValueError(f"the VQGAN has {vqgan.codebook_size} codes but the vocabulary {vocab.image_count} "
                             f"image tokens")

    @property
    def codebook_size(self) -> int:
        return self.vqgan.codebook_size

    def image_size(self, grid: int) -> int:
        return self.vqgan.image_size(grid)

    def to_device(self, device, dtype=None, channels_last=None) -> "LuminaImageDecoder":
        self.vqgan.to_device(device, dtype, channels_last)
        return self

    def decode_codes(self, tokens: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """tokens [B, h, w + 1] (or [B, h, w]) of BPE ids -> images [B, 3, 16h, 16w] in [-1, 1]."""
        if ((tokens[..., -1] == self.vocab.end_of_line).all()):
            tokens = tokens[..., :-1]
        codes = self.vocab.bpe_to_code(tokens.reshape(-1)).view(tokens.shape)
        return self.vqgan.decode_codes(codes, chunk_size)
