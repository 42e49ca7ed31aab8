"""The Python entry point for single-process (or one-replica) generation: `lineray.sample(...)`."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lineray.cache import CacheSpec
from lineray.images import contact_sheet, save_png
from lineray.kernels.sampling import SamplingConfig
from lineray.models.decoding import decode_images
from lineray.models.generate import Condition, GenerationError
from lineray.models.spec import ModelSpec
from lineray.workers.replica import ReplicaConfig, make_replica, sample_sizes_then_generate


DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class SampleResult:
    labels: list[int]  # class ids (c2i); empty for text prompts
    seeds: list[int]
    tokens: torch.Tensor | list  # [B, N]; a list of [N_i] when the model drew each image's size
    images: np.ndarray | list  # [B, H, W, 3] uint8; a list of [H_i, W_i, 3] when the sizes differ
    paths: list[Path] = field(default_factory=list)
    sheet: Path | None = None
    seconds: float = 0.0
    prompts: list[str] = field(default_factory=list)  # text prompts (text-prompt families); empty for classes

    @property
    def images_per_second(self) -> float:
        return len(self.seeds) / self.seconds if self.seconds else float("nan")


def resolve_device(device: str | None = None) -> str:
    """The device to run on: as given, else CUDA when a GPU is present, else the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE.fullmatch(device):
        raise GenerationError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"device {device}: this machine has no CUDA GPU (torch {torch.__version__})")
    return device


def sample(classes: list[int] | None = None, *, prompts: list[str] | None = None, model: ModelSpec = ModelSpec(),
           cache: CacheSpec = CacheSpec(), sampling: SamplingConfig | None = None, seed: int = 0,
           seeds: list[int] | None = None, batch_size: int = 16, tp: int = 1, device: str | None = None,
           compile: bool = False, out: str | Path | None = None, progress: bool = True, replica=None,
           size: str | None = None) -> SampleResult:
    """Generate one image per class label (c2i models) or per text prompt (Janus-Pro and other text-prompt
    families). Image i gets seed `seeds[i]` (default `seed + i`). size (Lumina-mGPT): "WIDTHxHEIGHT", or
    "sample": the model draws each image's size as the original does (model.size otherwise).

    device: cpu, cuda or cuda:N; None = CUDA when present. The class ids or prompts, the tp size and the
    cache settings are checked before the model loads. Writes `out/{i:04d}_class{c}.png` (or
    `out/{i:04d}_{first words}.png`) and `out/contact_sheet.png` when `out` is given.
    """
    if size is not None:
        model = model.replace(size=size)
    model_cfg = model.config()
    conditions, captions = _conditions(model, model_cfg, classes, prompts)
    n = len(captions)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(n)]
    if len(seeds) != n:
        raise GenerationError(f"{n} {'prompts' if prompts is not None else 'classes'} but {len(seeds)} seeds")
    model_cfg.check_tp(tp, model.preset)
    model_cfg.cache_plan(cache)
    device = resolve_device(device)
    if sampling is None:
        sampling = model.default_sampling()
    cfg = ReplicaConfig(model=model, cache=cache, sampling=sampling, tp=tp, device=device, compile=compile)
    own = replica is None
    replica = replica or make_replica(cfg)
    decoder = model.build_decoder(device=device)
    n_tok = replica.model_config.image_tokens
    bar = _progress(None if model.samples_size else n * n_tok, progress)  # drawn sizes: tokens unknown ahead
    t0 = time.perf_counter()
    try:
        tokens, grids = [], []
        for start in range(0, n, batch_size):
            chunk = slice(start, start + batch_size)
            rows = len(seeds[chunk])
            step = (lambda i, k=rows: bar.update(k))
            if model.samples_size:  # the model draws each image's size; the images of each size run together
                drawn, grid = sample_sizes_then_generate(replica, conditions.ids[chunk], seeds[chunk],
                                                         on_step=bar.update)
                tokens, grids = tokens + drawn, grids + grid
            else:
                tokens.append(replica.generate(conditions(chunk), seeds[chunk], on_step=step))
    finally:
        bar.close()
        if own:
            replica.shutdown()
    if model.samples_size:
        images = decode_images(decoder, model_cfg, tokens, grids, device)
    else:
        tokens = torch.cat(tokens)
        images = np.stack(decode_images(decoder, model_cfg, tokens, [(model_cfg.grid_h, model_cfg.grid_width)] * n,
                                        device))
    result = SampleResult(list(classes or []) if prompts is None else [], seeds, tokens, images,
                          seconds=time.perf_counter() - t0, prompts=list(prompts or []))
    if out is not None:
        out = Path(out)
        names = [f"class{c}" for c in result.labels] or [_slug(p) for p in result.prompts]
        result.paths = [save_png(img, out / f"{i:04d}_{name}.png") for i, (img, name) in enumerate(zip(images, names))]
        result.sheet = out / "contact_sheet.png"
        contact_sheet(list(images), captions).save(result.sheet)
    return result


def _conditions(model: ModelSpec, model_cfg, classes, prompts):
    """(chunk -> Condition, one caption per image), after checking every class id or prompt (no model loaded)."""
    if (classes is None) == (prompts is None):
        raise GenerationError("give class ids (classes=[...]) or text prompts (prompts=[...]), not both"
                              if classes is not None else "no prompts given: pass classes=[...] or prompts=[...]")
    if prompts is not None:
        if model_cfg.model_type != "text":
            kind = "class ids" if model_cfg.model_type == "c2i" else "caption embeddings (a job with text_encoder)"
            raise GenerationError(f"{model.name} takes {kind}, not text prompts")
        ids = prompt_token_ids(model, model_cfg, list(prompts))
        return PromptBatches(ids), list(prompts)
    classes = [int(c) for c in classes]
    if not classes:
        raise GenerationError("no prompts given: the class list is empty")
    if model_cfg.model_type != "c2i":
        raise GenerationError(f"sample takes class ids for class-conditional models; {model.name} is "
                              + ("a text-prompt model: pass prompts=[...] (--prompt TEXT)" if model_cfg.model_type == "text"
                                 else "text-conditional: write text prompts to a file and run a job (lineray generate)"))
    bad = [c for c in classes if not 0 <= c < model_cfg.num_classes]
    if bad:
        raise GenerationError(f"class id {bad[0]} is out of range: this model has {model_cfg.num_classes} classes "
                              f"(0..{model_cfg.num_classes - 1})")
    return (lambda chunk: Condition.classes(classes[chunk])), [str(c) for c in classes]


def prompt_token_ids(model: ModelSpec, model_cfg, prompts: list[str]) -> list[list[int]]:
    """Every prompt's token ids, or a GenerationError naming the first bad prompt (its number and start)."""
    from lineray.pipelines.prompts import RowError, encode_prompt

    if not prompts:
        raise GenerationError("no prompts given: the prompt list is empty")
    encoder = model.prompt_encoder()
    ids = []
    for i, text in enumerate(prompts, 1):
        try:
            ids.append(encode_prompt(encoder, text, model_cfg.max_prefix_len, model.size))
        except RowError as e:
            raise GenerationError(f"prompt {i}: {e}") from None
    return ids


@dataclass
class PromptBatches:
    """chunk -> the Condition of those prompts; `ids`: their token ids."""
    ids: list[list[int]]

    def __call__(self, chunk: slice) -> Condition:
        return Condition.prompts(self.ids[chunk])


def _slug(text: str, limit: int = 40) -> str:
    """A file-name-safe start of a prompt: "a red fox in snow" -> "a-red-fox-in-snow"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].rstrip("-") or "prompt"


def default_sampling(model: ModelSpec) -> SamplingConfig:
    """The model's default sampling settings (ModelSpec.default_sampling)."""
    return model.default_sampling()


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="tok", unit_scale=True, disable=not enabled, desc="generating",
                dynamic_ncols=True)
