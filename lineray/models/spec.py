"""Which model to run: a bundled model or a preset with its checkpoint and image decoder, as one record.

    ModelSpec()                                              the bundled digits model (the default)
    ModelSpec(preset="digits")                               the same, by name (lineray.models.bundles)
    ModelSpec(preset="GPT-XL", checkpoint="/ckpt/c2i_XL_384.pt", decoder="/ckpt/vq_ds16_c2i.pt", grid_size=24)
    ModelSpec(preset="GPT-B", checkpoint="random", decoder="random")   random weights (tests, benchmarks)

A preset is only a shape: it has no weights of its own, so it needs `checkpoint` (a path or
"random") and `decoder` (a path or "random"); leaving either out is an error, never a silent
fallback. A ModelSpec travels to Ray workers (a small frozen pydantic dataclass: validated on
construction, picklable), and each worker builds its own shard from it.
"""
from __future__ import annotations

from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import model_validator
from pydantic.dataclasses import dataclass

from lineray.kernels.sampling import SamplingConfig
from lineray.models.bundles import BUNDLES, bundle_module
from lineray.models.checkpoint import load_checkpoint
from lineray.models.config import PRESETS, GPTConfig, preset
from lineray.models.layers import TPGroup, checkpoint_tensors
from lineray.models.llamagen import Transformer
from lineray.validation import STRICT

RANDOM = "random"  # checkpoint / decoder value meaning "random weights" (seeded by ModelSpec.seed)
DEFAULT_BUNDLE = "digits"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# LlamaGen's c2i sampling settings (autoregressive/sample/sample_c2i.py), the default for presets
LLAMAGEN_SAMPLING = dict(cfg_scale=4.0, temperature=1.0, top_k=2000, top_p=1.0)


class ImageDecoder(Protocol):
    """codes [B, h, w] -> images [B, 3, H, W] in [-1, 1]."""
    codebook_size: int

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor: ...

    def image_size(self, grid: int) -> int: ...


def parse_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 where the hardware computes in it, else float32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True on CUDA GPUs with bf16 and on CPUs with AVX512-BF16 or AMX; elsewhere bf16 is emulated
    and slower than fp32 (measured here, AVX2-only: GPT-B decode at 0.81x the fp32 speed)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or _cpu_flags() & {"avx512_bf16", "amx_bf16"} != set()


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True, config=STRICT)
class ModelSpec:
    preset: str = DEFAULT_BUNDLE  # a bundled model (digits) or a preset shape (GPT-B ... GPT-3B, GPT-tiny)
    checkpoint: str | None = None  # GPT weights: a path or "random"; None: the bundle's (bundled models only)
    decoder: str | None = None  # VQ decoder: a path or "random"; None: the bundle's (bundled models only)
    grid_size: int | None = None  # image tokens per side; None = the preset's
    model_type: Literal["c2i", "t2i"] | None = None  # None = the preset's
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "float32"  # auto: bf16 where native
    ema: bool = False
    seed: int = 0  # initialisation seed of random weights
    # VQConfig fields for a non-default VQ decoder shape (e.g. a small random one in tests); None = VQ-16
    vq_config: dict | None = field(default=None, hash=False)

    @model_validator(mode="after")
    def _unambiguous(self) -> "ModelSpec":
        for name in ("checkpoint", "decoder"):
            if getattr(self, name) == "bundled":
                raise ValueError(f"{name}: bundled is no longer a value: the bundled model is chosen by name "
                                 f"(preset: {DEFAULT_BUNDLE}); give a path or 'random' here")
        if self.is_bundled:
            if self.grid_size is not None or self.model_type is not None:
                raise ValueError(f"the bundled model {self.preset!r} has a fixed shape: "
                                 f"leave grid_size and model_type unset")
            return self
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; bundled models: {', '.join(BUNDLES)}; "
                             f"presets (need a checkpoint): {', '.join(PRESETS)}")
        missing = [f"{name}: PATH (or {name}: random)" for name in ("checkpoint", "decoder")
                   if getattr(self, name) is None]
        if missing:
            raise ValueError(f"preset {self.preset} is a shape without weights: it needs {' and '.join(missing)} "
                             f"(flags: --checkpoint, --vq); for the bundled model use preset: {DEFAULT_BUNDLE}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "ModelSpec":
        return replace(self, **kw)

    @property
    def is_bundled(self) -> bool:
        """The model is one that ships inside lineray (lineray.models.bundles)."""
        return self.preset in BUNDLES

    @property
    def name(self) -> str:
        """What ran, for logs and the dataset's model column."""
        if self.is_bundled and self.checkpoint is None:
            return f"{self.preset} (bundled)"
        if self.checkpoint == RANDOM:
            return f"{self.preset} (random weights, seed {self.seed})"
        return f"{self.preset} ({Path(self.checkpoint).name})"

    def config(self) -> GPTConfig:
        if self.is_bundled:
            return bundle_module(self.preset).bundled_config()
        return preset(self.preset, grid_size=self.grid_size, model_type=self.model_type)

    def default_sampling(self) -> SamplingConfig:
        """The bundle's tuned sampling settings; LlamaGen's c2i defaults for a preset."""
        if self.is_bundled:
            return bundle_module(self.preset).bundled_sampling()
        return SamplingConfig(**LLAMAGEN_SAMPLING)

    def checkpoint_path(self) -> Path | None:
        """The GPT weights file; None for random weights."""
        if self.checkpoint == RANDOM:
            return None
        if self.checkpoint is None:  # a bundle (the validator allows None nowhere else)
            return Path(bundle_module(self.preset).BUNDLED_GPT)
        return Path(self.checkpoint).expanduser()

    def build_model(self, tp: TPGroup = TPGroup(), device: str | torch.device = "cpu",
                    compile: bool = False) -> Transformer:
        """The model (or this rank's shard of it) with its weights, in eval mode.

        compile: torch.compile its dense parts (Transformer.compile_dense; off unless it pays)."""
        dtype = parse_dtype(self.dtype, device)
        model = Transformer(self.config(), tp)
        path = self.checkpoint_path()
        if path is None:
            # Random weights (tests, benchmarks). Embeddings come first in parameter order, so
            # they are the same for any tp; sharded weights are slices of one seeded full tensor.
            model.init_weights(generator=torch.Generator().manual_seed(self.seed))
            _init_shards_consistently(model, self.seed)
        else:
            load_checkpoint(model, path, ema=self.ema)
        model = model.to(device=device, dtype=dtype).eval()
        return model.compile_dense() if compile else model

    def build_decoder(self, device: str | torch.device = "cpu") -> ImageDecoder:
        if self.is_bundled and self.decoder is None:
            return bundle_module(self.preset).load_bundled_tokenizer().to(device)
        from lineray.models.vq import VQConfig, VQDecoder
        shape = VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in (self.vq_config or {}).items()})
        if self.decoder == RANDOM:
            # Random decoder (tests, benchmarks): seeded, so every process builds the same one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                vq = VQDecoder(shape)
        else:
            vq = VQDecoder(shape).load(Path(self.decoder).expanduser())
        return vq.to_device(device)  # on CUDA: bf16, channels_last


def slice_2d(t: torch.Tensor, rows: slice | None, cols: slice | None) -> torch.Tensor:
    t = t if rows is None else t[rows]  # 1-D tensors (a split bias) have rows only
    return t if cols is None else t[:, cols]


def _init_shards_consistently(model: Transformer, seed: int) -> None:
    """Give every sharded weight its slice of one seeded full tensor, so tp=N equals tp=1.

    The output head gets random weights too (LlamaGen's zero init would make all logits equal).
    """
    for i, t in enumerate(t for t in checkpoint_tensors(model) if t.split):
        gen = torch.Generator().manual_seed(seed * 100_003 + i + 1)
        full = torch.empty(t.full_shape).normal_(0, 0.02, generator=gen)
        with torch.no_grad():
            t.target.copy_(t.load_shard(lambda rows=None, cols=None, full=full: slice_2d(full, rows, cols)))
