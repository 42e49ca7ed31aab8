"""Janus-Pro checkpoint folders: both layouts and every file format load the same tensors into the
Janus Transformer, a TP rank reads only its slices, unused tensors are skipped and counted, and
bad folders fail in one line naming the file, field or key."""
import json
import logging
import shutil

import pytest
import torch

from janus_fixtures import BOS, CFG_PAD, RecordingReader, janus, write_tokenizer  # noqa: F401 (janus: fixture)
from lineray.models.checkpoint import CheckpointError, CheckpointReader, KeyMappedReader, load_checkpoint
from lineray.models.config import preset
from lineray.models.janus import folder as jfolder
from lineray.models.janus.keys import lm_key_map
from lineray.models.layers import TPGroup
from lineray.models.transformer import Transformer
from lineray.models.vq import VQConfig, VQDecoder, config_from_shapes

LAYOUTS = ["transformers", "transformers-shards", "bin", "bin-shards", "safetensors-shards"]


def folder_of(janus, layout):
    return {"transformers": janus.tf_dir, "transformers-shards": janus.tf_shards_dir}.get(layout) \
        or janus.deepseek_dirs[layout]


def expected_state(tf: dict) -> dict:
    """The Janus Transformer's state dict, built by hand from transformers' tensors (FAMILIES.md section 2)."""
    lm = "model.language_model."
    out = {"prompt_embedding.weight": tf[f"{lm}embed_tokens.weight"], "norm.weight": tf[f"{lm}norm.weight"],
           "image_embedding.table.weight": tf["model.generation_embeddings.weight"]}
    for ours, theirs in [("image_embedding.fc1", "model.generation_aligner.fc1"),
                         ("image_embedding.fc2", "model.generation_aligner.hidden_layers.0"),
                         ("output.fc1", "model.generation_head.proj_out"),
                         ("output.fc2", "model.generation_head.vision_head")]:
        out[f"{ours}.weight"], out[f"{ours}.bias"] = tf[f"{theirs}.weight"], tf[f"{theirs}.bias"]
    for i in range(2):
        p = f"{lm}layers.{i}."
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([tf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"layers.{i}.attention.wo.weight"] = tf[f"{p}self_attn.o_proj.weight"]
        for ours, theirs in [("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                             ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
                             ("ffn_norm", "post_attention_layernorm")]:
            out[f"layers.{i}.{ours}.weight"] = tf[f"{p}{theirs}.weight"]
    return out


def test_both_layouts_give_one_config(janus):
    configs = {layout: jfolder.read_config(folder_of(janus, layout)) for layout in LAYOUTS}
    cfg = configs["transformers"]
    assert all(c == cfg for c in configs.values())
    assert (cfg.family, cfg.model_type, cfg.rope, cfg.rope_style, cfg.norm_eps) == ("janus", "text", "1d", "half", 1e-6)
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.kv_heads, cfg.ffn_hidden) == (2, 64, 4, 4, 128)
    assert (cfg.vocab_size, cfg.text_vocab_size, cfg.image_embed_dim, cfg.head_hidden) == (32, 128, 8, 64)
    assert (cfg.grid_size, cfg.image_tokens, cfg.max_prefix_len) == (4, 16, 256 - 16)
    # ids from tokenizer.json: the full-width CFG pad, not the tokenizer's own (ASCII) pad 4
    assert (cfg.bos_token_id, cfg.cfg_pad_token_id) == (BOS, CFG_PAD)
    assert jfolder.read_config(janus.tf_dir, max_prefix_len=32).max_prefix_len == 32


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_tensors(janus, layout):
    d = folder_of(janus, layout)
    cfg = jfolder.read_config(d)
    model = Transformer(cfg)
    load_checkpoint(model, jfolder.lm_reader(d, cfg))
    got, want = model.state_dict(), expected_state(janus.tf_state)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# language_config as published: 7B gives only layers, vocab and max_pos (MODELS.md A1, A4), the rest is
# LlamaConfig's defaults; 1B as its converted transformers config lists it.
PUBLISHED_LM = {
    "janus-pro-7b": {"num_hidden_layers": 30},
    "janus-pro-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
                     "num_key_value_heads": 16, "num_hidden_layers": 24},
}


@pytest.mark.parametrize("name", PUBLISHED_LM)
def test_published_deepseek_configs_read_as_the_presets(tmp_path, name):
    p = preset(name)
    (tmp_path / "config.json").write_text(json.dumps({
        "language_config": {"max_position_embeddings": 16384, "model_type": "llama", "torch_dtype": "bfloat16",
                            "vocab_size": 102400, **PUBLISHED_LM[name]},
        "vision_config": {"cls": "CLIPVisionTower",
                          "params": {"image_size": 384, "model_name": "siglip_large_patch16_384"}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 8, "n_embed": p.dim,
                                                                 "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": p.dim, "image_token_size": 16384,
                                                             "n_embed": p.dim}}}))
    write_tokenizer(tmp_path)
    cfg = jfolder.read_config(tmp_path)
    for field in ("n_layer", "dim", "n_head", "kv_heads", "ffn_hidden", "head_hidden", "vocab_size", "text_vocab_size",
                  "image_embed_dim", "grid_size", "norm_eps", "rope", "rope_style", "max_prefix_len"):
        assert getattr(cfg, field) == getattr(p, field), field
    assert cfg.ffn_hidden == (11008 if name == "janus-pro-7b" else 5632) and cfg.image_tokens == 576


def test_vq16_shape_is_read_back_from_its_tensors():
    """deepseek folders size the decoder from the tensors (the original never passes gen_vision_config to it)."""
    for cfg in (VQConfig(), VQConfig(codebook_size=32, z_channels=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in VQDecoder(cfg).state_dict().items()}
        assert config_from_shapes(shapes) == cfg


@pytest.mark.parametrize("layout", ["transformers", "bin-shards"])
def test_a_tp_rank_reads_only_its_slices(janus, layout):
    d = folder_of(janus, layout)
    cfg = jfolder.read_config(d)
    rank = Transformer(cfg, TPGroup(rank=1, size=2))
    f = jfolder.JanusFolder.open(d)
    source = RecordingReader(CheckpointReader(d))
    load_checkpoint(rank, KeyMappedReader(source, lm_key_map(f.layout, cfg.n_layer), skip=f.layout.lm_skip()))
    reads = {}
    for key, rows, cols in source.calls:
        assert key not in reads, f"{key} read twice"
        reads[key] = (rows, cols)
    lm = "model.language_model." if layout == "transformers" else "language_model.model."
    head = "model.generation_head." if layout == "transformers" else "gen_head."
    fc1, fc2 = ("proj_out", "vision_head") if layout == "transformers" else ("output_mlp_projector", "vision_head")
    half = slice(32, 64)  # rank 1 of 2: heads 2-3 = rows 32..63 of q, k and v; FFN rows 64..127
    for x in "qkv":
        assert reads[f"{lm}layers.0.self_attn.{x}_proj.weight"] == (half, None)
    assert reads[f"{lm}layers.1.self_attn.o_proj.weight"] == (None, half)
    assert reads[f"{lm}layers.0.mlp.gate_proj.weight"] == (slice(64, 128), None)
    assert reads[f"{lm}layers.0.mlp.down_proj.weight"] == (None, slice(64, 128))
    assert reads[f"{head}{fc1}.weight"] == (half, None) and reads[f"{head}{fc1}.bias"][0] == half
    assert reads[f"{head}{fc2}.weight"] == (None, half)
    assert reads[f"{lm}embed_tokens.weight"] == (None, None)  # embeddings are replicated
    skipped = ("model.vision_model.", "model.aligner.", "model.vqmodel.", "lm_head.") if layout == "transformers" \
        else ("vision_model.", "aligner.", "gen_vision_model.", "language_model.lm_head.")
    assert not [k for k in reads if k.startswith(skipped)]
    tf = janus.tf_state
    q = tf["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(rank.layers[0].attention.wqkv.weight[:32], q[32:])
    assert torch.equal(rank.output.fc2.weight, tf["model.generation_head.vision_head.weight"][:, 32:])


def test_skipped_tensors_are_counted_in_one_line(janus, caplog):
    d = janus.deepseek_dirs["bin"]
    cfg = jfolder.read_config(d)
    with caplog.at_level(logging.INFO, logger="lineray.models.checkpoint"):
        reader = jfolder.lm_reader(d, cfg)
    state = janus.deepseek_state
    count = {p: sum(k.startswith(p + ".") for k in state)
             for p in ("vision_model", "aligner", "language_model.lm_head", "gen_vision_model")}
    assert count["vision_model"] > 10 and count["gen_vision_model"] > 100
    line = (f"skipped {sum(count.values())} tensors not used for image generation: "
            + ", ".join(f"{p} ({n})" for p, n in count.items()))
    assert [r.getMessage() for r in caplog.records] == [line]
    assert reader.skipped == count


def test_missing_and_unexpected_keys_are_named_with_their_file(janus, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(janus.deepseek_dirs["bin"], d)
    cfg = jfolder.read_config(d)
    state = dict(janus.deepseek_state)
    del state["language_model.model.layers.1.mlp.up_proj.weight"]
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"lacks tensors the model needs: layers\.1\.feed_forward\.w3\.weight "
                                              r"\(from language_model\.model\.layers\.1\.mlp\.up_proj\.weight\)"):
        jfolder.lm_reader(d, cfg)
    state = {**janus.deepseek_state, "gen_head.extra.weight": torch.zeros(2)}
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"does not know: gen_head\.extra\.weight \(in .*ds/pytorch_model\.bin\)"):
        jfolder.lm_reader(d, cfg)
    # the same for a shard: the message names the shard file
    d = tmp_path / "shards"
    shutil.copytree(janus.deepseek_dirs["safetensors-shards"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.layers.7.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.7\.mlp\.up_proj\.weight \(in .*model-00002-of-00002"):
        jfolder.lm_reader(d, cfg)


def test_bad_folders_fail_in_one_line_naming_the_file_or_field(janus, tmp_path):
    def fails(path, pattern):
        with pytest.raises(CheckpointError, match=pattern) as e:
            jfolder.read_config(path)
        assert "\n" not in str(e.value)

    fails(tmp_path / "nope", "checkpoint folder not found")
    d = tmp_path / "d"
    shutil.copytree(janus.deepseek_dirs["bin"], d)
    raw = json.loads((d / "config.json").read_text())
    (d / "tokenizer.json").unlink()
    fails(d, r"no tokenizer\.json")
    write_tokenizer(d)
    (d / "config.json").unlink()
    fails(d, r"no config\.json")
    (d / "config.json").write_text("{not json")
    fails(d, r"config\.json: not valid JSON")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fails(d, r"config\.json is not a Janus-Pro config")
    del raw["language_config"]["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(raw))
    fails(d, r"config\.json: missing field language_config\.num_hidden_layers")
    raw["language_config"]["num_hidden_layers"] = 2
    del raw["gen_head_config"]["params"]["image_token_embed"]
    (d / "config.json").write_text(json.dumps(raw))
    fails(d, r"missing field gen_head_config\.params\.image_token_embed")
    raw["gen_head_config"]["params"]["image_token_embed"] = 64
    raw["gen_aligner_config"]["params"]["n_embed"] = 32
    (d / "config.json").write_text(json.dumps(raw))
    fails(d, r"gen_aligner_config\.params\.n_embed 32 differs from the LM's hidden_size 64")
    raw["gen_aligner_config"]["params"]["n_embed"] = 64
    raw["language_config"]["num_key_value_heads"] = 3
    (d / "config.json").write_text(json.dumps(raw))
    fails(d, r"config\.json: n_head 4 is not a multiple of n_kv_head 3")
    raw["language_config"]["num_key_value_heads"] = 4
    raw["language_config"]["vocab_size"] = 3
    (d / "config.json").write_text(json.dumps(raw))
    fails(d, r"the begin-of-image id 5 of .*tokenizer\.json is outside the text vocabulary \(3\)")
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*pytorch_model\.bin"):
        jfolder.lm_reader(d, jfolder.read_config(janus.deepseek_dirs["bin"]))
