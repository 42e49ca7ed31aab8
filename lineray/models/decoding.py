"""Image tokens -> uint8 pixels with a model's image decoder, for a batch whose images may have several grids."""
from __future__ import annotations

import numpy as np
import torch

from lineray.images import to_uint8
from lineray.models.config import GPTConfig
from lineray.models.family import family_of


def decode_images(decoder, cfg: GPTConfig, tokens, grids: list[tuple[int, int]], device="cpu") -> list[np.ndarray]:
    """Each image's pixels [H, W, 3] uint8, in order, rounded to uint8 as the family's original does.

    tokens: one row per image, its image by line as generated (a family's end-of-line tokens last in each
    line; a row padded to a batch's longest image may run on); grids: each image's (rows, cols). The images
    of one grid are decoded together."""
    rounding, extra = family_of(cfg.family).pixel_rounding, cfg.line_extra
    images: list = [None] * len(tokens)
    for rows, cols in sorted(set(grids)):
        idx = [i for i, g in enumerate(grids) if g == (rows, cols)]
        n = rows * (cols + extra)
        lines = torch.stack([torch.as_tensor(tokens[i][:n], dtype=torch.long) for i in idx])
        with torch.inference_mode():
            pixels = to_uint8(decoder.decode_codes(lines.view(len(idx), rows, cols + extra).to(device)), rounding)
        for j, i in enumerate(idx):
            images[i] = pixels[j]
    return images
