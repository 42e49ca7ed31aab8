"""The Python entry point for single-process (or one-replica) generation: `lineray.sample(...)`."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lineray.cache import CacheSpec
from lineray.images import contact_sheet, save_png, to_uint8
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, GenerationError
from lineray.models.spec import ModelSpec
from lineray.workers.replica import ReplicaConfig, make_replica


DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class SampleResult:
    labels: list[int]
    seeds: list[int]
    tokens: torch.Tensor  # [B, N]
    images: np.ndarray  # [B, H, W, 3] uint8
    paths: list[Path] = field(default_factory=list)
    sheet: Path | None = None
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds else float("nan")


def resolve_device(device: str | None = None) -> str:
    """The device to run on: as given, else CUDA when a GPU is present, else the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE.fullmatch(device):
        raise GenerationError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"device {device}: this machine has no CUDA GPU (torch {torch.__version__})")
    return device


def sample(classes: list[int], *, model: ModelSpec = ModelSpec(), cache: CacheSpec = CacheSpec(),
           sampling: SamplingConfig | None = None, seed: int = 0, seeds: list[int] | None = None,
           batch_size: int = 16, tp: int = 1, device: str | None = None, compile: bool = False,
           out: str | Path | None = None, progress: bool = True, replica=None) -> SampleResult:
    """Generate one image per class label. Image i gets seed `seeds[i]` (default `seed + i`).

    device: cpu, cuda or cuda:N; None = CUDA when present. The class ids, the tp size and the
    cache settings are checked before the model loads. Writes `out/{i:04d}_class{c}.png` and
    `out/contact_sheet.png` when `out` is given.
    """
    classes = [int(c) for c in classes]
    if not classes:
        raise GenerationError("no prompts given: the class list is empty")
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(classes))]
    if len(seeds) != len(classes):
        raise GenerationError(f"{len(classes)} classes but {len(seeds)} seeds")
    model_cfg = model.config()
    if model_cfg.model_type != "c2i":
        raise GenerationError(f"sample takes class ids; {model.name} is text-conditional: write text prompts "
                              f"to a file and run a job (lineray generate)")
    bad = [c for c in classes if not 0 <= c < model_cfg.num_classes]
    if bad:
        raise GenerationError(f"class id {bad[0]} is out of range: this model has {model_cfg.num_classes} classes "
                              f"(0..{model_cfg.num_classes - 1})")
    model_cfg.check_tp(tp, model.preset)
    cache.plan(model_cfg.grid_size, model_cfg.grid_size, model_cfg.image_tokens)
    device = resolve_device(device)
    if sampling is None:
        sampling = model.default_sampling()
    cfg = ReplicaConfig(model=model, cache=cache, sampling=sampling, tp=tp, device=device, compile=compile)
    own = replica is None
    replica = replica or make_replica(cfg)
    decoder = model.build_decoder(device=device)
    n_tok = replica.model_config.image_tokens
    bar = _progress(len(classes) * n_tok, progress)
    t0 = time.perf_counter()
    try:
        tokens = []
        for start in range(0, len(classes), batch_size):
            chunk = slice(start, start + batch_size)
            tokens.append(replica.generate(Condition.classes(classes[chunk]), seeds[chunk],
                                           on_step=lambda i, n=len(classes[chunk]): bar.update(n)))
    finally:
        bar.close()
        if own:
            replica.shutdown()
    tokens = torch.cat(tokens)
    grid = replica.model_config.grid_size
    with torch.inference_mode():
        images = to_uint8(decoder.decode_codes(tokens.view(-1, grid, grid).to(device)))
    result = SampleResult(classes, seeds, tokens, images, seconds=time.perf_counter() - t0)
    if out is not None:
        out = Path(out)
        result.paths = [save_png(img, out / f"{i:04d}_class{c}.png") for i, (img, c) in enumerate(zip(images, classes))]
        sheet = contact_sheet(list(images), [f"{c}" for c in classes])
        result.sheet = out / "contact_sheet.png"
        sheet.save(result.sheet)
    return result


def default_sampling(model: ModelSpec) -> SamplingConfig:
    """The model's default sampling settings (ModelSpec.default_sampling)."""
    return model.default_sampling()


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="tok", unit_scale=True, disable=not enabled, desc="generating",
                dynamic_ncols=True)
