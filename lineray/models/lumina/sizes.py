"""Which image sizes a Lumina-mGPT model makes, and their grids.

Lumina-mGPT is trained on the crops of `generate_crop_size_list((target // 32) ** 2, 32)` (LUM
data/item_processor.py): for a target size T (512, 768, 1024) every width x height in 32 px patches
on the staircase of wp * hp <= (T / 32)^2 with an aspect ratio of at most 4. lineray's rules:

  * a requested (forced) size is allowed when it fits under that staircase: at most (T / 32)^2
    patches and an aspect ratio of at most 4 (`size_problem`); larger sizes are refused;
  * a sampled size is one of the crop sizes exactly (`crop_sizes`): the height token is restricted
    to the crop heights, then the width token to the widths paired with the drawn height;
  * the cache, RoPE table and memory plans are sized for the allowed grid with the most tokens
    (`largest_image_tokens`): a tall image has more lines, and so more end-of-line tokens.

Image code grids are 16 px a code: a size of hp x wp patches is 2hp lines of 2wp codes.
"""
from __future__ import annotations

from dataclasses import dataclass

from lineray.models.lumina.vocab import PATCH_PX

SAMPLE = "sample"  # a size the model draws: the prefix ends at begin-of-image (lumina.model.sample_grids)
MAX_ASPECT = 4.0  # generate_crop_size_list's max_ratio
CODES_PER_PATCH = PATCH_PX // 16  # codes a side of one 32 px patch


class PromptError(ValueError):
    """A prompt that cannot be used (empty, too long, a size the model cannot make); names the prompt."""


@dataclass(frozen=True)
class ImageSize:
    """Width x height in pixels, multiples of 32 (the size tokens count 32 px patches)."""
    width: int
    height: int

    @classmethod
    def parse(cls, value) -> "ImageSize":
        """768, "768", "768x512" (width x height), (768, 512) or an ImageSize."""
        if isinstance(value, ImageSize):
            return value
        try:
            if isinstance(value, (tuple, list)):
                w, h = (int(v) for v in value)
            elif isinstance(value, int) or "x" not in str(value).lower():
                w = h = int(value)
            else:
                w, h = (int(v) for v in str(value).lower().split("x"))
        except (TypeError, ValueError):
            raise PromptError(f"image size must be WIDTHxHEIGHT in pixels (e.g. 768x512), got {value!r}") from None
        if w <= 0 or h <= 0 or w % PATCH_PX or h % PATCH_PX:
            raise PromptError(f"image size {w}x{h}: width and height must be positive multiples of {PATCH_PX} px")
        return cls(w, h)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, codes per row) of the image token grid: 16 px per code."""
        return self.height // (PATCH_PX // 2), self.width // (PATCH_PX // 2)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def max_patches(target_px: int) -> int:
    return (target_px // PATCH_PX) ** 2


def crop_sizes(target_px: int) -> list[ImageSize]:
    """The crop sizes of a target (the original's staircase walk, widest first)."""
    n = max_patches(target_px)
    sizes, wp, hp = [], n, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= MAX_ASPECT:
            sizes.append(ImageSize(wp * PATCH_PX, hp * PATCH_PX))
        if (hp + 1) * wp <= n:
            hp += 1
        else:
            wp -= 1
    return sizes


def longest_side(target_px: int) -> int:
    """The most patches a side of a crop size has (a 4:1 image's long side)."""
    return max((max(s.width, s.height) // PATCH_PX for s in crop_sizes(target_px)), default=0)


def size_problem(size: ImageSize, target_px: int) -> str | None:
    """Why a model trained at `target_px` cannot make `size` (None: it can)."""
    wp, hp = size.width // PATCH_PX, size.height // PATCH_PX
    if wp * hp > max_patches(target_px):
        return (f"image size {size} is larger than this model makes: at most {max_patches(target_px)} patches of "
                f"{PATCH_PX} px ({target_px}x{target_px}), {wp * hp} asked")
    if max(wp, hp) / min(wp, hp) > MAX_ASPECT:
        return f"image size {size} is more than {MAX_ASPECT:g}:1; this model makes aspect ratios up to {MAX_ASPECT:g}:1"
    return None


def size_of_grid(rows: int, cols: int) -> ImageSize:
    return ImageSize(cols * 16, rows * 16)


def allowed_grids(cfg) -> list[tuple[int, int]]:
    """(rows, cols) of every crop size of the config's target, and the config's own grid (a family rule:
    Family.image_grids). Without a target only the config's grid."""
    own = (cfg.grid_h, cfg.grid_width)
    if not cfg.target_size:
        return [own]
    grids = [s.grid for s in crop_sizes(cfg.target_size)]
    return grids if own in grids else grids + [own]


def grid_problem(cfg, rows: int, cols: int) -> str | None:
    """Why a model of `cfg` cannot make images of this grid (None: it can)."""
    if (rows, cols) == (cfg.grid_h, cfg.grid_width):
        return None
    if not cfg.target_size:
        return f"this model makes {cfg.grid_h}x{cfg.grid_width} grids only"
    if rows % CODES_PER_PATCH or cols % CODES_PER_PATCH or rows < 1 or cols < 1:
        return f"grid {rows}x{cols}: lines and codes come in pairs ({PATCH_PX} px patches)"
    return size_problem(size_of_grid(rows, cols), cfg.target_size)
