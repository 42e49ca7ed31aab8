"""A tiny random Lumina-mGPT (a transformers ChameleonForConditionalGeneration, MODELS.md B5) written as
the two folder layouts lineray reads, plus a tiny tokenizer.json:

- `hf`: `save_pretrained` (one model.safetensors, q_norm/k_norm [heads, head_dim], the VQ encoder
  under model.vqmodel.*, architectures ChameleonForConditionalGeneration);
- `lumina`: the published layout (model-0000x-of-00002.safetensors + model.safetensors.index.json,
  q_norm/k_norm [1, head_dim] as Lumina's converter writes them, no vqmodel keys, architectures
  ChameleonXLLMXForConditionalGeneration). Same weights: the per-head norms are made equal across
  heads so that both layouts hold one model.

The image tokens' names are assigned to their ids in a shuffled order, so a code map built from an
offset (code = id - 4) instead of the names gives wrong codes.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

N_CODES = 16
IMAGE_START = 4
# code c is named by token id IMAGE_START + CODE_POSITION[c]
CODE_POSITION = [int(i) for i in torch.randperm(N_CODES, generator=torch.Generator().manual_seed(5))]
SPECIALS = ["<eoss>", "<racm3:break>", "<image>", "<reserved08706>", "<reserved08799>"] + \
           [f"<reserved{8800 + g:05d}>" for g in range(1, 7)]
WORDS = ["Generate", "an", "image", "of", "according", "to", "the", "following", "prompt", ":",
         "64x64", "96x64", "64x96", "128x64", "a", "red", "fox", "in", "snow", "blue", "cat", "sits", "on",
         "mat", "green", "tree", "under", "big", "sky", "small"]
VOCAB_SIZE = 96


def image_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary_map() -> dict[str, int]:
    names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for code in range(N_CODES):
        names[image_name(code)] = IMAGE_START + CODE_POSITION[code]
    for n in SPECIALS + WORDS:
        names[n] = len(names)
    assert len(names) <= VOCAB_SIZE
    return names


def chameleon_config(n_layer: int = 2):
    from transformers import ChameleonConfig
    return ChameleonConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, bos_token_id=0,
        eos_token_id=2, pad_token_id=1, vocabulary_map=vocabulary_map(),
        vq_config=dict(embed_dim=8, num_embeddings=N_CODES, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, resolution=32))


def tiny_chameleon(seed: int = 0, n_layer: int = 2):
    """Random weights N(0, 0.2) (logits far from flat, so greedy choices are clear); qk-norm weights
    around 1 with random biases, equal across heads (Lumina's layout holds one row for all heads)."""
    from transformers import ChameleonForConditionalGeneration
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(chameleon_config(n_layer)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vqmodel" in name:
                continue
            if "q_norm" in name or "k_norm" in name:
                row = torch.randn(p.size(-1), generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0)
                p.copy_(row.expand_as(p))
            elif "layernorm" in name or name.endswith("model.norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json (the `tokenizers` library) with the template's words and the special tokens."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    names = vocabulary_map()
    tok = Tokenizer(WordLevel(vocab=names, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False)
                            for n in ["<s>", "<pad>", "</s>", "<unk>"] + SPECIALS])
    tok.save(str(path))


@dataclass
class TinyLumina:
    hf: Path  # save_pretrained folder + tokenizer.json
    lumina: Path  # the published layout + tokenizer.json
    model: object  # the transformers model (eval, fp32)


def write_lumina_layout(model, folder: Path) -> None:
    """The weights as Lumina publishes them: two safetensors shards + index, qk-norm [1, head_dim]."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("model.vqmodel.")}
    for k in list(sd):
        if "q_norm" in k or "k_norm" in k:
            assert torch.equal(sd[k], sd[k][:1].expand_as(sd[k]))
            sd[k] = sd[k][:1].clone()
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": weight_map}))
    cfg = model.config.to_dict()
    cfg.update(architectures=["ChameleonXLLMXForConditionalGeneration"], model_type="chameleon",
               mask_image_logits=False, model_parallel_size=1, z_loss_weight=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))


def build_tiny_lumina(root: Path, seed: int = 0) -> TinyLumina:
    model = tiny_chameleon(seed)
    hf, lumina = root / "hf", root / "lumina"
    model.save_pretrained(hf)
    write_tokenizer(hf / "tokenizer.json")
    write_lumina_layout(model, lumina)
    shutil.copy(hf / "tokenizer.json", lumina / "tokenizer.json")
    return TinyLumina(hf, lumina, model)
