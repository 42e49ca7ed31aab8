"""Model shapes: one config for every family, the LlamaGen and Janus-Pro presets, and the small presets
lineray ships and tests with.

A family (lineray.models.family) is a few switches here plus its embedding and head modules.
Every switch defaults to LlamaGen, so a LlamaGen config is unchanged by the fields it does not use.
"""
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
    vocab_size: int = 16384  # image token codes (the output head's width)
    model_type: str = "c2i"  # "c2i" (class label), "t2i" (caption embeddings) or "text" (prompt token ids)
    num_classes: int = 1000  # c2i: the embedding table has one more row, the null class
    caption_dim: int = 2048  # t2i: FLAN-T5-XL feature size
    cls_token_num: int = 1  # condition tokens: 1 for c2i, 120 for t2i
    grid_size: int = 16  # image tokens per side (256px/16 = 16, 384px/16 = 24)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256  # SwiGLU hidden size rounds up to this
    ffn_dim_multiplier: float | None = None
    # -- family switches (FAMILIES.md section 1); the defaults are LlamaGen's --
    family: str = "llamagen"  # a key of lineray.models.family.FAMILIES
    rope: str = "2d"  # "2d": LlamaGen's grid RoPE (condition unrotated); "1d": sequence positions (Llama)
    rope_style: str = "interleaved"  # pairs (x[2j], x[2j+1]) (LlamaGen) or "half": (x[j], x[j+D/2]) (HF Llama)
    qk_norm: bool = False  # per-head LayerNorm (weight, bias) on q and k before RoPE (Chameleon)
    qk_norm_eps: float = 1e-5
    text_vocab_size: int = 0  # rows of the prompt-token table (model_type "text")
    max_prefix_len: int = 0  # longest prefix a batch may have (the cache's prefix capacity); 0 = cls_token_num
    grid_w: int | None = None  # image tokens per row; None = grid_size (square)
    line_extra: int = 0  # tokens per line after the grid codes (Lumina's end-of-line: 1)
    image_embed_dim: int = 0  # Janus: width of the image-token table (gen_embed, 8) before the aligner MLP
    head_hidden: int = 0  # Janus: hidden width of the gen_head MLP; 0 = LlamaGen's single Linear head
    bos_token_id: int | None = None  # text prompts: the tokenizer's ids (read from tokenizer.json)
    cfg_pad_token_id: int | None = None  # Janus: fills the CFG null prompt between BOS and the last token
    line_token_id: int | None = None  # the token of each line's extra slots (Lumina's end-of-line), forced
    image_token_range: tuple[int, int] | None = None  # Lumina: head columns [start, stop) that are image codes
    # Lumina: the resolution the model is trained at (px a side); it makes any size of up to (target / 32)^2
    # 32 px patches, aspect up to 4:1 (lineray.models.lumina.sizes). 0: only the grid above.
    target_size: int = 0
    size_token_ids: tuple[int, ...] = ()  # Lumina: id of the size token of g x 32 px at index g - 1 (g = 1, 2, ...)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(map(repr, MODEL_TYPES))}, got {self.model_type!r}")
        if self.family not in FAMILY_SWITCHES:
            raise ValueError(f"unknown model family {self.family!r}; known families: {', '.join(FAMILY_SWITCHES)}")
        if self.rope not in ("2d", "1d"):
            raise ValueError(f"rope must be '2d' or '1d', got {self.rope!r}")
        if self.rope_style not in ("interleaved", "half"):
            raise ValueError(f"rope_style must be 'interleaved' or 'half', got {self.rope_style!r}")
        if self.rope == "2d" and (self.grid_w not in (None, self.grid_size) or self.line_extra):
            raise ValueError("2D RoPE needs a square grid without end-of-line tokens")
        if self.model_type == "text" and (self.text_vocab_size < 1 or self.max_prefix_len < 1):
            raise ValueError("a text-prompt model needs text_vocab_size and max_prefix_len")
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
    def grid_h(self) -> int:
        return self.grid_size

    @property
    def grid_width(self) -> int:
        return self.grid_w or self.grid_size

    @property
    def line_tokens(self) -> int:
        """Tokens per image line: the grid codes plus any end-of-line tokens (a LineAR line)."""
        return self.grid_width + self.line_extra

    @property
    def image_tokens(self) -> int:
        return self.grid_h * self.line_tokens

    @property
    def prefix_len(self) -> int:
        """Condition slots the cache reserves: max_prefix_len, or LlamaGen's fixed cls_token_num."""
        return self.max_prefix_len or self.cls_token_num

    def cache_plan(self, spec):
        """A CacheSpec checked against this model's image layout (lines of `line_tokens`)."""
        return spec.plan(self.grid_h, self.line_tokens, self.image_tokens)

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


MODEL_TYPES = ("c2i", "t2i", "text")

# The switches every model of a family has, under its presets' own fields (lineray.models.family
# holds each family's modules and rules; a new family is added in both places).
FAMILY_SWITCHES: dict[str, dict] = {
    "llamagen": {},
    # Janus-Pro (MODELS.md A1-A3): a Llama LM (1D rotate-half RoPE, RMSNorm eps 1e-6, MHA, SwiGLU),
    # its own 16384 x 8 image-token table, 384 px = 24 x 24 tokens.
    "janus": dict(model_type="text", rope="1d", rope_style="half", norm_eps=1e-6, vocab_size=16384,
                  image_embed_dim=8, grid_size=24),
    # Lumina-mGPT (MODELS.md B1-B3): Chameleon-7B (qk-norm, 1D rotate-half RoPE, eps 1e-5), one 65,536 vocabulary
    # for prompt and image tokens, lines of W codes + a forced end-of-line; the published vocabulary's ids (image
    # codes 4..8195, end-of-line 8803; a folder's own ids replace them: lineray.models.lumina.folder).
    "lumina": dict(model_type="text", rope="1d", rope_style="half", qk_norm=True, norm_eps=1e-5,
                   text_vocab_size=65536, max_prefix_len=384, line_extra=1, grid_size=48,
                   image_token_range=(4, 8196), line_token_id=8803, vocab_size=8804, bos_token_id=0,
                   size_token_ids=tuple(8804 + g for g in range(1, 65))),  # up to 64 x 32 px (1024's 4:1 side)
}

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
    # A Janus-shaped model for tests (random weights): text prompts, aligner and MLP head, 1D RoPE;
    # BOS 1 and CFG pad 2 of a tiny test vocabulary (a real folder's ids come from its tokenizer.json).
    "janus-tiny": dict(family="janus", n_layer=2, n_head=4, dim=64, vocab_size=32, text_vocab_size=128,
                       head_hidden=64, grid_size=6, max_prefix_len=32, multiple_of=32, bos_token_id=1,
                       cfg_pad_token_id=2),
}
# Janus-Pro (MODELS.md A1, A2, A4): the family's switches above plus its sizes; the gen_head hidden
# width equals the model width. Token ids (BOS, CFG pad) come from the checkpoint folder's tokenizer.json.
_JANUS = {
    "janus-pro-1b": dict(family="janus", n_layer=24, n_head=16, dim=2048, head_hidden=2048,  # FFN 5632
                         text_vocab_size=102400, max_prefix_len=256),
    "janus-pro-7b": dict(family="janus", n_layer=30, n_head=32, dim=4096, head_hidden=4096,  # FFN 11008
                         text_vocab_size=102400, max_prefix_len=256),
}
# Lumina-mGPT 7B (MODELS.md B1-B4): Chameleon-7B, one preset per published resolution (the grid is
# px / 16 a side; non-square sizes set grid_size (rows) and grid_w). Family switches and the published
# vocabulary's ids: FAMILY_SWITCHES["lumina"]; a checkpoint folder's own ids replace them.
_LUMINA = {f"lumina-mgpt-{px}": dict(family="lumina", n_layer=32, n_head=32, dim=4096, grid_size=px // 16,
                                     target_size=px)  # FFN 11008
           for px in (512, 768, 1024)}
# A Lumina-shaped model for tests (tests/lumina_fixtures.py's folder): 96 x 64 px, 4 lines of 6 codes + end-of-line;
# trained (so to say) at 96 px: sizes of up to 3 x 3 patches, 32x128 .. 128x32 (size tokens 1..6 x 32 px).
_LUMINA["lumina-tiny"] = dict(family="lumina", n_layer=2, n_head=4, dim=64, grid_size=4, grid_w=6, text_vocab_size=96,
                              image_token_range=(4, 20), line_token_id=24, vocab_size=25, max_prefix_len=40,
                              multiple_of=128, ffn_dim_multiplier=0.75, target_size=96,  # FFN 128
                              size_token_ids=tuple(range(25, 31)))
PRESETS = {**_LLAMAGEN, **_SMALL, **_JANUS, **_LUMINA}


def preset_family(name: str) -> str:
    """The family a preset belongs to (`lineray presets` groups by it)."""
    return PRESETS[name].get("family", "llamagen")


def preset(name: str, **overrides) -> GPTConfig:
    """A preset by name (e.g. "GPT-XL"), with field overrides (grid_size=24, model_type="t2i", ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    fields = {**FAMILY_SWITCHES[preset_family(name)], **PRESETS[name]}
    if overrides.get("model_type") == "t2i":
        fields["cls_token_num"] = 120
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**fields)


def with_grid(cfg: GPTConfig, grid_size: int) -> GPTConfig:
    return replace(cfg, grid_size=grid_size)
