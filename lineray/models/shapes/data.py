"""The shapes data: procedural 96x96 scenes whose bottom third repeats what was drawn 16 token lines above.

A scene has three bands of 32 pixels (8 token lines each at 4x4 pixels per token):
  top     the class's shape (10 classes, CLASS_NAMES) at a random size and column;
  middle  a grey horizontal bar of random length and position, independent of the class;
  bottom  the same shape again, same size, same column.
The class comes with the condition token, but the size and the column exist only in the
top band: a model draws the bottom band right only if it still sees the top, 16 lines
back. That is the long-range dependency a KV cache policy can break, and `copy_iou`
measures it on any image exactly (1.0 on every real scene).

Positions are multiples of 4 pixels (the tokenizer's patch), so a shape's tokens are
the same wherever it stands and the bottom band's tokens equal the top band's. Shapes
are anti-aliased (4x supersampling). Pixels are in [-1, 1], one channel (background
-1, shape +1, bar 0). Every scene is a function of (seed, index): the data is rebuilt,
not shipped; the held-out set uses seeds the training stream never draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 96
BAND = 32  # pixels per band; top = rows 0-31, middle 32-63, bottom 64-95
PATCH = 4
CLASS_NAMES = ["disc", "ring", "square", "frame", "triangle_up", "triangle_down", "diamond", "plus", "cross",
               "bars"]
NUM_CLASSES = len(CLASS_NAMES)
SIZES = (8, 10, 12, 14)  # half-size in pixels (shapes are 16-28 px wide)
SUPERSAMPLE = 4
HELDOUT_SEED = 10_000_019  # the held-out scenes' seed; training streams use small seeds
REFERENCE_SEED = 20_000_003  # real scenes for the Frechet distance
BAR_VALUE = 0.0


@dataclass
class Scenes:
    """A batch of scenes and the exact attributes they were drawn from."""
    images: torch.Tensor  # [N, 1, 96, 96] in [-1, 1]
    labels: torch.Tensor  # [N] class ids
    sizes: torch.Tensor  # [N] half-size in pixels
    centers: torch.Tensor  # [N] shape centre column in pixels (a multiple of 4)

    def __len__(self) -> int:
        return len(self.labels)


def inside(cls: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of class `cls`'s shape in shape coordinates (u right, v down, half-size 1)."""
    au, av = u.abs(), v.abs()
    box = torch.maximum(au, av)
    name = CLASS_NAMES[cls]
    if name == "disc":
        return u * u + v * v <= 1
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.55 ** 2)
    if name == "square":
        return box <= 0.85
    if name == "frame":
        return (box <= 0.9) & (box >= 0.5)
    if name in ("triangle_up", "triangle_down"):
        w = v if name == "triangle_up" else -v
        return (w >= -0.9) & (w <= 0.8) & (au <= 0.95 * (w + 0.9) / 1.7)
    if name == "diamond":
        return au + av <= 1
    if name == "plus":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "cross":
        return (((u - v).abs() <= 0.32) | ((u + v).abs() <= 0.32)) & (box <= 0.9)
    if name == "bars":
        return (au <= 0.9) & (((v - 0.5).abs() <= 0.25) | ((v + 0.5).abs() <= 0.25))
    raise ValueError(f"unknown shape class {cls}")


def _band_shapes(labels: torch.Tensor, sizes: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[N, 1, 32, 96] coverage in [0, 1] of each shape centred in a 32-pixel band."""
    s = SUPERSAMPLE
    ys = (torch.arange(BAND * s) + 0.5) / s  # pixel coordinates of the subsamples
    xs = (torch.arange(IMAGE_SIZE * s) + 0.5) / s
    out = torch.zeros(len(labels), 1, BAND * s, IMAGE_SIZE * s)
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().flatten()
        r = sizes[idx].float().view(-1, 1, 1)
        u = (xs.view(1, 1, -1) - centers[idx].float().view(-1, 1, 1)) / r
        v = (ys.view(1, -1, 1) - BAND / 2) / r
        out[idx, 0] = inside(cls, u, v).float()
    return F.avg_pool2d(out, s)


def draw(labels: torch.Tensor, sizes: torch.Tensor, centers: torch.Tensor, bar_rows: torch.Tensor,
         bar_starts: torch.Tensor, bar_ends: torch.Tensor) -> torch.Tensor:
    """[N, 1, 96, 96] scenes in [-1, 1] from their attributes (bar_* are in token units)."""
    n = len(labels)
    shape = _band_shapes(labels, sizes, centers) * 2 - 1
    middle = torch.full((n, 1, BAND, IMAGE_SIZE), -1.0)
    cols = torch.arange(IMAGE_SIZE) // PATCH
    rows = torch.arange(BAND) // PATCH
    on = ((rows.view(1, -1, 1) == bar_rows.view(-1, 1, 1))
          & (cols.view(1, 1, -1) >= bar_starts.view(-1, 1, 1)) & (cols.view(1, 1, -1) < bar_ends.view(-1, 1, 1)))
    middle[on.unsqueeze(1)] = BAR_VALUE
    return torch.cat([shape, middle, shape], dim=2)


def make_scenes(n: int, seed: int, labels: torch.Tensor | None = None) -> Scenes:
    """n scenes drawn from `seed` (the same on every machine); labels cycle 0-9 unless given."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES if labels is None else torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} scenes")
    sizes = torch.tensor(SIZES)[torch.randint(len(SIZES), (n,), generator=g)]
    # Centre columns: multiples of 4 that keep the shape 2+ pixels inside the image.
    lo = torch.div(sizes + 2 + PATCH - 1, PATCH, rounding_mode="floor")
    hi = torch.div(IMAGE_SIZE - sizes - 2, PATCH, rounding_mode="floor")
    centers = (lo + (torch.rand(n, generator=g) * (hi - lo + 1)).long().clamp_max(hi - lo)) * PATCH
    grid = IMAGE_SIZE // PATCH
    bar_rows = torch.randint(1, BAND // PATCH - 1, (n,), generator=g)  # token rows 1-6 of the middle band
    length = torch.randint(4, grid - 4, (n,), generator=g)
    bar_starts = (torch.rand(n, generator=g) * (grid - length + 1)).long()
    images = draw(labels, sizes, centers, bar_rows, bar_starts, bar_starts + length)
    return Scenes(images, labels, sizes, centers)


def heldout_scenes(n: int = 500) -> Scenes:
    """The fixed held-out scenes (classes cycle 0-9) that no model or judge trains on."""
    return make_scenes(n, HELDOUT_SEED)


class SceneBatches:
    """An endless, seeded stream of training batches (images [B, 1, 96, 96], labels [B]), random classes."""

    def __init__(self, batch_size: int, seed: int, step: int = 0):
        self.batch_size, self.seed, self.step = batch_size, seed, step  # step: resume mid-stream

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Each batch is a pure function of (seed, step), so a resumed run draws what it would have drawn.
        batch_seed = self.seed * 1_000_003 + self.step
        self.step += 1
        labels = torch.randint(NUM_CLASSES, (self.batch_size,), generator=torch.Generator().manual_seed(batch_seed))
        scenes = make_scenes(self.batch_size, batch_seed + 7, labels)
        return scenes.images, scenes.labels


def copy_iou(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[N] intersection-over-union of the shape masks in the top and bottom bands (1 = a faithful copy).

    Reads any [N, C, 96, 96] image in [-1, 1]: pixels brighter than `threshold` count as shape
    (the middle bar is grey, 0, and not counted). An image with no shape in either band scores 0.
    """
    gray = images.float().mean(1)
    top, bottom = gray[:, :BAND] > threshold, gray[:, 2 * BAND:] > threshold
    inter = (top & bottom).flatten(1).sum(1).float()
    union = (top | bottom).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
