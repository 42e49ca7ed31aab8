"""The Janus-Pro test oracle (FAMILIES.md section 6), built once per session in seconds on CPU.

A tiny random transformers `JanusForConditionalGeneration` (MODELS.md A5), saved with
`save_pretrained`, plus a tiny tokenizer.json holding the template's words and Janus's special
tokens; the same weights in the original deepseek layout (key map: the inverse of transformers'
convert_janus_weights_to_hf.py) as one pytorch_model.bin, as .bin shards + index and as
safetensors shards + index. And what transformers generates from them: greedy image tokens and
every step's gen-head logits, at guidance 5 and 1, for two prompts of different lengths.

Use: `from janus_fixtures import janus  # noqa: F401` in a test module, then the `janus` fixture.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TEXT_VOCAB = 128
# Special tokens as the Janus-Pro tokenizer names them (ids here are the tiny model's, all < 128).
SPECIALS = ["<｜▁pad▁｜>",  # 0: the CFG pad (full-width bars), transformers' generation pad_token_id
            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",  # 1, 2: BOS, EOS
            "<image_placeholder>",  # 3: image_token_id (understanding)
            "<|▁pad▁|>",  # 4: the tokenizer's own pad (ASCII bars), NOT the CFG pad
            "<begin_of_image>", "<end_of_image>",  # 5, 6
            "<|User|>", "<|Assistant|>"]
WORDS = ["[UNK]", ":", "\n\n", ".", ",", "a", "an", "red", "fox", "in", "the", "snow", "cat", "on", "moon",
         "portrait", "of", "young", "girl", "masterpiece", "film", "grained", "best", "quality", "lighthouse",
         "at", "night", "with", "stars", "and", "waves"]
BOS, EOS, CFG_PAD, BOI = 1, 2, 0, 5
PROMPTS = ["a red fox in the snow",
           "a portrait of a young girl, masterpiece, film grained, best quality, a lighthouse at night"]
GUIDANCES = (5.0, 1.0)


@dataclass
class Oracle:
    """transformers' outputs for one prompt at one guidance scale."""
    ids: list[int]
    tokens: torch.Tensor  # [N] greedy image tokens
    logits: torch.Tensor  # [N, rows, V] gen-head logits per step: rows = (cond, uncond) with CFG, (cond,) without
    guided: torch.Tensor  # [N, V] the logits the token was taken from


@dataclass
class JanusFiles:
    tf_dir: Path  # transformers layout (save_pretrained: one model.safetensors)
    tf_shards_dir: Path  # the same, saved in 1 MB shards + model.safetensors.index.json
    deepseek_dirs: dict[str, Path]  # "bin", "bin-shards", "safetensors-shards" -> folder
    model: object  # the transformers model (eval)
    tf_state: dict[str, torch.Tensor]
    deepseek_state: dict[str, torch.Tensor]
    oracle: dict[tuple[int, float], Oracle] = field(default_factory=dict)  # (prompt index, guidance) -> outputs


def tiny_janus(seed: int = 0):
    """MODELS.md A5's config. Weights N(0, 0.2); RMSNorm/GroupNorm scales 1 + N(0, 0.2), because with
    scales near 0 the hidden states collapse and every image repeats one token (a weak oracle)."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration
    cfg = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=4),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                           patch_size=16, num_image_tokens=16, projection_dim=64, mlp_ratio=2),
        vq_config=dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=64, image_token_embed_dim=64),
        image_token_id=3)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") and p.dim() == 1 else noise)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=CFG_PAD,
                                               do_sample=False, guidance_scale=5.0,
                                               generation_kwargs={"boi_token_id": BOI})
    return model


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json (a WordLevel model; the template's words, a few prompt words, Janus's special
    tokens) and the tokenizer_config.json naming BOS, as a Janus-Pro folder has them."""
    from tokenizers import AddedToken, Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Sequence, Split
    from tokenizers.processors import TemplateProcessing
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    assert len(vocab) < TEXT_VOCAB
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Sequence([Split(Regex(r" +"), behavior="removed"),
                                  Split(Regex(r"\n+|[^\w\s]"), behavior="isolated")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    # like the real one, plain encode() adds BOS; the encoder must not add it twice
    tok.post_processor = TemplateProcessing(single=f"{SPECIALS[BOS]} $A", special_tokens=[(SPECIALS[BOS], BOS)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[BOS], "eos_token": SPECIALS[EOS], "pad_token": SPECIALS[4]}))


# transformers -> deepseek: the inverse of convert_janus_weights_to_hf.py's MAPPINGS (the understanding
# tower's inner names are left as they are: those tensors are only ever skipped).
_TO_DEEPSEEK = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.weight$", "language_model.lm_head.weight"),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
    (r"^model\.generation_aligner\.hidden_layers\.0\.", "gen_aligner.layers.2."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.vision_head\.", "gen_head.vision_head."),
    (r"^model\.aligner\.fc1\.", "aligner.layers.0."),
    (r"^model\.aligner\.hidden_layers\.0\.", "aligner.layers.2."),
    (r"^model\.vision_model\.", "vision_model.vision_tower."),
    (r"^model\.vqmodel\.", "gen_vision_model."),
    (r"^(gen_vision_model\.decoder)\.up\.", r"\1.conv_blocks."),
    (r"^(gen_vision_model\.encoder)\.down\.", r"\1.conv_blocks."),
    (r"^(gen_vision_model\..*)\.block\.(\d+)\.", r"\1.res.\2."),
    (r"^(gen_vision_model\..*)\.mid\.block_1\.", r"\1.mid.0."),
    (r"^(gen_vision_model\..*)\.mid\.attn_1\.", r"\1.mid.1."),
    (r"^(gen_vision_model\..*)\.mid\.block_2\.", r"\1.mid.2."),
]


def to_deepseek(tf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tf_state.items():
        for pattern, repl in _TO_DEEPSEEK:
            key = re.sub(pattern, repl, key)
        out[key] = value.detach().clone().contiguous()
    out["language_model.lm_head.weight"] = out["language_model.model.embed_tokens.weight"].clone()  # untied there
    out["gen_vision_model.quantize.codebook_used"] = torch.zeros(32)  # a buffer the original saves
    return out


def deepseek_config(tf_config) -> dict:
    """config.json as the original MultiModalityConfig writes it, for the tiny shapes."""
    t, vq = tf_config.text_config, tf_config.vq_config
    mlp = lambda n_in, n: {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": n_in, "n_embed": n,  # noqa: E731
                                                             "projector_type": "mlp_gelu"}}
    return {
        "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality", "torch_dtype": "float32",
        "language_config": {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                            "num_hidden_layers": t.num_hidden_layers, "vocab_size": t.vocab_size,
                            "max_position_embeddings": t.max_position_embeddings, "model_type": "llama",
                            "torch_dtype": "float32"},
        "vision_config": {"cls": "CLIPVisionTower", "params": {"image_size": tf_config.vision_config.image_size,
                                                               "model_name": "siglip_large_patch16_384",
                                                               "select_feature": "same", "select_layer": -1}},
        "aligner_config": mlp(tf_config.vision_config.hidden_size, t.hidden_size),
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": vq.num_embeddings,
                                                         "n_embed": vq.embed_dim}},
        "gen_aligner_config": mlp(vq.embed_dim, vq.projection_dim),
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": vq.projection_dim,
                                                             "image_token_size": vq.num_embeddings,
                                                             "n_embed": t.hidden_size}},
    }


def write_shards(folder: Path, state: dict[str, torch.Tensor], fmt: str) -> Path:
    """Two shards as transformers names them (keys alternate, so q/k/v of a layer span both) + the index;
    returns the index's path."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        names, index = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)], "model.safetensors.index.json"
    else:
        names, index = [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)], "pytorch_model.bin.index.json"
    shards: list[dict] = [{}, {}]
    for i, key in enumerate(sorted(state)):
        shards[i % 2][key] = state[key].contiguous().clone()
    for name, shard in zip(names, shards):
        save_file(shard, folder / name) if fmt == "safetensors" else torch.save(shard, folder / name)
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": {k: names[i] for i, s in enumerate(shards) for k in s}}))
    return folder / index


class RecordingReader:
    """A reader that remembers every (key, rows, cols) it was asked for."""

    def __init__(self, reader):
        self.inner, self.path, self.calls = reader, reader.path, []

    def keys(self):
        return self.inner.keys()

    def shape(self, key):
        return self.inner.shape(key)

    def read(self, key, rows=None, cols=None):
        self.calls.append((key, rows, cols))
        return self.inner.read(key, rows, cols)


@torch.no_grad()
def transformers_generate(model, ids: list[int], guidance: float) -> Oracle:
    """Greedy generation by hand with transformers' own modules: `model.model.language_model` with its
    cache, `generation_head`, CFG on [cond; uncond] rows (uncond = BOS, CFG pads, BOI, as transformers
    builds it), argmax, `prepare_embeddings_for_image_generation`. Returns every step's logits, which
    `generate` does not (its output_logits holds only the last hidden state). At guidance 1 transformers'
    generate fails (it still doubles the rows; observed in 5.24), so this loop is the oracle there; a test
    checks it gives generate's tokens at guidance 5 and at 1 + 1e-6."""
    from transformers import DynamicCache
    lm, head = model.model.language_model, model.model.generation_head
    row = torch.tensor([ids])
    rows = row
    if guidance > 1:
        uncond = row.masked_fill((row != BOS) & (row != BOI), CFG_PAD)
        rows = torch.cat([row, uncond])
    cache = DynamicCache(config=model.config.text_config)
    out = lm(inputs_embeds=lm.embed_tokens(rows), cache=cache, use_cache=True)
    n = model.model.vision_model.config.num_image_tokens
    tokens, logits, guided = [], [], []
    for _ in range(n):
        step = head(out.last_hidden_state[:, -1])
        g = step[1] + guidance * (step[0] - step[1]) if guidance > 1 else step[0]
        tok = g.argmax(-1)
        tokens.append(tok), logits.append(step), guided.append(g)
        emb = model.prepare_embeddings_for_image_generation(tok.repeat(len(rows)).unsqueeze(-1))
        out = lm(inputs_embeds=emb, cache=cache, use_cache=True)
    return Oracle(ids, torch.stack(tokens), torch.stack(logits), torch.stack(guided))


def prompt_ids(text: str) -> list[int]:
    """The template's ids built by hand from the tiny vocabulary (independent of lineray's encoder)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    words = re.findall(r"\w+|[^\w\s]", text)
    return [BOS, vocab["<|User|>"], vocab[":"], *(vocab.get(w, vocab["[UNK]"]) for w in words), vocab["\n\n"],
            vocab["<|Assistant|>"], vocab[":"], BOI]


_BUILT: list[JanusFiles] = []  # one build per process, whichever test module asks first


@pytest.fixture(scope="session")
def janus(tmp_path_factory) -> JanusFiles:
    # Each test module imports this fixture, which makes it a separate fixture per module for pytest:
    # the module-level cache keeps it one build per session without a conftest plugin.
    if not _BUILT:
        _BUILT.append(build(tmp_path_factory.mktemp("janus")))
    return _BUILT[0]


def build(root: Path) -> JanusFiles:
    torch.set_num_threads(1)
    model = tiny_janus()
    tf_dir = root / "transformers"
    model.save_pretrained(tf_dir)
    write_tokenizer(tf_dir)
    tf_shards_dir = root / "transformers-shards"
    model.save_pretrained(tf_shards_dir, max_shard_size="1MB")
    write_tokenizer(tf_shards_dir)
    tf_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ds_state = to_deepseek(tf_state)
    ds_config = json.dumps(deepseek_config(model.config), indent=2)
    dirs = {}
    for name in ("bin", "bin-shards", "safetensors-shards"):
        d = dirs[name] = root / f"deepseek-{name}"
        d.mkdir()
        (d / "config.json").write_text(ds_config)
        write_tokenizer(d)
        if name == "bin":
            torch.save(ds_state, d / "pytorch_model.bin")
        else:
            write_shards(d, ds_state, name.split("-")[0])
    files = JanusFiles(tf_dir, tf_shards_dir, dirs, model, tf_state, ds_state)
    for p, text in enumerate(PROMPTS):
        for g in GUIDANCES:
            files.oracle[p, g] = transformers_generate(model, prompt_ids(text), g)
    return files
