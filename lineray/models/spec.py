"""Which model to run: a bundled model, or a preset with its weights, image decoder and tokenizer, as one record.

    ModelSpec()                                              the bundled digits model (the default)
    ModelSpec(preset="digits")                               the same, by name (lineray.models.bundles)
    ModelSpec(preset="GPT-XL", checkpoint="/ckpt/c2i_XL_384.pt", decoder="/ckpt/vq_ds16_c2i.pt", grid_size=24)
    ModelSpec(preset="GPT-B", checkpoint="random", decoder="random")   random weights (tests, benchmarks)
    ModelSpec(preset="janus-pro-1b", checkpoint="/models/Janus-Pro-1B")  a downloaded model folder
    ModelSpec(preset="janus-pro-1b", checkpoint="random", tokenizer="tokenizer.json")
    ModelSpec(preset="lumina-mgpt-768", checkpoint="/models/Lumina-mGPT-7B-768", size="768x512")  width x height

A LlamaGen preset is only a shape: it has no weights of its own, so it needs `checkpoint` (a path
or "random") and `decoder` (a path or "random"); leaving either out is an error, never a silent
fallback. A folder family (Janus-Pro) reads everything from the downloaded folder: the config
(config.json; the preset only checks the size), the tokenizer (tokenizer.json), the weights and
the image decoder. With `checkpoint: random` it takes the preset's shape, a random decoder, and
`tokenizer: PATH` for text prompts. The family's name (`janus`) stands for "whatever size the
folder holds". A ModelSpec travels to Ray workers (a small frozen pydantic dataclass: validated on
construction, picklable, no file read), and each worker builds its own shard from it.
"""
from __future__ import annotations

from dataclasses import asdict, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import model_validator
from pydantic.dataclasses import dataclass

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.bundles import BUNDLES, bundle_module
from lineray.models.checkpoint import load_checkpoint
from lineray.models.config import PRESETS, GPTConfig, preset, preset_family
from lineray.models.layers import TPGroup, checkpoint_tensors
from lineray.models.lumina.sizes import SAMPLE, ImageSize, size_problem
from lineray.models.tokenizer_file import TOKENIZER_FILE
from lineray.models.transformer import Transformer
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


# Families whose checkpoint is a downloaded folder (config.json, tokenizer.json, weights, the image decoder):
# family -> the module that reads it: read_config(dir) -> GPTConfig, lm_reader(dir, cfg) -> a checkpoint reader,
# load_vq_decoder(dir), prompt_encoder(dir, max_tokens) -> PromptEncoder (encode, bos_id, cfg_pad_id).
FOLDER_FAMILIES = {"janus": "lineray.models.janus.folder", "lumina": "lineray.models.lumina.folder"}
# The original code's sampling defaults per family (Janus-Pro: generation_inference.py, MODELS.md A3).
FAMILY_SAMPLING = {"janus": dict(cfg_scale=5.0, temperature=1.0, top_k=0, top_p=1.0),
                   # Lumina-mGPT: README (cfg 4, image top-k 2000, T 1; MODELS.md B3)
                   "lumina": dict(cfg_scale=4.0, temperature=1.0, top_k=2000, top_p=1.0)}
# LineAR's budget when a compressing cache policy is named without one: the family's own (the LineAR paper runs
# Lumina-mGPT at 1/8 of the K/V; issue 14), else the paper's headline 1/6 (ModelSpec.cache_with_budget).
FAMILY_RHO = {"lumina": "1/8"}
DEFAULT_RHO = "1/6"
FOLDER_FILES = ("config.json", TOKENIZER_FILE)
# What a preset of each family needs besides its name (`lineray presets`).
FAMILY_NEEDS = {
    "llamagen": "--checkpoint FILE (.pt/.pth/.safetensors) and --vq FILE (the VQ-16 decoder), or 'random' for either",
    "janus": "--checkpoint FOLDER (the downloaded model folder: config.json, tokenizer.json, the weights with the "
             "VQ-16 decoder), or --checkpoint random --tokenizer PATH",
    "lumina": "--checkpoint FOLDER (the downloaded model folder: config.json, tokenizer.json, the weights; Meta's "
              "vqgan.ckpt + vqgan.yaml copied into it); the preset names the image size, --size WxH "
              "another (multiples of 32 px, e.g. 768x512)",
}


@dataclass(frozen=True, config=STRICT)
class ModelSpec:
    preset: str = DEFAULT_BUNDLE  # a bundled model (digits), a preset (GPT-B ..., janus-pro-1b) or a folder family
    checkpoint: str | None = None  # weights: a file (LlamaGen), the model folder (Janus-Pro) or "random"
    decoder: str | None = None  # VQ decoder: a path or "random"; None: the bundle's / the folder's
    tokenizer: str | None = None  # text prompts: tokenizer.json or its folder; None: the checkpoint folder's
    grid_size: int | None = None  # image tokens per side; None = the preset's
    # Lumina-mGPT: the image's WIDTHxHEIGHT in px, multiples of 32 ("768x512"; 768 = square); None = the preset's
    # or "sample": the model draws each image's size, as the original does (its crop sizes; lumina.model.sample_grids)
    size: int | str | None = None
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
            if any(v is not None for v in (self.grid_size, self.model_type, self.tokenizer, self.size)):
                raise ValueError(f"the bundled model {self.preset!r} has a fixed shape and no tokenizer: "
                                 f"leave grid_size, size, model_type and tokenizer unset")
            return self
        if self.preset not in PRESETS and self.preset not in FOLDER_FAMILIES:
            raise ValueError(f"unknown model preset {self.preset!r}; {known_models()}")
        if self.size is not None:
            self._check_size()
        if self.is_folder_family:
            return self._folder_family()
        if self.tokenizer is not None:
            raise ValueError(f"tokenizer is for text-prompt families (janus-pro-1b, ...); {self.preset} reads "
                             f"class labels or caption embeddings")
        missing = [f"{name}: PATH (or {name}: random)" for name in ("checkpoint", "decoder")
                   if getattr(self, name) is None]
        if missing:
            raise ValueError(f"preset {self.preset} is a shape without weights: it needs {' and '.join(missing)} "
                             f"(flags: --checkpoint, --vq); for the bundled model use preset: {DEFAULT_BUNDLE}")
        return self

    def _check_size(self) -> None:
        """`size` is Lumina's (its size tokens and end-of-line lines take any WxH it allows); stored as "WxH",
        or "sample" (the model draws it)."""
        if self.family != "lumina":
            raise ValueError(f"size: {self.size!r} is for Lumina-mGPT models (lumina-mgpt-768, ...); {self.preset} "
                             f"makes square images of grid_size tokens a side")
        if self.size == SAMPLE:
            return
        try:
            size = ImageSize.parse(self.size)
        except ValueError as e:
            raise ValueError(f"size: {e}") from None
        problem = size_problem(size, preset(self.preset).target_size) if self.preset in PRESETS else None
        if problem is not None:
            raise ValueError(f"size: {problem} ({self.preset})")
        object.__setattr__(self, "size", str(size))  # frozen: normalised once, here

    @property
    def samples_size(self) -> bool:
        """The model draws each image's size (Lumina-mGPT `size: sample`)."""
        return self.size == SAMPLE

    def _folder_family(self) -> "ModelSpec":
        if self.checkpoint is None:
            raise ValueError(f"{self.preset} needs checkpoint: FOLDER (the downloaded model folder with "
                             f"{', '.join(FOLDER_FILES)} and the weights), or checkpoint: random (flag: --checkpoint)")
        if self.grid_size is not None or self.model_type is not None:
            raise ValueError(f"{self.preset}: the folder's config.json decides the shape: leave grid_size and "
                             f"model_type unset")
        if self.checkpoint == RANDOM and self.preset in FOLDER_FAMILIES:
            sizes = [p for p in PRESETS if preset_family(p) == self.preset]
            raise ValueError(f"checkpoint: random needs a size, not the family {self.preset!r}: "
                             f"one of {', '.join(sizes)}")
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
    def family(self) -> str:
        if self.is_bundled:
            return "llamagen"
        return self.preset if self.preset in FOLDER_FAMILIES else preset_family(self.preset)

    @property
    def is_folder_family(self) -> bool:
        """Config, tokenizer, weights and decoder come from one downloaded folder (Janus-Pro)."""
        return not self.is_bundled and self.family in FOLDER_FAMILIES

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
        if self.is_folder_family:
            return with_size(_folder_config(self.preset, self.checkpoint, self.tokenizer), self.size)
        return preset(self.preset, grid_size=self.grid_size, model_type=self.model_type)

    def default_sampling(self) -> SamplingConfig:
        """The bundle's tuned sampling settings; the family's original defaults for a preset (LlamaGen: c2i's)."""
        if self.is_bundled:
            return bundle_module(self.preset).bundled_sampling()
        return SamplingConfig(**FAMILY_SAMPLING.get(self.family, LLAMAGEN_SAMPLING))

    def cache_with_budget(self, cache: CacheSpec, fallback: str | None = DEFAULT_RHO) -> CacheSpec:
        """`cache` with a budget when a compressing policy names none: the family's (FAMILY_RHO), else `fallback`
        (None: left without one, and the plan names the missing budget). An explicit rho or lines always wins."""
        rho = FAMILY_RHO.get(self.family, fallback)
        if cache.policy == "full" or cache.rho is not None or cache.lines is not None or rho is None:
            return cache
        return replace(cache, rho=rho)

    def checkpoint_path(self) -> Path | None:
        """The GPT weights file (or model folder); None for random weights."""
        if self.checkpoint == RANDOM:
            return None
        if self.checkpoint is None:  # a bundle (the validator allows None nowhere else)
            return Path(bundle_module(self.preset).BUNDLED_GPT)
        return Path(self.checkpoint).expanduser()

    def tokenizer_folder(self) -> Path:
        """Where a text-prompt model's tokenizer.json is: `tokenizer` (the file or its folder), else the
        checkpoint folder."""
        if self.tokenizer is not None:
            path = Path(self.tokenizer).expanduser()
            if path.name == TOKENIZER_FILE and path.is_file():
                return path.parent
            if path.is_dir():
                return _folder_file(path, TOKENIZER_FILE, "tokenizer folder").parent
            raise FileNotFoundError(f"tokenizer {path} not found (give a {TOKENIZER_FILE} or its folder)")
        if self.checkpoint == RANDOM:
            raise ValueError(f"{self.name} has no tokenizer: with checkpoint: random give tokenizer: PATH "
                             f"(a {TOKENIZER_FILE} or its folder; flag: --tokenizer)")
        return _folder_file(self.checkpoint_path(), TOKENIZER_FILE).parent

    def prompt_encoder(self):
        """The family's PromptEncoder (text -> token ids with the family's template), from tokenizer.json."""
        cfg = self.config()
        if cfg.model_type != "text":
            raise ValueError(f"{self.name} does not take text prompts")
        encoder = _prompt_encoder(self.family, str(self.tokenizer_folder()), cfg.max_prefix_len)
        return encoder.for_config(cfg) if hasattr(encoder, "for_config") else encoder  # Lumina: the image size

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
        elif self.is_folder_family:
            load_checkpoint(model, folder_module(self.family).lm_reader(path, model.config))
        else:
            load_checkpoint(model, path, ema=self.ema)
        model = model.to(device=device, dtype=dtype).eval()
        return model.compile_dense() if compile else model

    def build_decoder(self, device: str | torch.device = "cpu") -> ImageDecoder:
        if self.is_bundled and self.decoder is None:
            return bundle_module(self.preset).load_bundled_tokenizer().to(device)
        from lineray.models.vq import VQConfig, VQDecoder
        shape = VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in (self.vq_config or {}).items()})
        if self.decoder == RANDOM or (self.decoder is None and self.checkpoint == RANDOM):
            # Random decoder (tests, benchmarks): seeded, so every process builds the same one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                vq = VQDecoder(shape)
        elif self.decoder is None:  # a folder family: the decoder is in the checkpoint folder
            vq = folder_module(self.family).load_vq_decoder(self.checkpoint_path())
        else:
            vq = VQDecoder(shape).load(Path(self.decoder).expanduser())
        return vq.to_device(device)  # on CUDA: bf16, channels_last


def with_size(cfg: GPTConfig, size: str | None) -> GPTConfig:
    """cfg with the image grid of a WIDTHxHEIGHT size (16 px a code: H/16 lines of W/16 codes); None or "sample"
    (drawn per image): as is."""
    if size is None or size == SAMPLE:
        return cfg
    rows, cols = ImageSize.parse(size).grid
    return replace(cfg, grid_size=rows, grid_w=cols)


def known_models() -> str:
    """Every model name by family, for error messages: bundled ones, then each family's presets."""
    by_family: dict[str, list[str]] = {}
    for name in PRESETS:
        by_family.setdefault(preset_family(name), []).append(name)
    families = "; ".join(f"{family}: {', '.join(names)}" for family, names in by_family.items())
    return (f"bundled models: {', '.join(BUNDLES)}; families and their presets: {families} "
            f"(a folder family's name alone, e.g. janus, takes the size from the folder)")


def folder_module(family: str):
    import importlib
    return importlib.import_module(FOLDER_FAMILIES[family])


def _folder_file(folder: Path, name: str, what: str = "checkpoint folder") -> Path:
    """folder/name, or a one-line error naming what is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} not found (a downloaded model folder with {', '.join(FOLDER_FILES)})")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{what} {folder} has no {name}")
    return path


@lru_cache(maxsize=8)
def _folder_config(preset_name: str, checkpoint: str, tokenizer: str | None) -> GPTConfig:
    """A folder family's config: the folder's config.json (with its tokenizer's ids), or the preset's shape for
    random weights (with `tokenizer`'s ids). Cached: the driver and every stage ask, and tokenizer.json is MBs."""
    family = preset_name if preset_name in FOLDER_FAMILIES else preset_family(preset_name)
    spec = ModelSpec(preset=preset_name, checkpoint=checkpoint, tokenizer=tokenizer)
    if checkpoint == RANDOM:
        cfg = preset(preset_name)
    else:
        folder = Path(checkpoint).expanduser()
        _folder_file(folder, "config.json")
        _folder_file(folder, TOKENIZER_FILE)
        cfg = folder_module(family).read_config(folder)
        if preset_name in PRESETS:
            _check_size(preset_name, cfg, folder)
            sized = preset(preset_name)  # the preset names the image size (Lumina-mGPT 512/768/1024)
            cfg = replace(cfg, grid_size=sized.grid_size, grid_w=sized.grid_w, target_size=sized.target_size)
    if tokenizer is None:
        return cfg
    # A tokenizer of its own: its special ids, and every id must have a row in the prompt embedding.
    encoder = folder_module(family).prompt_encoder(spec.tokenizer_folder())
    size = encoder.tokenizer.get_vocab_size()
    if size > cfg.text_vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {size} tokens but {preset_name}'s text vocabulary has "
                         f"{cfg.text_vocab_size}: not this model's tokenizer")
    return replace(cfg, bos_token_id=encoder.bos_id, cfg_pad_token_id=encoder.cfg_pad_id)


def _check_size(preset_name: str, cfg: GPTConfig, folder: Path) -> None:
    """The folder holds the model the preset names (janus-pro-1b is not a 7B folder)."""
    want = preset(preset_name)
    fields = ("n_layer", "dim", "n_head")
    if any(getattr(cfg, f) != getattr(want, f) for f in fields):
        shape = lambda c: " x ".join(f"{f} {getattr(c, f)}" for f in fields)  # noqa: E731
        raise ValueError(f"checkpoint folder {folder} holds a model of {shape(cfg)}, not {preset_name} "
                         f"({shape(want)}); name its size or the family ({cfg.family}) as the preset")


@lru_cache(maxsize=8)
def _prompt_encoder(family: str, folder: str, max_tokens: int):
    return folder_module(family).prompt_encoder(Path(folder), max_tokens)


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
