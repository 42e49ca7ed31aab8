"""A Janus-Pro checkpoint folder -> lineray: its config, its LM weights, its VQ decoder, its prompts.

Two layouts are read (MODELS.md A4; lineray.models.janus.keys has their key names):
  deepseek      the published deepseek-ai/Janus-Pro-1B/-7B: config.json of `MultiModalityConfig`
                (language_config + {vision,aligner,gen_vision,gen_aligner,gen_head}_config),
                pytorch_model.bin or shards + index (or safetensors)
  transformers  `JanusForConditionalGeneration.save_pretrained`: config.json with model_type "janus",
                text_config / vision_config / vq_config, model.safetensors or shards + index
Both need the folder's tokenizer.json (BOS and the CFG pad id come from it).

What the caller uses (errors: FolderError, a CheckpointError, one line naming file and field/key):
  check_folder(dir)                             config.json and tokenizer.json readable as Janus-Pro
  read_config(dir) -> GPTConfig                 the Transformer's shape, family switches and token ids
  lm_reader(dir, config) -> KeyMappedReader     load_checkpoint(model, reader) fills the Transformer
                                                (or a TP rank's slices of it)
  load_vq_decoder(dir) -> VQDecoder             the image decoder shipped inside the checkpoint
  prompt_encoder(dir, max_tokens)               prompt.PromptEncoder: text -> prefix token ids
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lineray.models.checkpoint import CheckpointError, CheckpointReader, KeyMappedReader
from lineray.models.config import GPTConfig, round_up
from lineray.models.janus.keys import DEEPSEEK, TRANSFORMERS, Layout, lm_key_map, vq_key_map
from lineray.models.janus.prompt import PromptEncoder, PromptError
from lineray.models.layers import checkpoint_tensors
from lineray.models.vq import VQConfig, VQDecoder, config_from_shapes

CONFIG_FILE = "config.json"
# LlamaConfig's defaults: the published deepseek language_config gives only num_hidden_layers,
# vocab_size and max_position_embeddings; everything else is the default (MODELS.md A1).
LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=None,
                      rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, hidden_act="silu",
                      attention_bias=False, mlp_bias=False)
VQ_DOWNSAMPLE = 16  # Janus-Pro generates 384 px = 24 x 24 codes of its VQ-16
DEFAULT_MAX_PREFIX = 256  # prompt tokens a batch may hold (the cache's prefix slots), as the presets


class FolderError(CheckpointError):
    """A Janus-Pro folder that cannot be read; the message names the file and the field."""


_MISSING = object()


@dataclass(frozen=True)
class JanusFolder:
    path: Path
    layout: Layout
    config: dict  # config.json as parsed

    @classmethod
    def open(cls, folder: str | Path) -> "JanusFolder":
        path = Path(folder)
        if not path.is_dir():
            raise FolderError(f"Janus-Pro checkpoint folder not found: {path}")
        file = path / CONFIG_FILE
        if not file.is_file():
            raise FolderError(f"{path}: no {CONFIG_FILE} (a Janus-Pro checkpoint folder holds config.json, "
                              f"tokenizer.json and the weights)")
        try:
            raw = json.loads(file.read_text())
        except ValueError as e:
            raise FolderError(f"{file}: not valid JSON ({e})") from None
        if isinstance(raw, dict) and "language_config" in raw and "gen_head_config" in raw:
            layout = DEEPSEEK
        elif isinstance(raw, dict) and raw.get("model_type") == "janus" and "text_config" in raw:
            layout = TRANSFORMERS
        else:
            raise FolderError(f"{file} is not a Janus-Pro config: expected deepseek's language_config + "
                              f"gen_head_config, or transformers' model_type 'janus' with text_config and vq_config")
        return cls(path, layout, raw)

    def field(self, *names: str, default=_MISSING):
        """config.json's value at a dotted path, e.g. field("gen_head_config", "params", "image_token_embed")."""
        value = self.config
        for name in names:
            if not isinstance(value, dict) or name not in value or value[name] is None:
                if default is not _MISSING:
                    return default
                raise FolderError(f"{self.path / CONFIG_FILE}: missing field {'.'.join(names)}")
            value = value[name]
        return value

    def section(self, *names: str) -> dict:
        value = self.field(*names)
        self.require(isinstance(value, dict), f"{'.'.join(names)} is not a JSON object")
        return value

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise FolderError(f"{self.path / CONFIG_FILE}: {what}")


def read_config(folder: str | Path, max_prefix_len: int | None = None) -> GPTConfig:
    """The Janus Transformer's config from the folder's config.json and tokenizer.json.

    max_prefix_len: the longest prompt (in tokens, template included) a batch may hold; default
    256, or less where max_position_embeddings leaves less room beside the image."""
    from lineray.models.family import family_of
    f = JanusFolder.open(folder)
    text = _text_fields(f)
    gen = _deepseek_gen_fields(f, text["dim"]) if f.layout is DEEPSEEK else _transformers_gen_fields(f, text["dim"])
    grid = gen.pop("grid_size")
    room = text.pop("max_position_embeddings") - grid * grid
    f.require(room > 1, f"max_position_embeddings leaves no room for a prompt beside {grid * grid} image tokens")
    max_prefix_len = max_prefix_len or min(DEFAULT_MAX_PREFIX, room)
    f.require(max_prefix_len <= room, f"max_prefix_len {max_prefix_len} + {grid * grid} image tokens exceed "
                                      f"max_position_embeddings")
    prompts = prompt_encoder(f.path)
    vocab = text["text_vocab_size"]
    for what, i in (("BOS", prompts.bos_id), ("begin-of-image", prompts.boi_id), ("CFG pad", prompts.cfg_pad_id)):
        f.require(i < vocab, f"the {what} id {i} of {prompts.source} is outside the text vocabulary ({vocab}): "
                             f"another model's tokenizer?")
    fields = {**family_of("janus").switches, **text, **gen, "family": "janus", "grid_size": grid,
              "max_prefix_len": max_prefix_len, "bos_token_id": prompts.bos_id, "cfg_pad_token_id": prompts.cfg_pad_id}
    try:
        return GPTConfig(**fields)
    except ValueError as e:  # a shape GPTConfig refuses (e.g. heads vs key/value heads)
        raise FolderError(f"{f.path / CONFIG_FILE}: {e}") from None


def _text_fields(f: JanusFolder) -> dict:
    section = "language_config" if f.layout is DEEPSEEK else "text_config"
    llama = {**LLAMA_DEFAULTS, **{k: v for k, v in f.section(section).items() if v is not None}}
    where = f"{section}."
    for name in ("num_hidden_layers", "vocab_size"):
        f.field(section, name)  # no default worth guessing: name the field
    f.require(llama["hidden_act"] == "silu", f"{where}hidden_act {llama['hidden_act']!r} is not supported (silu)")
    f.require(not llama["attention_bias"] and not llama["mlp_bias"],
              f"{where}attention_bias / mlp_bias are not supported (Llama has no biases)")
    dim, heads = llama["hidden_size"], llama["num_attention_heads"]
    f.require(heads > 0 and dim % heads == 0,
              f"{where}hidden_size {dim} is not divisible by num_attention_heads {heads}")
    f.require(llama.get("head_dim") in (None, dim // heads),
              f"{where}head_dim {llama.get('head_dim')} differs from hidden_size / num_attention_heads")
    rope = llama.get("rope_parameters") or llama.get("rope_scaling") or {}
    f.require(rope.get("rope_type", rope.get("type", "default")) == "default",
              f"{where}rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    return dict(n_layer=llama["num_hidden_layers"], dim=dim, n_head=heads, n_kv_head=llama["num_key_value_heads"],
                text_vocab_size=llama["vocab_size"], norm_eps=llama["rms_norm_eps"],
                rope_base=float(rope.get("rope_theta", llama["rope_theta"])),
                max_position_embeddings=llama["max_position_embeddings"],
                **_ffn_fields(f, dim, llama["intermediate_size"]))


def _ffn_fields(f: JanusFolder, dim: int, hidden: int) -> dict:
    """GPTConfig derives the SwiGLU width LlamaGen's way (8/3 dim rounded up to multiple_of, which
    gives Janus-Pro's 5632 and 11008); any other intermediate_size is reached through its two knobs."""
    base = int(2 * 4 * dim / 3)
    if round_up(base, 256) == hidden:
        return dict(multiple_of=256, ffn_dim_multiplier=None)
    fields = dict(multiple_of=hidden, ffn_dim_multiplier=hidden / base)
    got = round_up(int(fields["ffn_dim_multiplier"] * base), hidden)
    f.require(got == hidden, f"intermediate_size {hidden} cannot be expressed (got {got})")
    return fields


def _deepseek_gen_fields(f: JanusFolder, dim: int) -> dict:
    head = f.section("gen_head_config", "params")
    aligner = f.section("gen_aligner_config", "params")
    vq = f.section("gen_vision_config", "params")
    codes, embed = vq.get("image_token_size", 16384), vq.get("n_embed", 8)  # they size gen_embed only
    f.require(head.get("image_token_size", codes) == codes,
              "gen_head_config.params.image_token_size differs from gen_vision_config.params.image_token_size")
    f.require(aligner.get("depth", 2) == 2, f"gen_aligner_config.params.depth {aligner.get('depth')} is not 2")
    f.require(aligner.get("input_dim", embed) == embed,
              "gen_aligner_config.params.input_dim differs from gen_vision_config.params.n_embed")
    for where, width in (("gen_aligner_config.params.n_embed", aligner.get("n_embed", dim)),
                         ("gen_head_config.params.n_embed", head.get("n_embed", dim))):
        f.require(width == dim, f"{where} {width} differs from the LM's hidden_size {dim}")
    # The generation grid as transformers' converter sizes it: the vision tower's image size / 16 (384 -> 24).
    image_size = f.field("vision_config", "params", "image_size", default=384)
    return dict(vocab_size=codes, image_embed_dim=embed, grid_size=image_size // VQ_DOWNSAMPLE,
                head_hidden=f.field("gen_head_config", "params", "image_token_embed"))


def _transformers_gen_fields(f: JanusFolder, dim: int) -> dict:
    vq = f.section("vq_config")
    f.require(vq.get("num_hidden_layers", 2) == 2, f"vq_config.num_hidden_layers {vq.get('num_hidden_layers')} "
                                                   f"(the generation aligner's depth) is not 2")
    # transformers' head is Linear(image_token_embed_dim -> projection_dim), GELU, Linear(-> num_embeddings),
    # and its aligner ends at projection_dim: both must be the LM width.
    for name in ("projection_dim", "image_token_embed_dim"):
        f.require(vq.get(name, dim) == dim, f"vq_config.{name} {vq.get(name)} differs from hidden_size {dim}")
    patches = vq.get("num_patches") or (f.field("vision_config", "image_size", default=384)
                                        // f.field("vision_config", "patch_size", default=16))
    return dict(vocab_size=f.field("vq_config", "num_embeddings"), image_embed_dim=f.field("vq_config", "embed_dim"),
                head_hidden=vq.get("projection_dim", dim), grid_size=patches)


def prompt_encoder(folder: str | Path, max_tokens: int | None = None) -> PromptEncoder:
    """The folder's tokenizer; errors as FolderError naming tokenizer.json."""
    try:
        return PromptEncoder.from_folder(folder, max_tokens=max_tokens)
    except PromptError as e:
        raise FolderError(str(e)) from None


def lm_reader(folder: str | Path, config: GPTConfig) -> KeyMappedReader:
    """The Transformer's tensors under lineray names; the understanding tower, its aligner, the text
    lm_head and the VQ model are skipped (counted in one log line), never read."""
    f = JanusFolder.open(folder)
    return KeyMappedReader(CheckpointReader(f.path), lm_key_map(f.layout, config.n_layer), skip=f.layout.lm_skip())


def vq_config(folder: str | Path) -> VQConfig:
    """The decoder's shape. transformers: its vq_config. deepseek: from the tensors, because the original
    builds the VQ model as `VQ_16()` and never passes gen_vision_config.params to it (modeling_vlm.py:204)."""
    f = JanusFolder.open(folder)
    if f.layout is TRANSFORMERS:
        d = VQConfig()  # transformers' JanusVQVAEConfig defaults are VQ-16's
        vq = f.section("vq_config")
        f.require(vq.get("out_channels", 3) == 3, f"vq_config.out_channels {vq.get('out_channels')} is not 3")
        return VQConfig(codebook_size=vq.get("num_embeddings", d.codebook_size),
                        codebook_embed_dim=vq.get("embed_dim", d.codebook_embed_dim),
                        z_channels=vq.get("latent_channels", d.z_channels), ch=vq.get("base_channels", d.ch),
                        ch_mult=tuple(vq.get("channel_multiplier", d.ch_mult)),
                        num_res_blocks=vq.get("num_res_blocks", d.num_res_blocks))
    reader = CheckpointReader(f.path)
    prefix = f.layout.vq
    shapes = {k[len(prefix):]: reader.shape(k) for k in reader.keys()
              if k.startswith(prefix) and k[len(prefix):].startswith(("decoder.", "quantize.embedding", "post_quant"))}
    try:
        return config_from_shapes(shapes)
    except ValueError as e:
        raise FolderError(f"{f.path}: the checkpoint's VQ model ({prefix}*) cannot be read: {e}") from None


def vq_reader(folder: str | Path, decoder: VQDecoder) -> KeyMappedReader:
    """`decoder`'s tensors under its own names; everything but the VQ decoder is skipped, counted."""
    f = JanusFolder.open(folder)
    keys = [t.key for t in checkpoint_tensors(decoder)]
    return KeyMappedReader(CheckpointReader(f.path), vq_key_map(f.layout, keys), skip=f.layout.vq_skip(),
                           purpose="image decoding")


def load_vq_decoder(folder: str | Path, chunk_size: int = 16) -> VQDecoder:
    """The folder's VQ decoder, sized from the folder and loaded (fp32, CPU; `to_device` moves it)."""
    decoder = VQDecoder(vq_config(folder), chunk_size=chunk_size)
    return decoder.load(vq_reader(folder, decoder)).eval()


def check_folder(folder: str | Path) -> JanusFolder:
    """config.json readable as Janus-Pro and a tokenizer.json with Janus's tokens: the checks a job runs up front."""
    f = JanusFolder.open(folder)
    prompt_encoder(f.path)
    return f
