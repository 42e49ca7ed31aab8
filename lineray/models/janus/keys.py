"""Janus-Pro checkpoint key maps: lineray names (FAMILIES.md section 2, VQDecoder) <- the two layouts.

deepseek (the original, as published: `MultiModalityCausalLM`):
    language_model.model.*, language_model.lm_head, gen_embed, gen_aligner.layers.{0,2},
    gen_head.{output_mlp_projector,vision_head}, gen_vision_model.* (LlamaGen's VQ-16, same names
    as lineray's VQDecoder), vision_model.* + aligner.* (image understanding)
transformers (`JanusForConditionalGeneration.save_pretrained`):
    model.language_model.*, lm_head, model.generation_embeddings, model.generation_aligner.{fc1,
    hidden_layers.0}, model.generation_head.{proj_out,vision_head}, model.vqmodel.* (decoder.up.N.block.J,
    mid.block_1/attn_1/block_2), model.vision_model.* + model.aligner.*
(transformers' convert_janus_weights_to_hf.py MAPPINGS documents the correspondence.)

Each layout has two maps over the same files: the LM (the Transformer's tensors) and the VQ
decoder. Whatever the one does not use, the other may: both skip it by prefix, counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lineray.models.checkpoint import KeyMap


@dataclass(frozen=True)
class Layout:
    """Where one on-disk layout keeps each part of Janus-Pro (key prefixes)."""
    name: str
    lm: str  # prefix of the Llama body (embed_tokens, layers, norm)
    gen: dict[str, str]  # lineray module -> this layout's module, for the generation-side modules
    gen_roots: tuple[str, ...]  # the modules those live in
    vq: str  # prefix of the VQ model
    understanding: tuple[str, ...]  # image-understanding tower and its aligner
    lm_head: str  # the text head (the image path never uses it)

    def lm_skip(self) -> tuple[str, ...]:
        return (*self.understanding, self.lm_head, self.vq)

    def vq_skip(self) -> tuple[str, ...]:
        return (self.lm, *self.gen_roots, *self.understanding, self.lm_head,
                f"{self.vq}encoder.", f"{self.vq}quant_conv.", f"{self.vq}quantize.codebook_used")


DEEPSEEK = Layout(
    name="deepseek", lm="language_model.model.",
    gen={"image_embedding.table": "gen_embed", "image_embedding.fc1": "gen_aligner.layers.0",
         "image_embedding.fc2": "gen_aligner.layers.2", "output.fc1": "gen_head.output_mlp_projector",
         "output.fc2": "gen_head.vision_head"},
    gen_roots=("gen_embed.", "gen_aligner.", "gen_head."),
    vq="gen_vision_model.", understanding=("vision_model.", "aligner."), lm_head="language_model.lm_head.")

TRANSFORMERS = Layout(
    name="transformers", lm="model.language_model.",
    gen={"image_embedding.table": "model.generation_embeddings", "image_embedding.fc1": "model.generation_aligner.fc1",
         "image_embedding.fc2": "model.generation_aligner.hidden_layers.0",
         "output.fc1": "model.generation_head.proj_out", "output.fc2": "model.generation_head.vision_head"},
    gen_roots=("model.generation_embeddings.", "model.generation_aligner.", "model.generation_head."),
    vq="model.vqmodel.", understanding=("model.vision_model.", "model.aligner."), lm_head="lm_head.")

# Per transformer block: lineray name -> the Llama names (one, or several stacked along dim 0).
_BLOCK = {
    "attention.wqkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def lm_key_map(layout: Layout, n_layer: int) -> KeyMap:
    """The Janus Transformer's tensors (FAMILIES.md section 2) -> `layout`'s keys."""
    p = layout.lm
    key_map: KeyMap = {"prompt_embedding.weight": f"{p}embed_tokens.weight", "norm.weight": f"{p}norm.weight"}
    for i in range(n_layer):
        for ours, theirs in _BLOCK.items():
            key_map[f"layers.{i}.{ours}"] = ([f"{p}layers.{i}.{t}" for t in theirs] if isinstance(theirs, list)
                                             else f"{p}layers.{i}.{theirs}")
    for ours, theirs in layout.gen.items():
        for param in ("weight", "bias"):
            if ours != "image_embedding.table" or param == "weight":
                key_map[f"{ours}.{param}"] = f"{theirs}.{param}"
    return key_map


# lineray's VQDecoder keeps LlamaGen's names (= deepseek's, under gen_vision_model.); transformers renamed
# conv_blocks -> up, res -> block, mid.{0,1,2} -> mid.{block_1,attn_1,block_2}.
_TRANSFORMERS_VQ = [(re.compile(r"^decoder\.conv_blocks\.(\d+)\.res\."), r"decoder.up.\1.block."),
                    (re.compile(r"^decoder\.conv_blocks\."), "decoder.up."),
                    (re.compile(r"^decoder\.mid\.0\."), "decoder.mid.block_1."),
                    (re.compile(r"^decoder\.mid\.1\."), "decoder.mid.attn_1."),
                    (re.compile(r"^decoder\.mid\.2\."), "decoder.mid.block_2.")]


def vq_source_key(layout: Layout, key: str) -> str:
    """A VQDecoder key (e.g. decoder.conv_blocks.0.res.1.conv1.weight) -> `layout`'s key."""
    if layout is TRANSFORMERS:
        for pattern, repl in _TRANSFORMERS_VQ:
            key, n = pattern.subn(repl, key)
            if n:
                break
    return layout.vq + key


def vq_key_map(layout: Layout, decoder_keys: list[str]) -> KeyMap:
    """The VQDecoder's tensors (by their keys) -> `layout`'s keys."""
    return {k: vq_source_key(layout, k) for k in decoder_keys}
