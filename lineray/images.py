"""Pixels out: model images in [-1, 1] -> uint8 arrays, PNG files/bytes and contact sheets."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


PIXEL_ROUNDING = ("round", "truncate")


def to_uint8(images: torch.Tensor, rounding: str = "round") -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as the model's original writes its images: "round"
    (LlamaGen: 127.5 x + 128, then cast) or "truncate" (Janus-Pro and Lumina-mGPT cast (x + 1) * 127.5)."""
    if rounding not in PIXEL_ROUNDING:
        raise ValueError(f"pixel rounding must be one of {', '.join(PIXEL_ROUNDING)}, got {rounding!r}")
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    x = x.round() if rounding == "round" else x.floor()  # x >= 0: floor is the cast's truncation
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def contact_sheet(images: list[np.ndarray], captions: list[str] | None = None, cols: int | None = None,
                  min_cell: int = 96) -> Image.Image:
    """A grid of images (upscaled to at least `min_cell` px, nearest), with an optional caption under each."""
    if not images:
        raise ValueError("contact sheet needs at least one image")
    n = len(images)
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    h, w = max(im.shape[0] for im in images), max(im.shape[1] for im in images)  # images may differ in size
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    text_h = 14 if captions else 0
    sheet = Image.new("RGB", (cols * (cw + 4) + 4, rows * (ch + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = 4 + c * (cw + 4), 4 + r * (ch + text_h + 4)
        sheet.paste(Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + ch + 1), captions[i][: max(1, cw // 6)], fill="black")
    return sheet
