"""Model shapes: the LlamaGen presets and the small presets lineray ships and tests with."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


def round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    dim: int
    n_head: int
    n_kv_head: int | None = None  # None = n_head (all LlamaGen presets)
    vocab_size: int = 16384
    model_type: str = "c2i"  # "c2i" (class label) or "t2i" (caption embeddings)
    num_classes: int = 1000  # c2i: the embedding table has one more row, the null class
    caption_dim: int = 2048  # t2i: FLAN-T5-XL feature size
    cls_token_num: int = 1  # condition tokens: 1 for c2i, 120 for t2i
    grid_size: int = 16  # image tokens per side (256px/16 = 16, 384px/16 = 24)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256  # SwiGLU hidden size rounds up to this
    ffn_dim_multiplier: float | None = None

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.multiple_of)

    @property
    def image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def prefix_len(self) -> int:
        return self.cls_token_num

    def valid_tp_sizes(self) -> list[int]:
        """Tensor-parallel sizes that give every rank whole heads (FFN columns and vocab may split unevenly)."""
        return [t for t in range(1, self.n_head + 1) if self.n_head % t == 0 and self.kv_heads % t == 0]

    def check_tp(self, tp: int, name: str = "this model") -> None:
        if tp not in self.valid_tp_sizes():
            raise ValueError(f"tp={tp} does not fit {name}: its {self.n_head} attention heads must split evenly "
                             f"across ranks; valid tensor-parallel sizes are "
                             f"{', '.join(map(str, self.valid_tp_sizes()))}")

    def to_dict(self) -> dict:
        return asdict(self)


# LlamaGen's published shapes (DESIGN.md section 2).
_LLAMAGEN = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}
# Small shapes for tests and the bundled digits model (same code path).
_SMALL = {
    "GPT-tiny": dict(n_layer=2, n_head=4, dim=64, vocab_size=256, num_classes=10, multiple_of=32),
    # The bundled model (lineray/assets/digits): sized to train in ~25 min on one CPU core in fp32.
    "GPT-digits": dict(n_layer=4, n_head=4, dim=96, vocab_size=16, num_classes=10, multiple_of=64),
}
PRESETS = {**_LLAMAGEN, **_SMALL}


def preset(name: str, **overrides) -> GPTConfig:
    """A preset by name (e.g. "GPT-XL"), with field overrides (grid_size=24, model_type="t2i", ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if overrides.get("model_type") == "t2i":
        fields["cls_token_num"] = 120
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**fields)


def with_grid(cfg: GPTConfig, grid_size: int) -> GPTConfig:
    return replace(cfg, grid_size=grid_size)
