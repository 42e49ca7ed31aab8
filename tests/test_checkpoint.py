"""Checkpoint loading: LlamaGen key layout, wrappers, safetensors, folders and shard indexes, key maps,
strictness, slices, VQ decoder."""
import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lineray.kernels.sampling import SamplingConfig
from lineray.models.checkpoint import CheckpointError, CheckpointReader, KeyMappedReader, Source, load_checkpoint
from lineray.models.generate import Condition, generate_tokens
from lineray.models.layers import TPGroup
from lineray.models.transformer import Transformer
from lineray.models.vq import VQConfig, VQDecoder
from conftest import tiny_model
from janus_fixtures import RecordingReader, write_shards


def logits_of(model):
    return generate_tokens(model, Condition.classes([3, 4]), [5, 6], sampling=SamplingConfig(cfg_scale=2.0),
                           return_logits=True).logits


def fresh(model):
    return Transformer(model.config).eval()


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", "bare", "ema", "safetensors", "prefixed"])
def test_llamagen_layout_roundtrip(tmp_path, wrap):
    src = tiny_model(8)
    sd = src.state_dict()
    assert "layers.1.attention.wqkv.weight" in sd and "cls_embedding.embedding_table.weight" in sd
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif wrap == "bare":
        torch.save(sd, path)
    elif wrap == "ema":
        torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "steps": 10}, path)
    elif wrap == "prefixed":  # DDP + torch.compile names, plus buffers LlamaGen may persist
        torch.save({"model": {**{f"module._orig_mod.{k}": v for k, v in sd.items()},
                              "freqs_cis": torch.zeros(3)}}, path)
    else:
        torch.save({wrap: sd, "optimizer": {"step": 3}}, path)
    dst = fresh(src)
    load_checkpoint(dst, path, ema=wrap == "ema")
    torch.testing.assert_close(logits_of(dst), logits_of(src), atol=0, rtol=0)


def write(tmp_path, sd):
    path = tmp_path / "bad.pt"
    torch.save({"model": sd}, path)
    return path


def test_missing_key_is_named(tmp_path):
    src = tiny_model(8)
    sd = src.state_dict()
    del sd["layers.1.feed_forward.w3.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.feed_forward\.w3\.weight"):
        load_checkpoint(fresh(src), write(tmp_path, sd))


def test_unexpected_key_is_named(tmp_path):
    src = tiny_model(8)
    sd = src.state_dict() | {"layers.9.attention.wqkv.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: layers\.9\.attention\.wqkv\.weight"):
        load_checkpoint(fresh(src), write(tmp_path, sd))


def test_wrong_shape_is_named(tmp_path):
    src = tiny_model(8)
    sd = src.state_dict()
    sd["norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"shape mismatch: norm\.weight \(checkpoint \[7\], model \[64\]\)"):
        load_checkpoint(fresh(src), write(tmp_path, sd))


def test_unreadable_paths_fail_in_one_line(tmp_path):
    model = tiny_model(8)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as e:
        load_checkpoint(model, junk)
    assert "\n" not in str(e.value)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(model, bad_st)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tiny_model(8), path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_rank_loads_only_its_slice(tmp_path, fmt):
    src = tiny_model(8)
    sd = src.state_dict()
    path = tmp_path / f"w.{fmt}"
    save_file(sd, path) if fmt == "safetensors" else torch.save({"model": sd}, path)
    shard = Transformer(src.config, TPGroup(rank=1, size=2))
    load_checkpoint(shard, path)
    d, hd = src.config.dim, src.config.head_dim
    half = d // 2
    wqkv = sd["layers.0.attention.wqkv.weight"]
    want = torch.cat([wqkv[half:d], wqkv[d + half:2 * d], wqkv[2 * d + half:]])
    assert torch.equal(shard.layers[0].attention.wqkv.weight, want)
    assert torch.equal(shard.layers[0].attention.wo.weight, sd["layers.0.attention.wo.weight"][:, half:])
    hidden = src.config.ffn_hidden
    assert torch.equal(shard.state_dict()["layers.0.feed_forward.w1.weight"], sd["layers.0.feed_forward.w1.weight"][hidden // 2:])
    assert torch.equal(shard.layers[0].feed_forward.w13.weight,  # gate and up slices stacked in one weight
                       torch.cat([sd[f"layers.0.feed_forward.{w}.weight"][hidden // 2:] for w in ("w1", "w3")]))
    assert torch.equal(shard.output.weight, sd["output.weight"][src.config.vocab_size // 2:])
    assert shard.local_heads == 2 and hd * 2 == half


def test_uneven_vocab_split_covers_every_row():
    tp = [TPGroup(rank=r, size=3) for r in range(3)]
    parts = [t.part(10) for t in tp]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 7), (7, 10)]


def test_reader_reads_slices_without_the_rest(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(12.0).view(4, 3)}, path)
    r = CheckpointReader(path)
    assert r.shape("a") == (4, 3)
    assert torch.equal(r.read("a", rows=slice(1, 3)), torch.tensor([[3.0, 4, 5], [6, 7, 8]]))
    assert torch.equal(r.read("a", cols=slice(2, 3)), torch.tensor([[2.0], [5], [8], [11]]))


SMALL_VQ = VQConfig(codebook_size=64, ch=32, z_channels=64)


def test_vq_decoder_published_layout_and_encoder_keys_skipped(tmp_path):
    torch.manual_seed(0)
    src = VQDecoder(SMALL_VQ).eval()
    sd = src.state_dict()
    for key in ["quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_in.weight",
                "decoder.mid.0.norm1.weight", "decoder.mid.1.q.weight", "decoder.conv_blocks.0.res.0.conv1.weight",
                "decoder.conv_blocks.0.attn.2.proj_out.weight", "decoder.conv_blocks.0.upsample.conv.weight",
                "decoder.conv_blocks.4.res.2.conv2.weight", "decoder.norm_out.weight", "decoder.conv_out.weight"]:
        assert key in sd, key
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd
    published = {**sd, "encoder.conv_in.weight": torch.zeros(1), "quant_conv.weight": torch.zeros(1),
                 "quantize.codebook_used": torch.zeros(65536)}
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": published}, path)
    dst = VQDecoder(SMALL_VQ).load(path).eval()
    codes = torch.randint(0, 64, (2, 4, 4))
    out = dst.decode_codes(codes)
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, src.decode_codes(codes))


def test_vq_decoder_default_is_vq16_shape():
    cfg = VQConfig()
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.z_channels, cfg.downsample) == (16384, 8, 256, 16)
    with torch.device("meta"):
        vq = VQDecoder(cfg)
    assert vq.decoder.conv_in.weight.shape == (512, 256, 3, 3)
    assert vq.image_size(24) == 384


# -- condition embeddings as LlamaGen writes them ------------------------------------------------
def test_t2i_checkpoint_with_a_short_condition_loads(tmp_path):
    """LlamaGen's uncond_embedding always has 120 rows; a model with 12 condition tokens uses the first 12."""
    src = tiny_model(4, model_type="t2i")  # cls_token_num 12, caption_dim 32
    sd = src.state_dict()
    null = torch.randn(120, 32, generator=torch.Generator().manual_seed(3))
    sd["cls_embedding.uncond_embedding"] = null
    path = tmp_path / "t2i.pt"
    torch.save({"model": sd}, path)
    dst = fresh(src)
    load_checkpoint(dst, path)
    cond = torch.randn(2, 12, 32)
    assert torch.equal(dst.null_condition(cond), null[:12].expand(2, 12, 32))
    # a checkpoint written by an older lineray (uncond_embedding sized by the condition) loads too
    sd["cls_embedding.uncond_embedding"] = null[:12].clone()
    torch.save({"model": sd}, path)
    load_checkpoint(dst := fresh(src), path)
    assert torch.equal(dst.null_condition(cond), null[:12].expand(2, 12, 32))


def test_c2i_checkpoint_without_a_null_class_loads_and_refuses_cfg(tmp_path):
    """class_dropout_prob=0 in LlamaGen: the table has num_classes rows and no null class."""
    src = tiny_model(4)
    sd = src.state_dict()
    sd["cls_embedding.embedding_table.weight"] = sd["cls_embedding.embedding_table.weight"][:10].clone()
    path = tmp_path / "c2i.pt"
    torch.save({"model": sd}, path)
    dst = fresh(src)
    load_checkpoint(dst, path)
    assert not dst.supports_cfg
    plain = SamplingConfig(cfg_scale=1.0)
    got = generate_tokens(dst, Condition.classes([3, 4]), [5, 6], sampling=plain).tokens
    assert torch.equal(got, generate_tokens(src, Condition.classes([3, 4]), [5, 6], sampling=plain).tokens)
    with pytest.raises(ValueError, match="no null-class row .*class_dropout_prob=0.*cfg_scale"):
        generate_tokens(dst, Condition.classes([3]), [5], sampling=SamplingConfig(cfg_scale=2.0))
    # a table of any other size is still a shape mismatch, named
    sd["cls_embedding.embedding_table.weight"] = torch.zeros(7, src.config.dim)
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"cls_embedding\.embedding_table\.weight \(checkpoint \[7, 64\]"):
        load_checkpoint(fresh(src), path)


# -- folders, shard indexes and key maps (FAMILIES.md section 3) ---------------------------------
@pytest.mark.parametrize("layout", ["pytorch_model.bin", "model.safetensors", "bin-shards", "safetensors-shards"])
def test_folders_and_indexes_load(tmp_path, layout):
    src = tiny_model(8)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if layout == "pytorch_model.bin":
        torch.save(sd, folder / layout)
    elif layout == "model.safetensors":
        save_file(sd, folder / layout)
    else:
        index = write_shards(folder, sd, layout.split("-")[0])
        load_checkpoint(dst := fresh(src), index)  # the index file itself opens too
        torch.testing.assert_close(logits_of(dst), logits_of(src), atol=0, rtol=0)
    dst = fresh(src)
    load_checkpoint(dst, folder)
    torch.testing.assert_close(logits_of(dst), logits_of(src), atol=0, rtol=0)


def test_a_shard_is_opened_only_when_one_of_its_tensors_is_read(tmp_path):
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2), "c": torch.zeros(3)}
    write_shards(tmp_path, sd, "bin")
    r = CheckpointReader(tmp_path)
    assert sorted(r.keys()) == ["a", "b", "c"] and r._shards == {}
    assert torch.equal(r.read("a", rows=slice(1, 2)), torch.tensor([[3.0, 4, 5]]))
    assert list(r._shards) == ["pytorch_model-00001-of-00002.bin"]
    assert r.file_of("b") == tmp_path / "pytorch_model-00002-of-00002.bin"


def test_folder_and_index_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*expected one of model\.safetensors\.index\.json"):
        CheckpointReader(tmp_path)
    index = write_shards(tmp_path / "s", {"a": torch.ones(2), "b": torch.ones(2)}, "safetensors")
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard files that are not in .*: model-00002-of-00002"):
        CheckpointReader(index)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint index .*weight_map"):
        CheckpointReader(tmp_path / "bad")


def test_key_map_concatenates_and_reads_only_the_needed_rows(tmp_path, caplog):
    q, k, v = (torch.randn(4, 3) for _ in range(3))
    sd = {"m.q": q, "m.k": k, "m.v": v, "m.norm": torch.randn(1, 3), "tower.w": torch.ones(5),
          "tower.b": torch.ones(5), "head.w": torch.ones(2)}
    write_shards(tmp_path, sd, "safetensors")
    src = RecordingReader(CheckpointReader(tmp_path))
    key_map = {"wqkv": ["m.q", "m.k", "m.v"],
               "qn": Source(("m.norm",), transform=lambda t: t.repeat(2, 1))}
    with caplog.at_level(logging.INFO, logger="lineray.models.checkpoint"):
        r = KeyMappedReader(src, key_map, skip=("tower.", "head."))
    assert "skipped 3 tensors not used for image generation: tower (2), head (1)" in caplog.text
    assert r.shape("wqkv") == (12, 3) and r.shape("qn") == (2, 3)
    assert torch.equal(r.read("wqkv"), torch.cat([q, k, v]))
    assert torch.equal(r.read("qn"), sd["m.norm"].repeat(2, 1))
    src.calls.clear()
    assert torch.equal(r.read("wqkv", rows=slice(2, 6), cols=slice(1, 3)), torch.cat([q, k])[2:6, 1:3])
    assert src.calls == [("m.q", slice(2, 4), slice(1, 3)), ("m.k", slice(0, 2), slice(1, 3))]
    assert not any(key.startswith(("tower", "head")) for key, *_ in src.calls)


def test_key_map_names_missing_and_unexpected_keys_with_their_file(tmp_path):
    write_shards(tmp_path, {"m.q": torch.ones(2), "m.k": torch.ones(2), "extra.w": torch.ones(1)}, "bin")
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match=r"lacks tensors the model needs: wqkv \(from m\.v\)"):
        KeyMappedReader(reader, {"wqkv": ["m.q", "m.k", "m.v"]}, skip=("extra.",))
    with pytest.raises(CheckpointError, match=r"does not know: extra\.w \(in .*pytorch_model-0000[12]-of-00002\.bin\)"):
        KeyMappedReader(reader, {"wqkv": ["m.q", "m.k"]})


def test_bf16_shards_load_into_an_fp32_model(tmp_path):
    """Published Janus-Pro weights are bf16 pickles: they load cast to the model's dtype."""
    src = tiny_model(8)
    sd = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    write_shards(tmp_path, sd, "bin")
    dst = fresh(src)
    load_checkpoint(dst, tmp_path)
    got = dst.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float()) for k, v in sd.items())
