"""Model families: what one family supplies on top of the shared `Transformer` (DESIGN.md section 7).

A family is a record, not a plugin: the config switches its models use (config.FAMILY_SWITCHES,
merged under a preset's fields by `config.preset`), three module builders registered under the
family's checkpoint names (the prefix embedding, the image-token embedding, the output head), the
CFG null-condition rule, and optionally the image positions whose token is fixed (an end-of-line).
The decode loop, caches, sizing, TP workers and pipeline read the record through the model and the
config and never branch on the family name.

Shared by every family (in GPTConfig / Transformer, not here):
  * prefixes are left-padded to the batch's longest with a key mask; the cache keeps them whole;
  * the image is `grid_h` lines of `grid_w + line_extra` tokens (a LineAR line);
  * 1D RoPE positions count each row's real tokens, 2D RoPE positions are grid indices.

Adding a family (e.g. Lumina-mGPT): write its three builders and its null rule in its own module,
add a `Family` here, its switches to config.FAMILY_SWITCHES, and presets with `family=<name>`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from lineray.models import llamagen
from lineray.models.config import FAMILY_SWITCHES
from lineray.models.janus import model as janus
from lineray.models.lumina import model as lumina

NullRule = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class Family:
    name: str
    switches: dict  # GPTConfig fields every model of the family has (presets override)
    prefix_name: str  # attribute (checkpoint key prefix) of the prefix embedding
    prefix_embedding: Callable[..., nn.Module]  # (cfg) -> module: condition [B, ...] -> [B, T, dim]
    image_name: str  # attribute of the image-token embedding
    # (cfg, prefix module) -> module: codes [B, S] -> [B, S, dim]. It gets the prefix embedding so that a
    # family whose image codes live in its text vocabulary can look them up there (not register it twice).
    image_embedding: Callable[..., nn.Module]
    output_head: Callable[..., nn.Module]  # (cfg, tp) -> module: [B, dim] -> logits [B, vocab], gathered
    null_condition: NullRule  # (model, cond rows, key mask) -> (CFG null rows, their key mask)
    # (cfg) -> [image_tokens] int64: the token forced at each image position, -1 where it is sampled; or None
    forced_tokens: Callable[..., "torch.Tensor | None"] = lambda cfg: None
    pixel_rounding: str = "round"  # decoder output -> uint8 as the original does it (images.to_uint8)
    # (cfg) -> [(rows, cols)]: the image grids a model makes besides its config's own (Lumina's sizes); with
    # grid_problem (cfg, rows, cols) -> why not (None: allowed). One grid per generate call (Transformer.for_grid).
    image_grids: Callable[..., list] = lambda cfg: [(cfg.grid_h, cfg.grid_width)]
    grid_problem: Callable[..., "str | None"] = lambda cfg, rows, cols: (
        None if (rows, cols) == (cfg.grid_h, cfg.grid_width) else f"this model makes {cfg.grid_h}x{cfg.grid_width} grids only")
    # (model, Condition ending at begin-of-image, seeds, sampling) -> one (rows, cols) per image, drawn by the model
    # from each image's own seed; None: the family has no size tokens
    sample_grids: Callable | None = None
    # (cfg, rows, cols) -> the token ids that end the prefix of an image of this grid (Lumina: the size tokens)
    grid_prefix: Callable[..., list] = lambda cfg, rows, cols: []
    description: str = ""


FAMILIES: dict[str, Family] = {
    "llamagen": Family(
        name="llamagen", switches=FAMILY_SWITCHES["llamagen"],
        prefix_name="cls_embedding", prefix_embedding=llamagen.condition_embedding,
        image_name="tok_embeddings", image_embedding=llamagen.token_embedding,
        output_head=llamagen.output_head, null_condition=llamagen.null_condition,
        description="LlamaGen class/caption-conditional GPT, 2D RoPE"),
    "janus": Family(
        name="janus", switches=FAMILY_SWITCHES["janus"],
        prefix_name="prompt_embedding", prefix_embedding=janus.prompt_embedding,
        image_name="image_embedding", image_embedding=janus.image_embedding,
        output_head=janus.output_head, null_condition=janus.null_prompt, pixel_rounding="truncate",
        description="Janus-Pro text-to-image (Llama LM, gen_embed + aligner, gen_head), 384 px"),
    "lumina": Family(
        name="lumina", switches=FAMILY_SWITCHES["lumina"],
        # one table embeds prompt and image tokens: registered once, under one name
        prefix_name="prompt_embedding", prefix_embedding=lumina.shared_embedding,
        image_name="prompt_embedding", image_embedding=lumina.image_embedding,
        output_head=lumina.output_head, null_condition=lumina.null_prompt, forced_tokens=lumina.forced_tokens,
        pixel_rounding="truncate",
        image_grids=lumina.image_grids, grid_problem=lumina.grid_problem, sample_grids=lumina.sample_grids,
        grid_prefix=lumina.grid_prefix,
        description="Lumina-mGPT text-to-image (Chameleon LM with qk-norm, end-of-line lines), 512-1024 px"),
}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def largest_image_tokens(cfg) -> int:
    """Image tokens of the largest grid a model of `cfg` makes: what its RoPE table and memory plans are sized for."""
    grids = family_of(cfg.family).image_grids(cfg)
    return max([cfg.image_tokens] + [rows * (cols + cfg.line_extra) for rows, cols in grids])
