"""Reading a Lumina-mGPT checkpoint folder as published (Alpha-VLLM/Lumina-mGPT-7B-{512,768,1024}).

A folder holds `config.json` (a ChameleonConfig: `architectures` ChameleonXLLMXForConditionalGeneration,
the shapes, `vocabulary_map` with every token name, `vq_config`), the weights as
`model-0000x-of-00002.safetensors` + `model.safetensors.index.json` (or one file), and, in the 768
repository, `tokenizer.json`. Folders written by transformers' `ChameleonForConditionalGeneration.
save_pretrained` have the same keys plus the image tokenizer's encoder (`model.vqmodel.*`), which
generation does not use and which is skipped by name.

Weight names are HF Chameleon's (`model.layers.N.self_attn.q_proj.weight`, ...); KEY_MAP below puts
them onto lineray's names. q_norm/k_norm (per-head LayerNorm, weight and bias) are stored
[model_parallel_size, head_dim] by Lumina's converter (`reshape(1, -1)`, repeated over heads at run
time) and [heads, head_dim] by transformers: both load, repeated to lineray's [heads, head_dim].
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from lineray.models.config import GPTConfig, round_up
from lineray.models.checkpoint import CheckpointReader, KeyMap, KeyMappedReader, Source
from lineray.models.layers import TPGroup
from lineray.models.lumina.vocab import LuminaVocab
from lineray.models.tokenizer_file import TokenizerFileError, read_tokenizer

ARCHITECTURES = ("ChameleonXLLMXForConditionalGeneration", "ChameleonForConditionalGeneration")
SKIPPED_PREFIXES = ("model.vqmodel.",)  # the VQ encoder transformers keeps; never used for generation


class LuminaFolderError(ValueError):
    """A folder that is not a usable Lumina-mGPT / Chameleon checkpoint; the message names the file."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise LuminaFolderError(f"{path.name} not found in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LuminaFolderError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LuminaFolderError(f"{path}: expected a JSON object")
    return data


def read_hf_config(folder: str | os.PathLike) -> dict:
    """config.json, checked to be a Chameleon causal LM lineray can run."""
    path = Path(folder) / "config.json"
    cfg = read_json(path)
    arch = cfg.get("architectures") or []
    if not any(a in ARCHITECTURES for a in arch) and cfg.get("model_type") != "chameleon":
        raise LuminaFolderError(f"{path}: architectures {arch} is not a Chameleon / Lumina-mGPT model "
                                f"(expected one of {', '.join(ARCHITECTURES)})")
    if cfg.get("swin_norm"):
        raise LuminaFolderError(f"{path}: swin_norm true (the Chameleon-30B/34B block order) is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise LuminaFolderError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (Chameleon: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise LuminaFolderError(f"{path}: {key} true is not supported (Chameleon-7B has no biases)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in cfg]
    if missing:
        raise LuminaFolderError(f"{path}: missing {', '.join(missing)}")
    return cfg


def read_vocab(folder: str | os.PathLike, hf_config: dict | None = None) -> LuminaVocab:
    """The vocabulary from config.json's `vocabulary_map`, else from tokenizer.json."""
    folder = Path(folder)
    cfg = read_hf_config(folder) if hf_config is None else hf_config
    names = cfg.get("vocabulary_map")
    source = str(folder / "config.json") + " vocabulary_map"
    if not names:
        tok = folder / "tokenizer.json"
        if not tok.is_file():
            raise LuminaFolderError(f"{folder}: config.json has no vocabulary_map and there is no tokenizer.json")
        try:
            names, source = read_tokenizer(tok).get_vocab(with_added_tokens=True), str(tok)
        except TokenizerFileError as e:
            raise LuminaFolderError(str(e)) from None
    return LuminaVocab.from_names(names, cfg["vocab_size"], source=source)


def key_map(n_layer: int, n_head: int, n_kv_head: int | None = None) -> KeyMap:
    """lineray key -> HF Chameleon key (or keys concatenated along dim 0; qk-norms repeated over heads)."""
    m: KeyMap = {"prompt_embedding.weight": "model.embed_tokens.weight",
                                     "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    for i in range(n_layer):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        m[ours + "attention.wqkv.weight"] = [f"{theirs}self_attn.{p}_proj.weight" for p in "qkv"]
        m[ours + "attention.wo.weight"] = theirs + "self_attn.o_proj.weight"
        for norm, heads in (("q_norm", n_head), ("k_norm", n_kv_head or n_head)):
            for p in ("weight", "bias"):
                m[f"{ours}attention.{norm}.{p}"] = Source((f"{theirs}self_attn.{norm}.{p}",),
                                                          functools.partial(repeat_over_heads, heads=heads))
        m[ours + "feed_forward.w1.weight"] = theirs + "mlp.gate_proj.weight"
        m[ours + "feed_forward.w3.weight"] = theirs + "mlp.up_proj.weight"
        m[ours + "feed_forward.w2.weight"] = theirs + "mlp.down_proj.weight"
        m[ours + "attention_norm.weight"] = theirs + "input_layernorm.weight"
        m[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
    return m


def repeat_over_heads(value: torch.Tensor, heads: int) -> torch.Tensor:
    """A qk-norm parameter [groups, head_dim] (Lumina: groups = model_parallel_size = 1; transformers:
    groups = heads) -> [heads, head_dim], each group's row repeated for its heads (Lumina's
    ChameleonLayerNorm.repeat_param: repeat_interleave(heads // groups))."""
    groups = value.size(0)
    if value.dim() != 2 or heads % groups:
        raise LuminaFolderError(f"qk-norm parameter of shape {list(value.shape)} does not fit {heads} heads")
    return value.repeat_interleave(heads // groups, dim=0)


def open_weights(folder: str | os.PathLike, n_layer: int, n_head: int, n_kv_head: int | None = None) -> KeyMappedReader:
    """The folder's weights (one file, or shards + index) under lineray's names; a TP rank reading
    through it touches only its slices (the qk-norms, a few KB, are read whole)."""
    return KeyMappedReader(CheckpointReader(folder), key_map(n_layer, n_head, n_kv_head), skip=SKIPPED_PREFIXES)


def ffn_fields(dim: int, hidden: int) -> dict:
    """GPTConfig fields whose ffn_hidden is exactly `hidden` (config.json's intermediate_size)."""
    base = int(2 * 4 * dim / 3)
    if round_up(base, 256) == hidden:
        return dict(multiple_of=256, ffn_dim_multiplier=None)
    return dict(multiple_of=hidden, ffn_dim_multiplier=hidden / base)  # int(m * base) rounds up to hidden


def read_config(folder: str | os.PathLike, max_prefix_len: int | None = None,
                base: GPTConfig | None = None) -> GPTConfig:
    """The model config from config.json and its vocabulary's ids, on top of `base` (a lumina preset: the
    image size and prefix capacity; default lumina-mgpt-768). The folder-family interface of ModelSpec."""
    return read_folder(folder, base, max_prefix_len)[0]


def read_folder(folder: str | os.PathLike, base: GPTConfig | None = None,
                max_prefix_len: int | None = None) -> tuple[GPTConfig, LuminaVocab]:
    """(config, vocabulary) of a folder; see read_config."""
    from lineray.models.config import preset
    hf = read_hf_config(folder)
    rope = hf.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here; older configs at the top
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise LuminaFolderError(f"{Path(folder) / 'config.json'}: RoPE scaling {scaling} is not supported")
    vocab = read_vocab(folder, hf)
    base = base if base is not None else preset("lumina-mgpt-768")
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    cfg = replace(base, family="lumina", n_layer=int(hf["num_hidden_layers"]), dim=dim, n_head=heads,
                  n_kv_head=int(hf.get("num_key_value_heads") or heads), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                  rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                  text_vocab_size=vocab.vocab_size, image_token_range=(vocab.image_start, vocab.image_stop),
                  line_token_id=vocab.end_of_line, vocab_size=max(vocab.image_stop, vocab.end_of_line + 1),
                  bos_token_id=vocab.bos, max_prefix_len=max_prefix_len or base.max_prefix_len,
                  size_token_ids=size_token_ids(vocab, base.target_size), **ffn_fields(dim, int(hf["intermediate_size"])))
    return cfg, vocab


def size_token_ids(vocab: LuminaVocab, target_px: int) -> tuple[int, ...]:
    """Ids of the size tokens for 1, 2, ... x 32 px, up to the longest side of the target's crop sizes (as far as
    the vocabulary has them without a gap: a tiny test vocabulary holds a few)."""
    from lineray.models.lumina.sizes import longest_side
    ids = []
    for g in range(1, longest_side(target_px) + 1):
        if g not in vocab.size_ids:
            break
        ids.append(vocab.size_ids[g])
    return tuple(ids)


def lm_reader(folder: str | os.PathLike, config: GPTConfig) -> KeyMappedReader:
    """The folder-family interface of ModelSpec: the weights under lineray names (open_weights)."""
    return open_weights(folder, config.n_layer, config.n_head, config.kv_heads)


def prompt_encoder(folder: str | os.PathLike, max_tokens: int | None = None):
    """The folder-family interface of ModelSpec: tokenizer.json with Lumina's template."""
    from lineray.models.lumina.prompt import LuminaPromptEncoder
    return LuminaPromptEncoder.from_folder(folder, max_tokens)


def load_model(folder: str | os.PathLike, base: GPTConfig | None = None, tp: TPGroup = TPGroup(),
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **overrides):
    """(model, vocabulary) from a Lumina-mGPT / Chameleon folder; `overrides` replace config fields
    (e.g. grid_size, grid_w, max_prefix_len). A TP rank reads only its slices."""
    from lineray.models.checkpoint import load_checkpoint
    from lineray.models.transformer import Transformer
    cfg, vocab = read_folder(folder, base)
    cfg = replace(cfg, **overrides)
    with torch.device(device):
        model = Transformer(cfg, tp)
    load_checkpoint(model, open_weights(folder, cfg.n_layer, cfg.n_head, cfg.kv_heads))
    return model.to(dtype).eval(), vocab


VQGAN_FILES = ("vqgan.ckpt", "vqgan.yaml")


def load_vq_decoder(folder: str | os.PathLike, vqgan_dir: str | os.PathLike | None = None):
    """Chameleon's VQGAN (Meta's vqgan.ckpt + vqgan.yaml; the Hub folders do not carry it, LUM README:
    ckpts/chameleon/tokenizer/) behind the folder's vocabulary. Looked for in `vqgan_dir`, else in the
    model folder and its `vqgan/` or `tokenizer/` subfolder."""
    from lineray.models.lumina.model import LuminaImageDecoder
    from lineray.models.vqgan import VQGANDecoder
    folder = Path(folder)
    places = [Path(vqgan_dir)] if vqgan_dir is not None else [folder, folder / "vqgan", folder / "tokenizer"]
    for place in places:
        if all((place / f).is_file() for f in VQGAN_FILES):
            vqgan = VQGANDecoder.from_files(place / "vqgan.ckpt", place / "vqgan.yaml")
            return LuminaImageDecoder(vqgan, read_vocab(folder))
    raise LuminaFolderError(f"no Chameleon VQGAN ({' + '.join(VQGAN_FILES)}, Meta's image tokenizer) in "
                            f"{', '.join(map(str, places))}: Lumina-mGPT folders do not ship it; copy Meta's "
                            f"files there")
