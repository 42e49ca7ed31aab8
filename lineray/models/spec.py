"""Which model to run: a preset, its checkpoint and its image decoder, as one serialisable record.

A ModelSpec travels to Ray workers (it is a small frozen dataclass), and each
worker builds its own shard from it. The bundled digits model is the default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from lineray.models.checkpoint import load_checkpoint
from lineray.models.config import GPTConfig, preset
from lineray.models.layers import TPGroup, checkpoint_tensors
from lineray.models.llamagen import Transformer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = "bundled"  # checkpoint / decoder value meaning "the files shipped in lineray/assets"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


@dataclass(frozen=True)
class ModelSpec:
    preset: str = "GPT-digits"
    checkpoint: str | None = BUNDLED  # path, "bundled", or None (random weights, for tests and benchmarks)
    decoder: str | None = BUNDLED  # VQ checkpoint path, "bundled" (the digits tokenizer) or None (random VQ)
    grid_size: int | None = None  # image tokens per side; None = the preset's
    model_type: str | None = None  # "c2i" / "t2i"; None = the preset's
    dtype: str = "float32"  # or bfloat16, float16, auto (bf16 where the hardware has it)
    ema: bool = False
    seed: int = 0  # initialisation seed when checkpoint is None
    # VQConfig fields for a non-default VQ decoder shape (e.g. a small random one in tests); None = VQ-16
    vq_config: dict | None = field(default=None, hash=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelSpec":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **kw) -> "ModelSpec":
        return replace(self, **kw)

    @property
    def is_bundled(self) -> bool:
        return self.checkpoint == BUNDLED

    def config(self) -> GPTConfig:
        if self.is_bundled:
            from lineray.models.digits import bundled_config
            return bundled_config()
        return preset(self.preset, grid_size=self.grid_size, model_type=self.model_type)

    def checkpoint_path(self) -> Path | None:
        if self.checkpoint is None:
            return None
        if self.is_bundled:
            from lineray.models.digits import BUNDLED_GPT
            return BUNDLED_GPT
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
        if self.decoder == BUNDLED:
            from lineray.models.digits import load_bundled_tokenizer
            return load_bundled_tokenizer().to(device)
        from lineray.models.vq import VQConfig, VQDecoder
        shape = VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in (self.vq_config or {}).items()})
        if self.decoder is None:
            # Random decoder (tests, benchmarks): seeded, so every process builds the same one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                vq = VQDecoder(shape)
        else:
            vq = VQDecoder(shape).load(Path(self.decoder).expanduser())
        return vq.to_device(device)  # on CUDA: bf16, channels_last


def slice_2d(t: torch.Tensor, rows: slice | None, cols: slice | None) -> torch.Tensor:
    return t[rows if rows is not None else slice(None), cols if cols is not None else slice(None)]


def _init_shards_consistently(model: Transformer, seed: int) -> None:
    """Give every sharded weight its slice of one seeded full tensor, so tp=N equals tp=1.

    The output head gets random weights too (LlamaGen's zero init would make all logits equal).
    """
    for i, t in enumerate(t for t in checkpoint_tensors(model) if t.split):
        gen = torch.Generator().manual_seed(seed * 100_003 + i + 1)
        full = torch.empty(t.full_shape).normal_(0, 0.02, generator=gen)
        with torch.no_grad():
            t.target.copy_(t.load_shard(lambda rows=None, cols=None, full=full: slice_2d(full, rows, cols)))
